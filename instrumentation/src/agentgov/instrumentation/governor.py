"""The agent side of the governor: ask before every delegation and tool call, and listen
for the session's stop.

Light on purpose: the standard library's ``http.client`` with one keep-alive connection
per thread, and one server-sent-events listener thread per session and process.

Fail closed: the agent goes ahead only on an answer that is exactly ``allow``. Anything
else the governor (or something pretending to be it) sends back, a malformed body, an
unknown outcome, a non-JSON page, becomes :class:`Stopped` with a reason, within one
``timeout`` however the connection misbehaves.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from agentgov.instrumentation.lineage_token import HEADER as TOKEN_HEADER

log = logging.getLogger(__name__)

ALLOW, STOP, APPROVAL_REQUIRED = "allow", "stop", "approval_required"
OUTCOMES = frozenset({ALLOW, STOP, APPROVAL_REQUIRED})


class Stopped(RuntimeError):
    """The governor said stop. ``reason`` is one of the documented stop reasons."""

    def __init__(self, reason: str, phase: str, owner: str = "", detail: str = "") -> None:
        text = f"{phase} stopped by the governor: {reason}"
        if owner:
            text += f" (owner: {owner})"
        if detail:
            text += f" - {detail}"
        super().__init__(text)
        self.reason = reason
        self.phase = phase
        self.owner = owner
        self.detail = detail


class SessionKilled(Stopped):
    """The whole session was stopped; no agent of it may take another step."""

    def __init__(self, session_id: str, actor: str = "", why: str = "") -> None:
        super().__init__(
            "session_killed",
            "session",
            detail=f"{session_id} killed by {actor or '?'}" + (f": {why}" if why else ""),
        )
        self.session_id = session_id


class GovernorUnavailable(Stopped):
    """The governor could not be reached, refused the request, or answered nonsense; the
    client fails closed (``governor_unreachable``, ``governor_refused``,
    ``governor_invalid_answer``)."""


@dataclass(frozen=True)
class Decision:
    """A governor's answer, as it travels on the wire (both sides use this type)."""

    outcome: str
    reason: str = ""
    owner: str = ""
    approval_id: str = ""
    risk: int | None = None
    shadow: dict[str, str] | None = None
    #: with ``session_killed``: who stopped the session and why ({actor, reason})
    killed: dict[str, str] | None = None
    #: an allowed delegation: the new agent's signed lineage token. Any other answer: a
    #: renewed token for the caller, when its own is past half its life.
    lineage_token: str = ""
    #: what the governor says about the stop, e.g. which tool is not on the allowlist
    detail: str = ""

    @classmethod
    def from_json(cls, data: Any) -> Decision:
        """Read an answer strictly: anything but a known outcome is an invalid answer."""
        if not isinstance(data, dict):
            raise GovernorUnavailable(
                "governor_invalid_answer", "request", detail="the answer is not a JSON object"
            )
        outcome = data.get("outcome")
        if outcome not in OUTCOMES:
            raise GovernorUnavailable(
                "governor_invalid_answer",
                "request",
                detail=f"unknown outcome {str(outcome)[:40]!r}",
            )
        risk = data.get("risk")
        return cls(
            outcome=str(outcome),
            reason=_text(data.get("reason")),
            owner=_text(data.get("owner")),
            approval_id=_text(data.get("approval_id")),
            risk=risk if isinstance(risk, int) and not isinstance(risk, bool) else None,
            shadow=data.get("shadow") if isinstance(data.get("shadow"), dict) else None,
            killed=data.get("killed") if isinstance(data.get("killed"), dict) else None,
            lineage_token=_text(data.get("lineage_token"), 16 << 10),
            detail=_text(data.get("detail"), 2000),
        )

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"outcome": self.outcome, "reason": self.reason or None}
        if self.owner:
            out["owner"] = self.owner
        if self.approval_id:
            out["approval_id"] = self.approval_id
        if self.risk is not None:
            out["risk"] = self.risk
        if self.shadow is not None:
            out["shadow"] = self.shadow
        if self.killed is not None:
            out["killed"] = self.killed
        if self.lineage_token:
            out["lineage_token"] = self.lineage_token
        if self.detail:
            out["detail"] = self.detail
        return out


def _text(value: Any, limit: int = 512) -> str:
    return value[:limit] if isinstance(value, str) else ""


