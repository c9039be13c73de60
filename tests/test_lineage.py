"""Lineage across threads, asyncio tasks and processes, checked in ClickHouse.

One session runs once per module (fixture ``run``): the root agent delegates to agents in
worker threads, in concurrent asyncio tasks, in a child process (which delegates in
process, then hands off to a grandchild process at depth 3), and to an agent that receives
only baggage (lineage without trace context). The collector's API (which reads ClickHouse)
is queried while it runs; once it has stopped, its ``agentgov_spans`` rows are read straight
from the store, for the columns the API does not return (task and permissions per row).

The propagation unit tests at the end need no collector.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

try:  # tests/ as a plain folder (rootdir on sys.path) or as a package
    from conftest import CollectorProcess, free_port, make_provider, wait_for
except ImportError:  # pragma: no cover
    from tests.conftest import CollectorProcess, free_port, make_provider, wait_for
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from agentgov.instrumentation import (
    Governance,
    InvalidIdError,
    Lineage,
    NoSessionError,
    bind,
    current_lineage,
    extract,
    inject,
    inject_env,
)
from agentgov.instrumentation.lineage import MAX_BAGGAGE_INTENT, clip_for_baggage

INTENT = "Roll out release 1.2 to staging — then verify health ✓"
P = "planner-1"
ROOT_PERMS = ["fs:read", "fs:write", "net:egress"]
DEPLOY_PERMS = ["deploy:staging", "net:egress"]
THREADS = 3
TASKS = 4


@dataclass(frozen=True)
class Expected:
    name: str
    chain: list[str]
    task: str
    role: str
    permissions: list[str]
    service: str
    tool: str
    command: str

    @property
    def depth(self) -> int:
        return len(self.chain) - 1

    @property
    def parent(self) -> str:
        return self.chain[-2] if len(self.chain) > 1 else ""


def _expected() -> dict[str, Expected]:
    parent, child, grandchild = "lineage-parent", "lineage-child", "lineage-grandchild"
    out = {
        P: Expected("planner", [P], "", "planner", ROOT_PERMS, parent, "shell", "ls -la /opt/app")
    }
    for i in range(THREADS):
        out[f"tw-{i}"] = Expected(
            "thread-worker",
            [P, f"tw-{i}"],
            f"thread task {i}",
            "worker",
            ROOT_PERMS,
            parent,
            "shell",
            f"cat /opt/app/part-{i}",
        )
        out[f"td-{i}"] = Expected(
            "thread-delegate",
            [P, f"td-{i}"],
            f"delegated {i}",
            "",
            ["fs:read"],
            parent,
            "shell",
            f"wc -l /opt/app/part-{i}",
        )
    for i in range(TASKS):
        out[f"aw-{i}"] = Expected(
            "async-worker",
            [P, f"aw-{i}"],
            f"async task {i}",
            "",
            ROOT_PERMS,
            parent,
            "http",
            f"curl -fsS https://staging.example.com/shard/{i}",
        )
        out[f"as-{i}"] = Expected(
            "async-sub",
            [P, f"aw-{i}", f"as-{i}"],
            f"sub task {i}",
            "",
            ROOT_PERMS,
            parent,
            "shell",
            f"echo shard {i} done",
        )
    out["deployer-1"] = Expected(
        "deployer",
        [P, "deployer-1"],
        "deploy release 1.2 to staging",
        "deployer",
        DEPLOY_PERMS,
        child,
        "shell",
        "kubectl apply -f release-1.2.yaml",
    )
    out["packager-1"] = Expected(
        "packager",
        [P, "deployer-1", "packager-1"],
        "package the release",
        "",
        DEPLOY_PERMS,
        child,
        "shell",
        "tar czf release-1.2.tgz build/",
    )
    out["verifier-1"] = Expected(
        "verifier",
        [P, "deployer-1", "packager-1", "verifier-1"],
        "verify staging health",
        "verifier",
        DEPLOY_PERMS,
        grandchild,
        "http",
        "curl -fsS https://staging.example.com/health",
    )
    out["auditor-1"] = Expected(
        "auditor",
        [P, "auditor-1"],
        "audit without trace context",
        "",
        ROOT_PERMS,
        parent,
        "shell",
        "git log --oneline -5",
    )
    return out


EXPECTED = _expected()

CHILD_SCRIPT = """
import json, os, subprocess, sys
from agentgov.instrumentation import Governance, configure

