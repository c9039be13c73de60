"""The governor cannot be walked around: each way in that an attacker holding only an agent
key tried, as a regression test through a real collector process, the official OTLP
exporters and the real SDK.

- ingest needs a key; spans sent in a governed agent's name without its proof are no
  evidence for alert stops, and cannot re-parent the agent in the graph;
- identity, parent, depth and scope come from the lineage token the governor issued,
  never from the request body; forged, tampered, expired and foreign tokens are refused
  with their reason, and a refusal changes nothing;
- permission paths are normalized and may not climb with ``..``; wildcards count as write;
- a crafted command is decided in milliseconds while other agents' decisions flow;
- numbers out of range are a 400 naming the field, and the audit chain still verifies
  after a restart;
- the SDK goes ahead only on exactly ``allow``, within one timeout;
- a kill says which agents stopped, and an unknown session is a 404;
- and a property-based run over the decision, usage, approval and kill APIs finds no 5xx,
  no hang, and the same state after a restart as before it.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.trace import SpanKind

from agentgov.collector.governor.tokens import LineageKeys, LineageTokens, generate_key
from agentgov.instrumentation import Governance, GovernorClient, SessionKilled, Stopped
from agentgov.instrumentation import lineage as lineage_ids
from agentgov.instrumentation.lineage_token import HEADER as TOKEN_HEADER
from agentgov.instrumentation.lineage_token import claims as token_claims
from agentgov.instrumentation.permissions import (
    InvalidPermission,
    covers,
    is_write,
    normalize,
    write_granted,
)

from .conftest import CollectorProcess, free_port, make_provider, wait_for
from .hostile_governor import HostileGovernor

REPO = Path(__file__).resolve().parents[1]
HANDOFF = "/api/v1/decisions/handoff"
TOOL = "/api/v1/decisions/tool"
USAGE = "/api/v1/usage"

KEY_A = "agent-a-" + secrets.token_hex(12)
KEY_B = "agent-b-" + secrets.token_hex(12)
REVIEWER = "review-" + secrets.token_hex(12)
ADMIN = "admin-" + secrets.token_hex(12)
KEYS = {
    "AGENTGOV_API_KEYS": f"bot-a:agent:{KEY_A},bot-b:agent:{KEY_B},"
    f"rev:reviewer:{REVIEWER},ops:admin:{ADMIN}"
}

POLICY = """\
multi_agent:
  max_handoffs: 6
  max_delegation_depth: 2
  roles:
    billing_agent: [refund_check]
  require_approval_for: [billing.refund.create]
  high_risk_delegation: {write: true}
"""

#: tokenless clients allowed: only for agents started with the caller's own key
LENIENT = """\
multi_agent:
  require_verified_lineage: false
