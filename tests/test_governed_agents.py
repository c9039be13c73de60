"""Governed agents end to end: real agent code on the SDK against collector processes.

Agents use :class:`Governance` with a :class:`GovernorClient`, in this process and in
child processes started with a handoff's environment, against ``agentgov collector``
processes on loopback. Covered:

1. one kill (``POST /api/v1/sessions/{id}/kill``) stops a session's agents in three OS
   processes, refuses a fourth started later and refuses new delegations in the parent;
2. enforce mode (``Stopped``, ``on_stop``, ``constrained``, single-agent fallback) against
   observe mode (never raises; the stops are in the decisions list);
3. approvals decided by a reviewer from another thread: approved, denied, expired, and a
   kill while the agent waits;
4. shared spend and tool-call budgets and the concurrency limit;
5. failing closed (or open) when the governor cannot be reached, or refuses the key;
6. the five questions, with spans exported to the collector and read back from the API
   and, once the collector stopped, from the store.

Fail-open never covers a governor that refuses the request, and agents opened with
``Governance.agent`` are decided like any delegation.

Tests 1-4 share one collector with API keys on (agent, reviewer and admin keys); each test
writes the multi-agent policy it needs and reloads it. Test 6 has its own collector with
the API open, which it stops to read ``agentgov_spans`` and ``otel_traces``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

try:  # tests/ as a plain folder (rootdir on sys.path) or as a package
    from conftest import CollectorProcess, free_port, make_provider, wait_for
except ImportError:  # pragma: no cover
    from tests.conftest import CollectorProcess, free_port, make_provider, wait_for
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentgov.collector.governor.policy import MultiAgentPolicy
from agentgov.instrumentation import (
    AgentSpan,
    Governance,
    GovernorClient,
    GovernorUnavailable,
    SessionKilled,
    Stopped,
)

AGENT_KEY = "ak-" + secrets.token_hex(16)
REVIEWER_KEY = "rk-" + secrets.token_hex(16)
ADMIN_KEY = "dk-" + secrets.token_hex(16)
API_KEYS = f"agent-1:agent:{AGENT_KEY},reviewer-1:reviewer:{REVIEWER_KEY},admin-1:admin:{ADMIN_KEY}"

REFUND_TOOL = "billing.refund.create"

#: the agent process: opens the handoff's agent from its environment, then either runs
#: one governed tool call ("once") or loops on checkpoints or tool calls until killed
WORKER = r"""
import json, os, sys, time
from agentgov.instrumentation import Governance, GovernorClient, SessionKilled, configure

mode = os.environ["WORKER_MODE"]
marker = os.environ["WORKER_MARKER"]
provider = configure(service_name=os.environ.get("WORKER_SERVICE", "governed-worker"))
gov = Governance(provider, governor=GovernorClient(timeout=10))


def mark(**fields):
    with open(marker + ".tmp", "w") as f:
        json.dump(fields, f)
    os.replace(marker + ".tmp", marker)


stage, steps = "start", 0
try:
    with gov.agent(os.environ.get("WORKER_NAME", "worker"), carrier=os.environ) as agent:
        stage = "run"
        info = dict(agent_id=agent.agent_id, chain=list(agent.lineage.chain), depth=agent.depth,
                    permissions=list(agent.lineage.permissions or ()), task=agent.task)
        if mode == "once":
            with agent.tool(os.environ["WORKER_TOOL"], command=os.environ["WORKER_COMMAND"]):
                pass
            mark(stage="done", **info)
            sys.exit(0)
        with open(os.environ["WORKER_READY"], "w") as f:
            json.dump(info, f)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if mode == "tool":
                with agent.tool("shell", command=f"echo tick {steps}"):
                    pass
            else:
                agent.checkpoint()
            steps += 1
            time.sleep(0.05)
    sys.exit(3)  # never stopped
except SessionKilled as exc:
    mark(stage=stage, at=time.time(), reason=exc.reason, session_id=exc.session_id, steps=steps)
finally:
    provider.shutdown()
"""


# -- helpers -------------------------------------------------------------------------------


class Api:
    """The collector's HTTP API, with a key for reads (None when keys are off)."""

    def __init__(self, url: str, read_key: str | None) -> None:
        self.url = url
        self.read_key = read_key

    @staticmethod
    def _headers(key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    def try_get(self, path: str, **params: Any) -> Any:
        r = httpx.get(
            self.url + path, params=params, headers=self._headers(self.read_key), timeout=30
        )
        return r.json() if r.status_code == 200 else None

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(
            self.url + path, params=params, headers=self._headers(self.read_key), timeout=30
        )
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text}"
        return r.json()

    def post(self, path: str, key: str | None, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self._headers(key), timeout=30)

    def kill(self, session_id: str, key: str | None, **body: Any) -> dict[str, Any]:
        r = self.post(f"/api/v1/sessions/{session_id}/kill", key, body)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def governor(self, session_id: str) -> dict[str, Any]:
        """The governor's live figures of a session (``GET /api/v1/sessions/{id}``)."""
        return dict(self.get(f"/api/v1/sessions/{session_id}")["governor"])

    def decisions(self, session_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/api/v1/sessions/{session_id}/decisions")["decisions"])

    def approvals(self, session_id: str, status: str | None = None) -> list[dict[str, Any]]:
        params = {"status": status} if status else {}
        rows = self.get("/api/v1/approvals", **params)["approvals"]
        return [a for a in rows if a["session_id"] == session_id]


@dataclass
class Governed:
    """The shared collector with keys on, and its policy file."""

    collector: CollectorProcess
    api: Api
    policy_path: Path
    _stamp: int = field(default_factory=time.time_ns)

    @property
    def url(self) -> str:
        return self.collector.url

    def set_policy(self, **multi_agent: Any) -> None:
        """Write the policy, reload it, and check the governor now applies exactly it."""
        staged = self.policy_path.with_suffix(".staged")
        staged.write_text(json.dumps({"multi_agent": multi_agent}))
        # a fresh, strictly later mtime, so the change is seen whatever the file size
        self._stamp += 1_000_000_000
        os.utime(staged, ns=(self._stamp, self._stamp))
        os.replace(staged, self.policy_path)  # never read half-written
        r = self.api.post("/api/v1/policy/reload", ADMIN_KEY, {})
        assert r.status_code == 200, r.text
        expected = MultiAgentPolicy.model_validate(multi_agent).model_dump()
        assert r.json()["policy"]["multi_agent"] == expected


class Processes:
    """Agent processes running :data:`WORKER`; every one is killed if still running."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.script = folder / "governed_worker.py"
        self.script.write_text(WORKER)
        self._procs: list[tuple[subprocess.Popen[bytes], Any]] = []

    def start(self, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.folder / f"{name}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, str(self.script)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        self._procs.append((proc, log))
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for proc, log in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            log.close()


def stop_collector(c: CollectorProcess) -> None:
    """Stop a collector whose control-event streams this process still holds open.

    The SDK keeps one event stream per watched session and has no way to close it, so
    the first SIGTERM would wait out the 10 s graceful shutdown; a second one, sent once
    the listening socket closed, stops the wait (writes are still drained).
    """
    proc = c.proc
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)

        def listener_closed() -> bool:
            try:
                httpx.get(f"{c.url}/healthz", timeout=0.5)
            except httpx.TransportError:
                return True
            return proc.poll() is not None

        wait_for(listener_closed, timeout=15)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    c.stop()


def worker_env(url: str, carrier: dict[str, str], key: str | None, **extra: str) -> dict[str, str]:
    """A child's environment: the handoff's carrier, the governor URL, key and endpoint."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OTEL_", "AGENTGOV_"))
        and k.upper() not in ("TRACEPARENT", "TRACESTATE", "BAGGAGE")
    }
    env.update(carrier)
    env.update(
        AGENTGOV_URL=url,
        OTEL_EXPORTER_OTLP_ENDPOINT=url,
        OTEL_BSP_SCHEDULE_DELAY="100",
        **extra,
    )
    if key:
        env["AGENTGOV_API_KEY"] = key
    return env


