"""The asyncio governor client and the SDK's awaitable steps, against a real collector process
(API keys, a policy) and against a hostile local server in the governor's place.

- decisions, delegations and tool calls awaited on one event loop, spans exported with the
  session as ``gen_ai.conversation.id``; the loop keeps running while a request is in flight;
- fail-closed exactly as the blocking client: only ``allow`` proceeds, within one timeout;
- an approval wait on the loop is woken by the session's events (a reviewer coroutine on the
  same loop approves it), ``approvals="raise"`` raises at once, a denial stops;
- a kill reaches an agent waiting on the loop, and the process acknowledges it;
- importing the instrumentation loads no OpenTelemetry SDK and no framework.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentgov.instrumentation import (
    AsyncGovernorClient,
    AwaitingApproval,
    Governance,
    GovernorClient,
    SessionKilled,
    Stopped,
)

from .conftest import CollectorProcess, free_port
from .hostile_governor import HostileGovernor

AGENT = "agent-" + secrets.token_hex(12)
REVIEWER = "review-" + secrets.token_hex(12)
ADMIN = "admin-" + secrets.token_hex(12)
KEYS = {"AGENTGOV_API_KEYS": f"bot:agent:{AGENT},rev:reviewer:{REVIEWER},ops:admin:{ADMIN}"}
REFUND = "billing.refund.create"
POLICY = f"""\
multi_agent:
  max_delegation_depth: 2
  tool_allowlist: [shell, search.read, {REFUND}]
  require_approval_for: [{REFUND}]
"""


#: every client the tests made: their event listeners end before the collector stops
CLIENTS: list[GovernorClient] = []


@pytest.fixture(scope="module")
def gov(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollectorProcess]:
    base = tmp_path_factory.mktemp("async-governor")
    policy = base / "policy.yaml"
    policy.write_text(POLICY)
    c = CollectorProcess(base / "data", free_port(), free_port()).start(
        ("--policy", str(policy)), env=KEYS
    )
    yield c
    for client in CLIENTS:
        client.close()
    c.stop()


def governance(url: str, **client: Any) -> tuple[Governance, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client.setdefault("approval_timeout", 20)
    return Governance(
        provider, governor=AsyncGovernorClient(url, api_key=AGENT, **client)
    ), exporter


def reviewer(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {REVIEWER}"})


def decisions(url: str, sid: str) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{url}/api/v1/sessions/{sid}/decisions",
        headers={"Authorization": f"Bearer {REVIEWER}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return list(r.json()["decisions"])


class Ticker:
    """Measures how long the event loop went without running a 5 ms ticker."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            self.worst = max(self.worst, now - last)
            last = now

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


# -- 1. governed steps, awaited -------------------------------------------------------------


def test_awaited_steps_are_decided_and_traced(gov: CollectorProcess) -> None:
    g, exporter = governance(gov.url)
    client = g.governor
    assert isinstance(client, AsyncGovernorClient)

    async def main() -> tuple[str, list[str]]:
        with Ticker() as ticker:
            with g.session("rotate the logs") as session:
                root = await session.aagent("planner")
                async with root:
                    worker = await root.adelegate("worker", task="compress last week's logs")
                    async with worker:
                        async with worker.atool("shell", command="gzip /var/log/app/*.log"):
                            pass
                        await worker.ausage(input_tokens=120, output_tokens=30, usd=0.01)
                        with pytest.raises(Stopped) as refused:
                            async with worker.atool("rm", command="rm -rf /var/log"):
                                pytest.fail("a tool off the allowlist ran")
                        assert refused.value.reason == "tool_not_allowed"
                        ids = [root.agent_id, worker.agent_id]
        # every decision was a request on this loop; it never stood still for one
        assert ticker.worst < 0.1, ticker.worst
        # sequential requests of one loop share one kept-alive connection
        assert len(client._pools[asyncio.get_running_loop()].idle) == 1
        return session.session_id, ids

    sid, (root_id, worker_id) = asyncio.run(main())
    spans = {s.name: dict(s.attributes or {}) for s in exporter.get_finished_spans()}
    assert set(spans) == {"invoke_agent planner", "invoke_agent worker", "execute_tool shell"}
    for attrs in spans.values():
        assert attrs["gen_ai.conversation.id"] == attrs["agentgov.session.id"] == sid
        assert attrs["agentgov.lineage.token_id"]  # spans proven with the issued tokens
    assert spans["execute_tool shell"]["agentgov.delegation.chain"] == (root_id, worker_id)
    assert spans["invoke_agent worker"]["gen_ai.usage.input_tokens"] == 120
    got = [(d["phase"], d["outcome"], d["reason"], d["to_agent"]) for d in decisions(gov.url, sid)]
    assert got[:3] == [
        ("pre_handoff", "allow", "", root_id),
        ("pre_handoff", "allow", "", worker_id),
        ("tool", "allow", "", ""),
    ]
    assert ("tool", "stop", "tool_not_allowed", "") in got