"""


# -- a client that speaks the API the way an attacker with a key would ------------------------


@dataclass
class Api:
    url: str
    key: str = KEY_A

    def post(
        self, path: str, body: Any, token: str = "", key: str | None = None, raw: bytes = b""
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key if key is None else key}"}
        if token:
            headers[TOKEN_HEADER] = token
        if raw:
            headers["Content-Type"] = "application/json"
            return httpx.post(f"{self.url}{path}", content=raw, headers=headers, timeout=30)
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=30)

    def get(self, path: str, key: str = REVIEWER, **params: Any) -> httpx.Response:
        return httpx.get(
            f"{self.url}{path}",
            params=params,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )

    def decide(self, path: str, body: dict[str, Any], token: str = "", **kw: Any) -> dict:
        r = self.post(path, body, token, **kw)
        assert r.status_code == 200, (path, body, r.status_code, r.text)
        return dict(r.json())

    def root(self, sid: str, agent: str, **kw: Any) -> str:
        """Start ``agent`` as the root of ``sid``; its lineage token."""
        answer = self.decide(HANDOFF, {"session_id": sid, "to_agent": agent, **kw})
        assert answer["outcome"] == "allow", answer
        return str(answer["lineage_token"])

    def delegate(self, token: str, sid: str, to: str, **kw: Any) -> dict[str, Any]:
        return self.decide(HANDOFF, {"session_id": sid, "to_agent": to, **kw}, token)

    def figures(self, sid: str) -> dict[str, Any]:
        r = self.get(f"/api/v1/sessions/{sid}")
        assert r.status_code == 200, r.text
        return dict(r.json()["governor"])

    def records(self, sid: str) -> int:
        r = self.get(f"/api/v1/sessions/{sid}/decisions")
        return len(r.json()["decisions"]) if r.status_code == 200 else 0


def stopped(answer: dict[str, Any], reason: str) -> None:
    assert (answer["outcome"], answer["reason"]) == ("stop", reason), answer


def sid_of(tag: str) -> str:
    return f"{tag}-{secrets.token_hex(6)}"


@pytest.fixture(scope="module")
def gov(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollectorProcess]:
    """A collector with API keys, the policy above and the shipped alert rules."""
    base = tmp_path_factory.mktemp("trust")
    policy = base / "policy.yaml"
    policy.write_text(POLICY)
    c = CollectorProcess(base / "data", free_port(), free_port()).start(
        ("--policy", str(policy), "--alert-rules", str(REPO / "alerts")), env=KEYS
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def api(gov: CollectorProcess) -> Api:
    return Api(gov.url)


def governance(url: str, key: str = KEY_A, **client: Any) -> tuple[Governance, Any]:
    provider = make_provider(url, service="trust", api_key=key, schedule_delay_millis=50)
    return Governance(provider, governor=GovernorClient(url, api_key=key, **client)), provider


# == 1. ingest ================================================================================


def _one_span_request(attributes: dict[str, str]) -> bytes:
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    span.name = "execute_tool shell"
    span.start_time_unix_nano = span.end_time_unix_nano = time.time_ns()
    for k, v in attributes.items():
        kv = span.attributes.add()
        kv.key, kv.value.string_value = k, v
    return request.SerializeToString()


def test_ingest_needs_a_key_over_http_and_grpc(gov: CollectorProcess, api: Api) -> None:
    sid = sid_of("ingest")
    token = api.root(sid, "janitor")
    agent = token_claims(token)["aid"]  # type: ignore[index]
    body = _one_span_request(
        {
            "agentgov.session.id": sid,
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.agent.id": agent,
            "agentgov.command": "rm -rf /opt/app/data",
        }
    )
    before = gov.health()["spans_written"]
    headers = {"Content-Type": "application/x-protobuf"}
    for key, status in ((None, 401), ("not-a-key-at-all-xyz", 401), (REVIEWER, 403)):
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(f"{gov.url}/v1/traces", content=body, headers={**headers, **auth})
        assert r.status_code == status, r.text
        assert "OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer%20" in r.json()["message"]
    channel = grpc.insecure_channel(f"127.0.0.1:{gov.grpc_port}")
    export = channel.unary_unary(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as refused:
        export(body, timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as wrong_role:
        export(body, timeout=10, metadata=(("authorization", f"Bearer {REVIEWER}"),))
    assert wrong_role.value.code() == grpc.StatusCode.PERMISSION_DENIED
    channel.close()
    # nothing was stored, and the session whose agent the spans named lives on
    time.sleep(1.0)
    assert gov.health()["spans_written"] == before
    assert api.figures(sid)["status"] == "active"
    # with a key, the same exporters get through (HTTP and gRPC)
    for protocol, endpoint in (("http", gov.url), ("grpc", f"127.0.0.1:{gov.grpc_port}")):
        provider = make_provider(endpoint, protocol, service="keyed", api_key=KEY_A)
        provider.get_tracer("t").start_span("hello", attributes={"x": protocol}).end()
        assert provider.force_flush(10_000)
        provider.shutdown()
    wait_for(lambda: gov.health()["spans_written"] >= before + 2)


def test_spans_in_an_agents_name_without_its_proof_are_no_evidence(
    gov: CollectorProcess, api: Api
) -> None:
    """Agent key B sends an ``rm -rf`` span in governed agent A's name: it is stored and
    shown unverified, and the shipped destructive_without_write rule does not stop A's
    session for it. The same command really run by A does."""
    g, provider = governance(gov.url)
    sid = sid_of("forged")
    with g.session("tidy up", session_id=sid) as session:
        agent = session.agent("janitor", permissions=["fs.read:/opt/app"]).start()
        with agent.tool("shell", command="ls /opt/app", resources=["/opt/app"]):
            pass
        provider.force_flush()
        forger = make_provider(gov.url, service="forger", api_key=KEY_B)
        span = forger.get_tracer("forger").start_span(
            "execute_tool shell",
            kind=SpanKind.INTERNAL,
            attributes={
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": "shell",
                "gen_ai.agent.id": agent.agent_id,
                "agentgov.session.id": sid,
                "agentgov.delegation.chain": [agent.agent_id],
                "agentgov.command": "rm -rf /opt/app/data",
                "agentgov.resources": ["/opt/app/data"],
                # the token id is public (it is on the agent's spans); the proof is not
                "agentgov.lineage.token_id": str(token_claims(agent.token)["jti"]),  # type: ignore[index]
                "agentgov.lineage.proof": "AAAAAAAAAAAAAAAAAAAAAA",
            },
        )
        span.end()
        assert forger.force_flush(10_000)
        forger.shutdown()
        commands = wait_for(
            lambda: (
                (r := api.get(f"/api/v1/sessions/{sid}/audit")).status_code == 200
                and len(r.json()["commands"]) == 2
                and r.json()["commands"]
            )
        )
        by_command = {c["command"]: c["verified"] for c in commands}
        assert by_command == {"ls /opt/app": True, "rm -rf /opt/app/data": False}
        time.sleep(1.5)  # the alert engine judges within a few hundred ms
        assert api.figures(sid)["status"] == "active"
        assert agent.checkpoint() is None
        # the same command, really run by the agent, is evidence: the rule stops the run
        with agent.tool("shell", command="rm -rf /opt/app/data", resources=["/opt/app/data"]):
            pass
        provider.force_flush()
        wait_for(lambda: api.figures(sid)["status"] == "killed")
        summary = api.figures(sid)
        assert summary["killed_by"] == "alert:destructive_without_write"
        agent.end()
    provider.shutdown()


def test_a_span_cannot_reparent_a_governed_agent(gov: CollectorProcess, api: Api) -> None:
    g, provider = governance(gov.url)
    sid = sid_of("reparent")
    with g.session("sort the mail", session_id=sid) as session:
        with session.agent("sorter") as root, root.delegate("reader") as child:
            with child.tool("mail", command="list inbox"):
                pass
    provider.shutdown()
    forger = make_provider(gov.url, service="forger", api_key=KEY_B)
    forger.get_tracer("forger").start_span(
        "invoke_agent reader",
        attributes={
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.id": child.agent_id,
            "gen_ai.agent.name": "reader",
            "agentgov.session.id": sid,
            "agentgov.agent.parent_id": "someone-else",
            "agentgov.delegation.depth": 0,
        },
    ).end()
    assert forger.force_flush(10_000)
    forger.shutdown()

    def graph() -> dict[str, Any]:
        r = api.get(f"/api/v1/sessions/{sid}/graph")
        return dict(r.json()) if r.status_code == 200 else {}

    nodes = wait_for(
        lambda: (
            (g := graph())
            and {n["id"]: n for n in g["nodes"]}.get(child.agent_id, {}).get("contradicted")
            and {n["id"]: n for n in g["nodes"]}
        )
    )
    reader = nodes[child.agent_id]
    assert (reader["parent_id"], reader["depth"], reader["verified"]) == (root.agent_id, 1, True)
    assert reader["lineage"] == "governor"
    assert [(e["source"], e["target"]) for e in graph()["edges"]] == [
        (root.agent_id, child.agent_id)
    ]


# == 2. identity from the token, never from the body ==========================================


def test_identity_comes_from_the_token(api: Api) -> None:
    sid = sid_of("identity")
    root = api.root(sid, "planner")
    child = api.delegate(root, sid, "worker-1")
    assert child["outcome"] == "allow"
    worker = child["lineage_token"]
    claims = token_claims(worker)
    assert claims is not None
    assert (claims["sid"], claims["aid"], claims["par"], claims["dep"]) == (
        sid,
        "worker-1",
        "planner",
        1,
    )
    assert claims["chn"] == ["planner", "worker-1"]
    records = api.records(sid)

    # without a token, an agent claiming depth 1 escapes nothing: the policy (by default)
    # hears no tokenless request but a new session's start
    unknown = api.decide(
        HANDOFF, {"session_id": sid, "from_agent": "ghost", "to_agent": "x", "depth": 1}
    )
    stopped(unknown, "lineage_required")
    # a second root in a running session (it would skip the handoff budget)
    stopped(api.decide(HANDOFF, {"session_id": sid, "to_agent": "root-2"}), "lineage_invalid")
    # a tool call in the name of any agent, started or not
    for name in ("ghost", "worker-1"):
        stopped(
            api.decide(TOOL, {"session_id": sid, "agent_id": name, "tool": "shell"}),
            "lineage_required",
        )
    # a token whose signature does not match its claims
    head, body, foot = worker.rsplit(".", 2)
    flipped = body[:10] + ("A" if body[10] != "A" else "B") + body[11:]
    tampered = api.decide(TOOL, {"session_id": sid, "tool": "shell"}, f"{head}.{flipped}.{foot}")
    stopped(tampered, "lineage_invalid")
    assert "signature" in tampered["detail"]
    # the token of one agent naming another, or another session
    named = api.decide(TOOL, {"session_id": sid, "agent_id": "planner", "tool": "shell"}, worker)
    stopped(named, "lineage_invalid")
    assert "worker-1" in named["detail"]
    other = api.decide(TOOL, {"session_id": sid_of("other"), "tool": "shell"}, worker)
    stopped(other, "lineage_invalid")
    # a token signed by a key this governor does not hold
    foreign = LineageTokens(LineageKeys([generate_key()], "elsewhere"))
    forged, _ = foreign.issue(sid, "worker-1", "planner", ["planner", "worker-1"], "", "", None)
    stopped(api.decide(TOOL, {"session_id": sid, "tool": "shell"}, forged), "lineage_invalid")
    # none of that left a trace in the session's audit chain or state
    assert api.records(sid) == records
    assert api.figures(sid)["governed_agents"] == 2

    # the body's claims are ignored where the token speaks: depth comes from the chain
    deep = api.delegate(worker, sid, "worker-2", depth=0)["lineage_token"]
    stopped(api.delegate(deep, sid, "worker-3"), "delegation_depth_exceeded")
    # an agent id of the session under another parent, and a cycle, are refused
    stopped(api.delegate(deep, sid, "worker-1"), "lineage_invalid")
    stopped(api.delegate(root, sid, "worker-2"), "lineage_invalid")
    # with the right token, the same request goes ahead
    assert api.decide(TOOL, {"session_id": sid, "tool": "search"}, worker)["outcome"] == "allow"


def test_event_streams_need_a_token_of_the_session(gov: CollectorProcess, api: Api) -> None:
    sid = sid_of("events")
    token = api.root(sid, "planner")
    events = f"{gov.url}/api/v1/sessions/{sid}/events"
    refused = httpx.get(events, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=5)
    assert refused.status_code == 403 and "lineage_required" in refused.text
    other = api.root(sid_of("other"), "elsewhere")
    headers = {"Authorization": f"Bearer {KEY_A}", TOKEN_HEADER: other}
    assert httpx.get(events, headers=headers, timeout=5).status_code == 403
    with httpx.stream("GET", events, headers={**headers, TOKEN_HEADER: token}, timeout=5) as s:
        assert s.status_code == 200
    # reviewers and admins watch any session
    with httpx.stream(
        "GET", events, headers={"Authorization": f"Bearer {REVIEWER}"}, timeout=5
    ) as s:
        assert s.status_code == 200


def test_tokenless_clients_speak_only_for_their_own_agents(tmp_path: Path) -> None:
    """Where a policy lets tokenless clients in (require_verified_lineage: false), a request
    without a token may speak only for an agent the governor started, with the key that
    started it, at the depth the governor recorded."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(LENIENT)
    c = CollectorProcess(tmp_path / "data", free_port(), free_port()).start(
        ("--policy", str(policy)), env=KEYS
    )
    try:
        api = Api(c.url)
        sid = sid_of("lenient")
        api.root(sid, "planner")
        mine = {"session_id": sid, "agent_id": "planner", "tool": "shell"}
        assert api.decide(TOOL, mine)["outcome"] == "allow"
        stopped(api.decide(TOOL, mine, key=KEY_B), "lineage_invalid")
        stopped(api.decide(TOOL, {**mine, "agent_id": "ghost"}), "unknown_agent")
        unknown = {"session_id": sid, "from_agent": "ghost", "to_agent": "x", "depth": 0}
        stopped(api.decide(HANDOFF, unknown), "unknown_agent")
        child = api.decide(
            HANDOFF, {"session_id": sid, "from_agent": "planner", "to_agent": "c", "depth": 9}
        )
        assert token_claims(child["lineage_token"])["dep"] == 1  # type: ignore[index]
    finally:
        c.stop()