def read_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def uid() -> str:
    return uuid.uuid4().hex[:10]


StopLog = list[tuple[AgentSpan, Stopped]]


def recorder() -> tuple[StopLog, Callable[[AgentSpan, Stopped], None]]:
    calls: StopLog = []
    return calls, lambda agent, stop: calls.append((agent, stop))


def run_loop_workers(
    procs: Processes,
    url: str,
    key: str | None,
    carriers: list[dict[str, str]],
    modes: list[str],
    tag: str,
) -> tuple[list[subprocess.Popen[bytes]], list[Path], list[Path]]:
    """Start one looping agent process per carrier; wait until every one runs."""
    started, markers, ready = [], [], []
    for i, (carrier, mode) in enumerate(zip(carriers, modes, strict=True)):
        markers.append(procs.folder / f"{tag}-{i}.marker")
        ready.append(procs.folder / f"{tag}-{i}.ready")
        env = worker_env(
            url,
            carrier,
            key,
            WORKER_MODE=mode,
            WORKER_MARKER=str(markers[-1]),
            WORKER_READY=str(ready[-1]),
            WORKER_SERVICE=f"{tag}-{i}",
        )
        started.append(procs.start(f"{tag}-{i}", env))

    def all_ready() -> bool:
        for i, p in enumerate(started):
            assert p.poll() is None, procs.log(f"{tag}-{i}")
        return all(r.exists() for r in ready)

    wait_for(all_ready, timeout=40)
    return started, markers, ready


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def governed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Governed]:
    """One collector with API keys on and a policy file that each test rewrites."""
    base = tmp_path_factory.mktemp("governed")
    policy = base / "policy.yaml"
    policy.write_text(json.dumps({"multi_agent": {}}))
    c = CollectorProcess(base / "data", free_port(), free_port())
    c.start(extra_args=("--policy", str(policy)), env={"AGENTGOV_API_KEYS": API_KEYS})
    yield Governed(c, Api(c.url, REVIEWER_KEY), policy)
    stop_collector(c)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    group = Processes(tmp_path)
    yield group
    group.close()


def agent_governance(
    url: str, on_stop: Callable[[AgentSpan, Stopped], None] | None = None, **client: Any
) -> Governance:
    """Governance for this process: the agent key, no span export."""
    return Governance(
        TracerProvider(),
        governor=GovernorClient(url, api_key=AGENT_KEY, **client),
        on_stop=on_stop,
    )


# -- 1. one kill stops agents in every process ---------------------------------------------


