"""Spans written straight into ``otel_traces``, as the OpenTelemetry Collector's ClickHouse
exporter writes them, reach the governance tables through the materialized views.

The exporter stores every attribute as a string (arrays as JSON text), so these tests insert
rows exactly that way and read ``agentgov_spans``, ``agentgov_sessions`` and
``agentgov_edges`` back, directly and through :class:`Analytics` (the query layer of the
API). Every test uses its own session ids: the store is shared by the whole test session.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agentgov.collector.analytics.queries import Analytics
from agentgov.collector.normalize.service import TraceResolver
from agentgov.collector.risk import RiskRules, combine_session_risk
from agentgov.collector.store.connection import StoreConfig

COLUMNS = [
    "Timestamp",
    "TraceId",
    "SpanId",
    "ParentSpanId",
    "TraceState",
    "SpanName",
    "SpanKind",
    "ServiceName",
    "ResourceAttributes",
    "ScopeName",
    "ScopeVersion",
    "SpanAttributes",
    "Duration",
    "StatusCode",
    "StatusMessage",
    "Events.Timestamp",
    "Events.Name",
    "Events.Attributes",
]

SPAN_COLUMNS = (
    "SessionId, TraceId, SpanId, Operation, AgentId, AgentName, ParentAgentId, Chain, Depth, "
    "Intent, Task, Role, Permissions, ToolName, Command, Resources, RiskScore, RiskRules, "
    "CostUsd, InputTokens, OutputTokens, Messages, StatusCode"
)

BASE_TIME = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def trace_id() -> str:
    return uuid.uuid4().hex


def span_id() -> str:
    return uuid.uuid4().hex[:16]


class Spans:
    """Builds ``otel_traces`` rows in the exporter's layout, with increasing timestamps."""

    def __init__(self, service: str = "direct-otel") -> None:
        self.service = service
        self.rows: list[list[Any]] = []
        self.ids: dict[str, str] = {}

    def add(
        self,
        key: str,
        attrs: dict[str, str],
        *,
        trace: str,
        name: str = "span",
        parent: str = "",
        status: str = "Unset",
        events: tuple[tuple[str, dict[str, str]], ...] = (),
        duration_ns: int = 2_000_000,
    ) -> str:
        sid = span_id()
        self.ids[key] = sid
        start = BASE_TIME + timedelta(milliseconds=len(self.rows))
        self.rows.append(
            [
                start,
                trace,
                sid,
                self.ids.get(parent, parent),
                "",
                name,
                "Internal",
                self.service,
                {"service.name": self.service},
                "direct-tests",
                "1.0",
                attrs,
                duration_ns,
                status,
                "failed" if status == "Error" else "",
                [start for _ in events],
                [e[0] for e in events],
                [e[1] for e in events],
            ]
        )
        return sid

    def insert(self, client: Any, rows: list[list[Any]] | None = None) -> None:
        client.insert("otel_traces", rows if rows is not None else self.rows, column_names=COLUMNS)


_SPANS_BY = {
    key: f"SELECT {SPAN_COLUMNS} FROM agentgov_spans "
    f"WHERE {key} = {{v:String}} ORDER BY Timestamp, SpanId"
    for key in ("SessionId", "TraceId")
}


def span_rows(client: Any, key: str, value: str) -> list[dict[str, Any]]:
    """``agentgov_spans`` rows whose ``key`` (SessionId or TraceId) is ``value``."""
    return list(client.query(_SPANS_BY[key], parameters={"v": value}).named_results())


def by_span(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["SpanId"]: r for r in rows}


def agent_attrs(
    session: str, agent: str, chain: list[str], *, name: str, intent: str, **extra: str
) -> dict[str, str]:
    attrs = {
        "agentgov.session.id": session,
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.id": agent,
        "gen_ai.agent.name": name,
        "agentgov.delegation.chain": json.dumps(chain),
        "agentgov.delegation.depth": str(len(chain) - 1),
        "agentgov.intent": intent,
    }
    if len(chain) > 1:
        attrs["agentgov.agent.parent_id"] = chain[-2]
    attrs.update(extra)
    return attrs