def test_an_approval_cannot_be_replayed_by_another_caller(api: Api) -> None:
    sid = sid_of("replay")
    token = api.root(sid, "refunder")
    ask = {"session_id": sid, "tool": "billing.refund.create", "command": "refund 42"}
    first = api.decide(TOOL, ask, token)
    assert first["outcome"] == "approval_required"
    aid = first["approval_id"]
    r = api.post(f"/api/v1/approvals/{aid}/approve", {"comment": "ok"}, key=REVIEWER)
    assert r.status_code == 200, r.text
    # another API key, even holding the agent's token, gets nothing from it
    stolen = api.decide(TOOL, {**ask, "approval_id": aid}, token, key=KEY_B)
    stopped(stolen, "approval_mismatch")
    mine = api.decide(TOOL, {**ask, "approval_id": aid}, token)
    assert mine["outcome"] == "allow"


def test_nobody_else_can_finish_an_owner_and_free_its_task(api: Api) -> None:
    sid = sid_of("lock")
    root = api.root(sid, "planner")
    owner = api.delegate(root, sid, "billing_agent-1", task="refund_check")
    assert owner["outcome"] == "allow"
    other = api.delegate(root, sid, "helper")["lineage_token"]
    for attempt in (
        api.decide(USAGE, {"session_id": sid, "agent_id": "billing_agent-1", "finished": True}),
        api.decide(
            USAGE,
            {"session_id": sid, "agent_id": "billing_agent-1", "finished": True},
            key=KEY_B,
        ),
        api.decide(
            USAGE, {"session_id": sid, "agent_id": "billing_agent-1", "finished": True}, other
        ),
    ):
        assert attempt["outcome"] == "stop" and attempt["reason"] in (
            "lineage_invalid",
            "lineage_required",
        ), attempt
    # the owner still holds its task
    stopped(
        api.delegate(root, sid, "billing_agent-2", task="refund_check", to_role="billing_agent"),
        "ownership_conflict",
    )
    # the owner itself may finish, which frees the task
    finished = api.decide(USAGE, {"session_id": sid, "finished": True}, owner["lineage_token"])
    assert finished["outcome"] == "allow"
    taken = api.delegate(root, sid, "billing_agent-2", task="refund_check", to_role="billing_agent")
    assert taken["outcome"] == "allow"


