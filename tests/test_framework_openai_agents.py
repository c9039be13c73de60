"""The OpenAI Agents SDK under agentgov's instrumentor: real SDK runs, offline, with a
scripted model (tests/scripted_openai.py), against a real collector process with API keys
and a policy.

The app: ``planner`` hands off to ``coordinator``, which lists deployments (a tool), asks
``cleanup_data`` (an agent used as a tool, which runs ``run_shell``) and hands off to
``reporter``. Covered:

- the graph read back from the API is the run's real delegations (handoffs as siblings
  in the SDK, the agent tool as a nested run), with each tool on the agent that called it;
- policy stops inside the SDK: a handoff budget (the run raises, or the ``on_stop`` hook's
  constrained agent takes over), a tool off the allowlist and a delegation too deep (the
  model is told, the run ends normally); approvals wait or raise; the audit records each;
- a kill from another process (``agentgov kill``) stops a running run at its next step;
- ``opentelemetry-instrument`` runs an unmodified app whose governed spans reach the
  collector;
- ``uninstrument()`` puts back every patched attribute, the very objects;
- with OpenInference's instrumentor active too, the app works and agentgov's spans are all
  exported; streamed runs are traced.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import agents.run as sdk_run
import pytest
from agents import (
    Agent,
    AgentHooks,
    RunHooks,
    Runner,
    SQLiteSession,
    function_tool,
    set_default_openai_api,
    set_default_openai_client,
    set_trace_processors,
)
from agents.exceptions import AgentsException
from agents.run_internal import tool_execution, turn_resolution
from agents.tool_context import ToolContext
from openai import AsyncOpenAI
from opentelemetry.sdk.trace import TracerProvider

from agentgov.instrumentation import SessionKilled, Stopped
from agentgov.instrumentation.frameworks.openai_agents import OpenAIAgentsInstrumentor
from tests.framework_harness import (
    INTENT,
    Governed,
    Governor,
    Kill,
    Reviewer,
    alongside,
    asked,
    chains,
    each_agent_once,
    following,
    governor_fixture,
    instrument_fixture,
    parents,
    provider_fixture,
    run_unmodified,
    session_of,
    span_kinds,
    tree,
    usage,
)

from .conftest import wait_for
from .scripted_openai import ScriptedOpenAI, ToolCall

# -- the collector, its policy, the model ---------------------------------------------------

governor = governor_fixture("openai-agents")


#: what each agent's model does, in order; after its plan, it answers with what it saw
PLANS: dict[str, list[ToolCall]] = {}
#: the scripted model server of this module
MODEL: list[ScriptedOpenAI] = []


@pytest.fixture(scope="module")
def model() -> Iterator[ScriptedOpenAI]:
    with ScriptedOpenAI(following(PLANS)) as server:
        set_default_openai_api("responses")
        set_trace_processors([])  # the SDK's own exporter would try the network
        MODEL[:] = [server]
        yield server


def use_model(server: ScriptedOpenAI) -> AsyncOpenAI:
    """A fresh client for each event loop (an HTTP client's connections belong to one)."""
    client = AsyncOpenAI(base_url=server.base_url, api_key="dummy")
    set_default_openai_client(client, use_for_tracing=False)
    return client


# -- the app -------------------------------------------------------------------------------------


@dataclass
class App:
    """The app's agents, and what really happened, as the SDK's own hooks saw it."""

    planner: Agent[Any]
    coordinator: Agent[Any]
    cleanup_data: Agent[Any]
    reporter: Agent[Any]
    executed: list[tuple[str, str, str]]
    seen: list[tuple[str, str, str]]
    hooks: RunHooks[Any]


class Truth(AgentHooks[Any]):
    """Per-agent hooks: they fire in nested agent-as-tool runs too."""

    def __init__(self, seen: list[tuple[str, str, str]]) -> None:
        self.seen = seen

    async def on_handoff(self, context: Any, agent: Any, source: Any) -> None:
        self.seen.append(("handoff", source.name, agent.name))

    async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
        nested = getattr(tool, "_agent_instance", None)
        if nested is not None:
            self.seen.append(("delegation", agent.name, nested.name))
        else:
            self.seen.append(("tool", agent.name, tool.name))


class AppHooks(RunHooks[Any]):
    """The app's own run hooks: agentgov's hooks must pass every call on."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def on_agent_start(self, context: Any, agent: Any) -> None:
        self.events.append(f"start {agent.name}")

    async def on_handoff(self, context: Any, from_agent: Any, to_agent: Any) -> None:
        self.events.append(f"handoff {from_agent.name}->{to_agent.name}")

    async def on_llm_end(self, context: Any, agent: Any, response: Any) -> None:
        self.events.append(f"llm {agent.name}")


def build(
    reporter: bool = True,
    delegate: bool = True,
    on_list: Callable[[ToolContext[Any]], None] | None = None,
    on_shell: Callable[[ToolContext[Any]], None] | None = None,
) -> App:
    executed: list[tuple[str, str, str]] = []
    seen: list[tuple[str, str, str]] = []

    @function_tool
    def run_shell(ctx: ToolContext[Any], command: str) -> str:
        """Run a shell command (recorded, never executed)."""
        executed.append((str(ctx.agent.name if ctx.agent else "?"), "run_shell", command))
        if on_shell is not None:
            on_shell(ctx)
        return "removed"

    @function_tool
    def list_deployments(ctx: ToolContext[Any], path: str) -> str:
        """List the deployments under a folder."""
        executed.append((str(ctx.agent.name if ctx.agent else "?"), "list_deployments", path))
        if on_list is not None:
            on_list(ctx)
        return "app-v1 app-v2"

    truth = Truth(seen)
    rep = Agent(name="reporter", instructions="You are reporter.", model="m", hooks=truth)
    data = Agent(
        name="cleanup_data",
        instructions="You are cleanup_data.",
        tools=[run_shell],
        model="m",
        hooks=truth,
    )
    coord = Agent(
        name="coordinator",
        instructions="You are coordinator.",
        tools=[
            list_deployments,
            data.as_tool(tool_name="cleanup_data", tool_description="Remove old data."),
        ],
        handoffs=[rep] if reporter else [],
        model="m",
        hooks=truth,
    )
    planner = Agent(
        name="planner", instructions="You are planner.", handoffs=[coord], model="m", hooks=truth
    )
    PLANS.clear()
    if MODEL:
        MODEL[0].requests.clear()
    PLANS["planner"] = [ToolCall("transfer_to_coordinator")]
    PLANS["coordinator"] = [ToolCall("list_deployments", {"path": "/opt/app/releases"})]
    if delegate:
        PLANS["coordinator"].append(ToolCall("cleanup_data", {"input": "remove app-v1's data"}))
    if reporter:
        PLANS["coordinator"].append(ToolCall("transfer_to_reporter"))
    PLANS["cleanup_data"] = [ToolCall("run_shell", {"command": "rm -rf /opt/app/releases/app-v1"})]
    return App(planner, coord, data, rep, executed, seen, AppHooks())


# -- instrumenting ------------------------------------------------------------------------------


provider = provider_fixture("openai-agents-app")
instrument = instrument_fixture(OpenAIAgentsInstrumentor)


def run(app: App, text: str = INTENT, **kwargs: Any) -> Any:
    async def main() -> Any:
        client = use_model(MODEL[0])
        try:
            return await Runner.run(app.planner, text, hooks=app.hooks, **kwargs)
        finally:
            await client.close()

    return asyncio.run(main())


# == (a) the graph is the run's real delegations ===============================================


def test_the_graph_is_the_runs_real_delegations(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy()
    g = instrument()
    app = build()
    result = run(app)
    assert result.last_agent is app.reporter
    assert result.final_output.startswith("reporter done")

    # what the SDK did, by its own hooks: two handoffs (siblings in the SDK), one agent
    # called as a tool (a nested run), two tools
    assert app.seen == [
        ("handoff", "planner", "coordinator"),
        ("tool", "coordinator", "list_deployments"),
        ("delegation", "coordinator", "cleanup_data"),
        ("tool", "cleanup_data", "run_shell"),
        ("handoff", "coordinator", "reporter"),
    ]
    # agentgov's hooks passed every call on to the app's own
    assert app.hooks.events[:3] == ["start planner", "llm planner", "handoff planner->coordinator"]
    assert "handoff coordinator->reporter" in app.hooks.events

    sid = session_of(g)
    graph = governor.graph(sid, agents=4)
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    assert set(tree(graph["nodes"])) == {
        ("planner", "", 0),
        ("coordinator", "planner", 1),
        ("cleanup_data", "coordinator", 2),
        ("reporter", "coordinator", 2),
    }
    assert all(n["lineage"] == "governor" and n["verified"] for n in graph["nodes"])
    edges = {(names[e["source"]], names[e["target"]], e["task"]) for e in graph["edges"]}
    assert edges == {
        ("planner", "coordinator", ""),
        ("coordinator", "cleanup_data", "remove app-v1's data"),
        ("coordinator", "reporter", ""),
    }
    # each tool on the agent that called it, commands and resources from the arguments
    commands = wait_for(
        lambda: (
            (rows := governor.get(f"/api/v1/sessions/{sid}/audit")["commands"])
            and len(rows) == 2
            and rows
        )
    )
    got = {(c["agent_name"], c["tool"], c["command"], tuple(c["resources"])) for c in commands}
    assert got == {
        ("coordinator", "list_deployments", "/opt/app/releases", ("/opt/app/releases",)),
        ("cleanup_data", "run_shell", "rm -rf /opt/app/releases/app-v1", ()),
    }
    assert all(c["verified"] for c in commands)

    spans = g.spans()
    kinds = sorted(s.name for s in spans)
    assert kinds == [
        "execute_tool list_deployments",
        "execute_tool run_shell",
        "invoke_agent cleanup_data",
        "invoke_agent coordinator",
        "invoke_agent planner",
        "invoke_agent reporter",
        "invoke_workflow planner",
    ]
    workflow = next(s for s in spans if s.name == "invoke_workflow planner")
    assert workflow.attributes is not None
    assert workflow.attributes["gen_ai.operation.name"] == "invoke_workflow"
    assert workflow.attributes["agentgov.intent"] == INTENT
    for s in spans:
        assert s.attributes is not None and s.attributes["gen_ai.conversation.id"] == sid
    by_name = {s.name: s for s in spans}
    # token usage of each agent's own model calls (50 in, 10 out per call)
    assert usage(spans) == {
        "invoke_agent planner": (50, 10),
        "invoke_agent coordinator": (150, 30),
        "invoke_agent cleanup_data": (100, 20),
        "invoke_agent reporter": (50, 10),
    }
    # the delegation's task went as a message: a digest and a score, never the text
    coord = by_name["invoke_agent coordinator"]
    messages = [e for e in coord.events if e.name == "agentgov.message"]
    assert len(messages) == 1 and messages[0].attributes is not None
    assert str(messages[0].attributes["agentgov.message.digest"]).startswith("sha256:")
    assert "remove app-v1" not in json.dumps({k: str(v) for k, v in messages[0].attributes.items()})
    # the governor saw every step first
    assert governor.decisions(sid)[:2] == [
        ("pre_handoff", "allow", ""),
        ("pre_handoff", "allow", ""),
    ]
    assert g.stops == []


# == (b) policy stops inside the SDK ===========================================================


def test_a_handoff_over_budget_raises_through_the_sdk(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(max_handoffs=2)  # planner->coordinator, coordinator->cleanup_data
    g = instrument()
    app = build()
    with pytest.raises(Stopped) as stopped:
        run(app)
    error = stopped.value
    assert isinstance(error, AgentsException)  # the SDK's own kind, passed on unchanged
    assert (error.reason, error.phase) == ("handoff_budget_exceeded", "delegation")
    assert "handoff_budget_exceeded" in str(error)
    assert asked(model, "reporter") == []  # the target never ran
    assert [(a.name, s.reason) for a, s in g.stops] == [("coordinator", "handoff_budget_exceeded")]
    sid = session_of(g)
    assert ("pre_handoff", "stop", "handoff_budget_exceeded") in governor.decisions(sid)
    spans = {s.name: s for s in g.spans()}
    assert "invoke_agent reporter" not in spans
    assert spans["invoke_workflow planner"].status.status_code.name == "ERROR"


def test_the_fallback_hook_switches_to_a_constrained_agent(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(max_handoffs=2)
    app = build()
    alone = app.coordinator.clone(
        name="coordinator", instructions="You are coordinator_alone.", handoffs=[], tools=[]
    )
    calls: list[tuple[str, str]] = []

    def constrained(agent: Any, stop: Stopped) -> Any:
        calls.append((agent.name, stop.reason))
        return alone if stop.phase == "delegation" else None

    g = instrument(on_stop=constrained)
    result = run(app)
    assert calls == [("coordinator", "handoff_budget_exceeded")]
    assert result.last_agent is alone  # the run ended through the SDK's normal path
    assert result.final_output.startswith("coordinator_alone done")
    assert asked(model, "reporter") == []
    sid = session_of(g)
    assert ("pre_handoff", "stop", "handoff_budget_exceeded") in governor.decisions(sid)
    # the constrained agent is the coordinator going on alone: no new agent in the graph
    graph = governor.graph(sid, agents=3)
    assert sorted(n["name"] for n in graph["nodes"]) == ["cleanup_data", "coordinator", "planner"]


def test_a_tool_off_the_allowlist_is_refused_to_the_model(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(tool_allowlist=["list_deployments"])
    g = instrument()
    app = build(reporter=False)
    result = run(app)
    assert result.final_output.startswith("coordinator done")  # the normal path
    assert [e[1] for e in app.executed] == ["list_deployments"]  # run_shell never ran
    # the nested agent's model was told why, naming the reason
    told = [
        m["content"] for m in asked(model, "cleanup_data")[-1]["messages"] if m["role"] == "tool"
    ]
    assert len(told) == 1
    assert told[0].startswith("[agentgov] tool call stopped by the governor: tool_not_allowed")
    assert "run_shell" in told[0]
    assert [(a.name, s.reason) for a, s in g.stops] == [("cleanup_data", "tool_not_allowed")]
    sid = session_of(g)
    assert ("tool", "stop", "tool_not_allowed") in governor.decisions(sid)
    assert "execute_tool run_shell" not in {s.name for s in g.spans()}


def test_a_delegation_too_deep_is_refused_to_the_model(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(max_delegation_depth=1)
    g = instrument()
    app = build(reporter=False)
    result = run(app)
    assert result.final_output.startswith("coordinator done")
    assert "[agentgov] delegation stopped by the governor: delegation_depth_exceeded" in (
        result.final_output
    )
    assert asked(model, "cleanup_data") == []  # the nested agent never started
    assert [(a.name, s.reason) for a, s in g.stops] == [
        ("coordinator", "delegation_depth_exceeded")
    ]
    sid = session_of(g)
    assert ("pre_handoff", "stop", "delegation_depth_exceeded") in governor.decisions(sid)
    assert "invoke_agent cleanup_data" not in {s.name for s in g.spans()}


def test_approvals_wait_for_a_reviewer_or_raise(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(require_approval_for=["run_shell"])
    g = instrument(approvals="wait")
    reviewer = Reviewer(governor).start()
    result = run(build(reporter=False))
    assert reviewer.join(30) == [200]
    assert result.final_output.startswith("coordinator done")
    assert "removed" in result.final_output  # run_shell ran once approved
    g.instrumentor.uninstrument()

    g = instrument(approvals="raise")
    app = build(reporter=False)
    result = run(app)
    assert [e[1] for e in app.executed] == ["list_deployments"]
    told = [
        m["content"] for m in asked(model, "cleanup_data")[-1]["messages"] if m["role"] == "tool"
    ]
    assert told[0].startswith("[agentgov] approval stopped by the governor: awaiting_approval")
    assert ("approval", "requested", "") in governor.decisions(session_of(g))


# == (c) a kill from another process ===========================================================


@pytest.mark.parametrize("where", ["run", "nested run"])
def test_a_kill_from_the_cli_stops_a_running_run(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI, where: str
) -> None:
    governor.set_policy()
    instrument()
    # the tool runs in a worker thread, in its agent's context
    killed = Kill(governor.url, lambda: len(model.requests))
    # killed while the coordinator lists (its own run) or while cleanup_data runs its
    # command (a nested agent-as-tool run, whose errors the SDK turns into tool results)
    app = build(on_list=killed.now) if where == "run" else build(on_shell=killed.now)
    with pytest.raises(SessionKilled) as stopped:
        run(app)
    assert isinstance(stopped.value, AgentsException)
    assert stopped.value.reason == "session_killed"
    assert "wrong environment" in str(stopped.value)
    assert killed.acknowledged()  # by every agent running then
    # the run took no step after the kill: no model call, no tool, no delegation
    assert len(model.requests) == killed.asked_before
    if where == "run":
        assert [e[1] for e in app.executed] == ["list_deployments"]
        assert asked(model, "cleanup_data") == []
    else:
        assert [e[1] for e in app.executed] == ["list_deployments", "run_shell"]
        assert asked(model, "reporter") == []
    phases = governor.decisions(killed.sid)
    assert ("kill", "stop", "wrong environment") in phases or any(p[0] == "kill" for p in phases)


# == (d) opentelemetry-instrument runs an unmodified app =======================================

UNMODIFIED = '''
import sys
from agents import Agent, Runner, function_tool


@function_tool
def run_shell(command: str) -> str:
    """Run a shell command."""
    return "removed"


cleanup = Agent(name="cleanup_data", instructions="You are cleanup_data.", tools=[run_shell], model="m")
planner = Agent(name="planner", instructions="You are planner.", handoffs=[cleanup], model="m")
print(Runner.run_sync(planner, sys.argv[1]).final_output)
'''


def test_opentelemetry_instrument_governs_an_unmodified_app(
    governor: Governor, model: ScriptedOpenAI, tmp_path: Path
) -> None:
    governor.set_policy()
    PLANS.clear()
    PLANS["planner"] = [ToolCall("transfer_to_cleanup_data")]
    PLANS["cleanup_data"] = [ToolCall("run_shell", {"command": "rm -rf /opt/app/releases/app-v0"})]
    stdout, intent = run_unmodified(
        governor,
        "openai-agents",
        UNMODIFIED,
        tmp_path,
        OPENAI_BASE_URL=model.base_url,
        OPENAI_API_KEY="dummy",
        OPENAI_AGENTS_DISABLE_TRACING="1",
    )
    assert stdout.startswith("cleanup_data done:") and "removed" in stdout, stdout

    sid = governor.session_with(intent)
    graph = governor.graph(sid, agents=2)
    assert parents(graph) == {
        ("planner", ""),
        ("cleanup_data", "planner"),
    }
    assert all(n["lineage"] == "governor" for n in graph["nodes"])
    commands = wait_for(lambda: governor.get(f"/api/v1/sessions/{sid}/audit")["commands"])
    assert [(c["agent_name"], c["command"], c["verified"]) for c in commands] == [
        ("cleanup_data", "rm -rf /opt/app/releases/app-v0", True)
    ]
    got = governor.decisions(sid)
    assert got[:2] == [("pre_handoff", "allow", ""), ("pre_handoff", "allow", "")]
    assert ("tool", "allow", "") in got


# == (e) uninstrument leaves no trace ==========================================================


def patched() -> dict[str, Any]:
    return {
        "runner": sdk_run.get_default_agent_runner(),
        "DEFAULT_AGENT_RUNNER": sdk_run.DEFAULT_AGENT_RUNNER,
        "guardrails": tool_execution._execute_tool_input_guardrails,
        "invoke": tool_execution._invoke_function_tool_with_metadata,
        "handoffs": turn_resolution.execute_handoffs,
    }


def test_uninstrument_puts_back_every_patched_attribute(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy()
    before = patched()
    app = build(reporter=False)
    tools = list(app.coordinator.tools)
    invokers = [t.on_invoke_tool for t in tools]  # type: ignore[union-attr]
    handoffs = list(app.planner.handoffs)

    g = instrument()
    during = patched()
    assert all(during[k] is not before[k] for k in before), during
    run(app)
    assert len(g.spans()) == 6
    g.instrumentor.uninstrument()

    after = patched()
    assert all(after[k] is before[k] for k in before), after
    # the app's own objects were never touched
    assert app.coordinator.tools == tools and all(
        t.on_invoke_tool is i
        for t, i in zip(app.coordinator.tools, invokers, strict=True)  # type: ignore[union-attr]
    )
    assert app.planner.handoffs == handoffs
    # and nothing more is traced or governed
    g.exporter.clear()
    result = run(build(reporter=False), text="after uninstrument")
    assert result.final_output.startswith("coordinator done")
    assert g.spans() == []
    time.sleep(0.5)
    # (counted by intent: earlier runs' late spans may still be adding their sessions)
    intents = {r["intent"] for r in governor.get("/api/v1/sessions")["sessions"]}
    assert INTENT in intents and "after uninstrument" not in intents
    # instrumenting again works as the first time
    again = instrument()
    run(build(reporter=False))
    assert len(again.spans()) == 6


# == (f) with OpenInference's instrumentor too =================================================


@pytest.mark.parametrize("first", ["openinference", "agentgov"])
def test_with_openinference_too_the_app_works_and_every_span_is_there(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI, first: str
) -> None:
    from openinference.instrumentation.openai_agents import (
        OpenAIAgentsInstrumentor as OpenInferenceInstrumentor,
    )

    governor.set_policy()
    with alongside(OpenInferenceInstrumentor(), first, instrument, collector=governor) as (
        g,
        oi_exporter,
    ):
        app = build()
        result = run(app)
        assert result.final_output.startswith("reporter done")
        assert [e[1] for e in app.executed] == ["list_deployments", "run_shell"]
        ours = g.spans()
        assert sorted(s.name for s in ours) == [
            "execute_tool list_deployments",
            "execute_tool run_shell",
            "invoke_agent cleanup_data",
            "invoke_agent coordinator",
            "invoke_agent planner",
            "invoke_agent reporter",
            "invoke_workflow planner",
        ]
        lengths = chains(ours)
        assert lengths["execute_tool run_shell"] == 3 and lengths["invoke_agent reporter"] == 3
        theirs = oi_exporter.get_finished_spans()
        assert {"AGENT", "TOOL", "LLM"} <= span_kinds(theirs)  # OpenInference traced the run
        # both sent to the collector: in the same traces, and each agent one node
        assert {s.context.trace_id for s in theirs} <= {s.context.trace_id for s in ours}
    each_agent_once(governor, ours)
    set_trace_processors([])


# == streamed runs =============================================================================


def test_a_streamed_run_is_traced_and_governed(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(tool_allowlist=["list_deployments"])
    g = instrument()
    app = build(reporter=False)

    async def main() -> Any:
        client = use_model(model)
        streamed = Runner.run_streamed(app.planner, INTENT)
        async for _ in streamed.stream_events():
            pass
        await client.close()
        return streamed

    set_default_openai_api("chat_completions")  # the scripted server streams those
    try:
        result = asyncio.run(main())
    finally:
        set_default_openai_api("responses")
    assert result.final_output.startswith("coordinator done")
    assert [e[1] for e in app.executed] == ["list_deployments"]

    def exported() -> Any:
        names = sorted(s.name for s in g.spans())
        return len(names) == 5 and names

    assert wait_for(exported, timeout=10) == [
        "execute_tool list_deployments",
        "invoke_agent cleanup_data",
        "invoke_agent coordinator",
        "invoke_agent planner",
        "invoke_workflow planner",
    ]
    assert ("tool", "stop", "tool_not_allowed") in governor.decisions(session_of(g))


# == sessions from the SDK's own, and every framework at once ==================================


def test_the_sdks_session_names_the_agentgov_session(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy()
    g = instrument()
    chat = f"chat-{secrets.token_hex(4)}"
    run(build(reporter=False), session=SQLiteSession(chat))
    assert session_of(g) == chat
    g.exporter.clear()
    # a session has one root: the conversation's next run gets a session named after it
    run(build(reporter=False), session=SQLiteSession(chat))
    again = session_of(g)
    assert again.startswith(f"{chat}-") and again != chat
    assert governor.decisions(again)[0] == ("pre_handoff", "allow", "")


def test_instrument_all_instruments_the_installed_frameworks(
    governor: Governor, model: ScriptedOpenAI, provider: tuple[TracerProvider, Any]
) -> None:
    from agentgov.instrumentation.frameworks import instrument_all, uninstrument_all

    before = patched()
    done = instrument_all(tracer_provider=provider[0], governor=None)
    try:
        assert "openai-agents" in done
        assert OpenAIAgentsInstrumentor().is_instrumented_by_opentelemetry
        provider[1].clear()
        run(build(reporter=False))
        assert len(provider[1].get_finished_spans()) == 6  # traced, not governed
    finally:
        assert "openai-agents" in uninstrument_all()
    assert all(patched()[k] is before[k] for k in before)
    with pytest.raises(TypeError, match="unknown instrumentor option"):
        instrument_all(tracer_provider=provider[0], governer=None)