def test_one_kill_stops_agents_in_three_processes(governed: Governed, procs: Processes) -> None:
    governed.set_policy()
    api = governed.api
    stops, hook = recorder()
    provider = make_provider(governed.url, service="kill-parent", api_key=AGENT_KEY)
    gov = Governance(
        provider, governor=GovernorClient(governed.url, api_key=AGENT_KEY), on_stop=hook
    )
    tag = uid()
    try:
        with gov.session("rotate the API credentials on every shard") as session:
            sid = session.session_id
            with session.agent("coordinator", agent_id=f"coord-{tag}") as coord:
                handoffs = [
                    coord.handoff("worker", task=f"rotate shard {i}", agent_id=f"shard{i}-{tag}")
                    for i in range(4)
                ]
                workers, markers, ready = run_loop_workers(
                    procs,
                    governed.url,
                    AGENT_KEY,
                    [h.env() for h in handoffs[:3]],
                    ["checkpoint", "tool", "checkpoint"],
                    "shard",
                )
                assert [read_json(r)["chain"] for r in ready] == [
                    [f"coord-{tag}", f"shard{i}-{tag}"] for i in range(3)
                ]
                # the tool-calling process is really taking governed steps
                wait_for(lambda: api.governor(sid)["governed_tool_calls"] >= 3)
                assert not any(m.exists() for m in markers)

                killed_at = time.time()
                answer = api.kill(sid, ADMIN_KEY, reason="credentials leaked")
                assert {k: answer[k] for k in ("session_id", "actor", "reason", "status")} == {
                    "session_id": sid,
                    "actor": "admin-1",
                    "reason": "credentials leaked",
                    "status": "killed",
                }
                assert answer["cancelled_approvals"] == []
                at_kill = api.governor(sid)
                for i, w in enumerate(workers):
                    assert w.wait(timeout=15) == 0, procs.log(f"shard-{i}")
                for m in markers:
                    got = read_json(m)
                    assert (got["stage"], got["reason"], got["session_id"]) == (
                        "run",
                        "session_killed",
                        sid,
                    )
                    assert got["steps"] >= 1
                    assert 0 <= got["at"] - killed_at < 5.0, got["at"] - killed_at

                # a fourth process, started after the kill with a carrier made before it
                late_marker = procs.folder / "late.marker"
                late_ready = procs.folder / "late.ready"
                late = procs.start(
                    "late",
                    worker_env(
                        governed.url,
                        handoffs[3].env(),
                        AGENT_KEY,
                        WORKER_MODE="checkpoint",
                        WORKER_MARKER=str(late_marker),
                        WORKER_READY=str(late_ready),
                    ),
                )
                assert late.wait(timeout=30) == 0, procs.log("late")
                got = read_json(late_marker)
                assert (got["stage"], got["reason"], got["steps"]) == ("start", "session_killed", 0)
                assert not late_ready.exists()

                # and the parent may not delegate any more
                with pytest.raises(SessionKilled) as refused:
                    coord.delegate("helper", task="rotate shard 9", agent_id=f"late-{tag}")
                assert refused.value.reason == "session_killed"
                assert refused.value.session_id == sid
                assert stops == [(coord, refused.value)]
                assert coord.constrained is True
    finally:
        provider.shutdown()

    summary = api.get(f"/api/v1/sessions/{sid}")
    assert summary["status"] == "killed"
    assert summary["governor"]["killed_by"] == "admin-1"
    assert summary["governor"]["kill_reason"] == "credentials leaked"
    # every process running an agent says that it stopped, as soon as the kill event
    # reaches it (its listener posts it, so it may land a moment after the agents raised)
    expected_acks = {f"shard{i}-{tag}" for i in range(3)} | {f"coord-{tag}"}
    acked: set[str] = set()

    def learned_of_the_stop(records: list[dict[str, Any]]) -> set[str]:
        # as the governor counts it: an agent acknowledged, or was refused a step for the
        # kill (whichever reached it first; the other then adds no record)
        # (a refused usage report is the receiving agent's step, recorded as its parent's)
        return {
            d["to_agent"] if d["phase"] == "post_handoff" else d["from_agent"]
            for d in records
            if d["phase"] == "stopped"
            or (d["outcome"] == "stop" and d["reason"] == "session_killed")
        }

    def all_acked() -> bool:
        acked.update(learned_of_the_stop(api.decisions(sid)))
        return acked == expected_acks

    try:
        wait_for(all_acked)
    except AssertionError:
        pytest.fail(f"stop acknowledgements {sorted(acked)}, expected {sorted(expected_acks)}")
    records = api.decisions(sid)
    kills = [(d["actor"], d["reason"], d["detail"]) for d in records if d["phase"] == "kill"]
    assert kills == [
        ("admin-1", "credentials leaked", {"cancelled_approvals": [], "repeated": False})
    ]
    # after the kill nothing more was allowed, in any process
    kill_seq = next(d["seq"] for d in records if d["phase"] == "kill")
    after = [d for d in records if d["seq"] > kill_seq]
    assert {d["outcome"] for d in after if d["phase"] != "stopped"} == {"stop"}
    # and every process running an agent said that it stopped: the three shards and this
    # one, for the coordinator (the kill's answer lists that per agent)
    assert {d["outcome"] for d in after if d["phase"] == "stopped"} <= {"acknowledged"}
    assert learned_of_the_stop(after) == expected_acks
    final = summary["governor"]
    assert final["governed_tool_calls"] == at_kill["governed_tool_calls"]
    assert (final["governed_handoffs"], final["governed_agents"]) == (4, 5)
    assert final["decisions"] > at_kill["decisions"]  # the refused steps were still decided


def test_a_finished_sessions_listener_stops(governed: Governed) -> None:
    """Once a process's last agent of a session finished, its event stream is closed and
    the listener thread ends (a long-lived process runs many sessions)."""
    governed.set_policy()
    client = GovernorClient(governed.url, api_key=AGENT_KEY)
    gov = Governance(TracerProvider(), governor=client)
    with gov.session("summarize the weekly report") as session:
        sid = session.session_id
        with session.agent("writer", agent_id=f"writer-{uid()}") as agent:
            agent.checkpoint()
            name = f"agentgov-events-{sid[:24]}"
            assert [t for t in threading.enumerate() if t.name == name]
            # listening (a stream opened before the agent held its token is refused, then
            # opened again)
            wait_for(lambda: client._watches[sid]._sock is not None, timeout=10)
    wait_for(lambda: not [t for t in threading.enumerate() if t.name == name], timeout=5)
    assert sid not in client._watches


def test_a_listener_that_reconnects_after_the_kill_still_acknowledges(governed: Governed) -> None:
    """The kill event went out while this process's event stream was down: when the stream
    comes back it starts with the session's state, and the agents running here still say
    they stopped (not only when one of them next takes a step)."""
    governed.set_policy()
    api = governed.api
    client = GovernorClient(governed.url, api_key=AGENT_KEY)
    provider = make_provider(governed.url, service="reconnect", api_key=AGENT_KEY)
    gov = Governance(provider, governor=client)
    tag = uid()
    try:
        with gov.session("rebuild the search index") as session:
            sid = session.session_id
            with session.agent("indexer", agent_id=f"idx-{tag}"):
                watch = client._watches.pop(sid)  # the stream drops, as a network would
                watch.close()
                api.kill(sid, ADMIN_KEY, reason="index corrupted")
                time.sleep(0.5)  # a kill event would have been acknowledged by now
                assert [d for d in api.decisions(sid) if d["phase"] == "stopped"] == []
                client.watch(sid)  # listening again: the state says killed
                stopped = wait_for(
                    lambda: [d for d in api.decisions(sid) if d["phase"] == "stopped"]
                )
                assert [(d["from_agent"], d["outcome"]) for d in stopped] == [
                    (f"idx-{tag}", "acknowledged")
                ]
                with pytest.raises(SessionKilled):
                    client.check(sid)
    finally:
        provider.shutdown()