def test_a_killed_agent_cannot_carry_on_in_another_session(gov: CollectorProcess, api: Api) -> None:
    sid = sid_of("killed")
    token = api.root(sid, "runner")
    r = api.post(f"/api/v1/sessions/{sid}/kill", {"reason": "runaway"}, key=ADMIN)
    assert r.status_code == 200
    new = sid_of("escape")
    stopped(api.decide(TOOL, {"session_id": new, "tool": "shell"}, token), "lineage_invalid")
    stopped(api.decide(TOOL, {"session_id": sid, "tool": "shell"}, token), "session_killed")
    # starting a "new" root with its token is a delegation in its own, killed session
    stopped(api.decide(HANDOFF, {"session_id": sid, "to_agent": "again"}, token), "session_killed")
    # and the new session id it named was never created
    assert api.get(f"/api/v1/sessions/{new}").status_code == 404


# == 3. and 4. permission paths and wildcards ================================================


def test_permission_paths_are_normalized_and_may_not_climb(api: Api) -> None:
    sid = sid_of("paths")
    root = api.root(sid, "planner", permissions=["fs.read:/opt/app"])
    for climbing in (
        "fs.read:/opt/app/../../etc/shadow",
        "fs.read:/opt/app/%2e%2e/%2E%2E/etc/shadow",
        "fs.read:/opt/app/logs/..",
        "fs.read:..",
    ):
        r = api.post(HANDOFF, {"session_id": sid, "to_agent": "c", "permissions": [climbing]}, root)
        assert r.status_code == 400, (climbing, r.text)
        assert "permissions" in r.text and "climbs out of its path with '..'" in r.text
    # odd but harmless spellings are judged in their normal form
    ok = api.delegate(root, sid, "reader", permissions=["fs.read:/opt//app/./logs/"])
    assert ok["outcome"] == "allow"
    assert token_claims(ok["lineage_token"])["prm"] == ["fs.read:/opt/app/logs"]  # type: ignore[index]
    stopped(
        api.delegate(root, sid, "writer", permissions=["fs.read:/opt/application"]),
        "permission_escalation",
    )
    # the SDK refuses the same before asking
    g, provider = governance(api.url)
    with g.session("x") as s, s.agent("root", permissions=["fs.read:/opt/app"]) as a:
        with pytest.raises(InvalidPermission, match="climbs out"):
            a.delegate("child", permissions=["fs.read:/opt/app/../../etc/shadow"])
    provider.shutdown()