def tool_attrs(
    session: str,
    agent: str,
    chain: list[str],
    *,
    intent: str,
    command: str,
    resources: list[str] | None = None,
    tool: str = "shell",
    **extra: str,
) -> dict[str, str]:
    attrs = {
        "agentgov.session.id": session,
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": tool,
        "gen_ai.agent.id": agent,
        "gen_ai.agent.name": agent.split("-")[0],
        "agentgov.delegation.chain": json.dumps(chain),
        "agentgov.delegation.depth": str(len(chain) - 1),
        "agentgov.intent": intent,
        "agentgov.command": command,
    }
    if resources is not None:
        attrs["agentgov.resources"] = json.dumps(resources)
    if len(chain) > 1:
        attrs["agentgov.agent.parent_id"] = chain[-2]
    attrs.update(extra)
    return attrs


# -- a whole session through the exporter's table -----------------------------------------


def test_exporter_rows_fill_spans_sessions_and_edges(store_client: Any) -> None:
    sess = uid("direct")
    trace = trace_id()
    intent = "Archive last quarter's data, then free disk on the app host"
    planner, worker, sub = uid("planner"), uid("worker"), uid("sub")
    c1, c2, c3 = [planner], [planner, worker], [planner, worker, sub]
    message = (
        "agentgov.message",
        {"agentgov.message.from": planner, "agentgov.message.to": worker},
    )
    s = Spans()
    s.add(
        "planner",
        agent_attrs(
            sess,
            planner,
            c1,
            name="planner",
            intent=intent,
            **{
                "agentgov.agent.role": "planner",
                "agentgov.permissions": '["fs:read","fs:write"]',
                "agentgov.cost.usd": "0.25",
                "gen_ai.usage.input_tokens": "1000",
                "gen_ai.usage.output_tokens": "200",
            },
        ),
        trace=trace,
        name="invoke_agent planner",
        events=(message, message),
    )
    s.add(
        "worker",
        agent_attrs(
            sess,
            worker,
            c2,
            name="worker",
            intent=intent,
            **{
                "agentgov.task": "archive the data",
                "agentgov.agent.role": "executor",
                "agentgov.permissions": '["fs:write"]',
                "agentgov.cost.usd": "0.125",
                "gen_ai.usage.input_tokens": "300",
                "gen_ai.usage.output_tokens": "40",
            },
        ),
        trace=trace,
        name="invoke_agent worker",
        parent="planner",
        events=(message, ("unrelated.event", {})),
    )
    s.add(
        "sub",
        agent_attrs(
            sess,
            sub,
            c3,
            name="sub",
            intent=intent,
            **{
                "agentgov.task": "free disk space",
                "agentgov.permissions": "[]",
                "agentgov.cost.usd": "0.0625",
            },
        ),
        trace=trace,
        name="invoke_agent sub",
        parent="worker",
    )
    s.add(
        "t_ls",
        tool_attrs(sess, planner, c1, intent=intent, command="ls -la /opt/app"),
        trace=trace,
        parent="planner",
    )
    s.add(
        "t_rm",
        tool_attrs(
            sess,
            worker,
            c2,
            intent=intent,
            command="rm -rf /opt/app/data",
            resources=["/opt/app/data"],
        ),
        trace=trace,
        parent="worker",
    )
    s.add(
        "t_curl",
        tool_attrs(
            sess,
            sub,
            c3,
            intent=intent,
            tool="http",
            command="curl -fsS https://archive.example.com/upload",
        ),
        trace=trace,
        parent="sub",
        status="Error",
    )
    s.add(
        "t_prod",
        tool_attrs(sess, sub, c3, intent=intent, command="df -h", resources=["prod-app-01:/var"]),
        trace=trace,
        parent="sub",
    )
    # Two inserts: the aggregating sessions table must merge partial rows correctly.
    s.insert(store_client, s.rows[:3])
    s.insert(store_client, s.rows[3:])

    rows = by_span(span_rows(store_client, "SessionId", sess))
    assert len(rows) == 7
    ids = s.ids
    expected_agents = {
        "planner": dict(
            AgentId=planner,
            AgentName="planner",
            ParentAgentId="",
            Chain=c1,
            Depth=0,
            Task="",
            Role="planner",
            Permissions=["fs:read", "fs:write"],
            CostUsd=0.25,
            InputTokens=1000,
            OutputTokens=200,
            Messages=2,
        ),
        "worker": dict(
            AgentId=worker,
            AgentName="worker",
            ParentAgentId=planner,
            Chain=c2,
            Depth=1,
            Task="archive the data",
            Role="executor",
            Permissions=["fs:write"],
            CostUsd=0.125,
            InputTokens=300,
            OutputTokens=40,
            Messages=1,
        ),
        "sub": dict(
            AgentId=sub,
            AgentName="sub",
            ParentAgentId=worker,
            Chain=c3,
            Depth=2,
            Task="free disk space",
            Role="",
            Permissions=[],
            CostUsd=0.0625,
            InputTokens=0,
            OutputTokens=0,
            Messages=0,
        ),
    }
    for key, want in expected_agents.items():
        row = rows[ids[key]]
        got = {k: row[k] for k in want}
        assert got == want, key
        assert row["SessionId"] == sess and row["TraceId"] == trace
        assert row["Operation"] == "invoke_agent" and row["Intent"] == intent
        assert row["RiskScore"] == 0 and row["RiskRules"] == [] and row["Command"] == ""

    expected_tools = {
        "t_ls": (planner, "", c1, 0, "shell", "ls -la /opt/app", [], 0, [], "Unset"),
        "t_rm": (
            worker,
            planner,
            c2,
            1,
            "shell",
            "rm -rf /opt/app/data",
            ["/opt/app/data"],
            80,
            ["destructive_command", "write_scope"],
            "Unset",
        ),
        "t_curl": (
            sub,
            worker,
            c3,
            2,
            "http",
            "curl -fsS https://archive.example.com/upload",
            [],
            15,
            ["network_egress"],
            "Error",
        ),
        "t_prod": (
            sub,
            worker,
            c3,
            2,
            "shell",
            "df -h",
            ["prod-app-01:/var"],
            25,
            ["production_target"],
            "Unset",
        ),
    }
    for key, (
        agent,
        parent,
        chain,
        depth,
        tool,
        cmd,
        res,
        risk,
        rules,
        status,
    ) in expected_tools.items():
        row = rows[ids[key]]
        got = (
            row["AgentId"],
            row["ParentAgentId"],
            row["Chain"],
            row["Depth"],
            row["ToolName"],
            row["Command"],
            row["Resources"],
            row["RiskScore"],
            row["RiskRules"],
            row["StatusCode"],
        )
        assert got == (agent, parent, chain, depth, tool, cmd, res, risk, rules, status), key
        assert row["Operation"] == "execute_tool" and row["SessionId"] == sess
        assert row["Intent"] == intent and row["Task"] == "" and row["CostUsd"] == 0

    summary = Analytics(store_client).session(sess)
    assert summary["intent"] == intent
    assert summary["spans"] == 7
    assert summary["agents"] == 3
    assert summary["tool_calls"] == 4
    assert summary["handoffs"] == 2
    assert summary["max_depth"] == 2
    assert summary["usd"] == pytest.approx(0.4375)
    assert summary["input_tokens"] == 1300 and summary["output_tokens"] == 240
    assert summary["max_command_risk"] == 80
    # noisy-OR of 80, 15, 25 (and zeros): 100 * (1 - 0.2 * 0.85 * 0.75) = 87.25
    assert summary["session_risk"] == combine_session_risk([0, 0, 0, 0, 80, 15, 25]) == 87
    assert summary["errors"] == 1
    assert summary["status"] == "completed"

    edges = store_client.query(
        "SELECT ParentAgentId, AgentId, AgentName, Role, Task, Depth FROM agentgov_edges "
        "WHERE SessionId = {s:String} ORDER BY Depth",
        parameters={"s": sess},
    ).result_rows
    assert edges == [
        (planner, worker, "worker", "executor", "archive the data", 1),
        (worker, sub, "sub", "", "free disk space", 2),
    ]

    graph = Analytics(store_client).graph(sess)
    nodes = {r["id"]: r for r in graph.nodes.to_dict("records")}
    assert {
        k: (v["parent_id"], v["depth"], v["risk"], v["tool_calls"]) for k, v in nodes.items()
    } == {planner: ("", 0, 0, 1), worker: (planner, 1, 80, 1), sub: (worker, 2, 25, 2)}
    assert sorted(zip(graph.edges["source"], graph.edges["target"], strict=True)) == sorted(
        [(planner, worker), (worker, sub)]
    )
    audit = Analytics(store_client).audit(sess)
    assert list(audit["span_id"]) == [ids["t_ls"], ids["t_rm"], ids["t_curl"], ids["t_prod"]]
    assert list(audit["risk"]) == [0, 80, 15, 25]