# -- 2. enforce against observe ------------------------------------------------------------

WORK = ["collect last week's logs", "compress the logs", "upload the archive"]


def _orchestrate(gov: Governance, tag: str) -> tuple[str, AgentSpan, list[Any], list[Stopped]]:
    """An orchestrator hands each work item to a worker; once constrained, it does the
    remaining work itself as tool calls."""
    done: list[tuple[str, str]] = []
    caught: list[Stopped] = []
    with gov.session("archive last week's logs") as session:
        with session.agent("orchestrator", agent_id=f"orch-{tag}") as orch:
            for n, item in enumerate(WORK):
                if not orch.constrained:
                    try:
                        worker = orch.delegate("worker", task=item, agent_id=f"w{n}-{tag}")
                    except Stopped as stop:
                        caught.append(stop)
                    else:
                        with worker, worker.tool("shell", command=f"run: {item}"):
                            done.append((item, worker.agent_id))
                        continue
                with orch.tool("shell", command=f"run: {item}"):
                    done.append((item, orch.agent_id))
    return session.session_id, orch, done, caught


def test_enforce_stops_and_the_orchestrator_falls_back(governed: Governed) -> None:
    governed.set_policy(max_handoffs=1)
    api = governed.api
    stops, hook = recorder()
    provider = make_provider(governed.url, service="enforce", api_key=AGENT_KEY)
    gov = Governance(
        provider, governor=GovernorClient(governed.url, api_key=AGENT_KEY), on_stop=hook
    )
    tag = uid()
    try:
        sid, orch, done, caught = _orchestrate(gov, tag)
    finally:
        provider.shutdown()

    assert len(caught) == 1
    stop = caught[0]
    assert type(stop) is Stopped
    assert (stop.reason, stop.phase) == ("handoff_budget_exceeded", "delegation")
    assert stops == [(orch, stop)]
    assert orch.constrained is True
    orch_id = f"orch-{tag}"
    assert done == [
        (WORK[0], f"w0-{tag}"),
        (WORK[1], orch_id),
        (WORK[2], orch_id),
    ]

    # the fallback work is in the audit trail, run by the orchestrator itself
    audit = wait_for(
        lambda: (
            (r := api.try_get(f"/api/v1/sessions/{sid}/audit")) and len(r["commands"]) == 3 and r
        )
    )
    rows = [(c["command"], c["agent_id"], c["chain"], c["depth"]) for c in audit["commands"]]
    assert rows == [
        (f"run: {WORK[0]}", f"w0-{tag}", [orch_id, f"w0-{tag}"], 1),
        (f"run: {WORK[1]}", orch_id, [orch_id], 0),
        (f"run: {WORK[2]}", orch_id, [orch_id], 0),
    ]
    handoffs = [
        (d["from_agent"], d["to_agent"], d["outcome"], d["reason"])
        for d in api.decisions(sid)
        if d["phase"] == "pre_handoff"
    ]
    assert handoffs == [
        ("", orch_id, "allow", ""),
        (orch_id, f"w0-{tag}", "allow", ""),
        (orch_id, f"w1-{tag}", "stop", "handoff_budget_exceeded"),
    ]
    live = api.governor(sid)
    assert (live["governed_agents"], live["governed_handoffs"]) == (2, 1)
    assert live["governed_tool_calls"] == 3


def test_observe_never_raises_and_records_the_stops(governed: Governed) -> None:
    governed.set_policy(max_handoffs=1)
    stops, hook = recorder()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gov = Governance(
        provider,
        governor=GovernorClient(governed.url, api_key=AGENT_KEY, mode="observe"),
        on_stop=hook,
    )
    tag = uid()
    sid, orch, done, caught = _orchestrate(gov, tag)

    assert caught == [] and stops == []
    assert orch.constrained is False
    assert done == [(item, f"w{n}-{tag}") for n, item in enumerate(WORK)]
    handoffs = [
        (d["to_agent"], d["outcome"], d["reason"], d["mode"])
        for d in governed.api.decisions(sid)
        if d["phase"] == "pre_handoff"
    ]
    assert handoffs == [
        (f"orch-{tag}", "allow", "", "enforce"),
        (f"w0-{tag}", "allow", "", "enforce"),
        (f"w1-{tag}", "stop", "handoff_budget_exceeded", "enforce"),
        (f"w2-{tag}", "stop", "handoff_budget_exceeded", "enforce"),
    ]
    # the agent saw the stops too: recorded on the orchestrator's span, not raised
    (orch_span,) = [
        s
        for s in exporter.get_finished_spans()
        if s.attributes["gen_ai.agent.id"] == f"orch-{tag}" and s.name.startswith("invoke_agent")
    ]
    decided = [
        (e.attributes["agentgov.decision.outcome"], e.attributes.get("agentgov.decision.reason"))
        for e in orch_span.events
        if e.name == "agentgov.decision"
    ]
    assert decided == [
        ("allow", None),
        ("stop", "handoff_budget_exceeded"),
        ("stop", "handoff_budget_exceeded"),
    ]
    # the stopped workers ran but never counted as governed agents
    live = governed.api.governor(sid)
    assert (live["governed_agents"], live["governed_handoffs"]) == (2, 1)


# -- 3. approvals from the SDK -------------------------------------------------------------