def test_blocking_methods_still_work_on_the_async_client(gov: CollectorProcess) -> None:
    client = AsyncGovernorClient(gov.url, api_key=AGENT)
    CLIENTS.append(client)
    assert isinstance(client, GovernorClient)
    sid = f"sync-{secrets.token_hex(6)}"
    root = client.handoff(sid, "", f"root-{secrets.token_hex(4)}")
    assert root.outcome == "allow" and root.lineage_token
    tool = client.tool(sid, "", "shell", command="ls", token=root.lineage_token)
    assert tool.outcome == "allow"


# -- 2. fail closed, within one timeout -----------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ((200, "application/json", b'{"outcome": "deny"}'), "governor_invalid_answer"),
        ((200, "application/json", b'{"outcome": "ALLOW"}'), "governor_invalid_answer"),
        ((200, "application/json", b"[]"), "governor_invalid_answer"),
        ((200, "text/html", b"<html>maintenance</html>"), "governor_invalid_answer"),
        ((302, "text/html", b""), "governor_invalid_answer"),
        ((500, "text/plain", b"oops"), "governor_refused"),
        (None, "governor_unreachable"),
    ],
    ids=["deny", "upper", "list", "html", "redirect", "500", "hung"],
)
@pytest.mark.parametrize("fail_closed", [True, False], ids=["closed", "open"])
def test_the_async_client_goes_ahead_only_on_exactly_allow(
    answer: tuple[int, str, bytes] | None, reason: str, fail_closed: bool
) -> None:
    server = HostileGovernor(answer)

    async def main() -> None:
        client = AsyncGovernorClient(server.url, timeout=0.5, fail_closed=fail_closed)
        started = time.monotonic()
        with Ticker() as ticker:
            if reason == "governor_unreachable" and not fail_closed:
                decision = await client.atool("s-1", "a-1", "shell")
                assert decision.reason == "governor_unavailable"
            else:
                with pytest.raises(Stopped) as refused:
                    await client.atool("s-1", "a-1", "shell")
                assert refused.value.reason == reason
        assert time.monotonic() - started < 0.5 + 0.3  # one timeout bounds the step
        assert ticker.worst < 0.1, ticker.worst  # and the loop ran all along

    try:
        asyncio.run(main())
    finally:
        server.close()


def test_a_header_value_cannot_end_the_request_head() -> None:
    server = HostileGovernor((200, "application/json", b'{"outcome": "allow"}'))
    try:
        client = AsyncGovernorClient(server.url, api_key="key\r\nX-Injected: 1")
        with pytest.raises(ValueError, match="invalid value for header"):
            asyncio.run(client.atool("s-1", "a-1", "shell"))
    finally:
        server.close()


# -- 3. approvals on the loop ---------------------------------------------------------------


async def _pending(api: httpx.AsyncClient, sid: str) -> dict[str, Any]:
    for _ in range(400):
        r = await api.get("/api/v1/approvals", params={"status": "pending"})
        rows = [a for a in r.json()["approvals"] if a["session_id"] == sid]
        if rows:
            return dict(rows[0])
        await asyncio.sleep(0.02)
    raise AssertionError("no pending approval")


def test_an_approval_wait_is_woken_by_the_session_events(gov: CollectorProcess) -> None:
    g, _ = governance(gov.url)

    async def refund(agent: Any, order: int, entered: list[float]) -> None:
        async with agent.atool(REFUND, command=f"refund order {order} 25.00 EUR"):
            entered.append(time.perf_counter())

    async def main() -> list[float]:
        lags = []
        async with reviewer(gov.url) as api:
            with g.session("refund three damaged orders") as session:
                agent = await session.aagent("billing")
                async with agent:
                    for order in (1, 2, 3):
                        entered: list[float] = []
                        with Ticker() as ticker:
                            waiting = asyncio.create_task(refund(agent, order, entered))
                            pending = await _pending(api, session.session_id)
                            # let the agent settle into its wait before the reviewer acts
                            await asyncio.sleep(0.1 + 0.1 * order)
                            assert not entered and not waiting.done()
                            r = await api.post(
                                f"/api/v1/approvals/{pending['approval_id']}/approve"
                            )
                            assert r.status_code == 200, r.text
                            approved = time.perf_counter()
                            await asyncio.wait_for(waiting, 10)
                        assert ticker.worst < 0.1, (
                            ticker.worst
                        )  # the wait held no thread of the loop
                        lags.append(entered[0] - approved)
        return lags

    lags = asyncio.run(main())
    # the approval event wakes the waiter: re-asking on its own it would wait up to 0.5 s
    assert max(lags) < 0.2, lags