def test_spans_without_a_session_stay_out_of_governance_tables(store_client: Any) -> None:
    trace = trace_id()
    s = Spans()
    s.add("plain", {"http.method": "GET", "agentgov.command": "rm -rf /"}, trace=trace)
    s.add(
        "empty", {"agentgov.session.id": "", "gen_ai.operation.name": "execute_tool"}, trace=trace
    )
    s.insert(store_client)
    raw = store_client.query(
        "SELECT count() FROM otel_traces WHERE TraceId = {t:String}", parameters={"t": trace}
    ).result_rows[0][0]
    assert raw == 2
    assert span_rows(store_client, "TraceId", trace) == []


# -- foreign conventions -------------------------------------------------------------------


def resolver(store_path: Any) -> TraceResolver:
    """The collector's resolver on the test process's store (spans written straight into
    otel_traces are picked up by time, as another pipeline's would be)."""
    return TraceResolver(StoreConfig(f"chdb://{store_path}"), RiskRules.default()).start()


def test_foreign_conventions_map_onto_governance_columns(
    store_client: Any, store_path: Any
) -> None:
    oi_sess, conv_sess, tl_sess, mixed = uid("oi"), uid("conv"), uid("tl"), uid("mixed")
    trace = trace_id()
    s = Spans(service="foreign")
    # OpenInference: span kind and session.id
    s.add(
        "oi_agent",
        {
            "openinference.span.kind": "AGENT",
            "session.id": oi_sess,
            "gen_ai.agent.name": "researcher",
        },
        trace=trace,
    )
    s.add(
        "oi_tool",
        {
            "openinference.span.kind": "tool",
            "session.id": oi_sess,
            "gen_ai.agent.name": "researcher",
            "agentgov.command": "wget https://data.example.org/set.csv",
        },
        trace=trace,
        parent="oi_agent",
    )
    s.add(
        "oi_llm",
        {
            "openinference.span.kind": "LLM",
            "session.id": oi_sess,
            "gen_ai.usage.input_tokens": "512",
            "gen_ai.usage.output_tokens": "64",
        },
        trace=trace,
        parent="oi_agent",
    )
    # GenAI conversation id
    s.add(
        "conv_agent",
        {
            "gen_ai.conversation.id": conv_sess,
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.id": "asst-1",
            "gen_ai.agent.name": "assistant",
        },
        trace=trace,
    )
    s.add(
        "conv_tool",
        {
            "gen_ai.conversation.id": conv_sess,
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.agent.id": "asst-1",
            "gen_ai.tool.name": "sql",
            "agentgov.command": "DROP TABLE staging_events",
        },
        trace=trace,
        parent="conv_agent",
    )
    # OpenLLMetry (traceloop)
    s.add(
        "tl_tool",
        {
            "traceloop.span.kind": "tool",
            "traceloop.association.properties.session_id": tl_sess,
            "gen_ai.agent.id": "tl-agent",
            "agentgov.command": "sudo systemctl restart nginx",
        },
        trace=trace,
    )
    # agentgov's own id wins over foreign ones on the same span; the chain alone gives depth
    s.add(
        "mixed",
        {
            "agentgov.session.id": mixed,
            "session.id": oi_sess,
            "gen_ai.conversation.id": conv_sess,
            "openinference.span.kind": "TOOL",
            "gen_ai.agent.id": "leaf",
            "agentgov.delegation.chain": '["root","mid","leaf"]',
            "agentgov.command": "cat notes.txt",
        },
        trace=trace,
    )
    s.insert(store_client)
    resolved = resolver(store_path)
    try:
        assert resolved.flush(30)
    finally:
        resolved.close()

    rows = span_rows(store_client, "TraceId", trace)
    # agentgov's own span as it came; the others as resolved: one row per agent, one per
    # tool call, each in the session its convention names
    got = sorted(
        (r["SessionId"], r["Operation"], r["AgentId"], r["Chain"], r["Depth"], r["RiskScore"])
        for r in rows
    )
    assert got == sorted(
        [
            (oi_sess, "invoke_agent", "researcher", ["researcher"], 0, 0),
            (oi_sess, "execute_tool", "researcher", ["researcher"], 0, 15),
            (conv_sess, "invoke_agent", "asst-1", ["asst-1"], 0, 0),
            (conv_sess, "execute_tool", "asst-1", ["asst-1"], 0, 80),
            # the agent only the tool span names is a node of its own
            (tl_sess, "invoke_agent", "tl-agent", ["tl-agent"], 0, 0),
            (tl_sess, "execute_tool", "tl-agent", ["tl-agent"], 0, 30),
            (mixed, "execute_tool", "leaf", ["root", "mid", "leaf"], 2, 0),
        ]
    )
    by_tool = {r["Command"]: r for r in rows if r["Operation"] == "execute_tool"}
    assert by_tool["DROP TABLE staging_events"]["RiskRules"] == [
        "destructive_command",
        "write_scope",
    ]
    assert by_tool["DROP TABLE staging_events"]["ToolName"] == "sql"
    assert by_tool["sudo systemctl restart nginx"]["RiskRules"] == ["privilege_escalation"]
    # the model call's tokens count for the agent it ran under
    researcher = next(
        r for r in rows if r["AgentId"] == "researcher" and r["Operation"] == "invoke_agent"
    )
    assert researcher["InputTokens"] == 512

    analytics = Analytics(store_client)
    oi = analytics.session(oi_sess)
    assert (oi["spans"], oi["tool_calls"], oi["agents"], oi["input_tokens"]) == (2, 1, 1, 512)
    assert oi["max_command_risk"] == 15 and oi["session_risk"] == 15
    conv = analytics.session(conv_sess)
    assert (conv["spans"], conv["tool_calls"], conv["max_command_risk"]) == (2, 1, 80)
    tl = analytics.session(tl_sess)
    assert (tl["spans"], tl["tool_calls"], tl["max_command_risk"]) == (2, 1, 30)
    assert analytics.session(mixed)["spans"] == 1


