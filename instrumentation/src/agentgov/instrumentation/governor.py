"""The agent side of the governor: ask before every delegation and tool call, and listen
for the session's stop.

Light on purpose: the standard library only. :class:`GovernorClient` speaks ``http.client``
with one keep-alive connection per thread; :class:`AsyncGovernorClient` adds coroutines on
asyncio streams with one keep-alive pool per event loop, so an asyncio framework never
blocks its loop on a decision or an approval wait. Both listen to each session's control
events on one server-sent-events thread per session and process.

Both run the same decision logic: a step is a small generator that says what to do next
(ask the governor, listen to the session, wait for its events) and each client carries
those out with its own I/O, so the rules below are written once.

Fail closed: the agent goes ahead only on an answer that is exactly ``allow``. Anything
else the governor (or something pretending to be it) sends back, a malformed body, an
unknown outcome, a non-JSON page, becomes :class:`Stopped` with a reason, within one
``timeout`` however the connection misbehaves.
"""

from __future__ import annotations

import asyncio
import atexit
import http.client
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from agentgov.instrumentation.lineage_token import HEADER as TOKEN_HEADER
from agentgov.instrumentation.plan import PlanAnswer, PlanRejected

log = logging.getLogger(__name__)


class _Pending(threading.Condition):
    count = 0


#: kill acknowledgements being posted by listener threads (daemons: the interpreter would
#: cut them off at exit, and the governor would never hear that the process's agents stopped)
_PENDING_ACKS = _Pending()


@atexit.register
def _deliver_acknowledgements(timeout: float = 2.0) -> None:
    with _PENDING_ACKS:
        _PENDING_ACKS.wait_for(lambda: _PENDING_ACKS.count <= 0, timeout)


ALLOW, STOP, APPROVAL_REQUIRED = "allow", "stop", "approval_required"
OUTCOMES = frozenset({ALLOW, STOP, APPROVAL_REQUIRED})
#: what a step does on ``approval_required``: wait for a reviewer, or raise at once
APPROVALS = ("wait", "raise")
#: the most of an answer the client reads
MAX_ANSWER = 1 << 20
T = TypeVar("T")


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