@pytest.mark.parametrize("grant", ["*", "fs.write*", "fs.*", "fs.*:/opt", "db:write"])
def test_wildcard_and_verb_grants_count_as_write(api: Api, grant: str) -> None:
    sid = sid_of("wildcard")
    root = api.root(sid, "planner")
    answer = api.delegate(root, sid, "child", permissions=[grant])
    assert (answer["outcome"], answer["reason"]) == ("approval_required", "high_risk_delegation")
    # and the alert rules' idea of write is the same one
    assert is_write(grant) and write_granted([grant], [])


def test_one_definition_of_permissions() -> None:
    assert normalize("fs.read:/a//b/./c/") == "fs.read:/a/b/c"
    assert covers("fs.write:/opt/app", "fs.write:/opt/app/logs")
    assert not covers("fs.write:/opt/app", "fs.write:/opt/application")
    assert covers("fs.*", "fs.write:/x") and covers("fs.*:/opt", "fs.read:/opt/x")
    with pytest.raises(InvalidPermission):
        covers("fs.read:/opt/app", "fs.read:/opt/app/../etc")
    assert not is_write("fs.read:/opt/write-logs")  # a path is not a verb
    assert write_granted(["fs.write:/opt/app"], ["file:/opt/app/x"])
    assert not write_granted(["fs.write:/opt/app"], ["/opt/app/../etc/passwd"])
    assert not write_granted(["fs.write:/opt/app/../../"], [])


