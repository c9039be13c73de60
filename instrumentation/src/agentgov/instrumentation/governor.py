"""The agent side of the governor: ask before every delegation and tool call, and listen
for the session's stop.

Light on purpose: the standard library's ``http.client`` with one keep-alive connection
per thread, and one server-sent-events listener thread per session and process.
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

log = logging.getLogger(__name__)


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
    """The governor could not be reached and the client fails closed."""


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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Decision:
        return cls(
            outcome=str(data.get("outcome", "stop")),
            reason=str(data.get("reason") or ""),
            owner=str(data.get("owner") or ""),
            approval_id=str(data.get("approval_id") or ""),
            risk=data.get("risk"),
            shadow=data.get("shadow"),
            killed=data.get("killed"),
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
        return out


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
        conn.request("GET", self.client._base + path, headers=self.client._headers(sse=True))
        resp = conn.getresponse()
        if resp.status in (401, 403):
            # a refused key will not start working by retrying: stop listening, say why
            self.closed = True
            self.ready.set()
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
                line = resp.fp.readline()
                if not line:
                    return
                text = line.decode("utf-8").rstrip("\r\n")
                if text.startswith("event:"):
                    kind = text[6:].strip()
                elif text.startswith("data:"):
                    self._on_event(kind, json.loads(text[5:].strip()))
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
    carry on. ``url`` and ``api_key`` default to ``AGENTGOV_URL`` and ``AGENTGOV_API_KEY``.
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
        #: called with (session_id, kill event) when a watched session is killed
        self.on_kill: list[Callable[[str, dict[str, Any]], None]] = []

    # -- transport -------------------------------------------------------------------------

    def _new_connection(self, timeout: float | None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=timeout)

    def _headers(self, sse: bool = False) -> dict[str, str]:
        headers = {"Accept": "text/event-stream" if sse else "application/json"}
        if not sse:
            headers["Content-Type"] = "application/json"
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        payload = json.dumps(body, separators=(",", ":")).encode()
        last: Exception | None = None
        for _ in range(2):  # one retry on a fresh connection (keep-alive may have closed)
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = self._new_connection(self.timeout)
            try:
                conn.request("POST", self._base + path, body=payload, headers=self._headers())
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._local.conn = None
                last = exc
                continue
            if resp.status >= 400:
                try:
                    message = json.loads(data).get("error", data.decode(errors="replace"))
                except ValueError:
                    message = data.decode(errors="replace")
                raise GovernorUnavailable(
                    "governor_refused", "request", detail=f"{resp.status}: {message}"
                )
            return dict(json.loads(data))
        raise GovernorUnavailable("governor_unreachable", "request", detail=f"{self.url}: {last}")

    def _decide(self, path: str, body: dict[str, Any]) -> Decision:
        try:
            return Decision.from_json(self._post(path, body))
        except GovernorUnavailable as exc:
            # fail-open covers a governor that cannot be reached, never one that refused
            # the request (a wrong key or a bad request is not an outage)
            if self.fail_closed or exc.reason != "governor_unreachable":
                raise
            log.warning("governor unavailable; carrying on (fail_closed=False)")
            return Decision("allow", "governor_unavailable")

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

    # -- decisions -------------------------------------------------------------------------

    def _settle(self, path: str, body: dict[str, Any], phase: str, session_id: str) -> Decision:
        decision = self._decide(path, body)
        if decision.outcome == "approval_required" and self.mode == "enforce":
            decision = self._await_approval(path, body, decision, session_id)
        if decision.outcome == "stop" and self.mode == "enforce":
            if decision.reason == "session_killed":
                self.watch(session_id, wait=0)
                # the answer says who stopped the session: the kill event may still be on
                # its way to this process
                by = decision.killed or self.killed(session_id) or {}
                raise SessionKilled(
                    session_id, str(by.get("actor") or ""), str(by.get("reason") or "")
                )
            raise Stopped(decision.reason, phase, decision.owner)
        return decision

    def _await_approval(
        self, path: str, body: dict[str, Any], decision: Decision, session_id: str
    ) -> Decision:
        """Ask again with the approval id until a reviewer decides, the TTL passes or the
        session is killed; woken early by the session's control events."""
        self.watch(session_id)
        watch = self._watches[session_id]
        again = {**body, "approval_id": decision.approval_id}
        deadline = time.monotonic() + self.approval_timeout
        while decision.outcome == "approval_required":
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
            decision = self._decide(path, again)
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
    ) -> Decision:
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
        if depth is not None:
            body["depth"] = depth
        return self._settle("/api/v1/decisions/handoff", body, "delegation", session_id)

    def tool(
        self,
        session_id: str,
        agent_id: str,
        tool: str,
        command: str = "",
        resources: list[str] | None = None,
    ) -> Decision:
        self.check(session_id)
        body = {
            "session_id": session_id,
            "agent_id": agent_id,
            "tool": tool,
            "command": command,
            "resources": list(resources or []),
        }
        return self._settle("/api/v1/decisions/tool", body, "tool call", session_id)

    def usage(
        self,
        session_id: str,
        agent_id: str,
        usd: float = 0.0,
        tool_calls: int = 0,
        finished: bool = False,
    ) -> Decision:
        body = {
            "session_id": session_id,
            "agent_id": agent_id,
            "usd": usd,
            "tool_calls": tool_calls,
            "finished": finished,
        }
        decision = self._decide("/api/v1/usage", body)
        if decision.outcome == "stop" and self.mode == "enforce" and not finished:
            raise Stopped(decision.reason, "usage")
        return decision