provider = configure()
gov = Governance()
report = {}
try:
    if sys.argv[1] == "child":
        with gov.agent("deployer", carrier=os.environ) as agent:
            with agent.tool("shell", command="kubectl apply -f release-1.2.yaml"):
                pass
            with agent.delegate("packager", task="package the release",
                                agent_id="packager-1") as packager:
                with packager.tool("shell", command="tar czf release-1.2.tgz build/"):
                    pass
                handoff = packager.handoff("verifier", task="verify staging health",
                                           role="verifier", agent_id="verifier-1")
                env = dict(os.environ)
                env.update(handoff.env())
                env["OTEL_SERVICE_NAME"] = "lineage-grandchild"
                out = subprocess.run([sys.executable, __file__, "grandchild"], env=env,
                                     capture_output=True, text=True, timeout=120)
                if out.returncode:
                    sys.stderr.write(out.stderr)
                    sys.exit(3)
                report["grandchild"] = json.loads(out.stdout)
    else:
        with gov.agent("verifier", carrier=os.environ) as agent:
            with agent.tool("http", command="curl -fsS https://staging.example.com/health"):
                pass
    report.update(
        agent_id=agent.agent_id, chain=list(agent.lineage.chain), depth=agent.depth,
        parent_id=agent.parent_id, task=agent.task, role=agent.lineage.role,
        permissions=list(agent.lineage.permissions or ()),
        trace_id=format(agent.span.get_span_context().trace_id, "032x"),
    )
finally:
    provider.shutdown()