@dataclass
class Review:
    """A reviewer on another thread: waits for the session's pending approval, then acts."""

    api: Api
    session_id: str
    action: str  # approve, deny, kill
    entered: threading.Event = field(default_factory=threading.Event)
    pending: list[dict[str, Any]] = field(default_factory=list)
    entered_before: bool | None = None
    reasked_records: int | None = None
    self_approval: int | None = None
    status: int | None = None
    response: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> Review:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            self.pending = wait_for(
                lambda: self.api.approvals(self.session_id, "pending"), timeout=20
            )
            # the agent keeps waiting (and asking again) while nobody decides; a re-ask of a
            # pending approval writes no record: one request, one decision
            asked = self.api.governor(self.session_id)["decisions"]
            time.sleep(2.5)
            self.reasked_records = self.api.governor(self.session_id)["decisions"] - asked
            self.entered_before = self.entered.is_set()
            aid = self.pending[0]["approval_id"]
            if self.action == "kill":
                self.response = self.api.kill(self.session_id, ADMIN_KEY, reason="refund fraud")
                return
            mine = self.api.post(f"/api/v1/approvals/{aid}/approve", AGENT_KEY, {})
            self.self_approval = mine.status_code
            r = self.api.post(
                f"/api/v1/approvals/{aid}/{self.action}", REVIEWER_KEY, {"comment": "checked"}
            )
            self.status, self.response = r.status_code, r.json()
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(30)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def _refund(gov: Governance, review_of: Callable[[str], Review], tag: str) -> Any:
    """A billing agent's refund call, with a reviewer started for its session."""
    with gov.session("refund order 1042: damaged in transit") as session:
        review = review_of(session.session_id).start()
        with session.agent("billing", agent_id=f"billing-{tag}") as agent:
            try:
                with agent.tool(REFUND_TOOL, command="refund order 1042 25.00 EUR"):
                    review.entered.set()
                outcome: Stopped | None = None
            except Stopped as stop:
                outcome = stop
    review.join()
    return session.session_id, agent, review, outcome


def test_approval_granted_lets_the_tool_call_proceed(governed: Governed) -> None:
    governed.set_policy(require_approval_for=[REFUND_TOOL])
    api = governed.api
    tag = uid()
    stops, hook = recorder()
    gov = agent_governance(governed.url, on_stop=hook, approval_timeout=30)
    sid, agent, review, outcome = _refund(gov, lambda s: Review(api, s, "approve"), tag)

    assert outcome is None and stops == []
    assert review.entered.is_set()
    assert review.entered_before is False  # blocked until the reviewer approved
    assert len(review.pending) == 1
    pending = review.pending[0]
    assert (pending["kind"], pending["status"], pending["requested_by"], pending["requester"]) == (
        "tool",
        "pending",
        f"billing-{tag}",
        "agent-1",
    )
    assert pending["request"] == {
        "agent_id": f"billing-{tag}",
        "tool": REFUND_TOOL,
        "command": "refund order 1042 25.00 EUR",
        "reason": "approval_required_for_tool",
    }
    assert review.reasked_records == 0
    assert review.self_approval == 403  # an agent key may not approve
    assert review.status == 200
    assert (review.response["status"], review.response["approver"]) == ("approved", "reviewer-1")
    assert review.response["comment"] == "checked"
    assert api.governor(sid)["governed_tool_calls"] == 1
    approval = api.get(f"/api/v1/approvals/{pending['approval_id']}")
    assert (approval["status"], approval["approver"]) == ("approved", "reviewer-1")


def test_approval_denied_raises_stopped(governed: Governed) -> None:
    governed.set_policy(require_approval_for=[REFUND_TOOL])
    api = governed.api
    stops, hook = recorder()
    gov = agent_governance(governed.url, on_stop=hook, approval_timeout=30)
    sid, agent, review, outcome = _refund(gov, lambda s: Review(api, s, "deny"), uid())

    assert type(outcome) is Stopped
    assert (outcome.reason, outcome.phase) == ("approval_denied", "tool call")
    assert not review.entered.is_set()
    assert (review.status, review.response["status"]) == (200, "denied")
    assert stops == [(agent, outcome)]
    assert agent.constrained is True
    assert api.governor(sid)["governed_tool_calls"] == 0


def test_approval_expires_without_a_decision(governed: Governed) -> None:
    governed.set_policy(require_approval_for=[REFUND_TOOL], approval_ttl_s=1)
    api = governed.api
    gov = agent_governance(governed.url, approval_timeout=30)
    tag = uid()
    started = time.monotonic()
    with gov.session("refund order 1043") as session:
        with session.agent("billing", agent_id=f"billing-{tag}") as agent:
            with pytest.raises(Stopped) as stopped:
                with agent.tool(REFUND_TOOL, command="refund order 1043 10.00 EUR"):
                    pytest.fail("the refund ran without an approval")
    waited = time.monotonic() - started
    assert (stopped.value.reason, stopped.value.phase) == ("approval_expired", "tool call")
    assert 1.0 <= waited < 10.0
    expired = api.approvals(session.session_id)
    assert [(a["status"], a["approver"]) for a in expired] == [("expired", "governor")]
    assert api.governor(session.session_id)["governed_tool_calls"] == 0


def test_kill_while_waiting_for_approval(governed: Governed) -> None:
    governed.set_policy(require_approval_for=[REFUND_TOOL])
    api = governed.api
    gov = agent_governance(governed.url, approval_timeout=30)
    sid, agent, review, outcome = _refund(gov, lambda s: Review(api, s, "kill"), uid())

    assert isinstance(outcome, SessionKilled)
    assert outcome.reason == "session_killed"
    assert not review.entered.is_set()
    aid = review.pending[0]["approval_id"]
    assert review.response["cancelled_approvals"] == [aid]
    approval = api.get(f"/api/v1/approvals/{aid}")
    assert approval["status"] == "cancelled"
    assert api.get(f"/api/v1/sessions/{sid}")["status"] == "killed"


# -- 4. budgets ----------------------------------------------------------------------------


def test_shared_usd_budget_stops_usage(governed: Governed) -> None:
    governed.set_policy(shared_max_usd=1.0)
    api = governed.api
    stops, hook = recorder()
    gov = agent_governance(governed.url, on_stop=hook)
    with gov.session("summarise the quarter's tickets") as session:
        with session.agent("analyst", agent_id=f"analyst-{uid()}") as agent:
            agent.usage(input_tokens=1200, output_tokens=300, usd=0.6)
            assert stops == []
            with pytest.raises(Stopped) as stopped:
                agent.usage(input_tokens=900, output_tokens=200, usd=0.5)
    assert (stopped.value.reason, stopped.value.phase) == ("shared_budget_exceeded", "usage")
    assert stops == [(agent, stopped.value)]
    assert agent.constrained is True
    assert api.governor(session.session_id)["budget_usd"] == pytest.approx(1.1)