def test_approvals_raise_and_denials_stop(gov: CollectorProcess) -> None:
    g, _ = governance(gov.url, approvals="raise")
    w, _ = governance(gov.url)

    async def main() -> None:
        with g.session("refund order 7") as session:
            agent = await session.aagent("billing")
            async with agent:
                started = time.monotonic()
                with pytest.raises(AwaitingApproval) as raised:
                    async with agent.atool(REFUND, command="refund order 7 10 EUR"):
                        pytest.fail("ran without an approval")
                assert time.monotonic() - started < 1.0  # no wait at all
                assert raised.value.reason == "awaiting_approval"
                assert raised.value.approval_id in str(raised.value)
        async with reviewer(gov.url) as api:
            with w.session("refund order 8") as session:
                agent = await session.aagent("billing")
                async with agent:
                    denied = asyncio.create_task(_deny(api, session.session_id))
                    with pytest.raises(Stopped) as stopped:
                        async with agent.atool(REFUND, command="refund order 8 10 EUR"):
                            pytest.fail("ran although denied")
                    await denied
                assert (stopped.value.reason, stopped.value.phase) == (
                    "approval_denied",
                    "tool call",
                )
                assert agent.constrained

    asyncio.run(main())


async def _deny(api: httpx.AsyncClient, sid: str) -> None:
    pending = await _pending(api, sid)
    r = await api.post(f"/api/v1/approvals/{pending['approval_id']}/deny")
    assert r.status_code == 200, r.text


# -- 4. kills ---------------------------------------------------------------------------------


def test_a_kill_reaches_an_agent_waiting_on_the_loop(gov: CollectorProcess) -> None:
    g, _ = governance(gov.url)

    async def main() -> tuple[str, str, dict[str, Any]]:
        async with httpx.AsyncClient(
            base_url=gov.url, headers={"Authorization": f"Bearer {ADMIN}"}
        ) as admin:
            with g.session("refund everything") as session:
                agent = await session.aagent("billing")
                async with agent:
                    waiting = asyncio.create_task(
                        _enter(agent.atool(REFUND, command="refund all orders"))
                    )
                    async with reviewer(gov.url) as api:
                        await _pending(api, session.session_id)
                    r = await admin.post(
                        f"/api/v1/sessions/{session.session_id}/kill",
                        json={"actor": "ops", "reason": "fraud", "wait_s": 10},
                    )
                    assert r.status_code == 200, r.text
                    with pytest.raises(SessionKilled) as killed:
                        await asyncio.wait_for(waiting, 5)
                    assert killed.value.reason == "session_killed"
                    with pytest.raises(SessionKilled):
                        agent.checkpoint()
                    with pytest.raises(SessionKilled):
                        await agent.adelegate("helper", task="anything")
        return session.session_id, agent.agent_id, dict(r.json())

    sid, agent_id, answer = asyncio.run(main())
    agents = {a["agent_id"]: a for a in answer["agents"]}
    assert agents[agent_id]["acknowledged"] is True  # this process said it stopped
    assert answer["cancelled_approvals"]  # the wait was for an approval the kill cancelled
    phases = [(d["phase"], d["outcome"]) for d in decisions(gov.url, sid)]
    assert ("kill", "stop") in phases or any(p == "kill" for p, _ in phases)


async def _enter(step: Any) -> None:
    async with step:
        pytest.fail("the step ran in a killed session")


# -- 5. light ---------------------------------------------------------------------------------


def test_importing_the_instrumentation_loads_no_sdk_and_no_framework() -> None:
    code = """
import json, sys
import agentgov.instrumentation
import agentgov.instrumentation.frameworks
import agentgov.instrumentation.frameworks.openai_agents
heavy = ("opentelemetry.sdk", "agents", "openai", "crewai", "langgraph", "langchain",
         "autogen_agentchat", "pydantic_ai", "smolagents", "httpx")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy
                        or m.startswith("opentelemetry.sdk"))))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(out.stdout) == []


def test_configure_still_builds_an_sdk_provider(tmp_path: Path) -> None:
    code = """
import sys
from agentgov.instrumentation import configure
provider = configure(service_name="light", endpoint="http://127.0.0.1:9", set_global=False)
print(type(provider).__module__, "opentelemetry.sdk.trace" in sys.modules)
provider.shutdown()
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["opentelemetry.sdk.trace", "True"]