class _SessionWatch:
    """Listens to one session's control events on a daemon thread."""

    def __init__(self, client: GovernorClient, session_id: str) -> None:
        self.client = client
        self.session_id = session_id
        self.killed: dict[str, Any] | None = None
        self.ready = threading.Event()
        self.changed = threading.Condition()
        self.closed = False
        self._conn: http.client.HTTPConnection | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"agentgov-events-{session_id[:24]}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                self._listen()
                backoff = 0.05
            except Exception as exc:
                log.debug("control events of %s: %s; reconnecting", self.session_id, exc)
            if self.killed is not None or self.closed:
                self.ready.set()
                return  # a kill is final; nothing more to hear
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def close(self) -> None:
        self.closed = True
        conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(2)  # wakes the blocked read
            except OSError:
                pass

    def _listen(self) -> None:
        conn = self._conn = self.client._new_connection(timeout=None)
        path = f"/api/v1/sessions/{quote(self.session_id, safe='')}/events"
        token = self.client.session_token(self.session_id)
        conn.request(
            "GET", self.client._base + path, headers=self.client._headers(sse=True, token=token)
        )
        resp = conn.getresponse()
        if resp.status in (401, 403):
            self.ready.set()  # nothing to wait for: agents still see a kill at their steps
            if not token and resp.status == 403:
                # the governor wants a lineage token of the session, which this process
                # gets with its first agent's start: listen again once there is one
                raise RuntimeError("refused until an agent of this process holds a token")
            # a refused key or token will not start working by retrying: say why, stop
            self.closed = True
            log.error(
                "control events of %s refused: %s %r; kills will only be seen at governed steps",
                self.session_id,
                resp.status,
                resp.read(300),
            )
            return
        if resp.status != 200:
            self.ready.set()
            raise RuntimeError(f"{resp.status} {resp.read(500)!r}")
        kind = ""
        try:
            while True:
                line = resp.fp.readline(1 << 20)
                if not line:
                    return
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if text.startswith("event:"):
                    kind = text[6:].strip()
                elif text.startswith("data:"):
                    try:
                        data = json.loads(text[5:].strip())
                    except ValueError:
                        continue
                    if isinstance(data, dict):
                        self._on_event(kind, data)
                    if self.killed is not None:
                        return
        finally:
            conn.close()

    def _on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "state":
            if data.get("status") == "killed":
                self.killed = {"actor": data.get("killed_by"), "reason": data.get("kill_reason")}
            self.ready.set()
        elif kind == "kill":
            self.killed = data
            self.ready.set()
            self.client._acknowledge_kill(self.session_id)
            for hook in list(self.client.on_kill):
                try:
                    hook(self.session_id, data)
                except Exception:
                    log.exception("kill hook failed")
        with self.changed:
            self.changed.notify_all()