def test_shared_tool_call_budget_stops_the_next_call(governed: Governed) -> None:
    governed.set_policy(shared_max_tool_calls=3)
    api = governed.api
    ran: list[int] = []
    gov = agent_governance(governed.url)
    with gov.session("list the weekly reports") as session:
        with session.agent("reader", agent_id=f"reader-{uid()}") as agent:
            for n in range(3):
                with agent.tool("shell", command=f"ls /srv/reports/week-{n}"):
                    ran.append(n)
            with pytest.raises(Stopped) as stopped:
                with agent.tool("shell", command="ls /srv/reports/week-3"):
                    ran.append(3)
    assert ran == [0, 1, 2]
    assert (stopped.value.reason, stopped.value.phase) == ("shared_budget_exceeded", "tool call")
    assert api.governor(session.session_id)["governed_tool_calls"] == 3


def test_concurrency_limit_frees_a_slot_when_a_child_finishes(governed: Governed) -> None:
    # the root agent counts: lead + one child are the two concurrent agents allowed
    governed.set_policy(max_concurrent_agents=2)
    api = governed.api
    stops, hook = recorder()
    gov = agent_governance(governed.url, on_stop=hook)
    tag = uid()
    with gov.session("profile the three services") as session:
        sid = session.session_id
        with session.agent("lead", agent_id=f"lead-{tag}") as lead:
            with lead.delegate("profiler", task="profile api", agent_id=f"pa-{tag}") as first:
                assert api.governor(sid)["active_agents"] == 2
                with pytest.raises(Stopped) as stopped:
                    lead.delegate("profiler", task="profile db", agent_id=f"pb-{tag}")
                with first.tool("shell", command="py-spy dump --pid 4242"):
                    pass
            assert api.governor(sid)["active_agents"] == 1
            with lead.delegate("profiler", task="profile db", agent_id=f"pc-{tag}") as again:
                assert api.governor(sid)["active_agents"] == 2
                with again.tool("shell", command="py-spy dump --pid 4343"):
                    pass
    assert (stopped.value.reason, stopped.value.phase) == ("concurrency_limit", "delegation")
    assert stops == [(lead, stopped.value)]
    handoffs = [
        (d["to_agent"], d["outcome"], d["reason"])
        for d in api.decisions(sid)
        if d["phase"] == "pre_handoff"
    ]
    assert handoffs == [
        (f"lead-{tag}", "allow", ""),
        (f"pa-{tag}", "allow", ""),
        (f"pb-{tag}", "stop", "concurrency_limit"),
        (f"pc-{tag}", "allow", ""),
    ]
    live = api.governor(sid)
    assert (live["active_agents"], live["governed_agents"], live["governed_handoffs"]) == (0, 3, 2)


# -- 5. fail closed ------------------------------------------------------------------------


def test_unreachable_governor_fails_closed_by_default() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    gov = Governance(TracerProvider(), governor=GovernorClient(url, timeout=0.5))
    with gov.session("clean up old deployments") as session:
        with pytest.raises(GovernorUnavailable) as refused:
            session.agent("planner")
    assert refused.value.reason == "governor_unreachable"
    assert url in str(refused.value)


def test_unreachable_governor_with_fail_open_lets_the_run_proceed() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gov = Governance(provider, governor=GovernorClient(url, timeout=0.5, fail_closed=False))
    done = []
    with gov.session("clean up old deployments") as session:
        with session.agent("planner", agent_id="planner-1") as planner:
            with planner.delegate("cleaner", task="prune images", agent_id="cleaner-1") as c:
                with c.tool("shell", command="docker image prune -f"):
                    done.append(c.agent_id)
    assert done == ["cleaner-1"]
    assert planner.constrained is False and c.constrained is False
    events = {
        s.attributes["gen_ai.agent.id"]: [
            (
                e.attributes["agentgov.decision.phase"],
                e.attributes["agentgov.decision.outcome"],
                e.attributes.get("agentgov.decision.reason"),
            )
            for e in s.events
            if e.name == "agentgov.decision"
        ]
        for s in exporter.get_finished_spans()
        if s.name.startswith("invoke_agent")
    }
    assert events == {
        "planner-1": [("pre_handoff", "allow", "governor_unavailable")],
        "cleaner-1": [("tool", "allow", "governor_unavailable")],
    }


def test_refused_by_the_governor_fails_closed(governed: Governed) -> None:
    governed.set_policy()
    gov = Governance(
        TracerProvider(), governor=GovernorClient(governed.url, api_key="not-a-key-0123456789")
    )
    with gov.session("clean up old deployments") as session:
        with pytest.raises(GovernorUnavailable) as refused:
            session.agent("planner")
    assert refused.value.reason == "governor_refused"
    assert "401: unknown API key" in str(refused.value)


def test_fail_open_does_not_bypass_a_refusing_governor(governed: Governed) -> None:
    governed.set_policy(max_handoffs=0)
    client = GovernorClient(governed.url, api_key="not-a-key-0123456789", fail_closed=False)
    gov = Governance(TracerProvider(), governor=client)
    ran = []
    with pytest.raises(Stopped) as refused:
        with gov.session("clean up old deployments") as session:
            with session.agent("planner") as planner:
                with planner.delegate("cleaner", permissions=["fs.write:/"]) as cleaner:
                    with cleaner.tool("shell", command="rm -rf /opt/app"):
                        ran.append(cleaner.agent_id)
    assert refused.value.reason == "governor_refused"
    assert ran == []


# -- permissions are decided wherever an agent opens ---------------------------------------


def test_sub_agent_opened_with_gov_agent_is_decided(governed: Governed) -> None:
    governed.set_policy()
    gov = agent_governance(governed.url)
    tag = uid()
    with gov.session("read the app logs") as session:
        with session.agent("reader", agent_id=f"reader-{tag}", permissions=["fs.read:/opt/app"]):
            with pytest.raises(Stopped) as stopped:
                with gov.agent("helper", agent_id=f"helper-{tag}", permissions=["fs.write:/"]):
                    pass
    assert stopped.value.reason == "permission_escalation"