# -- declared risk: a floor, never a ceiling -----------------------------------------------


def test_declared_risk_score_cannot_lower_the_computed_one(store_client: Any) -> None:
    sess = uid("declared")
    trace = trace_id()
    chain = ["agent-x"]
    cases = {
        # key: (command, declared, expected score, expected rules)
        "lower": ("rm -rf /opt/app/data", "10", 80, ["destructive_command", "write_scope"]),
        "higher": ("ls /tmp", "90", 90, []),
        "equal": ("curl https://example.com", "15", 15, ["network_egress"]),
        "higher_than_rules": ("mv a b", "45", 45, ["write_scope"]),
        "above_range": ("cat x", "250", 100, []),
        "garbage": ("chmod 777 /srv", "high", 50, ["write_scope", "privilege_escalation"]),
        "zero": ("DROP DATABASE app", "0", 80, ["destructive_command", "write_scope"]),
    }
    s = Spans()
    for key, (cmd, declared, _, _) in cases.items():
        s.add(
            key,
            tool_attrs(
                sess, "agent-x", chain, intent="i", command=cmd, **{"agentgov.risk.score": declared}
            ),
            trace=trace,
        )
    # a declared score on a span that is neither a tool call nor a command is not a risk
    s.add(
        "agent",
        agent_attrs(
            sess, "agent-x", chain, name="agent", intent="i", **{"agentgov.risk.score": "70"}
        ),
        trace=trace,
    )
    s.insert(store_client)

    rows = by_span(span_rows(store_client, "SessionId", sess))
    for key, (cmd, _, score, rules) in cases.items():
        row = rows[s.ids[key]]
        assert (row["Command"], row["RiskScore"], row["RiskRules"]) == (cmd, score, rules), key
    assert rows[s.ids["agent"]]["RiskScore"] == 0
    summary = Analytics(store_client).session(sess)
    assert summary["max_command_risk"] == 100
    assert summary["session_risk"] == combine_session_risk([c[2] for c in cases.values()])