class AwaitingApproval(Stopped):
    """The step needs a reviewer's approval and the client was told not to wait
    (``approvals="raise"``); ``approval_id`` names the request reviewers see."""

    def __init__(self, approval_id: str, what: str) -> None:
        super().__init__(
            "awaiting_approval", "approval", detail=f"{what} waits for approval {approval_id}"
        )
        self.approval_id = approval_id


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
    """Listens to one session's control events on a daemon thread.

    Waiters are woken on every event: threads through :attr:`changed`, coroutines through
    an :class:`asyncio.Event` of their own loop (set from the listener, thread-safely).
    """

    def __init__(self, client: GovernorClient, session_id: str) -> None:
        self.client = client
        self.session_id = session_id
        self.killed: dict[str, Any] | None = None
        self.ready = threading.Event()
        self.changed = threading.Condition()
        self.closed = False
        #: the kill event was handled: nothing more to hear
        self.final = False
        self._kind = ""
        # the stream's socket: http.client lets go of it once the response is read as a
        # stream (the connection's ``sock`` is None then), so the watch keeps it to close it
        self._sock: socket.socket | None = None
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._waiters_lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        thread = threading.Thread(
            target=self._run, name=f"agentgov-events-{self.session_id[:24]}", daemon=True
        )
        thread.start()

    @property
    def alive(self) -> bool:
        """Whether the watch still listens, or knows the kill (then it is final)."""
        return True

    def wait_ready(self, timeout: float) -> None:
        self.ready.wait(timeout)

    def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                self._listen()
                backoff = 0.05
            except Exception as exc:
                log.debug("control events of %s: %s; reconnecting", self.session_id, exc)
            if self.killed is not None or self.closed:
                self._ready()
                return  # a kill is final; nothing more to hear
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def close(self) -> None:
        self.closed = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked read
            except OSError:
                pass

    # -- waking waiters -----------------------------------------------------------------------

    def _ready(self) -> None:
        self.ready.set()
        self._signal()

    def _signal(self) -> None:
        with self.changed:
            self.changed.notify_all()
        with self._waiters_lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                self.forget(loop, event)

    def waiter(self) -> asyncio.Event:
        """An event of the running loop, set at this session's next event."""
        event = asyncio.Event()
        with self._waiters_lock:
            self._waiters.add((asyncio.get_running_loop(), event))
        return event

    def forget(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        with self._waiters_lock:
            self._waiters.discard((loop, event))

    # -- the stream ---------------------------------------------------------------------------

    def _path(self) -> str:
        return f"{self.client._base}/api/v1/sessions/{quote(self.session_id, safe='')}/events"

    def _refused(self, status: int, token: str, body: bytes) -> None:
        """A 401/403 answer to the stream: listen again once this process holds a token of
        the session, or give up on a key or token that will not start working."""
        self._ready()  # nothing to wait for: agents still see a kill at their steps
        if not token and status == 403:
            raise RuntimeError("refused until an agent of this process holds a token")
        self.closed = True
        log.error(
            "control events of %s refused: %s %r; kills will only be seen at governed steps",
            self.session_id,
            status,
            body[:300],
        )

    def _feed(self, line: bytes) -> None:
        """One line of the stream (chunk-size lines of a chunked body are skipped too)."""
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if text.startswith("event:"):
            self._kind = text[6:].strip()
        elif text.startswith("data:"):
            try:
                data = json.loads(text[5:].strip())
            except ValueError:
                return
            if isinstance(data, dict):
                self._on_event(self._kind, data)

    def _listen(self) -> None:
        conn = self.client._new_connection(timeout=None)
        try:
            token = self.client.session_token(self.session_id)
            conn.request("GET", self._path(), headers=self.client._headers(sse=True, token=token))
            self._sock = conn.sock
            if self.closed:  # closed while connecting: close() found no socket to shut
                return
            with conn.getresponse() as resp:
                if resp.status in (401, 403):
                    self._refused(resp.status, token, resp.read(300))
                    return
                if resp.status != 200:
                    self._ready()
                    raise RuntimeError(f"{resp.status} {resp.read(500)!r}")
                while True:
                    line = resp.fp.readline(1 << 20)
                    if not line:
                        return
                    self._feed(line)
                    if self.final or self.closed:
                        return
        finally:
            conn.close()
            self._sock = None

    def _acknowledge(self, agents: dict[str, Any]) -> None:
        self.client._acknowledge_kill(self.session_id, agents)

    def _stop_here(self, killed: dict[str, Any]) -> None:
        """Make the kill visible to this process's agents, then acknowledge it for them."""
        # who runs here now: once the kill is visible, agents raise and leave
        agents = self.client._running_agents(self.session_id)
        with _PENDING_ACKS:  # counted before any agent can see the kill and exit
            _PENDING_ACKS.count += 1
        try:
            self.killed = killed
            self.ready.set()
            self._signal()  # the agents stop first; the acknowledgement follows
            if agents:
                self._acknowledge(agents)
        finally:
            with _PENDING_ACKS:
                _PENDING_ACKS.count -= 1
                _PENDING_ACKS.notify_all()

    def _on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "state":
            if data.get("status") == "killed":
                # known before ready: an agent starting now is refused at once. The kill
                # event follows on the same stream (also when it (re)connected after the
                # kill), and acknowledges for the agents running here
                self.killed = {"actor": data.get("killed_by"), "reason": data.get("kill_reason")}
            self.ready.set()
        elif kind == "kill":
            self._stop_here(data)
            self.final = True
            for hook in list(self.client.on_kill):
                try:
                    hook(self.session_id, data)
                except Exception:
                    log.exception("kill hook failed")
        self._signal()


class _LoopSessionWatch(_SessionWatch):
    """The same watch as a task of the event loop that first needed it: no thread to start,
    no second thread taking turns with the loop; the kill is acknowledged on the loop."""

    client: AsyncGovernorClient

    def __init__(self, client: AsyncGovernorClient, session_id: str) -> None:
        self.loop = asyncio.get_running_loop()
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        super().__init__(client, session_id)

    def _start(self) -> None:
        self._task = self.loop.create_task(self._arun())

    @property
    def alive(self) -> bool:
        return self.killed is not None or not (self._task.done() or self.loop.is_closed())

    def wait_ready(self, timeout: float) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self.loop:  # the loop can listen while this thread waits
            self.ready.wait(timeout)

    def close(self) -> None:
        self.closed = True
        try:
            self.loop.call_soon_threadsafe(self._task.cancel)
        except RuntimeError:
            pass  # the loop is closed, and the task with it

    async def _arun(self) -> None:
        backoff = 0.05
        try:
            while True:
                try:
                    await self._alisten()
                    backoff = 0.05
                except (
                    OSError,
                    RuntimeError,
                    ValueError,
                    asyncio.IncompleteReadError,
                    _BadResponse,
                ) as exc:
                    log.debug("control events of %s: %s; reconnecting", self.session_id, exc)
                if self.killed is not None or self.closed:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        finally:
            self._ready()
            if self._writer is not None:
                self._writer.close()

    async def _alisten(self) -> None:
        token = self.client.session_token(self.session_id)
        reader, writer = await self.client._open()
        self._writer = writer
        try:
            head = [f"GET {self._path()} HTTP/1.1", f"Host: {self.client._host}"]
            head += [f"{k}: {v}" for k, v in self.client._headers(sse=True, token=token).items()]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            await writer.drain()
            status, _ = await _read_head(reader)
            if status in (401, 403):
                self._refused(status, token, await reader.read(300))
                return
            if status != 200:
                self._ready()
                raise RuntimeError(f"{status} {(await reader.read(500))!r}")
            while True:
                line = await reader.readline()
                if not line:
                    return
                self._feed(line)
                if self.final or self.closed:
                    return
        finally:
            writer.close()
            self._writer = None

    def _acknowledge(self, agents: dict[str, Any]) -> None:
        task = self.loop.create_task(self.client._aacknowledge_kill(self.session_id, agents))
        self._tasks.add(task)  # kept until done: the loop holds tasks only weakly
        task.add_done_callback(self._tasks.discard)


# -- what a governed step does, as data: each client carries it out with its own I/O ----------


@dataclass(frozen=True, slots=True)
class _Ask:
    """Ask the governor (POST ``body`` to ``path``); the answer is sent back as a Decision."""

    path: str
    body: dict[str, Any]
    token: str


@dataclass(frozen=True, slots=True)
class _Watch:
    """Listen to the session's control events; wait up to ``wait`` seconds for its state."""

    session_id: str
    wait: float | None


@dataclass(frozen=True, slots=True)
class _Wait:
    """Wait until the session's next control event, or ``seconds``."""

    session_id: str
    seconds: float


@dataclass(frozen=True, slots=True)
class _Tell:
    """POST ``body`` to ``path`` and carry on whatever the answer (best effort)."""

    path: str
    body: dict[str, Any]
    token: str


_Op = _Ask | _Watch | _Wait | _Tell
#: how often a waiting step asks again when no control event woke it first (an approval
#: change wakes it at once; a re-ask of a pending approval writes no record)
APPROVAL_POLL_S = 2.0
_Flow = Generator[_Op, Any, T]


class GovernorClient:
    """Talks to the collector's governor for one agent process.

    ``mode``: ``enforce`` raises :class:`Stopped` on stop; ``observe`` asks and records but
    never blocks. ``fail_closed``: when the governor cannot be reached, raise (default) or
    carry on; a governor that answered (a refusal, an invalid answer) is never treated as
    unreachable. ``timeout`` bounds each request as a whole, retries included. ``approvals``:
    on ``approval_required``, ``wait`` (up to ``approval_timeout`` seconds, woken by the
    session's events) or ``raise`` :class:`AwaitingApproval` at once; each decision may
    override both. ``url`` and ``api_key`` default to ``AGENTGOV_URL`` and
    ``AGENTGOV_API_KEY``.
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        mode: str = "enforce",
        timeout: float = 5.0,
        approval_timeout: float = 300.0,
        fail_closed: bool = True,
        approvals: str = "wait",
    ) -> None:
        if mode not in ("enforce", "observe"):
            raise ValueError("mode must be 'enforce' or 'observe'")
        if approvals not in APPROVALS:
            raise ValueError("approvals must be 'wait' or 'raise'")
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
        self.approvals = approvals
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

    def _answer(self, status: int, data: bytes) -> Any:
        """The parsed JSON of an answer; a refusal or a body that is not JSON raises."""
        if status >= 400:
            raise GovernorUnavailable(
                "governor_refused", "request", detail=f"{status}: {_error_text(data)}"
            )
        try:
            return json.loads(data)
        except ValueError:
            raise GovernorUnavailable(
                "governor_invalid_answer",
                "request",
                detail=f"{status} with a body that is not JSON: {data[:80]!r}",
            ) from None

    def _unreachable(self, last: BaseException | None) -> GovernorUnavailable:
        return GovernorUnavailable("governor_unreachable", "request", detail=f"{self.url}: {last}")

    def _fail_open(self, exc: GovernorUnavailable) -> Decision:
        """What a request that failed becomes: fail-open covers a governor that cannot be
        reached, never one that refused the request or answered something that is not a
        decision."""
        if self.fail_closed or exc.reason != "governor_unreachable":
            raise exc
        log.warning("governor unavailable; carrying on (fail_closed=False)")
        return Decision(ALLOW, "governor_unavailable")

    def _post(self, path: str, body: dict[str, Any], token: str = "") -> Any:
        """POST ``body``; the parsed JSON answer. One deadline covers every attempt."""
        return self._answer(*self._exchange(path, body, token))

    def _exchange(self, path: str, body: dict[str, Any], token: str = "") -> tuple[int, bytes]:
        """POST ``body``; the answer's status and body. One deadline covers every attempt."""
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
                data = resp.read(MAX_ANSWER)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._local.conn = None
                last = exc
                # only a kept-alive connection that the server had closed is worth a second
                # try; a fresh connection that failed or timed out means the governor is down
                if fresh or isinstance(exc, TimeoutError) or attempt:
                    break
                continue
            return resp.status, data
        raise self._unreachable(last)

    def _decide(self, path: str, body: dict[str, Any], token: str = "") -> Decision:
        try:
            return Decision.from_json(self._post(path, body, token))
        except GovernorUnavailable as exc:
            return self._fail_open(exc)

    def _run(self, flow: _Flow[T]) -> T:
        """Carry out a step with blocking I/O."""
        result: Any = None
        try:
            while True:
                op = flow.send(result)
                if isinstance(op, _Ask):
                    result = self._decide(op.path, op.body, op.token)
                elif isinstance(op, _Watch):
                    self.watch(op.session_id, op.wait)
                    result = None
                elif isinstance(op, _Tell):
                    try:
                        self._post(op.path, op.body, op.token)
                    except Stopped as exc:
                        log.debug("%s not delivered: %s", op.path, exc)
                    result = None
                else:
                    watch = self._watches.get(op.session_id)
                    if watch is None:
                        time.sleep(op.seconds)
                    else:
                        with watch.changed:
                            watch.changed.wait(op.seconds)
                    result = None
        except StopIteration as done:
            return done.value

    # -- sessions --------------------------------------------------------------------------

    def _new_watch(self, session_id: str) -> _SessionWatch:
        return _SessionWatch(self, session_id)

    def _watch(self, session_id: str) -> _SessionWatch:
        with self._watch_lock:
            w = self._watches.get(session_id)
            if w is None or not w.alive:
                w = self._watches[session_id] = self._new_watch(session_id)
        return w

    def watch(self, session_id: str, wait: float | None = None) -> None:
        """Listen to a session's control events (once per process); wait for its state."""
        self._watch(session_id).wait_ready(self.timeout if wait is None else wait)

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
        """Note that an agent of this process finished. After the session's last one, the
        process stops listening to the session (an agent of it started later listens
        again); a killed session's watch stays, so the kill stays known here."""
        done = None
        with self._watch_lock:
            agents = self._running.get(session_id)
            if agents is not None:
                agents.pop(agent_id, None)
                if not agents:
                    del self._running[session_id]
                    self._known.pop(session_id, None)
                    watch = self._watches.get(session_id)
                    if watch is not None and watch.killed is None:
                        done = self._watches.pop(session_id)
        if done is not None:
            done.close()

    def session_token(self, session_id: str) -> str:
        """A token of one of this process's agents in the session (for its event stream)."""
        with self._watch_lock:
            cells = [*self._running.get(session_id, {}).values(), self._known.get(session_id)]
        return next((c.value for c in cells if getattr(c, "value", "")), "")

    def remember(self, session_id: str, token: Any) -> None:
        """Keep a token cell of the session for its event stream (before any agent runs)."""
        with self._watch_lock:
            self._known.setdefault(session_id, token)

    def _running_agents(self, session_id: str) -> dict[str, Any]:
        """This process's running agents of a session (id -> token cell), now."""
        with self._watch_lock:
            return dict(self._running.get(session_id, {}))

    def _acknowledge_kill(self, session_id: str, agents: dict[str, Any]) -> None:
        """Tell the governor which of this process's agents stopped (runs on the listener
        thread, so the agents' own threads are not held up). A process that ends as its
        agents stop waits for this at exit (:func:`_deliver_acknowledgements`)."""
        for agent_id, cell in agents.items():
            try:
                self._post(
                    f"/api/v1/sessions/{quote(session_id, safe='')}/stopped",
                    {"session_id": session_id, "agent_id": agent_id},
                    getattr(cell, "value", ""),
                )
            except Stopped as exc:
                log.debug("kill acknowledgement for %s not delivered: %s", agent_id, exc)

    # -- session plans ---------------------------------------------------------------------

    @staticmethod
    def _plan_path(session_id: str) -> str:
        return f"/api/v1/sessions/{quote(session_id, safe='')}/plan"

    def _plan_answer(self, session_id: str, status: int, data: bytes) -> PlanAnswer:
        """The governor's answer to a plan: its view, or :class:`PlanRejected` with the
        governor's whole message (it names every field that is wrong)."""
        if status in (400, 409):
            raise PlanRejected(_error_text(data, 8000), status)
        answer = self._answer(status, data)
        if not isinstance(answer, dict) or answer.get("status") not in ("active", "pending"):
            raise GovernorUnavailable(
                "governor_invalid_answer", "plan", detail="the answer is not a plan's view"
            )
        approval = answer.get("approval") if isinstance(answer.get("approval"), dict) else {}
        needs = answer.get("needs_approval")
        radius = answer.get("blast_radius")
        return PlanAnswer(
            session_id=session_id,
            status=str(answer["status"]),
            approval_id=_text((approval or {}).get("approval_id")),
            needs_approval=tuple(str(x) for x in needs) if isinstance(needs, list) else (),
            blast_radius=radius if isinstance(radius, dict) else {},
        )

    def _plan_unreachable(self, session_id: str, exc: GovernorUnavailable) -> PlanAnswer:
        self._fail_open(exc)  # raises unless the client carries on without a governor
        return PlanAnswer(session_id, "unverified")

    def declare_plan(self, session_id: str, plan: dict[str, Any]) -> PlanAnswer:
        """Declare the session's plan (before its first agent starts); see
        :meth:`agentgov.instrumentation.SessionScope.plan`."""
        try:
            status, data = self._exchange(self._plan_path(session_id), plan)
        except GovernorUnavailable as exc:
            return self._plan_unreachable(session_id, exc)
        return self._plan_answer(session_id, status, data)

    # -- the steps, once for both clients -------------------------------------------------------

    def _decision_flow(
        self,
        path: str,
        body: dict[str, Any],
        phase: str,
        session_id: str,
        token: str,
        what: str,
        approvals: str | None,
        approval_timeout: float | None,
    ) -> _Flow[Decision]:
        """Ask; on ``approval_required`` wait for a reviewer (or raise); on ``stop`` raise.
        Only an answer that is exactly ``allow`` returns in enforce mode."""
        self.check(session_id)
        decision: Decision = yield _Ask(path, body, token)
        if decision.outcome == APPROVAL_REQUIRED and self.mode == "enforce":
            if (approvals or self.approvals) == "raise":
                raise AwaitingApproval(decision.approval_id, what)
            decision = yield from self._approval_flow(
                path, body, decision, session_id, token, what, approval_timeout
            )
        if decision.outcome == STOP and self.mode == "enforce":
            if decision.reason == "session_killed":
                yield _Watch(session_id, 0)
                # the answer says who stopped the session: the kill event may still be on
                # its way to this process
                by = decision.killed or self.killed(session_id) or {}
                raise SessionKilled(
                    session_id, str(by.get("actor") or ""), str(by.get("reason") or "")
                )
            raise Stopped(decision.reason or "stopped", phase, decision.owner, decision.detail)
        return decision

    def _approval_flow(
        self,
        path: str,
        body: dict[str, Any],
        decision: Decision,
        session_id: str,
        token: str,
        what: str,
        approval_timeout: float | None,
    ) -> _Flow[Decision]:
        """Ask again with the approval id until a reviewer decides, the time is up or the
        session is killed; woken early by the session's control events."""
        yield _Watch(session_id, None)
        approval_id = decision.approval_id
        again = {**body, "approval_id": approval_id}
        limit = self.approval_timeout if approval_timeout is None else approval_timeout
        deadline = time.monotonic() + limit
        # once per wait, everything a person needs: what waits, why, and the command
        log.warning("%s", self.waiting_message(what, decision, limit))
        while decision.outcome == APPROVAL_REQUIRED:
            self.check(session_id)
            left = deadline - time.monotonic()
            if left <= 0:
                # giving up withdraws the request: no reviewer should approve a step that
                # will never run (nor find it pending forever)
                if approval_id:
                    yield _Tell(
                        f"/api/v1/approvals/{quote(approval_id, safe='')}/withdraw", {}, token
                    )
                raise Stopped(
                    "approval_timeout",
                    "approval",
                    detail=f"nobody decided approval {approval_id} within {limit:g} s; "
                    "the request was withdrawn",
                )
            yield _Wait(session_id, min(left, APPROVAL_POLL_S))
            decision = yield _Ask(path, again, token)
            # a renewed lineage token may come with any answer: the next ask presents it
            token = decision.lineage_token or token
        return decision

    def waiting_message(self, what: str, decision: Decision, limit: float) -> str:
        """What a waiting step tells the person running the agent: what it waits for,
        why, and the exact command that approves it."""
        url = "" if self.url == "http://127.0.0.1:4318" else f" --url {self.url}"
        aid = decision.approval_id or "?"
        why = f" ({decision.reason})" if decision.reason else ""
        return (
            f"{what} waits up to {limit:g} s for a reviewer's approval {aid}{why}. "
            f"Approve: uv run agentgov approve {aid}{url}   "
            f"deny: uv run agentgov approve {aid} --deny{url}   "
            f"list: uv run agentgov approvals{url}"
        )

    def _handoff_flow(
        self,
        session_id: str,
        from_agent: str,
        to_agent: str,
        task: str,
        permissions: list[str] | None,
        estimated_usd: float,
        to_role: str,
        token: str,
        approvals: str | None,
        approval_timeout: float | None,
    ) -> _Flow[Decision]:
        body: dict[str, Any] = {
            "session_id": session_id,
            "from_agent": from_agent,
            "to_agent": to_agent,
            "task": task,
            "permissions": permissions,
            "estimated_usd": estimated_usd,
            "to_role": to_role,
        }
        what = f"delegation {from_agent or 'root'} -> {to_agent}"
        return self._decision_flow(
            "/api/v1/decisions/handoff",
            body,
            "delegation",
            session_id,
            token,
            what,
            approvals,
            approval_timeout,
        )

    def _tool_flow(
        self,
        session_id: str,
        agent_id: str,
        tool: str,
        command: str,
        resources: list[str] | None,
        token: str,
        approvals: str | None,
        approval_timeout: float | None,
    ) -> _Flow[Decision]:
        body = {
            "session_id": session_id,
            "agent_id": agent_id,
            "tool": tool,
            "command": command,
            "resources": list(resources or []),
        }
        what = f"tool call {tool} by {agent_id}"
        return self._decision_flow(
            "/api/v1/decisions/tool",
            body,
            "tool call",
            session_id,
            token,
            what,
            approvals,
            approval_timeout,
        )

    def _usage_flow(
        self,
        session_id: str,
        agent_id: str,
        usd: float,
        tool_calls: int,
        finished: bool,
        token: str,
    ) -> _Flow[Decision]:
        body = {
            "session_id": session_id,
            "agent_id": agent_id,
            "usd": usd,
            "tool_calls": tool_calls,
            "finished": finished,
        }
        decision: Decision = yield _Ask("/api/v1/usage", body, token)
        if decision.outcome == STOP and self.mode == "enforce" and not finished:
            raise Stopped(decision.reason or "stopped", "usage", detail=decision.detail)
        return decision

    # -- decisions -------------------------------------------------------------------------

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
        approvals: str | None = None,
        approval_timeout: float | None = None,
    ) -> Decision:
        """Ask to start ``to_agent``: delegated by the holder of ``token`` (the delegating
        agent's lineage token), or as the root of a new session without one. An allowed
        answer carries the new agent's own token."""
        del depth  # the governor takes depth from lineage, never from the caller
        return self._run(
            self._handoff_flow(
                session_id,
                from_agent,
                to_agent,
                task,
                permissions,
                estimated_usd,
                to_role,
                token,
                approvals,
                approval_timeout,
            )
        )

    def tool(
        self,
        session_id: str,
        agent_id: str,
        tool: str,
        command: str = "",
        resources: list[str] | None = None,
        token: str = "",
        approvals: str | None = None,
        approval_timeout: float | None = None,
    ) -> Decision:
        """Ask before a tool call of ``agent_id`` (the holder of ``token``)."""
        return self._run(
            self._tool_flow(
                session_id, agent_id, tool, command, resources, token, approvals, approval_timeout
            )
        )

    def usage(
        self,
        session_id: str,
        agent_id: str,
        usd: float = 0.0,
        tool_calls: int = 0,
        finished: bool = False,
        token: str = "",
    ) -> Decision:
        """Report spend and tool calls (``finished``: the agent ended, which frees its slot);
        past the shared budget, a report that is not the last raises :class:`Stopped`."""
        return self._run(self._usage_flow(session_id, agent_id, usd, tool_calls, finished, token))