class GovernorClient:
    """Talks to the collector's governor for one agent process.

    ``mode``: ``enforce`` raises :class:`Stopped` on stop; ``observe`` asks and records but
    never blocks. ``fail_closed``: when the governor cannot be reached, raise (default) or
    carry on; a governor that answered (a refusal, an invalid answer) is never treated as
    unreachable. ``timeout`` bounds each request as a whole, retries included. ``url`` and
    ``api_key`` default to ``AGENTGOV_URL`` and ``AGENTGOV_API_KEY``.
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        mode: str = "enforce",
        timeout: float = 5.0,
        approval_timeout: float = 300.0,
        fail_closed: bool = True,
    ) -> None:
        if mode not in ("enforce", "observe"):
            raise ValueError("mode must be 'enforce' or 'observe'")
        raw = url or os.environ.get("AGENTGOV_URL") or "http://127.0.0.1:4318"
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"governor URL {raw!r} must look like http://host:port")
        self.url = raw.rstrip("/")
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._base = parts.path.rstrip("/")
        self._key = api_key or os.environ.get("AGENTGOV_API_KEY") or ""
        self.mode = mode
        self.timeout = timeout
        self.approval_timeout = approval_timeout
        self.fail_closed = fail_closed
        self._local = threading.local()
        self._watches: dict[str, _SessionWatch] = {}
        self._watch_lock = threading.Lock()
        #: session -> agent id -> the token cell of each agent of this process still running
        self._running: dict[str, dict[str, Any]] = {}
        #: session -> a token cell of one of its agents, for the session's event stream
        self._known: dict[str, Any] = {}
        #: called with (session_id, kill event) when a watched session is killed
        self.on_kill: list[Callable[[str, dict[str, Any]], None]] = []

    # -- transport -------------------------------------------------------------------------

    def _new_connection(self, timeout: float | None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=timeout)

    def _headers(self, sse: bool = False, token: str = "") -> dict[str, str]:
        headers = {"Accept": "text/event-stream" if sse else "application/json"}
        if not sse:
            headers["Content-Type"] = "application/json"
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        if token:
            headers[TOKEN_HEADER] = token
        return headers

    def _post(self, path: str, body: dict[str, Any], token: str = "") -> Any:
        """POST ``body``; the parsed JSON answer. One deadline covers every attempt."""
        payload = json.dumps(body, separators=(",", ":")).encode()
        deadline = time.monotonic() + self.timeout
        last: Exception | None = None
        for attempt in range(2):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            conn = getattr(self._local, "conn", None)
            fresh = conn is None
            if conn is None:
                conn = self._local.conn = self._new_connection(left)
            try:
                if conn.sock is not None:
                    conn.sock.settimeout(left)
                else:
                    conn.timeout = left
                conn.request(
                    "POST", self._base + path, body=payload, headers=self._headers(token=token)
                )
                resp = conn.getresponse()
                data = resp.read(1 << 20)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._local.conn = None
                last = exc
                # only a kept-alive connection that the server had closed is worth a second
                # try; a fresh connection that failed or timed out means the governor is down
                if fresh or isinstance(exc, TimeoutError) or attempt:
                    break
                continue
            if resp.status >= 400:
                raise GovernorUnavailable(
                    "governor_refused", "request", detail=f"{resp.status}: {_error_text(data)}"
                )
            try:
                return json.loads(data)
            except ValueError:
                raise GovernorUnavailable(
                    "governor_invalid_answer",
                    "request",
                    detail=f"{resp.status} with a body that is not JSON: {data[:80]!r}",
                ) from None
        raise GovernorUnavailable("governor_unreachable", "request", detail=f"{self.url}: {last}")

    def _decide(self, path: str, body: dict[str, Any], token: str = "") -> Decision:
        try:
            return Decision.from_json(self._post(path, body, token))
        except GovernorUnavailable as exc:
            # fail-open covers a governor that cannot be reached, never one that refused
            # the request or answered something that is not a decision
            if self.fail_closed or exc.reason != "governor_unreachable":
                raise
            log.warning("governor unavailable; carrying on (fail_closed=False)")
            return Decision(ALLOW, "governor_unavailable")

    # -- sessions --------------------------------------------------------------------------

    def watch(self, session_id: str, wait: float | None = None) -> None:
        """Listen to a session's control events (once per process); wait for its state."""
        with self._watch_lock:
            w = self._watches.get(session_id)
            if w is None:
                w = self._watches[session_id] = _SessionWatch(self, session_id)
        w.ready.wait(self.timeout if wait is None else wait)

    def close(self) -> None:
        """Stop listening to every session (listener threads end)."""
        with self._watch_lock:
            watches = list(self._watches.values())
        for w in watches:
            w.close()

    def killed(self, session_id: str) -> dict[str, Any] | None:
        w = self._watches.get(session_id)
        return w.killed if w is not None else None

    def check(self, session_id: str) -> None:
        """Raise :class:`SessionKilled` if the session was stopped (a local, instant check)."""
        info = self.killed(session_id)
        if info is not None and self.mode == "enforce":
            raise SessionKilled(
                session_id, str(info.get("actor") or ""), str(info.get("reason") or "")
            )

    def running(self, session_id: str, agent_id: str, token: Any) -> None:
        """Note an agent of this process as running (``token``: its lineage token cell), so
        that a kill of its session is acknowledged for it."""
        with self._watch_lock:
            self._running.setdefault(session_id, {})[agent_id] = token

    def finished(self, session_id: str, agent_id: str) -> None:
        with self._watch_lock:
            agents = self._running.get(session_id)
            if agents is not None:
                agents.pop(agent_id, None)
                if not agents:
                    del self._running[session_id]

    def session_token(self, session_id: str) -> str:
        """A token of one of this process's agents in the session (for its event stream)."""
        with self._watch_lock:
            cells = [*self._running.get(session_id, {}).values(), self._known.get(session_id)]
        return next((c.value for c in cells if getattr(c, "value", "")), "")

    def remember(self, session_id: str, token: Any) -> None:
        """Keep a token cell of the session for its event stream (before any agent runs)."""
        with self._watch_lock:
            self._known.setdefault(session_id, token)

    def _acknowledge_kill(self, session_id: str) -> None:
        """Tell the governor which of this process's agents stopped (runs on the listener
        thread, so the agents' own threads are not held up)."""
        with self._watch_lock:
            agents = dict(self._running.get(session_id, {}))
        for agent_id, cell in agents.items():
            try:
                self._post(
                    f"/api/v1/sessions/{quote(session_id, safe='')}/stopped",
                    {"session_id": session_id, "agent_id": agent_id},
                    getattr(cell, "value", ""),
                )
            except Stopped as exc:
                log.debug("kill acknowledgement for %s not delivered: %s", agent_id, exc)

    # -- decisions -------------------------------------------------------------------------

    def _settle(
        self, path: str, body: dict[str, Any], phase: str, session_id: str, token: str
    ) -> Decision:
        decision = self._decide(path, body, token)
        if decision.outcome == APPROVAL_REQUIRED and self.mode == "enforce":
            decision = self._await_approval(path, body, decision, session_id, token)
        if decision.outcome == STOP and self.mode == "enforce":
            if decision.reason == "session_killed":
                self.watch(session_id, wait=0)
                # the answer says who stopped the session: the kill event may still be on
                # its way to this process
                by = decision.killed or self.killed(session_id) or {}
                raise SessionKilled(
                    session_id, str(by.get("actor") or ""), str(by.get("reason") or "")
                )
            raise Stopped(decision.reason or "stopped", phase, decision.owner, decision.detail)
        return decision

    def _await_approval(
        self, path: str, body: dict[str, Any], decision: Decision, session_id: str, token: str
    ) -> Decision:
        """Ask again with the approval id until a reviewer decides, the TTL passes or the
        session is killed; woken early by the session's control events."""
        self.watch(session_id)
        watch = self._watches[session_id]
        again = {**body, "approval_id": decision.approval_id}
        deadline = time.monotonic() + self.approval_timeout
        while decision.outcome == APPROVAL_REQUIRED:
            self.check(session_id)
            left = deadline - time.monotonic()
            if left <= 0:
                raise Stopped(
                    "approval_timeout",
                    "approval",
                    detail=f"no decision on {decision.approval_id} in time",
                )
            with watch.changed:
                watch.changed.wait(min(left, 0.5))
            decision = self._decide(path, again, token)
        return decision

    def handoff(
        self,
        session_id: str,
        from_agent: str,
        to_agent: str,
        task: str = "",
        permissions: list[str] | None = None,
        estimated_usd: float = 0.0,
        to_role: str = "",
        depth: int | None = None,
        token: str = "",
    ) -> Decision:
        """Ask to start ``to_agent``: delegated by the holder of ``token`` (the delegating
        agent's lineage token), or as the root of a new session without one. An allowed
        answer carries the new agent's own token."""
        self.check(session_id)
        body: dict[str, Any] = {
            "session_id": session_id,
            "from_agent": from_agent,
            "to_agent": to_agent,
            "task": task,
            "permissions": permissions,
            "estimated_usd": estimated_usd,
            "to_role": to_role,
        }
        del depth  # the governor takes depth from lineage, never from the caller
        return self._settle("/api/v1/decisions/handoff", body, "delegation", session_id, token)

    def tool(
        self,
        session_id: str,
        agent_id: str,
        tool: str,
        command: str = "",
        resources: list[str] | None = None,
        token: str = "",
    ) -> Decision:
        self.check(session_id)
        body = {
            "session_id": session_id,
            "agent_id": agent_id,
            "tool": tool,
            "command": command,
            "resources": list(resources or []),
        }
        return self._settle("/api/v1/decisions/tool", body, "tool call", session_id, token)

    def usage(
        self,
        session_id: str,
        agent_id: str,
        usd: float = 0.0,
        tool_calls: int = 0,
        finished: bool = False,
        token: str = "",
    ) -> Decision:
        body = {
            "session_id": session_id,
            "agent_id": agent_id,
            "usd": usd,
            "tool_calls": tool_calls,
            "finished": finished,
        }
        decision = self._decide("/api/v1/usage", body, token)
        if decision.outcome == STOP and self.mode == "enforce" and not finished:
            raise Stopped(decision.reason or "stopped", "usage", detail=decision.detail)
        return decision


def _error_text(data: bytes) -> str:
    try:
        parsed = json.loads(data)
    except ValueError:
        return data[:300].decode(errors="replace")
    if isinstance(parsed, dict):
        return str(parsed.get("error") or parsed.get("message") or parsed)[:300]
    return str(parsed)[:300]