# -- Python and SQL score commands the same way --------------------------------------------

#: (command, resources, expected score, expected rules): varied, hand-checked cases
PARITY_CASES: list[tuple[str, list[str], int, list[str]]] = [
    ("rm -rf /opt/app/data", [], 80, ["destructive_command", "write_scope"]),
    ("rm -r -f /var/tmp/cache", [], 80, ["destructive_command", "write_scope"]),
    ("rm /tmp/report.txt", [], 20, ["write_scope"]),
    ("DROP TABLE customers", [], 80, ["destructive_command", "write_scope"]),
    ("TRUNCATE TABLE audit_log", [], 80, ["destructive_command", "write_scope"]),
    ("DELETE FROM sessions", [], 80, ["destructive_command", "write_scope"]),
    ("git push --force origin main", [], 60, ["destructive_command"]),
    ("kubectl delete namespace staging", [], 60, ["destructive_command"]),
    ("terraform destroy -auto-approve", [], 60, ["destructive_command"]),
    ("dd if=/dev/zero of=/dev/sda bs=1M", [], 60, ["destructive_command"]),
    ("mkfs.ext4 /dev/sdb1", [], 60, ["destructive_command"]),
    ("mv build/app /opt/app", [], 20, ["write_scope"]),
    ("chmod 777 /srv/shared", [], 50, ["write_scope", "privilege_escalation"]),
    ("sed -i 's/debug/info/' config.yaml", [], 20, ["write_scope"]),
    ("echo ready > /var/run/app.flag", [], 20, ["write_scope"]),
    ("find /tmp -name '*.log' -delete", [], 20, ["write_scope"]),
    ("docker system prune -af", [], 20, ["write_scope"]),
    ("UPDATE users SET active = 0", [], 20, ["write_scope"]),
    ("kubectl --context=prod get pods", [], 25, ["production_target"]),
    ("psql -h production-db.internal -c 'select 1'", [], 25, ["production_target"]),
    ("cat config.yaml", ["/srv/prod/app.yaml"], 25, ["production_target"]),
    ("curl -fsSL https://example.com/install.sh", [], 15, ["network_egress"]),
    ("scp backup.tar.gz ops@10.0.0.5:/backups/", [], 15, ["network_egress"]),
    ("sudo systemctl restart nginx", [], 30, ["privilege_escalation"]),
    (
        "sudo rm -rf /var/lib/prod",
        [],
        100,
        ["destructive_command", "write_scope", "production_target", "privilege_escalation"],
    ),
    (
        "curl http://prod-api.internal/health | sudo tee /etc/motd",
        [],
        70,
        ["production_target", "network_egress", "privilege_escalation"],
    ),
    ("echo 'rm -rf /' is dangerous", [], 60, ["destructive_command"]),
    ("ls -la /opt/app", [], 0, []),
    ("git status", [], 0, []),
    ("python -m pytest -q", [], 0, []),
    ("kubectl get pods -n staging", [], 0, []),
    ("cat productivity-report.txt", ["reproduce.log"], 0, []),
    ("", ["production"], 25, ["production_target"]),
]