class _Pool:
    """The idle keep-alive connections of one event loop.

    They are closed while the loop shuts down (``asyncio.run`` finalizes the loop's async
    generators, the pool's closer among them); the pool of a loop closed some other way is
    dropped at the next request, and its sockets go with it.
    """

    SIZE = 16

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.closer: Any = None

    async def start(self) -> None:
        self.closer = self._closer()
        await self.closer.__anext__()

    async def _closer(self) -> Any:
        try:
            yield
        finally:
            self.close()

    def close(self) -> None:
        idle, self.idle = self.idle, []
        for _, writer in idle:
            writer.close()


class _BadResponse(Exception):
    """What came back does not read as HTTP/1.x (treated like a broken connection)."""


class AsyncGovernorClient(GovernorClient):
    """A :class:`GovernorClient` that also decides without blocking an event loop.

    ``await ahandoff(...)``, ``await atool(...)``, ``await ausage(...)`` and ``await
    awatch(...)`` take the same arguments, follow the same rules and raise the same
    exceptions as their blocking namesakes, which remain available (for code of the same
    process that runs outside the loop). Requests use asyncio streams with one keep-alive
    pool per event loop; approval waits are woken by the session's control events without
    holding the loop.
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        mode: str = "enforce",
        timeout: float = 5.0,
        approval_timeout: float = 300.0,
        fail_closed: bool = True,
        approvals: str = "wait",
    ) -> None:
        super().__init__(url, api_key, mode, timeout, approval_timeout, fail_closed, approvals)
        self._pools: dict[asyncio.AbstractEventLoop, _Pool] = {}
        self._ssl: ssl.SSLContext | None = None

    # -- transport -------------------------------------------------------------------------

    async def _pool(self) -> _Pool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            for old in [p for p in self._pools.values() if p.loop.is_closed()]:
                del self._pools[old.loop]
            pool = self._pools[loop] = _Pool(loop)
            await pool.start()
        return pool

    def _request_head(self, path: str, length: int, token: str) -> bytes:
        lines = [
            f"POST {self._base}{path} HTTP/1.1",
            f"Host: {self._host}:{self._port}",
            f"Content-Length: {length}",
        ]
        for name, value in self._headers(token=token).items():
            if any(c in value for c in "\r\n\0"):
                # as http.client does: a header value never ends the header early
                raise ValueError(f"invalid value for header {name}")
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        context = None
        if self._scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        return await asyncio.open_connection(self._host, self._port, ssl=context)

    async def _apost(self, path: str, body: dict[str, Any], token: str = "") -> Any:
        """POST ``body``; the parsed JSON answer. One deadline covers every attempt."""
        return self._answer(*await self._aexchange(path, body, token))

    async def _aexchange(
        self, path: str, body: dict[str, Any], token: str = ""
    ) -> tuple[int, bytes]:
        """POST ``body``; the answer's status and body. One deadline covers every attempt."""
        payload = json.dumps(body, separators=(",", ":")).encode()
        request = self._request_head(path, len(payload), token) + payload
        pool = await self._pool()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        last: BaseException | None = None
        for attempt in range(2):
            left = deadline - loop.time()
            if left <= 0:
                break
            conn = pool.idle.pop() if pool.idle else None
            fresh = conn is None
            reusable = False
            try:
                async with asyncio.timeout(left):
                    if conn is None:
                        conn = await self._open()
                    reader, writer = conn
                    writer.write(request)
                    await writer.drain()
                    status, data, reusable = await _read_response(reader)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, _BadResponse) as exc:
                last = exc
                # as the blocking client: only a kept-alive connection the server had
                # closed is worth a second try
                if fresh or isinstance(exc, TimeoutError) or attempt:
                    break
                continue
            finally:
                if conn is not None:
                    if reusable and len(pool.idle) < _Pool.SIZE:
                        pool.idle.append(conn)
                    else:
                        conn[1].close()
            return status, data
        raise self._unreachable(last)

    async def _adecide(self, path: str, body: dict[str, Any], token: str = "") -> Decision:
        try:
            return Decision.from_json(await self._apost(path, body, token))
        except GovernorUnavailable as exc:
            return self._fail_open(exc)

    async def _arun(self, flow: _Flow[T]) -> T:
        """Carry out a step without blocking the running event loop."""
        result: Any = None
        try:
            while True:
                op = flow.send(result)
                if isinstance(op, _Ask):
                    result = await self._adecide(op.path, op.body, op.token)
                elif isinstance(op, _Watch):
                    await self.awatch(op.session_id, op.wait)
                    result = None
                elif isinstance(op, _Tell):
                    try:
                        await self._apost(op.path, op.body, op.token)
                    except Stopped as exc:
                        log.debug("%s not delivered: %s", op.path, exc)
                    result = None
                else:
                    await self._await_event(self._watch(op.session_id), op.seconds, False)
                    result = None
        except StopIteration as done:
            return done.value

    async def aclose(self) -> None:
        """Close this loop's idle connections and stop listening to every session (this
        loop's listeners have ended when it returns)."""
        loop = asyncio.get_running_loop()
        pool = self._pools.pop(loop, None)
        if pool is not None:
            pool.close()
        with self._watch_lock:
            mine = [
                w._task
                for w in self._watches.values()
                if isinstance(w, _LoopSessionWatch) and w.loop is loop
            ]
        self.close()
        await asyncio.gather(*mine, return_exceptions=True)

    # -- sessions --------------------------------------------------------------------------

    def _new_watch(self, session_id: str) -> _SessionWatch:
        """On an event loop, a task of that loop listens; elsewhere a thread."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return _SessionWatch(self, session_id)
        return _LoopSessionWatch(self, session_id)

    async def _aacknowledge_kill(self, session_id: str, agents: dict[str, Any]) -> None:
        """:meth:`_acknowledge_kill`, on the loop."""
        for agent_id, cell in agents.items():
            try:
                await self._apost(
                    f"/api/v1/sessions/{quote(session_id, safe='')}/stopped",
                    {"session_id": session_id, "agent_id": agent_id},
                    getattr(cell, "value", ""),
                )
            except Stopped as exc:
                log.debug("kill acknowledgement for %s not delivered: %s", agent_id, exc)

    @staticmethod
    async def _await_event(watch: _SessionWatch, seconds: float, ready: bool) -> None:
        event = watch.waiter()
        loop = asyncio.get_running_loop()
        try:
            if ready and watch.ready.is_set():
                return
            try:
                await asyncio.wait_for(event.wait(), seconds)
            except TimeoutError:
                pass
        finally:
            watch.forget(loop, event)

    async def awatch(self, session_id: str, wait: float | None = None) -> None:
        """:meth:`watch` without blocking the loop: listen, and wait for the state."""
        watch = self._watch(session_id)
        deadline = time.monotonic() + (self.timeout if wait is None else wait)
        while not watch.ready.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await self._await_event(watch, left, True)

    # -- decisions -------------------------------------------------------------------------

    async def ahandoff(
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
        approvals: str | None = None,
        approval_timeout: float | None = None,
    ) -> Decision:
        """:meth:`handoff`, awaited."""
        del depth
        return await self._arun(
            self._handoff_flow(
                session_id,
                from_agent,
                to_agent,
                task,
                permissions,
                estimated_usd,
                to_role,
                token,
                approvals,
                approval_timeout,
            )
        )

    async def atool(
        self,
        session_id: str,
        agent_id: str,
        tool: str,
        command: str = "",
        resources: list[str] | None = None,
        token: str = "",
        approvals: str | None = None,
        approval_timeout: float | None = None,
    ) -> Decision:
        """:meth:`tool`, awaited."""
        return await self._arun(
            self._tool_flow(
                session_id, agent_id, tool, command, resources, token, approvals, approval_timeout
            )
        )

    async def adeclare_plan(self, session_id: str, plan: dict[str, Any]) -> PlanAnswer:
        """:meth:`declare_plan`, awaited."""
        try:
            status, data = await self._aexchange(self._plan_path(session_id), plan)
        except GovernorUnavailable as exc:
            return self._plan_unreachable(session_id, exc)
        return self._plan_answer(session_id, status, data)

    async def ausage(
        self,
        session_id: str,
        agent_id: str,
        usd: float = 0.0,
        tool_calls: int = 0,
        finished: bool = False,
        token: str = "",
    ) -> Decision:
        """:meth:`usage`, awaited."""
        return await self._arun(
            self._usage_flow(session_id, agent_id, usd, tool_calls, finished, token)
        )


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """Status and headers (names in lower case; ``:version`` the HTTP version) of one
    HTTP/1.x response."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionResetError("the governor closed the connection")
        parts = line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise _BadResponse(f"not an HTTP response: {line[:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {":version": parts[0]}
        for _ in range(200):
            raw = await reader.readline()
            if raw in (b"\r\n", b"\n"):
                break
            if not raw:
                raise asyncio.IncompleteReadError(raw, None)
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        else:
            raise _BadResponse("too many header lines")
        if not 100 <= status < 200:  # an interim answer: the real one follows
            return status, headers


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body (at most :data:`MAX_ANSWER` bytes) and whether the connection can be
    used again, of one HTTP/1.x response."""
    status, headers = await _read_head(reader)
    keep = (
        headers[":version"] == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    )
    if status in (204, 304):
        return status, b"", keep
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size_line = await reader.readline()
            try:
                size = int(size_line.split(b";", 1)[0].strip() or b"x", 16)
            except ValueError:
                raise _BadResponse(f"bad chunk size {size_line[:40]!r}") from None
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return status, bytes(body), keep
            if len(body) + size > MAX_ANSWER:
                body += await reader.readexactly(MAX_ANSWER - len(body))
                return status, bytes(body), False
            body += await reader.readexactly(size)
            await reader.readexactly(2)  # the CRLF after each chunk
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise _BadResponse(f"bad content-length {length[:40]!r}")
        size = int(length)
        if size > MAX_ANSWER:
            return status, await reader.readexactly(MAX_ANSWER), False
        return status, await reader.readexactly(size), keep
    # no length: the body runs to the end of the connection
    body = bytearray()
    while len(body) < MAX_ANSWER:
        data = await reader.read(MAX_ANSWER - len(body))
        if not data:
            break
        body += data
    return status, bytes(body), False


def _error_text(data: bytes, limit: int = 300) -> str:
    try:
        parsed = json.loads(data)
    except ValueError:
        return data[:limit].decode(errors="replace")
    if isinstance(parsed, dict):
        return str(parsed.get("error") or parsed.get("message") or parsed)[:limit]
    return str(parsed)[:limit]