# == 5. a crafted command cannot freeze the collector =========================================

CRAFTED = [
    "delete from x" + " " * 63_000 + "y",
    "git push " + "a " * 31_000,
    "rm " + "-" * 63_000,
    "drop" + " \t" * 20_000 + "tablex",  # JSON writes a tab as two bytes
]


def test_crafted_commands_are_decided_in_milliseconds_while_others_flow(api: Api) -> None:
    sid = sid_of("crafted")
    token = api.root(sid, "attacker")
    other_sid = sid_of("bystander")
    other = api.root(other_sid, "bystander")
    lat: list[float] = []
    stop = threading.Event()

    def bystander() -> None:
        with httpx.Client(base_url=api.url, timeout=30) as c:
            headers = {"Authorization": f"Bearer {KEY_A}", TOKEN_HEADER: other}
            while not stop.is_set():
                t = time.perf_counter()
                r = c.post(TOOL, json={"session_id": other_sid, "tool": "ls"}, headers=headers)
                lat.append(time.perf_counter() - t)
                assert r.json()["outcome"] == "allow"

    thread = threading.Thread(target=bystander)
    thread.start()
    try:
        took = []
        for command in CRAFTED * 3:
            t = time.perf_counter()
            answer = api.decide(TOOL, {"session_id": sid, "tool": "sql", "command": command}, token)
            took.append(time.perf_counter() - t)
            assert answer["outcome"] == "allow" and answer["risk"] >= 0
    finally:
        stop.set()
        thread.join(30)
    # the round trip of a 64 KiB body over loopback, and the decision, well under a second
    assert max(took) < 0.25, took
    assert lat and max(lat) < 0.5, max(lat)


# == 6. out-of-range numbers ==================================================================


def test_out_of_range_numbers_are_refused_and_the_chain_survives_a_restart(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("multi_agent:\n  shared_max_usd: 100\n")
    c = CollectorProcess(tmp_path / "data", free_port(), free_port()).start(
        ("--policy", str(policy)), env=KEYS
    )
    try:
        api = Api(c.url)
        sid = sid_of("numbers")
        token = api.root(sid, "spender")
        assert api.decide(USAGE, {"session_id": sid, "usd": 1.5}, token)["outcome"] == "allow"
        before = api.figures(sid)
        for body, fieldname in (
            ({"session_id": sid, "tool_calls": 2**64}, "tool_calls"),
            ({"session_id": sid, "tool_calls": -1}, "tool_calls"),
            ({"session_id": sid, "usd": 1e308}, "usd"),
            ({"session_id": sid, "usd": 2e6}, "usd"),
        ):
            r = api.post(USAGE, body, token)
            assert r.status_code == 400 and fieldname in r.json()["error"], (body, r.text)
        for raw in (b'{"usd": Infinity}', b'{"usd": NaN}', b'{"usd": -Infinity}'):
            r = api.post(USAGE, None, token, raw=raw)
            assert r.status_code == 400, (raw, r.text)
        r = api.post(HANDOFF, {"session_id": sid, "to_agent": "c", "estimated_usd": 1e9}, token)
        assert r.status_code == 400 and "estimated_usd" in r.text
        assert api.figures(sid) == before
        c.stop()
        c.start(("--policy", str(policy)), env=KEYS)
        assert api.figures(sid) == before
        verified = api.get(f"/api/v1/sessions/{sid}/decisions/verify").json()
        assert (verified["ok"], verified["records"]) == (True, 2)
        # tokens issued before the restart still hold (the signing key is kept)
        assert api.decide(USAGE, {"session_id": sid, "usd": 1.0}, token)["outcome"] == "allow"
    finally:
        c.stop()


# == 7. small holes ===========================================================================


def test_ids_must_match_whole_and_come_from_secrets(api: Api) -> None:
    for bad in ("sess-1\n", "sess-1\r\n", "a b", "x" * 129):
        r = api.post(HANDOFF, {"session_id": bad, "to_agent": "a"})
        assert r.status_code == 400 and "session_id" in r.text, bad
        r = api.post(HANDOFF, {"session_id": "s-ok", "to_agent": bad})
        assert r.status_code == 400 and "to_agent" in r.text, bad
    assert api.get("/api/v1/sessions/sess-1%0A").status_code == 400
    # reseeding Python's random generator does not repeat an id: they come from secrets
    random.seed(7)
    first = (lineage_ids.new_session_id(), lineage_ids.new_id("agent"))
    random.seed(7)
    assert (lineage_ids.new_session_id(), lineage_ids.new_id("agent")) != first


# == 8. the SDK is fail-closed ================================================================


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ((200, "application/json", b'{"outcome": "deny"}'), "governor_invalid_answer"),
        ((200, "application/json", b'{"outcome": null}'), "governor_invalid_answer"),
        ((200, "application/json", b'{"outcome": "ALLOW"}'), "governor_invalid_answer"),
        ((200, "application/json", b"[]"), "governor_invalid_answer"),
        ((200, "text/html", b"<html>maintenance</html>"), "governor_invalid_answer"),
        ((302, "text/html", b""), "governor_invalid_answer"),
        ((500, "text/plain", b"oops"), "governor_refused"),
        (None, "governor_unreachable"),
    ],
    ids=["deny", "null", "upper", "list", "html", "redirect", "500", "hung"],
)
@pytest.mark.parametrize("fail_closed", [True, False], ids=["closed", "open"])
def test_the_sdk_goes_ahead_only_on_exactly_allow(
    answer: tuple[int, str, bytes] | None, reason: str, fail_closed: bool
) -> None:
    server = HostileGovernor(answer)
    try:
        client = GovernorClient(server.url, timeout=0.5, fail_closed=fail_closed)
        started = time.monotonic()
        if reason == "governor_unreachable" and not fail_closed:
            # the one case fail-open covers: nobody answered at all
            assert client.tool("s-1", "a-1", "shell").reason == "governor_unavailable"
        else:
            with pytest.raises(Stopped) as refused:
                client.tool("s-1", "a-1", "shell")
            assert refused.value.reason == reason
        # one timeout bounds the whole step, however the server misbehaves
        assert time.monotonic() - started < 0.5 + 0.3
    finally:
        server.close()