#: commands outside plain ASCII: the rule engines must still agree
UNICODE_CASES = [
    pytest.param("DROP TABLE usérs", id="accented-table-name"),
    pytest.param("ſudo ls", id="long-s-folds-to-s"),
    pytest.param("rm\u00a0-rf /opt/app", id="nbsp-separator"),
    pytest.param("rm\x0b-rf /opt/app", id="vertical-tab-separator"),
    pytest.param("DELETE FROM usérs", id="delete-from-accented-table"),
    pytest.param("drop tableé x", id="word-boundary-after-ascii"),
    pytest.param("\u212aubectl delete pod web-1", id="kelvin-sign-case-folding"),
]


@pytest.fixture(scope="module")
def scored(store_client: Any) -> dict[tuple[str, tuple[str, ...]], tuple[int, list[str]]]:
    """Every parity command stored as a tool span; SQL's score and rules per command."""
    sess = uid("parity")
    trace = trace_id()
    s = Spans()
    commands = [(c, r) for c, r, _, _ in PARITY_CASES]
    commands += [(p.values[0], []) for p in UNICODE_CASES]
    for i, (cmd, res) in enumerate(commands):
        s.add(
            f"c{i}",
            tool_attrs(sess, "scorer", ["scorer"], intent="parity", command=cmd, resources=res),
            trace=trace,
        )
    s.insert(store_client)
    rows = by_span(span_rows(store_client, "SessionId", sess))
    assert len(rows) == len(commands)
    out = {}
    for i, (cmd, res) in enumerate(commands):
        row = rows[s.ids[f"c{i}"]]
        assert (row["Command"], row["Resources"]) == (cmd, res)
        out[(cmd, tuple(res))] = (row["RiskScore"], row["RiskRules"])
    return out


def test_python_and_sql_risk_rules_agree(scored: dict[Any, tuple[int, list[str]]]) -> None:
    rules = RiskRules.default()
    mismatches = []
    for cmd, res, score, names in PARITY_CASES:
        py = rules.assess(cmd, res)
        sql_score, sql_rules = scored[(cmd, tuple(res))]
        row = {
            "python": (py.score, list(py.rules)),
            "sql": (sql_score, sql_rules),
            "expected": (score, names),
        }
        if len({repr(v) for v in row.values()}) != 1:
            mismatches.append((cmd, res, row))
    assert mismatches == []
    # the list covers every rule and both ends of the scale
    assert {n for _, _, _, names in PARITY_CASES for n in names} == {r.name for r in rules.rules}
    assert {s for _, _, s, _ in PARITY_CASES} >= {0, 100}


@pytest.mark.parametrize("command", UNICODE_CASES)
def test_python_and_sql_agree_on_unicode_commands(
    scored: dict[Any, tuple[int, list[str]]], command: str
) -> None:
    py = RiskRules.default().assess(command)
    assert scored[(command, ())] == (py.score, list(py.rules))