print(json.dumps(report))
"""

_DUMP = """
import json, sys
import clickhouse_connect
client = clickhouse_connect.get_client(dsn="chdb://" + sys.argv[1])
rows = client.query(
    "SELECT SessionId, TraceId, SpanId, ParentSpanId, ServiceName, Operation, AgentId,"
    " AgentName, ParentAgentId, Chain, Depth, Intent, Task, Role, Permissions, ToolName,"
    " Command FROM agentgov_spans WHERE SessionId = {s:String} ORDER BY Timestamp",
    parameters={"s": sys.argv[2]},
).named_results()
print(json.dumps(list(rows), default=str))
"""


@dataclass
class Run:
    session_id: str
    root_trace: str
    root_span: str
    child: dict[str, Any]
    thread_errors: list[BaseException]
    orphan: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    graph: dict[str, Any] = field(default_factory=dict)
    audit: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def agent_rows(self) -> dict[str, dict[str, Any]]:
        out = {r["AgentId"]: r for r in self.rows if r["Operation"] == "invoke_agent"}
        assert len(out) == len([r for r in self.rows if r["Operation"] == "invoke_agent"])
        return out

    def tool_rows(self) -> dict[str, dict[str, Any]]:
        return {r["AgentId"]: r for r in self.rows if r["Operation"] == "execute_tool"}


def _threads(
    gov: Governance, root: Any, errors: list[BaseException], orphan: dict[str, Any]
) -> None:
    """(a) agents in worker threads: by ``bind`` and by explicit ``delegate``; and a plain
    thread without either, which has no session."""
    together = threading.Barrier(2 * THREADS, timeout=30)

    def guarded(fn: Any) -> Any:
        def run(i: int) -> None:
            try:
                fn(i)
            except BaseException as exc:
                errors.append(exc)

        return run

    def bound_worker(i: int) -> None:
        exp = EXPECTED[f"tw-{i}"]
        with gov.agent(exp.name, task=exp.task, role=exp.role, agent_id=f"tw-{i}") as w:
            together.wait()  # every thread's agent is open at once
            with w.tool(exp.tool, command=exp.command):
                pass

    def explicit_worker(i: int) -> None:
        exp = EXPECTED[f"td-{i}"]
        with root.delegate(
            exp.name, task=exp.task, permissions=exp.permissions, agent_id=f"td-{i}"
        ) as d:
            together.wait()
            with d.tool(exp.tool, command=exp.command):
                pass

    def plain() -> None:
        orphan["lineage"] = current_lineage()
        orphan["span_valid"] = trace.get_current_span().get_span_context().is_valid
        try:
            gov.agent("orphan", agent_id="orphan-1")
        except NoSessionError as exc:
            orphan["error"] = exc

    threads = [
        threading.Thread(target=bind(guarded(bound_worker)), args=(i,)) for i in range(THREADS)
    ]
    threads += [
        threading.Thread(target=guarded(explicit_worker), args=(i,)) for i in range(THREADS)
    ]
    threads.append(threading.Thread(target=plain))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


async def _tasks(gov: Governance) -> None:
    """(b) agents in concurrent asyncio tasks; lineage follows without help."""
    together = asyncio.Barrier(TASKS)

    async def worker(i: int) -> None:
        exp = EXPECTED[f"aw-{i}"]
        with gov.agent(exp.name, task=exp.task, agent_id=f"aw-{i}") as a:
            await together.wait()
            await asyncio.sleep(0.002 * (TASKS - i))  # finish in reverse order
            with a.tool(exp.tool, command=exp.command):
                pass

            async def sub() -> None:
                sub_exp = EXPECTED[f"as-{i}"]
                with gov.agent(sub_exp.name, task=sub_exp.task, agent_id=f"as-{i}") as s:
                    await asyncio.sleep(0)
                    with s.tool(sub_exp.tool, command=sub_exp.command):
                        pass

            await asyncio.create_task(sub())

    await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(TASKS))), 30)


def _child_process(root: Any, url: str, script: Path) -> dict[str, Any]:
    """(c) a child process (and its grandchild) started with the handoff's environment."""
    exp = EXPECTED["deployer-1"]
    handoff = root.handoff(
        exp.name, task=exp.task, role=exp.role, permissions=exp.permissions, agent_id="deployer-1"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OTEL_") and k.upper() not in ("TRACEPARENT", "BAGGAGE")
    }
    env.update(handoff.env())
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=url, OTEL_SERVICE_NAME="lineage-child")
    proc = subprocess.run(
        [sys.executable, str(script), "child"], env=env, capture_output=True, text=True, timeout=180
    )
    if proc.returncode:
        raise RuntimeError(f"child process failed ({proc.returncode}):\n{proc.stderr}")
    return dict(json.loads(proc.stdout))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    base = tmp_path_factory.mktemp("lineage")
    script = base / "agent_process.py"
    script.write_text(CHILD_SCRIPT)
    collector = CollectorProcess(base / "data", free_port(), free_port()).start()
    try:
        provider = make_provider(collector.url, "http", service="lineage-parent")
        gov = Governance(provider)
        sid = f"lineage-{uuid.uuid4().hex[:12]}"
        errors: list[BaseException] = []
        orphan: dict[str, Any] = {}
        root_exp = EXPECTED[P]
        with (
            gov.session(INTENT, session_id=sid) as session,
            session.agent(
                root_exp.name, role=root_exp.role, permissions=root_exp.permissions, agent_id=P
            ) as root,
        ):
            with root.tool(root_exp.tool, command=root_exp.command):
                pass
            _threads(gov, root, errors, orphan)
            asyncio.run(_tasks(gov))
            child = _child_process(root, collector.url, script)
            aud = EXPECTED["auditor-1"]
            headers = root.handoff(aud.name, task=aud.task, agent_id="auditor-1").headers()
            with gov.agent(aud.name, carrier={"baggage": headers["baggage"]}) as auditor:
                with auditor.tool(aud.tool, command=aud.command):
                    pass
            ctx = root.span.get_span_context()
        assert provider.force_flush(30_000)
        provider.shutdown()

        result = Run(
            sid, format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"), child, errors, orphan
        )
        total = 2 * len(EXPECTED)
        wait_for(
            lambda: (
                collector.get(f"/api/v1/sessions/{sid}").status_code == 200
                and collector.get(f"/api/v1/sessions/{sid}").json()["spans"] >= total
            )
        )
        result.summary = collector.get(f"/api/v1/sessions/{sid}").json()
        result.graph = collector.get(f"/api/v1/sessions/{sid}/graph").json()
        result.audit = collector.get(f"/api/v1/sessions/{sid}/audit").json()["commands"]
    finally:
        collector.stop()
    proc = subprocess.run(
        [sys.executable, "-c", _DUMP, str(base / "data"), sid],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result.rows = json.loads(proc.stdout)
    yield result


# -- the session, end to end ---------------------------------------------------------------


def test_plain_thread_without_bind_has_no_session(run: Run) -> None:
    assert run.orphan["lineage"] is None
    assert run.orphan["span_valid"] is False
    err = run.orphan.get("error")
    assert isinstance(err, NoSessionError)
    assert "Governance.session" in str(err) and "carrier" in str(err)
    assert "orphan-1" not in {r["AgentId"] for r in run.rows}


def test_threads_and_tasks_ran_without_errors(run: Run) -> None:
    assert run.thread_errors == []


def test_session_summary_counts_every_agent_and_command(run: Run) -> None:
    s = run.summary
    assert s["session_id"] == run.session_id
    assert s["intent"] == INTENT
    assert s["agents"] == len(EXPECTED)
    assert s["spans"] == 2 * len(EXPECTED)
    assert s["tool_calls"] == len(EXPECTED)
    assert s["handoffs"] == len(EXPECTED) - 1  # every agent but the root has a parent
    assert s["max_depth"] == 3
    assert s["errors"] == 0
    assert s["status"] == "completed"


def test_graph_has_every_agent_with_its_parent_depth_and_task(run: Run) -> None:
    assert run.graph["session_id"] == run.session_id
    nodes = {n["id"]: n for n in run.graph["nodes"]}
    assert set(nodes) == set(EXPECTED)
    for aid, exp in EXPECTED.items():
        n = nodes[aid]
        got = (n["name"], n["role"], n["depth"], n["parent_id"], n["task"], n["tool_calls"])
        assert got == (exp.name, exp.role, exp.depth, exp.parent, exp.task, 1), aid
    edges = {(e["source"], e["target"], e["task"]) for e in run.graph["edges"]}
    assert edges == {(e.parent, aid, e.task) for aid, e in EXPECTED.items() if e.parent}


def test_audit_rows_carry_exact_lineage(run: Run) -> None:
    assert len(run.audit) == len(EXPECTED)
    by_agent = {r["agent_id"]: r for r in run.audit}
    assert set(by_agent) == set(EXPECTED)
    for aid, exp in EXPECTED.items():
        r = by_agent[aid]
        got = (
            r["agent_name"],
            r["parent_id"],
            r["chain"],
            r["depth"],
            r["intent"],
            r["tool"],
            r["command"],
            r["status"],
        )
        want = (exp.name, exp.parent, exp.chain, exp.depth, INTENT, exp.tool, exp.command, "Unset")
        assert got == want, aid


def test_store_rows_carry_session_task_and_permissions(run: Run) -> None:
    assert len(run.rows) == 2 * len(EXPECTED)
    assert {r["SessionId"] for r in run.rows} == {run.session_id}
    assert {r["Intent"] for r in run.rows} == {INTENT}
    agents, tools = run.agent_rows(), run.tool_rows()
    assert set(agents) == set(tools) == set(EXPECTED)
    for aid, exp in EXPECTED.items():
        a = agents[aid]
        got = (
            a["AgentName"],
            a["ParentAgentId"],
            a["Chain"],
            a["Depth"],
            a["Task"],
            a["Role"],
            a["Permissions"],
            a["ServiceName"],
        )
        want = (
            exp.name,
            exp.parent,
            exp.chain,
            exp.depth,
            exp.task,
            exp.role,
            exp.permissions,
            exp.service,
        )
        assert got == want, aid
        t = tools[aid]
        got = (
            t["AgentName"],
            t["ParentAgentId"],
            t["Chain"],
            t["Depth"],
            t["Role"],
            t["ToolName"],
            t["Command"],
            t["ServiceName"],
        )
        want = (
            exp.name,
            exp.parent,
            exp.chain,
            exp.depth,
            exp.role,
            exp.tool,
            exp.command,
            exp.service,
        )
        assert got == want, aid
        # tool spans carry who/why (session, chain, intent) and the caller's grant, so a
        # command can be judged against its scope on its own; not the agent's task
        assert (t["Task"], t["Permissions"]) == ("", list(agents[aid]["Permissions"])), aid


def test_trace_context_is_shared_where_it_was_propagated(run: Run) -> None:
    agents, tools = run.agent_rows(), run.tool_rows()
    traced = {aid for aid in EXPECTED if aid != "auditor-1"}
    assert {agents[a]["TraceId"] for a in traced} == {run.root_trace}
    assert {tools[a]["TraceId"] for a in traced} == {run.root_trace}
    # baggage without traceparent: same lineage, a trace of its own
    aud = agents["auditor-1"]
    assert aud["TraceId"] != run.root_trace and aud["ParentSpanId"] == ""
    assert tools["auditor-1"]["TraceId"] == aud["TraceId"]

    span_of = {aid: row["SpanId"] for aid, row in agents.items()}
    assert span_of[P] == run.root_span and agents[P]["ParentSpanId"] == ""
    for aid in traced - {P}:
        # each agent's span is a child of its parent agent's span, across every boundary
        assert agents[aid]["ParentSpanId"] == span_of[EXPECTED[aid].parent], aid
    for aid in EXPECTED:
        assert tools[aid]["ParentSpanId"] == span_of[aid], aid


def test_child_and_grandchild_processes_saw_the_lineage(run: Run) -> None:
    child, grandchild = run.child, run.child["grandchild"]
    for report, aid in ((child, "deployer-1"), (grandchild, "verifier-1")):
        exp = EXPECTED[aid]
        got = (
            report["agent_id"],
            report["chain"],
            report["depth"],
            report["parent_id"],
            report["task"],
            report["role"],
            report["permissions"],
            report["trace_id"],
        )
        want = (
            aid,
            exp.chain,
            exp.depth,
            exp.parent,
            exp.task,
            exp.role,
            exp.permissions,
            run.root_trace,
        )
        assert got == want
    assert grandchild["depth"] == 3


# -- propagation, unit level ---------------------------------------------------------------


@pytest.fixture
def gov() -> Governance:
    return Governance(TracerProvider())  # real SDK spans with real ids, exported nowhere


def test_handoff_headers_round_trip(gov: Governance) -> None:
    with (
        gov.session("ship it", session_id="sess-headers") as s,
        s.agent(
            "planner", role="planner", permissions=["repo:read", "ci:run"], agent_id="planner-1"
        ) as root,
    ):
        handoff = root.handoff(
            "builder",
            task="build the image",
            role="builder",
            permissions=["docker:build"],
            agent_id="builder-1",
        )
        headers = handoff.headers()
        sc = root.span.get_span_context()
    assert set(headers) == {"traceparent", "baggage"}
    assert headers["traceparent"] == f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"
    assert handoff.agent_id == "builder-1" and handoff.task == "build the image"

    ctx = extract(headers)
    assert current_lineage(ctx) == Lineage(
        session_id="sess-headers",
        intent="ship it",
        chain=("planner-1",),
        permissions=("docker:build",),
        task="build the image",
        handoff_to="builder-1",
        role="builder",
    )
    remote = trace.get_current_span(ctx).get_span_context()
    assert (remote.trace_id, remote.span_id, remote.is_remote) == (sc.trace_id, sc.span_id, True)

    with gov.agent("builder", carrier=headers) as builder:
        assert (builder.agent_id, builder.session_id, builder.task) == (
            "builder-1",
            "sess-headers",
            "build the image",
        )
        assert builder.lineage.chain == ("planner-1", "builder-1")
        assert (builder.depth, builder.parent_id, builder.lineage.role) == (
            1,
            "planner-1",
            "builder",
        )
        assert builder.lineage.permissions == ("docker:build",)
        assert builder.span.parent is not None
        assert (builder.span.parent.span_id, builder.span.context.trace_id) == (
            sc.span_id,
            sc.trace_id,
        )
        # a carrier for the next hop, written from the current context
        onward: dict[str, str] = {}
        inject(onward)
    nxt = current_lineage(extract(onward))
    assert nxt is not None
    assert (nxt.session_id, nxt.chain) == ("sess-headers", ("planner-1", "builder-1"))
    assert nxt.permissions == ("docker:build",) and nxt.intent == "ship it"


def test_received_handoff_is_not_forwarded_to_the_next_hop(gov: Governance) -> None:
    with gov.session("ship it") as s, s.agent("planner", agent_id="planner-1") as root:
        headers = root.handoff(
            "builder", task="build the image", role="builder", agent_id="builder-1"
        ).headers()
    with gov.agent("builder", carrier=headers) as builder:
        # an HTTP call made by the builder carries its context (inject), as documented
        onward: dict[str, str] = {}
        inject(onward)
        # a further handoff that names no task or role
        plain = builder.handoff("checker", agent_id="checker-1").headers()
    with gov.agent("downstream", carrier=onward) as downstream:
        # not a second 'builder-1' under itself
        assert downstream.agent_id != "builder-1"
        assert downstream.lineage.chain == ("planner-1", "builder-1", downstream.agent_id)
        assert (downstream.task, downstream.lineage.role) == ("", "")
    with gov.agent("checker", carrier=plain) as checker:
        assert checker.agent_id == "checker-1"
        assert (checker.task, checker.lineage.role) == ("", "")


def test_env_carrier_round_trip_is_case_insensitive(gov: Governance) -> None:
    with (
        gov.session("nightly batch", session_id="sess-env") as s,
        s.agent("scheduler", agent_id="scheduler-1", permissions=[]) as root,
    ):
        env = root.handoff("batch", task="run the batch", agent_id="batch-7").env()
        sc = root.span.get_span_context()
        target = {"PATH": "/usr/bin", "TRACEPARENT": "stale", "HOME": "/root"}
        written = inject_env(target)
    assert set(env) == {"TRACEPARENT", "BAGGAGE"}
    assert env["TRACEPARENT"] == f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"
    expected = Lineage(
        session_id="sess-env",
        intent="nightly batch",
        chain=("scheduler-1",),
        permissions=(),
        task="run the batch",
        handoff_to="batch-7",
    )
    variants = [
        env,
        {k.lower(): v for k, v in env.items()},
        {k.title(): v for k, v in env.items()},
        {"PATH": "/bin", "LANG": "C.UTF-8", **env},
    ]
    for carrier in variants:
        ctx = extract(carrier)
        assert current_lineage(ctx) == expected, carrier.keys()
        assert trace.get_current_span(ctx).get_span_context().trace_id == sc.trace_id
    # an empty grant stays empty across the boundary: it must not become "inherit all"
    with gov.agent("batch", carrier=variants[2]) as batch:
        assert (batch.agent_id, batch.task, batch.lineage.permissions) == (
            "batch-7",
            "run the batch",
            (),
        )
    # inject_env merges into the given environment and returns what it wrote
    assert set(written) == {"TRACEPARENT", "BAGGAGE"}
    assert target["PATH"] == "/usr/bin" and target["HOME"] == "/root"
    assert target["TRACEPARENT"] == written["TRACEPARENT"] == env["TRACEPARENT"]
    merged = current_lineage(extract(target))
    assert merged is not None and merged.chain == ("scheduler-1",)


def test_carrier_without_lineage_has_no_session(gov: Governance) -> None:
    with pytest.raises(NoSessionError):
        gov.agent("nobody", carrier={})
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with pytest.raises(NoSessionError):
        gov.agent("nobody", carrier={"traceparent": traceparent})
    with pytest.raises(NoSessionError):
        gov.agent("nobody")  # nothing in the current context either


_RULE = "1-128 characters of letters, digits and . _ : @ -"


@pytest.mark.parametrize(
    ("baggage", "message"),
    [
        (
            "agentgov.session.id=bad%20id,agentgov.delegation.chain=planner-1",
            "invalid session id 'bad id'",
        ),
        (
            "agentgov.session.id=sess-%C3%A9,agentgov.delegation.chain=planner-1",
            "invalid session id 'sess-é'",
        ),
        (
            "agentgov.session.id=s-1,agentgov.delegation.chain=planner-1%2Cevil%3Brm",
            "invalid agent id 'evil;rm'",
        ),
        (
            "agentgov.session.id=s-1,agentgov.delegation.chain=planner-1,"
            f"agentgov.handoff.to={'x' * 129}",
            "invalid agent id 'xxxx",
        ),
        ("agentgov.session.id=s-1,agentgov.delegation.chain=a%20b", "invalid agent id 'a b'"),
    ],
    ids=[
        "space-in-session",
        "non-ascii-session",
        "semicolon-in-chain",
        "too-long-target",
        "space-in-chain",
    ],
)
def test_invalid_ids_in_a_carrier_are_rejected(gov: Governance, baggage: str, message: str) -> None:
    for carrier in ({"baggage": baggage}, {"BAGGAGE": baggage}):
        with pytest.raises(InvalidIdError) as info:
            extract(carrier)
        assert message in str(info.value) and _RULE in str(info.value)
        with pytest.raises(InvalidIdError):
            gov.agent("worker", carrier=carrier)
    assert issubclass(InvalidIdError, ValueError)


def test_invalid_ids_and_grants_are_rejected_where_they_are_given(gov: Governance) -> None:
    with pytest.raises(InvalidIdError, match="invalid session id 'a b'"):
        gov.session("x", session_id="a b")
    with gov.session("x") as s, s.agent("root", agent_id="root-1") as root:
        with pytest.raises(InvalidIdError, match="invalid agent id 'a,b'"):
            root.delegate("child", agent_id="a,b")
        with pytest.raises(InvalidIdError, match="invalid agent id"):
            root.handoff("child", agent_id="x" * 129)
        with pytest.raises(ValueError, match="permission 'a,b' holds a comma"):
            root.delegate("child", permissions=["a,b"])
        with pytest.raises(ValueError, match=r"climbs out of its path with '\.\.'"):
            root.delegate("child", permissions=["fs.read:/opt/app/../../etc/shadow"])


@pytest.mark.parametrize(
    "intent",
    ["a" * 5000, "ab " * 2000, "é" * 1500, "日本" * 600, "x" + "😀" * 600, "short ✓"],
    ids=["ascii", "ascii-spaces", "2-byte", "3-byte", "4-byte", "short"],
)
def test_long_intents_are_clipped_for_baggage_on_a_character_boundary(
    gov: Governance, intent: str
) -> None:
    from urllib.parse import quote_plus

    clipped = clip_for_baggage(intent)
    assert len(quote_plus(clipped)) <= MAX_BAGGAGE_INTENT
    assert intent.startswith(clipped)
    # the longest prefix that fits: one more character would not
    if clipped != intent:
        assert len(quote_plus(intent[: len(clipped) + 1])) > MAX_BAGGAGE_INTENT
    else:
        assert len(quote_plus(intent)) <= MAX_BAGGAGE_INTENT
    with gov.session(intent) as s, s.agent("root") as root:
        # in the session's own process every span carries the whole intent
        assert s.intent == intent
        assert root.span.attributes["agentgov.intent"] == intent


def test_full_intent_is_kept_on_the_root_agent_span(gov: Governance) -> None:
    intent = "step " * 1000
    with gov.session(intent) as s, s.agent("root") as root:
        assert root.span.attributes["agentgov.intent"] == intent


@pytest.mark.parametrize(
    "intent",
    [
        pytest.param("a" * 3000, id="ascii"),
        pytest.param("deploy / verify, " * 200, id="ascii-escaped"),
        pytest.param("é" * 1500, id="2-byte"),
        pytest.param("日本" * 600, id="3-byte"),
    ],
)
def test_clipped_intent_survives_the_handoff(gov: Governance, intent: str) -> None:
    with gov.session(intent) as s, s.agent("root") as root:
        headers = root.handoff("worker").headers()
    received = current_lineage(extract(headers))
    assert received is not None
    assert received.intent == clip_for_baggage(intent)
    assert received.intent  # never silently dropped by the propagator