# == 9. an honest kill ========================================================================

HOLDER = """\
import os, sys, time
from agentgov.instrumentation import Governance, GovernorClient, SessionKilled
gov = Governance(governor=GovernorClient())
try:
    with gov.agent("holder", carrier=os.environ) as agent:
        print("ready", flush=True)
        while True:
            agent.checkpoint()
            time.sleep(0.01)
except SessionKilled:
    print("stopped", flush=True)
"""


def cli(*args: str, key: str = ADMIN) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentgov.collector.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "AGENTGOV_API_KEY": key},
    )


def test_a_kill_says_which_agents_stopped(gov: CollectorProcess, tmp_path: Path) -> None:
    unknown = cli("kill", "never-seen-1", "--reason", "typo", "--url", gov.url)
    assert unknown.returncode == 1 and "unknown session 'never-seen-1'" in unknown.stderr
    pre = cli("kill", sid_of("later"), "--reason", "not yet", "--unseen", "--url", gov.url)
    assert pre.returncode == 3 and "0 of 0 running agents" in pre.stdout, pre

    g, provider = governance(gov.url)
    sid = sid_of("honest")
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    with g.session("hold the line", session_id=sid) as session, session.agent("lead") as lead:
        handoff = lead.handoff("holder", task="wait")
        env = {
            **os.environ,
            **handoff.env(),
            "AGENTGOV_URL": gov.url,
            "AGENTGOV_API_KEY": KEY_A,
            "OTEL_EXPORTER_OTLP_ENDPOINT": gov.url,
        }
        proc = subprocess.Popen(
            [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            done = cli("kill", sid, "--reason", "drill", "--wait", "10", "--json", "--url", gov.url)
            assert done.returncode == 0, (done.stdout, done.stderr)
            result = json.loads(done.stdout)
            agents = {a["agent_id"]: a for a in result["agents"]}
            assert agents[handoff.agent_id]["acknowledged"] is True
            assert agents[lead.agent_id]["acknowledged"] is True  # this process, on the event
            assert result["acknowledged"] == result["running_at_kill"] == 2
            assert proc.wait(20) == 0 and proc.stdout.read().strip() == "stopped"
        finally:
            if proc.poll() is None:
                proc.kill()
        with pytest.raises(SessionKilled):
            lead.checkpoint()
    provider.shutdown()
    text = cli("kill", sid, "--reason", "again", "--url", gov.url)
    assert text.returncode == 0 and "acknowledged the stop" in text.stdout
    assert "yes," in text.stdout and handoff.agent_id in text.stdout


# == 10. property-based: no 5xx, no hang, the same state after a restart =====================

IDS = st.sampled_from(["s-1", "s-2", "s-3"])
AGENTS = st.sampled_from(["a", "b", "c", "planner", ""])
HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["../../etc", "fs.read:/x/../..", "*", "a,b", "\x00", "é" * 20, "x\n"]),
)
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
)


@dataclass
class World:
    """What the fuzzing client knows: tokens it was given, approvals it saw."""

    tokens: dict[tuple[str, str], str] = field(default_factory=dict)
    approvals: list[str] = field(default_factory=list)


