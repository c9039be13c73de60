"""The query API and the ``agentgov`` CLI on a realistic multi-agent session.

Two sessions go through the instrumentation API and the official OTLP/HTTP exporter to a
real collector process:

* "cleanup" (risky): planner -> orchestrator -> 3 workers, 4 tool calls, model usage on
  every agent, and an ``rm -rf``;
* "report" (calm, sent second): planner -> reader, 1 harmless tool call.

Every figure checked below follows from what was sent and from the built-in risk rules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest

from agentgov.collector.client import ApiError, CollectorClient
from agentgov.instrumentation.spans import Governance

try:  # tests/ on sys.path (rootdir conftest), or tests/ as a package (tests/__init__.py)
    from conftest import CollectorProcess, free_port, make_provider, wait_for
except ImportError:
    from tests.conftest import CollectorProcess, free_port, make_provider, wait_for

CLEANUP_INTENT = "clean up deployments older than 30 days"
REPORT_INTENT = "summarize the weekly report"

# (name, role, task, usage (input tokens, output tokens, usd), tools (tool, command, resources))
WORKERS = [
    (
        "scanner",
        "list stale deployments",
        (200, 50, 0.001),
        [("kubectl", "kubectl get deployments -o name", ["cluster/staging"])],
    ),
    (
        "cleaner-eu",
        "delete stale deployments",
        (300, 60, 0.002),
        [
            ("shell", "ls /srv/deploys/eu", []),
            ("shell", "rm -rf /srv/deploys/eu/old", ["/srv/deploys/eu/old"]),
        ],
    ),
    (
        "cleaner-us",
        "delete stale deployments",
        (100, 40, 0.0005),
        [("http", "curl -X DELETE https://deploy.example.com/us/old", [])],
    ),
]

# built-in rules: rm -rf = destructive_command 60 + write_scope 20; curl = network_egress 15
EXPECTED_RISK = {
    "kubectl get deployments -o name": (0, []),
    "ls /srv/deploys/eu": (0, []),
    "rm -rf /srv/deploys/eu/old": (80, ["destructive_command", "write_scope"]),
    "curl -X DELETE https://deploy.example.com/us/old": (15, ["network_egress"]),
}
SESSION_RISK = 83  # noisy-OR: 100 * (1 - (1 - 0.80) * (1 - 0.15))
USD = 0.0125 + 0.004 + 0.001 + 0.002 + 0.0005  # 0.02


@dataclass(frozen=True)
class Sent:
    session_id: str
    agents: dict[str, str]  # name -> agent id


def _send_cleanup(gov: Governance) -> Sent:
    agents: dict[str, str] = {}
    with gov.session(CLEANUP_INTENT) as session:
        with session.agent("planner", role="planner") as planner:
            agents["planner"] = planner.agent_id
            planner.usage(1200, 300, 0.0125)
            with planner.delegate(
                "orchestrator", task="coordinate the cleanup", role="orchestrator"
            ) as orch:
                agents["orchestrator"] = orch.agent_id
                orch.usage(800, 150, 0.004)
                for name, task, usage, tools in WORKERS:
                    with orch.delegate(name, task=task, role="worker") as worker:
                        agents[name] = worker.agent_id
                        worker.usage(*usage)
                        for tool, command, resources in tools:
                            with worker.tool(tool, command, resources=resources):
                                pass
    return Sent(session.session_id, agents)


def _send_report(gov: Governance) -> Sent:
    with gov.session(REPORT_INTENT) as session:
        with session.agent("planner", role="planner") as planner:
            with planner.delegate("reader", task="read the report", role="worker") as reader:
                with reader.tool("read_file", "cat weekly-report.md", ["weekly-report.md"]):
                    pass
    return Sent(session.session_id, {"planner": planner.agent_id, "reader": reader.agent_id})


def _summary(c: CollectorProcess, sid: str) -> dict[str, Any] | None:
    resp = c.get(f"/api/v1/sessions/{sid}")
    return dict(resp.json()) if resp.status_code == 200 else None


@pytest.fixture(scope="module")
def sent(collector: CollectorProcess) -> tuple[Sent, Sent]:
    provider = make_provider(collector.url, service="api-cli-tests")
    gov = Governance(provider)
    cleanup = _send_cleanup(gov)
    report = _send_report(gov)
    provider.force_flush()
    provider.shutdown()
    for sid, spans in ((cleanup.session_id, 9), (report.session_id, 3)):
        wait_for(lambda sid=sid, n=spans: (s := _summary(collector, sid)) and s["spans"] == n)
    return cleanup, report


def api(c: CollectorProcess, path: str, **params: Any) -> Any:
    resp = c.get(path, **params)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    return resp.json()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentgov.collector.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


# -- GET /api/v1/sessions ---------------------------------------------------------------


def test_sessions_list_has_the_governance_figures(
    collector: CollectorProcess, sent: tuple[Sent, Sent]
) -> None:
    cleanup, report = sent
    rows = api(collector, "/api/v1/sessions")["sessions"]
    assert [r["session_id"] for r in rows] == [report.session_id, cleanup.session_id]
    by_id = {r["session_id"]: r for r in rows}

    row = by_id[cleanup.session_id]
    assert {
        k: row[k]
        for k in (
            "status",
            "intent",
            "agents",
            "spans",
            "max_depth",
            "handoffs",
            "tool_calls",
            "session_risk",
            "max_command_risk",
            "input_tokens",
            "output_tokens",
            "errors",
        )
    } == {
        "status": "completed",
        "intent": CLEANUP_INTENT,
        "agents": 5,
        "spans": 9,
        "max_depth": 2,
        "handoffs": 4,
        "tool_calls": 4,
        "session_risk": SESSION_RISK,
        "max_command_risk": 80,
        "input_tokens": 2600,
        "output_tokens": 600,
        "errors": 0,
    }
    assert row["usd"] == pytest.approx(USD, abs=1e-9)
    assert datetime.fromisoformat(row["first_seen"]) < datetime.fromisoformat(row["last_seen"])

    row = by_id[report.session_id]
    assert (
        row["status"],
        row["agents"],
        row["spans"],
        row["max_depth"],
        row["handoffs"],
        row["tool_calls"],
        row["session_risk"],
        row["max_command_risk"],
        row["usd"],
    ) == ("completed", 2, 3, 1, 1, 1, 0, 0, 0.0)


def test_sessions_order_and_limit(collector: CollectorProcess, sent: tuple[Sent, Sent]) -> None:
    cleanup, report = sent

    def ids(**params: Any) -> list[str]:
        return [r["session_id"] for r in api(collector, "/api/v1/sessions", **params)["sessions"]]

    # the calm session is the most recent; the risky one comes first by risk
    assert ids(order="recent") == [report.session_id, cleanup.session_id]
    assert ids(order="risk") == [cleanup.session_id, report.session_id]
    assert ids(order="risk", limit=1) == [cleanup.session_id]
    assert ids(order="recent", limit=1) == [report.session_id]
    assert ids(limit=2) == [report.session_id, cleanup.session_id]


def test_session_summary_matches_the_list(
    collector: CollectorProcess, sent: tuple[Sent, Sent]
) -> None:
    rows = {r["session_id"]: r for r in api(collector, "/api/v1/sessions")["sessions"]}
    for s in sent:
        assert api(collector, f"/api/v1/sessions/{s.session_id}") == rows[s.session_id]


# -- graph, audit, fanout ---------------------------------------------------------------


def test_graph_nodes_and_edges(collector: CollectorProcess, sent: tuple[Sent, Sent]) -> None:
    cleanup, _ = sent
    a = cleanup.agents
    graph = api(collector, f"/api/v1/sessions/{cleanup.session_id}/graph")
    assert graph["session_id"] == cleanup.session_id

    nodes = {n["id"]: n for n in graph["nodes"]}
    assert len(graph["nodes"]) == 5
    expected = {
        # name: (role, depth, risk, tool_calls, parent, task, usd)
        "planner": ("planner", 0, 0, 0, "", "", 0.0125),
        "orchestrator": ("orchestrator", 1, 0, 0, a["planner"], "coordinate the cleanup", 0.004),
        "scanner": ("worker", 2, 0, 1, a["orchestrator"], "list stale deployments", 0.001),
        "cleaner-eu": ("worker", 2, 80, 2, a["orchestrator"], "delete stale deployments", 0.002),
        "cleaner-us": ("worker", 2, 15, 1, a["orchestrator"], "delete stale deployments", 0.0005),
    }
    for name, (role, depth, risk, tools, parent, task, usd) in expected.items():
        n = nodes[a[name]]
        assert (
            n["name"],
            n["role"],
            n["depth"],
            n["risk"],
            n["tool_calls"],
            n["parent_id"],
            n["task"],
            n["error"],
        ) == (name, role, depth, risk, tools, parent, task, 0)
        assert n["usd"] == pytest.approx(usd, abs=1e-9)
    # ordered by depth, then id
    assert [(n["depth"], n["id"]) for n in graph["nodes"]] == sorted(
        (n["depth"], n["id"]) for n in graph["nodes"]
    )

    edges = sorted((e["source"], e["target"], e["task"]) for e in graph["edges"])
    assert len(graph["edges"]) == 4
    assert edges == sorted(
        [
            (a["planner"], a["orchestrator"], "coordinate the cleanup"),
            (a["orchestrator"], a["scanner"], "list stale deployments"),
            (a["orchestrator"], a["cleaner-eu"], "delete stale deployments"),
            (a["orchestrator"], a["cleaner-us"], "delete stale deployments"),
        ]
    )


def test_audit_lists_every_command_with_its_lineage(
    collector: CollectorProcess, sent: tuple[Sent, Sent]
) -> None:
    cleanup, _ = sent
    a = cleanup.agents
    body = api(collector, f"/api/v1/sessions/{cleanup.session_id}/audit")
    assert body["session_id"] == cleanup.session_id
    commands = body["commands"]

    expected = [  # in the order they ran
        ("scanner", "kubectl", "kubectl get deployments -o name", ["cluster/staging"]),
        ("cleaner-eu", "shell", "ls /srv/deploys/eu", []),
        ("cleaner-eu", "shell", "rm -rf /srv/deploys/eu/old", ["/srv/deploys/eu/old"]),
        ("cleaner-us", "http", "curl -X DELETE https://deploy.example.com/us/old", []),
    ]
    assert [c["command"] for c in commands] == [e[2] for e in expected]
    for c, (agent, tool, command, resources) in zip(commands, expected, strict=True):
        risk, rules = EXPECTED_RISK[command]
        assert c["agent_id"] == a[agent]
        assert c["agent_name"] == agent
        assert c["parent_id"] == a["orchestrator"]
        assert c["chain"] == [a["planner"], a["orchestrator"], a[agent]]
        assert c["depth"] == 2
        assert c["intent"] == CLEANUP_INTENT
        assert c["tool"] == tool
        assert c["resources"] == resources
        assert (c["risk"], c["risk_rules"]) == (risk, rules)
        assert c["status"] == "Unset"
        assert len(c["trace_id"]) == 32 and len(c["span_id"]) == 16
    times = [datetime.fromisoformat(c["time"]) for c in commands]
    assert times == sorted(times)
    assert len(set(times)) == 4
    assert len({c["trace_id"] for c in commands}) == 1  # one trace: the whole session


def test_fanout_per_delegating_agent(collector: CollectorProcess, sent: tuple[Sent, Sent]) -> None:
    cleanup, report = sent
    a = cleanup.agents
    rows = api(collector, "/api/v1/fanout", session=cleanup.session_id)["agents"]
    assert [
        (
            r["session_id"],
            r["agent_id"],
            r["children"],
            r["distinct_tasks"],
            sorted(r["tasks"]),
            r["depth"],
        )
        for r in rows
    ] == [
        (
            cleanup.session_id,
            a["orchestrator"],
            3,
            2,
            ["delete stale deployments", "list stale deployments"],
            1,
        ),
        (cleanup.session_id, a["planner"], 1, 1, ["coordinate the cleanup"], 0),
    ]

    every = api(collector, "/api/v1/fanout")["agents"]
    assert len(every) == 3
    assert every[0]["agent_id"] == a["orchestrator"]  # most children first
    calm = [r for r in every if r["session_id"] == report.session_id]
    assert [(r["agent_id"], r["children"], r["tasks"]) for r in calm] == [
        (report.agents["planner"], 1, ["read the report"])
    ]
    assert [r["agent_id"] for r in api(collector, "/api/v1/fanout", limit=1)["agents"]] == [
        a["orchestrator"]
    ]


# -- the CLI ----------------------------------------------------------------------------


def test_cli_sessions(collector: CollectorProcess, sent: tuple[Sent, Sent]) -> None:
    cleanup, report = sent
    out = cli("sessions", "--url", collector.url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == [
        "SESSION",
        "STATUS",
        "AGENTS",
        "SPANS",
        "DEPTH",
        "HANDOFFS",
        "USD",
        "TOOLS",
        "RISK",
        "INTENT",
    ]
    assert len(lines) == 3
    assert lines[1].split() == [
        report.session_id,
        "completed",
        "2",
        "3",
        "1",
        "1",
        "0.0000",
        "1",
        "0",
        *REPORT_INTENT.split(),
    ]
    assert lines[2].split() == [
        cleanup.session_id,
        "completed",
        "5",
        "9",
        "2",
        "4",
        "0.0200",
        "4",
        str(SESSION_RISK),
        *CLEANUP_INTENT.split(),
    ]


def test_cli_sessions_json_order_and_limit_via_env(
    collector: CollectorProcess, sent: tuple[Sent, Sent]
) -> None:
    cleanup, _ = sent
    out = cli(
        "sessions", "--json", "--order", "risk", "--limit", "1", env={"AGENTGOV_URL": collector.url}
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert rows == api(collector, "/api/v1/sessions", order="risk", limit=1)["sessions"]
    assert [r["session_id"] for r in rows] == [cleanup.session_id]


def test_cli_graph_prints_the_delegation_tree(
    collector: CollectorProcess, sent: tuple[Sent, Sent]
) -> None:
    cleanup, _ = sent
    a = cleanup.agents
    out = cli("graph", cleanup.session_id, "--url", collector.url)
    assert out.returncode == 0, out.stderr
    # workers are listed by id: cleaner-eu-*, cleaner-us-*, scanner-*
    assert (
        out.stdout
        == "\n".join(
            [
                f"planner ({a['planner']}) [planner]  depth 0  risk 0 low",
                f"└── orchestrator ({a['orchestrator']}) [orchestrator]  depth 1  risk 0 low"
                "  task: 'coordinate the cleanup'",
                f"    ├── cleaner-eu ({a['cleaner-eu']}) [worker]  depth 2  risk 80 HIGH"
                "  task: 'delete stale deployments'",
                f"    ├── cleaner-us ({a['cleaner-us']}) [worker]  depth 2  risk 15 low"
                "  task: 'delete stale deployments'",
                f"    └── scanner ({a['scanner']}) [worker]  depth 2  risk 0 low"
                "  task: 'list stale deployments'",
            ]
        )
        + "\n"
    )


def test_cli_audit_prints_every_command(
    collector: CollectorProcess, sent: tuple[Sent, Sent]
) -> None:
    cleanup, _ = sent
    a = cleanup.agents
    out = cli("audit", cleanup.session_id, "--url", collector.url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"session {cleanup.session_id}  intent {CLEANUP_INTENT!r}"
    assert lines[1:3] == ["", "Commands (4 ran, 0 refused):"]
    assert lines[3].split() == ["TIME", "AGENT", "PARENT", "RISK", "DECISION", "COMMAND"]
    # no governor decided these spans' steps: the decision column says so with '-'
    rows = [line.split(maxsplit=5) for line in lines[4:8]]
    assert [(r[1], r[2], r[3], r[4], r[5]) for r in rows] == [
        (a["scanner"], a["orchestrator"], "0", "-", "kubectl get deployments -o name"),
        (a["cleaner-eu"], a["orchestrator"], "0", "-", "ls /srv/deploys/eu"),
        (a["cleaner-eu"], a["orchestrator"], "80", "-", "rm -rf /srv/deploys/eu/old"),
        (
            a["cleaner-us"],
            a["orchestrator"],
            "15",
            "-",
            "curl -X DELETE https://deploy.example.com/us/old",
        ),
    ]
    assert lines[8:] == [
        "",
        "Decisions: none recorded (the session ran without the governor)",
        "",
        "Inter-agent messages (0):",
        "  no messages",
    ]


def test_cli_unknown_session_fails_clearly(collector: CollectorProcess, sent: object) -> None:
    sid = "sess-ffffffffffffffffffffffffffffffff"
    for command in ("graph", "audit"):
        out = cli(command, sid, "--url", collector.url)
        assert out.returncode == 1
        assert out.stdout == ""
        assert f"Error: 404: unknown session {sid!r}: see GET /api/v1/sessions" in out.stderr


def test_cli_invalid_session_id_fails_clearly(collector: CollectorProcess, sent: object) -> None:
    sid = "x' OR 1=1 --"
    out = cli("audit", sid, "--url", collector.url)
    assert out.returncode == 1
    assert f"Error: 400: invalid session id {sid!r}" in out.stderr


def test_cli_unreachable_collector_fails_clearly() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = cli("sessions", "--url", url)
    assert out.returncode == 1
    assert out.stdout == ""
    assert f"Error: cannot reach the collector at {url}" in out.stderr
    assert "start it with 'agentgov collector' or set --url / AGENTGOV_URL" in out.stderr


def test_client_does_not_truncate_session_ids(
    collector: CollectorProcess, sent: tuple[Sent, Sent]
) -> None:
    cleanup, _ = sent
    client = CollectorClient(collector.url)
    try:
        with pytest.raises(ApiError, match="400: invalid session id"):
            client.graph(f"{cleanup.session_id}#fragment")
    finally:
        client.close()


def test_api_errors_are_json(collector: CollectorProcess, sent: object) -> None:
    resp = httpx.get(f"{collector.url}/api/v1/sessions/sess-nope", timeout=10)
    assert resp.status_code == 404
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {"error": "unknown session 'sess-nope': see GET /api/v1/sessions"}