def test_handoff_receiver_cannot_widen_its_permissions(governed: Governed) -> None:
    governed.set_policy()
    gov = agent_governance(governed.url)
    tag = uid()
    with gov.session("read the app logs") as session:
        with session.agent(
            "reader", agent_id=f"reader-{tag}", permissions=["fs.read:/opt/app"]
        ) as r:
            carrier = r.handoff(
                "tailer", permissions=["fs.read:/opt/app/logs"], agent_id=f"tailer-{tag}"
            ).headers()
    # the receiving side (another process in real use) opens the handoff
    receiver = agent_governance(governed.url)
    with pytest.raises(Stopped) as stopped:
        with receiver.agent("tailer", carrier=carrier, permissions=["fs.write:/"]):
            pass
    assert stopped.value.reason == "permission_escalation"


# -- 6. the five questions -----------------------------------------------------------------

INTENT = "Free disk space on app-01: clear old caches, archive the logs"
ROOT_PERMS = ["fs.read:/opt/app", "fs.write:/opt/app", "net.egress"]
PLANNER_PERMS = ["fs.read:/opt/app", "fs.write:/opt/app/tmp", "net.egress"]
EXECUTOR_PERMS = ["fs.read:/opt/app/logs"]
GRANT = "grant fs.write:/ to cleanup"
ROOT_CMD = "df -h /opt/app"
PLANNER_CMD = "rm -rf /opt/app/tmp/cache"
EXECUTOR_CMD = "rsync -a /opt/app/logs/ archive.internal:/srv/logs/app-01/"

_DUMP = """
import json, sys
import clickhouse_connect
client = clickhouse_connect.get_client(dsn="chdb://" + sys.argv[1])
sid = sys.argv[2]
spans = client.query(
    "SELECT SpanId, Operation, AgentId, Permissions, Messages FROM agentgov_spans"
    " WHERE SessionId = {s:String} ORDER BY Timestamp", parameters={"s": sid}
).named_results()
raw = client.query(
    "SELECT * FROM otel_traces WHERE SpanAttributes['agentgov.session.id'] = {s:String}",
    parameters={"s": sid},
).named_results()
print(json.dumps({"spans": list(spans), "raw": list(raw)}, default=str))
"""


@dataclass
class FiveQuestions:
    tag: str
    session_id: str = ""
    kill_session_id: str = ""
    escalation: Stopped | None = None
    message_escalation: Stopped | None = None
    stops: StopLog = field(default_factory=list)
    child: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    audit: list[dict[str, Any]] = field(default_factory=list)
    graph: dict[str, Any] = field(default_factory=dict)
    kill: dict[str, Any] = field(default_factory=dict)
    killed_at: float = 0.0
    kill_exits: list[int | None] = field(default_factory=list)
    kill_markers: list[dict[str, Any]] = field(default_factory=list)
    kill_summary: dict[str, Any] = field(default_factory=dict)
    spans: list[dict[str, Any]] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)

    def ids(self) -> tuple[str, str, str]:
        return f"super-{self.tag}", f"planner-{self.tag}", f"executor-{self.tag}"