def actions(world: World) -> st.SearchStrategy[Any]:
    def token(sid: str, agent: str, use: bool) -> str:
        return world.tokens.get((sid, agent), "") if use else ""

    handoff = st.builds(
        lambda sid, frm, to, perms, usd, use, task: (
            HANDOFF,
            {
                "session_id": sid,
                "from_agent": frm,
                "to_agent": to,
                "permissions": perms,
                "estimated_usd": usd,
                "task": task,
            },
            token(sid, frm, use),
        ),
        IDS,
        AGENTS,
        st.sampled_from(["a", "b", "c", "d", "planner", "bad id"]),
        st.one_of(st.none(), st.lists(HOSTILE_TEXT, max_size=3)),
        NUMBERS,
        st.booleans(),
        st.sampled_from(["", "refund_check", "close_account", "deploy to production"]),
    )
    tool = st.builds(
        lambda sid, agent, name, command, use: (
            TOOL,
            {"session_id": sid, "agent_id": agent, "tool": name, "command": command},
            token(sid, agent, use),
        ),
        IDS,
        AGENTS,
        st.sampled_from(["shell", "billing.refund.create", ""]),
        HOSTILE_TEXT,
        st.booleans(),
    )
    usage = st.builds(
        lambda sid, agent, usd, calls, fin, use: (
            USAGE,
            {
                "session_id": sid,
                "agent_id": agent,
                "usd": usd,
                "tool_calls": calls,
                "finished": fin,
            },
            token(sid, agent, use),
        ),
        IDS,
        AGENTS,
        NUMBERS,
        NUMBERS,
        st.booleans(),
        st.booleans(),
    )
    kill = st.builds(
        lambda sid, unseen, wait: (
            f"/api/v1/sessions/{sid}/kill",
            {"reason": "fuzz", "unseen": unseen, "wait_s": wait},
            "",
        ),
        IDS,
        st.booleans(),
        st.sampled_from([0, 0.05, -1, 1e9]),
    )
    approve = st.builds(
        lambda n, verb: (
            f"/api/v1/approvals/{world.approvals[n % len(world.approvals)]}/{verb}"
            if world.approvals
            else f"/api/v1/approvals/apr-{n:016x}/{verb}",
            {"comment": "fuzz"},
            "",
        ),
        st.integers(0, 50),
        st.sampled_from(["approve", "deny"]),
    )
    return st.one_of(handoff, handoff, tool, tool, usage, kill, approve)


def snapshot(api: Api, sids: list[str]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for sid in sids:
        r = api.get(f"/api/v1/sessions/{sid}")
        state[sid] = r.json().get("governor") if r.status_code == 200 else r.status_code
    r = api.get("/api/v1/approvals", include_escalated="true")
    assert r.status_code == 200
    state["approvals"] = sorted(r.json()["approvals"], key=lambda a: a["approval_id"])
    return state


def test_fuzzed_requests_never_break_the_governor(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY + "  shared_max_usd: 50\n  max_agents_per_run: 5\n")
    c = CollectorProcess(tmp_path / "data", free_port(), free_port()).start(
        ("--policy", str(policy)), env=KEYS
    )
    api = Api(c.url)
    world = World()
    statuses: dict[int, int] = {}
    try:

        @settings(
            max_examples=40,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(st.data())
        def run(data: st.DataObject) -> None:
            for _ in range(data.draw(st.integers(1, 12))):
                path, body, token = data.draw(actions(world))
                key = (
                    ADMIN
                    if path.endswith("/kill")
                    else (REVIEWER if "/approvals/" in path else KEY_A)
                )
                started = time.monotonic()
                r = api.post(path, body, token, key=key)
                assert time.monotonic() - started < 5, (path, body)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code < 500, (path, body, r.status_code, r.text)
                assert r.status_code in (200, 400, 403, 404, 409), (path, body, r.text)
                answer = r.json()
                if r.status_code == 200 and path == HANDOFF and answer.get("lineage_token"):
                    world.tokens[(body["session_id"], body["to_agent"])] = answer["lineage_token"]
                if answer.get("approval_id"):
                    world.approvals.append(answer["approval_id"])
            assert c.health()["status"] == "ok"

        run()
        sids = ["s-1", "s-2", "s-3"]
        before = snapshot(api, sids)
        assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, statuses
        for sid in sids:
            if isinstance(before[sid], dict):
                verified = api.get(f"/api/v1/sessions/{sid}/decisions/verify").json()
                assert verified["ok"], verified
        c.stop()
        c.start(("--policy", str(policy)), env=KEYS)
        after = snapshot(api, sids)
        assert after == before
    finally:
        c.stop()