@pytest.fixture(scope="module")
def five(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FiveQuestions]:
    """One governed run, spans exported to a collector with the API open; then a second
    session killed across two processes; then the collector stops and its store is read."""
    base = tmp_path_factory.mktemp("five")
    c = CollectorProcess(base / "data", free_port(), free_port()).start()
    api = Api(c.url, None)
    group = Processes(base)
    run = FiveQuestions(uid())
    root_id, planner_id, executor_id = run.ids()
    provider = make_provider(c.url, service="five-questions")
    try:
        gov = Governance(
            provider,
            governor=GovernorClient(c.url),
            on_stop=lambda agent, stop: run.stops.append((agent, stop)),
        )
        with gov.session(INTENT) as session:
            run.session_id = session.session_id
            with session.agent("supervisor", agent_id=root_id, permissions=ROOT_PERMS) as root:
                with root.tool("shell", command=ROOT_CMD):
                    pass
                with root.delegate(
                    "planner",
                    task="plan the cleanup",
                    permissions=PLANNER_PERMS,
                    agent_id=planner_id,
                ) as planner:
                    with planner.tool("shell", command=PLANNER_CMD):
                        pass
                    # (4) a message asks for a wider grant; the delegation asking it stops
                    planner.message(f"cleanup-{run.tag}", GRANT)
                    try:
                        planner.delegate(
                            "cleanup",
                            task="clean /",
                            permissions=["fs.write:/"],
                            agent_id=f"cleanup-{run.tag}",
                        )
                    except Stopped as stop:
                        run.message_escalation = stop
                    # (3) a child asking what its parent lacks stops; a narrower one runs
                    try:
                        planner.delegate(
                            "executor",
                            task="archive the logs",
                            permissions=["fs.read:/opt/app/logs", "fs.write:/opt/app/logs"],
                            agent_id=f"wide-{run.tag}",
                        )
                    except Stopped as stop:
                        run.escalation = stop
                    handoff = planner.handoff(
                        "executor",
                        task="archive the logs",
                        permissions=EXECUTOR_PERMS,
                        agent_id=executor_id,
                    )
                    marker = base / "executor.marker"
                    child = group.start(
                        "executor",
                        worker_env(
                            c.url,
                            handoff.env(),
                            None,
                            WORKER_MODE="once",
                            WORKER_MARKER=str(marker),
                            WORKER_NAME="executor",
                            WORKER_SERVICE="five-executor",
                            WORKER_TOOL="shell",
                            WORKER_COMMAND=EXECUTOR_CMD,
                        ),
                    )
                    assert child.wait(timeout=60) == 0, group.log("executor")
                    run.child = read_json(marker)
        provider.force_flush()

        sid = run.session_id

        seen: dict[str, Any] = {}

        def stored() -> Any:
            for name, path in (("audit", "/audit"), ("graph", "/graph"), ("summary", "")):
                seen[name] = api.try_get(f"/api/v1/sessions/{sid}{path}")
            audit, graph, summary = seen["audit"], seen["graph"], seen["summary"]
            done = (
                audit
                and len(audit["commands"]) == 3
                and graph
                and len(graph["nodes"]) == 3
                and summary
                and summary["status"] == "completed"
                and summary["spans"] == 6  # 3 agents, 3 commands
            )
            return done and (audit, graph, summary)

        try:
            audit, run.graph, run.summary = wait_for(stored, timeout=30)
        except AssertionError as exc:
            raise AssertionError(f"spans of the run not all stored: {seen}") from exc
        run.audit = audit["commands"]

        # (2) in miniature: one kill stops a session's agents in two processes
        with gov.session("drain the job queue") as session:
            run.kill_session_id = session.session_id
            with session.agent("dispatcher", agent_id=f"disp-{run.tag}") as disp:
                carriers = [
                    disp.handoff(
                        "drainer", task=f"drain queue {i}", agent_id=f"dr{i}-{run.tag}"
                    ).env()
                    for i in range(2)
                ]
                workers, markers, _ = run_loop_workers(
                    group, c.url, None, carriers, ["tool", "checkpoint"], "drain"
                )
                run.killed_at = time.time()
                run.kill = api.kill(run.kill_session_id, None, actor="oncall@example.com")
                run.kill_exits = [w.wait(timeout=15) for w in workers]
                run.kill_markers = [read_json(m) for m in markers]
        run.kill_summary = api.get(f"/api/v1/sessions/{run.kill_session_id}")
    finally:
        provider.shutdown()
        group.close()
        stop_collector(c)

    out = subprocess.run(
        [sys.executable, "-c", _DUMP, str(c.data_dir), run.session_id],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    dumped = json.loads(out.stdout)
    run.spans, run.raw = dumped["spans"], dumped["raw"]
    yield run


def test_q1_any_command_traces_back_to_the_human_instruction(five: FiveQuestions) -> None:
    root_id, planner_id, executor_id = five.ids()
    assert five.child == {
        "stage": "done",
        "agent_id": executor_id,
        "chain": [root_id, planner_id, executor_id],
        "depth": 2,
        "permissions": EXECUTOR_PERMS,
        "task": "archive the logs",
    }
    rows = [
        (c["agent_id"], c["parent_id"], c["chain"], c["depth"], c["intent"], c["command"])
        for c in five.audit
    ]
    assert rows == [
        (root_id, "", [root_id], 0, INTENT, ROOT_CMD),
        (planner_id, root_id, [root_id, planner_id], 1, INTENT, PLANNER_CMD),
        (executor_id, planner_id, [root_id, planner_id, executor_id], 2, INTENT, EXECUTOR_CMD),
    ]


def test_q2_one_action_stops_every_agent(five: FiveQuestions) -> None:
    assert five.kill["status"] == "killed"
    assert five.kill["actor"] == "oncall@example.com"
    assert five.kill_exits == [0, 0]
    for m in five.kill_markers:
        assert (m["stage"], m["reason"], m["session_id"]) == (
            "run",
            "session_killed",
            five.kill_session_id,
        )
        assert 0 <= m["at"] - five.killed_at < 5.0
    assert five.kill_summary["status"] == "killed"
    assert five.kill_summary["governor"]["killed_by"] == "oncall@example.com"


def test_q3_sub_agents_hold_only_what_they_need(five: FiveQuestions) -> None:
    root_id, planner_id, executor_id = five.ids()
    assert five.escalation is not None
    assert (five.escalation.reason, five.escalation.phase) == (
        "permission_escalation",
        "delegation",
    )
    nodes = {(n["id"], n["depth"], n["parent_id"]) for n in five.graph["nodes"]}
    assert nodes == {(root_id, 0, ""), (planner_id, 1, root_id), (executor_id, 2, planner_id)}
    edges = {(e["source"], e["target"], e["task"]) for e in five.graph["edges"]}
    assert edges == {
        (root_id, planner_id, "plan the cleanup"),
        (planner_id, executor_id, "archive the logs"),
    }
    perms = {r["AgentId"]: r["Permissions"] for r in five.spans if r["Operation"] == "invoke_agent"}
    assert perms == {
        root_id: ROOT_PERMS,
        planner_id: PLANNER_PERMS,
        executor_id: EXECUTOR_PERMS,
    }


def test_q4_messages_never_widen_permissions(five: FiveQuestions) -> None:
    _, planner_id, _ = five.ids()
    assert five.message_escalation is not None
    assert five.message_escalation.reason == "permission_escalation"
    assert [(a.agent_id, s.reason) for a, s in five.stops] == [
        (planner_id, "permission_escalation"),
        (planner_id, "permission_escalation"),
    ]
    (planner_span,) = [
        r
        for r in five.raw
        if r["SpanAttributes"].get("gen_ai.agent.id") == planner_id
        and r["SpanName"].startswith("invoke_agent")
    ]
    events = list(zip(planner_span["Events.Name"], planner_span["Events.Attributes"], strict=True))
    messages = [attrs for name, attrs in events if name == "agentgov.message"]
    assert messages == [
        {
            "agentgov.message.from": planner_id,
            "agentgov.message.to": f"cleanup-{five.tag}",
            "agentgov.message.digest": "sha256:" + hashlib.sha256(GRANT.encode()).hexdigest(),
            "agentgov.message.size": str(len(GRANT)),
            # scored in the sender's process; this asks for a grant, it injects nothing
            "agentgov.message.injection": "0",
        }
    ]
    stops = [
        (a["agentgov.decision.phase"], a["agentgov.decision.reason"])
        for name, a in events
        if name == "agentgov.decision" and a["agentgov.decision.outcome"] == "stop"
    ]
    assert stops == [("delegation", "permission_escalation")] * 2
    # the content is stored nowhere, in any span of the session
    assert GRANT not in json.dumps(five.raw, default=str)
    (planner_row,) = [
        r for r in five.spans if r["AgentId"] == planner_id and r["Operation"] == "invoke_agent"
    ]
    assert planner_row["Messages"] == 1


def test_q5_reviewers_see_session_risk_beside_command_risk(five: FiveQuestions) -> None:
    assert [(c["command"], c["risk"]) for c in five.audit] == [
        (ROOT_CMD, 0),
        (PLANNER_CMD, 80),
        (EXECUTOR_CMD, 15),
    ]
    assert five.summary["max_command_risk"] == 80
    assert five.summary["session_risk"] == 83  # 1 - (1 - .80) * (1 - .15)
    assert five.summary["governor"]["decided_risk"] == 83
    assert five.summary["governor"]["governed_tool_calls"] == 3
