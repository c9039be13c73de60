"""LangGraph under agentgov's instrumentor: real graphs, offline, with langchain-openai's
ChatOpenAI talking to a scripted model (tests/scripted_openai.py), against a real collector
process with API keys and a policy.

The main app is a hierarchy of langgraph-supervisor supervisors: ``planner`` hands off to
``coordinator`` (itself a supervisor, whose workflow is a subgraph of the planner's), which
lists deployments (a tool) and assigns ``cleanup_data`` (a ``create_agent`` agent that
runs ``run_shell``) a task through a handoff tool of its own; then ``planner`` hands off to
``reporter`` (a ``create_react_agent`` agent). A second app, ``ops``, has a subgraph as a
node (``triage``), an agent called inside a tool (``auditor``) and an agent invoked by a
node function (``fixer``). Covered:

- the graph read back from the API is the run's real delegations, with each tool on the
  agent that called it, through ``invoke``, ``ainvoke`` and ``stream``;
- policy stops inside LangGraph: a handoff over budget, a delegation too deep and a tool
  off the allowlist are refused to the model as the tool's result and the run ends
  normally; a nested run stopped raises out of ``invoke``; the ``on_stop`` hook switches
  to a constrained agent; approvals wait or raise; the audit records each;
- a kill from another process (``agentgov kill``) stops a running run at its next step;
- ``opentelemetry-instrument`` runs an unmodified app whose governed spans reach the
  collector;
- ``uninstrument()`` puts back every patched attribute, the very objects;
- with OpenInference's LangChain instrumentor active too, the app works and agentgov's
  spans are all exported.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from langchain.agents import create_agent
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, InjectedToolCallId, tool
from langchain_core.tracers import context as lc_context
from langchain_openai import ChatOpenAI
from langgraph.errors import GraphBubbleUp
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import InjectedState, create_react_agent
from langgraph.pregel import Pregel
from langgraph.types import Command
from langgraph_supervisor import create_handoff_tool, create_supervisor
from pydantic import SecretStr

from agentgov.instrumentation import SessionKilled, Stopped
from agentgov.instrumentation.frameworks.langgraph import LangGraphInstrumentor
from tests.framework_harness import (
    INTENT,
    Governed,
    Governor,
    Kill,
    Reviewer,
    agent_of,
    alongside,
    asked,
    chains,
    each_agent_once,
    following,
    governor_fixture,
    instrument_fixture,
    links,
    loaded_by_importing,
    provider_fixture,
    run_unmodified,
    session_of,
    span_kinds,
    usage,
    with_heartbeat,
)

from .conftest import wait_for
from .scripted_openai import ScriptedOpenAI, ToolCall

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# -- the collector, its policy, the model ---------------------------------------------------

governor = governor_fixture("langgraph")


#: what each agent's model does, in order; after its plan, it answers with what it saw
PLANS: dict[str, list[ToolCall]] = {}


@pytest.fixture(scope="module")
def model() -> Iterator[ScriptedOpenAI]:
    with ScriptedOpenAI(following(PLANS)) as server:
        yield server


def chat_model(server: ScriptedOpenAI, loop_bound: bool = False) -> ChatOpenAI:
    """A chat model on the scripted server; ``loop_bound``: with an HTTP client of its own
    for the running event loop (an async client's connections belong to one loop)."""
    extra: dict[str, Any] = {"http_async_client": httpx.AsyncClient()} if loop_bound else {}
    return ChatOpenAI(model="m", base_url=server.base_url, api_key=SecretStr("dummy"), **extra)


def told(server: ScriptedOpenAI, agent: str) -> list[str]:
    """The tool results ``agent``'s model saw last."""
    last = asked(server, agent)[-1]
    return [str(m["content"]) for m in last["messages"] if m["role"] == "tool"]


# -- the apps ------------------------------------------------------------------------------------


def assign_tool(agent_name: str, asynchronous: bool = False) -> BaseTool:
    """A handoff tool that names the task it hands over (a langgraph-supervisor handoff
    with an argument, as the LangGraph docs build them); sync or async."""

    def command(task: str, state: dict[str, Any], tool_call_id: str) -> Command[Any]:
        note = ToolMessage(
            f"assigned to {agent_name}", name=f"assign_to_{agent_name}", tool_call_id=tool_call_id
        )
        messages = [*state["messages"], note, HumanMessage(task)]
        return Command(
            goto=agent_name, graph=Command.PARENT, update={**state, "messages": messages}
        )

    name, description = f"assign_to_{agent_name}", f"Assign a task to {agent_name}."
    if asynchronous:

        @tool(name, description=description)
        async def assign_async(
            task: str,
            state: Annotated[dict[str, Any], InjectedState],
            tool_call_id: Annotated[str, InjectedToolCallId],
        ) -> Command[Any]:
            return command(task, state, tool_call_id)

        made = assign_async
    else:

        @tool(name, description=description)
        def assign(
            task: str,
            state: Annotated[dict[str, Any], InjectedState],
            tool_call_id: Annotated[str, InjectedToolCallId],
        ) -> Command[Any]:
            return command(task, state, tool_call_id)

        made = assign
    made.metadata = {"__handoff_destination": agent_name}
    return made


@dataclass
class App:
    graph: Any
    executed: list[tuple[str, str]]


def build(
    server: ScriptedOpenAI,
    *,
    loop_bound: bool = False,
    reporter: bool = True,
    on_list: Callable[[], None] | None = None,
    on_shell: Callable[[], None] | None = None,
    alone: bool = False,
) -> App:
    """The supervisor hierarchy; ``alone``: the planner's workflow also has a
    ``planner_alone`` node (a constrained agent for the fallback hook to route to)."""
    model = chat_model(server, loop_bound)
    executed: list[tuple[str, str]] = []

    def shell(command: str) -> str:
        executed.append(("run_shell", command))
        if on_shell is not None:
            on_shell()
        return "removed"

    def listing(path: str) -> str:
        executed.append(("list_deployments", path))
        if on_list is not None:
            on_list()
        return "app-v1 app-v2"

    if loop_bound:  # an async run gets async tools (a hook's blocking work off the loop)

        @tool
        async def run_shell(command: str) -> str:
            """Run a shell command (recorded, never executed)."""
            return await asyncio.to_thread(shell, command)

        @tool
        async def list_deployments(path: str) -> str:
            """List the deployments under a folder."""
            return await asyncio.to_thread(listing, path)

    else:

        @tool
        def run_shell(command: str) -> str:
            """Run a shell command (recorded, never executed)."""
            return shell(command)

        @tool
        def list_deployments(path: str) -> str:
            """List the deployments under a folder."""
            return listing(path)

    data = create_agent(
        model, [run_shell], system_prompt="You are cleanup_data.", name="cleanup_data"
    )
    coordinator = create_supervisor(
        [data],
        model=model,
        tools=[list_deployments, assign_tool("cleanup_data", asynchronous=loop_bound)],
        prompt="You are coordinator.",
        supervisor_name="coordinator",
    ).compile(name="coordinator")
    rep = create_react_agent(model, [], prompt="You are reporter.", name="reporter")
    workflow = create_supervisor(
        [coordinator, rep] if reporter else [coordinator],
        model=model,
        prompt="You are planner.",
        supervisor_name="planner",
    )
    if alone:
        solo = create_react_agent(model, [], prompt="You are planner_alone.", name="planner_alone")
        workflow.add_node("planner_alone", solo)
        workflow.add_edge("planner_alone", END)
    PLANS.clear()
    server.requests.clear()
    PLANS["planner"] = [ToolCall("transfer_to_coordinator")]
    if reporter:
        PLANS["planner"].append(ToolCall("transfer_to_reporter"))
    PLANS["coordinator"] = [
        ToolCall("list_deployments", {"path": "/opt/app/releases"}),
        ToolCall("assign_to_cleanup_data", {"task": "remove app-v1's data"}),
    ]
    PLANS["cleanup_data"] = [ToolCall("run_shell", {"command": "rm -rf /opt/app/releases/app-v1"})]
    return App(workflow.compile(name="planner"), executed)


def build_ops(server: ScriptedOpenAI) -> App:
    """``ops``: a subgraph as a node (triage), an agent called in a tool (auditor), an
    agent invoked by a node function (fixer)."""
    model = chat_model(server)
    executed: list[tuple[str, str]] = []

    @tool
    def run_shell(command: str) -> str:
        """Run a shell command (recorded, never executed)."""
        executed.append(("run_shell", command))
        return "restarted"

    auditor = create_agent(model, [], system_prompt="You are auditor.", name="auditor")
    fixer = create_agent(model, [run_shell], system_prompt="You are fixer.", name="fixer")

    @tool
    def ask_auditor(question: str) -> str:
        """Ask the auditor a question."""
        executed.append(("ask_auditor", question))
        answer = auditor.invoke({"messages": [HumanMessage(question)]})
        return str(answer["messages"][-1].content)

    triage = create_agent(model, [ask_auditor], system_prompt="You are triage.", name="triage")

    def fix(state: MessagesState) -> dict[str, Any]:
        answer = fixer.invoke({"messages": [HumanMessage("restart app-v2")]})
        return {"messages": [answer["messages"][-1]]}

    graph = StateGraph(MessagesState)
    graph.add_node("triage", triage)
    graph.add_node("fix", fix)
    graph.add_edge(START, "triage")
    graph.add_edge("triage", "fix")
    graph.add_edge("fix", END)
    PLANS.clear()
    server.requests.clear()
    PLANS["triage"] = [ToolCall("ask_auditor", {"question": "is app-v2 healthy?"})]
    PLANS["fixer"] = [ToolCall("run_shell", {"command": "systemctl restart app-v2"})]
    return App(graph.compile(name="ops"), executed)


# -- instrumenting ------------------------------------------------------------------------------


provider = provider_fixture("langgraph-app")
instrument = instrument_fixture(LangGraphInstrumentor)


def start(text: str = INTENT) -> dict[str, Any]:
    return {"messages": [HumanMessage(text)]}


def run(app: App, how: str = "invoke", text: str = INTENT, **config: Any) -> Any:
    """Run the app's graph to its end: ``invoke``, ``stream`` (the last values) or
    ``ainvoke`` (on a new event loop)."""
    if how == "invoke":
        return app.graph.invoke(start(text), config or None)
    if how == "stream":
        chunks = list(app.graph.stream(start(text), config or None, stream_mode="values"))
        return chunks[-1]
    assert how == "ainvoke"
    return asyncio.run(app.graph.ainvoke(start(text), config or None))


def last_text(result: Any) -> str:
    return str(result["messages"][-1].content)


# == (a) the graph is the run's real delegations ===============================================


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "stream"])
def test_the_graph_is_the_runs_real_delegations(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI, how: str
) -> None:
    governor.set_policy()
    g = instrument()
    app = build(model, loop_bound=how == "ainvoke")
    result = run(app, how)
    assert last_text(result).startswith("planner done")
    assert app.executed == [
        ("list_deployments", "/opt/app/releases"),
        ("run_shell", "rm -rf /opt/app/releases/app-v1"),
    ]
    # each agent's model was asked by LangGraph in turn: the run really went this way
    order = [agent for agent in map(agent_of, model.requests) if agent != "?"]
    assert order == [
        "planner",
        "coordinator",
        "coordinator",
        "cleanup_data",
        "cleanup_data",
        "coordinator",
        "planner",
        "reporter",
        "planner",
    ]

    sid = session_of(g)
    assert governor.tree(sid, agents=4) == {
        ("planner", "", 0),
        ("coordinator", "planner", 1),
        ("cleanup_data", "coordinator", 2),
        ("reporter", "planner", 1),
    }
    assert set(links(governor.graph(sid, agents=4))) == {
        ("planner", "coordinator", INTENT),
        ("coordinator", "cleanup_data", "remove app-v1's data"),
        ("planner", "reporter", INTENT),
    }
    # each tool on the agent that called it, commands and resources from the arguments
    assert governor.audited(sid, 2) == {
        ("coordinator", "list_deployments", "/opt/app/releases", ("/opt/app/releases",)),
        ("cleanup_data", "run_shell", "rm -rf /opt/app/releases/app-v1", ()),
    }

    spans = g.spans()
    assert g.names() == [
        "execute_tool list_deployments",
        "execute_tool run_shell",
        "invoke_agent cleanup_data",
        "invoke_agent coordinator",
        "invoke_agent planner",
        "invoke_agent reporter",
        "invoke_workflow planner",
    ]
    by_name = {s.name: s for s in spans}
    workflow = by_name["invoke_workflow planner"].attributes
    assert workflow is not None
    assert workflow["gen_ai.operation.name"] == "invoke_workflow"
    assert workflow["agentgov.intent"] == INTENT
    assert workflow["agentgov.framework"] == "langgraph"
    for s in spans:
        assert s.attributes is not None and s.attributes["gen_ai.conversation.id"] == sid
        assert s.attributes["agentgov.intent"] == INTENT
    # the span tree follows the delegations: each agent under its delegating agent
    ids = {s.context.span_id: s.name for s in spans if s.context is not None}
    parents = {s.name: ids.get(s.parent.span_id) if s.parent else None for s in spans}
    assert parents == {
        "invoke_workflow planner": None,
        "invoke_agent planner": "invoke_workflow planner",
        "invoke_agent coordinator": "invoke_agent planner",
        "execute_tool list_deployments": "invoke_agent coordinator",
        "invoke_agent cleanup_data": "invoke_agent coordinator",
        "execute_tool run_shell": "invoke_agent cleanup_data",
        "invoke_agent reporter": "invoke_agent planner",
    }
    # token usage of each agent's own model calls (50 in, 10 out per call)
    assert usage(spans) == {
        "invoke_agent planner": (150, 30),
        "invoke_agent coordinator": (150, 30),
        "invoke_agent cleanup_data": (100, 20),
        "invoke_agent reporter": (50, 10),
    }
    # the delegations' tasks went as messages: a digest and a score, never the text
    sent = [
        (s.name, e.attributes)
        for s in spans
        for e in s.events
        if e.name == "agentgov.message" and e.attributes is not None
    ]
    assert sorted(n for n, _ in sent) == [
        "invoke_agent coordinator",
        "invoke_agent planner",
        "invoke_agent planner",
    ]
    for _, attrs in sent:
        assert str(attrs["agentgov.message.digest"]).startswith("sha256:")
        assert isinstance(attrs["agentgov.message.injection"], int)
        assert "app-v1" not in json.dumps({k: str(v) for k, v in attrs.items()})
    # the governor saw every step first
    got = governor.decisions(sid)
    assert got[:2] == [("pre_handoff", "allow", ""), ("pre_handoff", "allow", "")]
    assert got.count(("pre_handoff", "allow", "")) == 4
    assert got.count(("tool", "allow", "")) == 2
    assert g.stops == []


def test_subgraphs_nested_agents_and_agents_in_tools_are_delegations(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy()
    g = instrument()
    app = build_ops(model)
    result = run(app, text="check app-v2")
    assert last_text(result).startswith("fixer done")
    assert app.executed == [
        ("ask_auditor", "is app-v2 healthy?"),
        ("run_shell", "systemctl restart app-v2"),
    ]
    sid = session_of(g)
    assert governor.tree(sid, agents=4) == {
        ("ops", "", 0),
        ("triage", "ops", 1),  # a subgraph as a node
        ("auditor", "triage", 2),  # an agent called inside triage's tool
        ("fixer", "ops", 1),  # an agent a node function invoked
    }
    assert set(links(governor.graph(sid, agents=4))) == {
        ("ops", "triage", "check app-v2"),
        ("triage", "auditor", "is app-v2 healthy?"),
        ("ops", "fixer", "restart app-v2"),
    }
    assert governor.audited(sid, 2) == {
        ("triage", "ask_auditor", "is app-v2 healthy?", ()),
        ("fixer", "run_shell", "systemctl restart app-v2", ()),
    }
    # the auditor's run happened inside triage's tool call, and its span says so
    spans = {s.name: s for s in g.spans()}
    auditor, call = spans["invoke_agent auditor"], spans["execute_tool ask_auditor"]
    assert auditor.parent is not None and call.context is not None
    assert auditor.parent.span_id == call.context.span_id


def test_a_handoff_back_to_the_supervisor_is_no_delegation(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    # one handoff allowed: planner->reporter; the reporter's way back must not count
    governor.set_policy(max_handoffs=1)
    g = instrument()
    chat = chat_model(model)
    back = create_handoff_tool(agent_name="planner", name="back_to_planner")
    rep = create_react_agent(chat, [back], prompt="You are reporter.", name="reporter")
    app = App(
        create_supervisor(
            [rep], model=chat, prompt="You are planner.", supervisor_name="planner"
        ).compile(name="planner"),
        [],
    )
    PLANS.clear()
    model.requests.clear()
    PLANS["planner"] = [ToolCall("transfer_to_reporter")]
    PLANS["reporter"] = [ToolCall("back_to_planner")]
    result = run(app)
    assert last_text(result).startswith("planner done")
    assert len(asked(model, "planner")) == 2 and len(asked(model, "reporter")) == 1
    sid = session_of(g)
    assert governor.tree(sid, agents=2) == {("planner", "", 0), ("reporter", "planner", 1)}
    assert governor.decisions(sid).count(("pre_handoff", "allow", "")) == 2
    assert g.stops == []


# == (b) policy stops inside LangGraph =========================================================


def test_a_handoff_over_budget_is_refused_to_the_model(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(max_handoffs=2)  # planner->coordinator, coordinator->cleanup_data
    g = instrument()
    app = build(model)
    result = run(app)
    # the run ended through LangGraph's normal path: the planner's model was told why
    assert last_text(result).startswith("planner done")
    refusal = told(model, "planner")[-1]
    assert refusal.startswith(
        "[agentgov] delegation stopped by the governor: handoff_budget_exceeded"
    )
    assert asked(model, "reporter") == []  # the target never ran
    assert [(a.name, s.reason) for a, s in g.stops] == [("planner", "handoff_budget_exceeded")]
    assert isinstance(g.stops[0][0], Pregel)
    sid = session_of(g)
    assert ("pre_handoff", "stop", "handoff_budget_exceeded") in governor.decisions(sid)
    assert "invoke_agent reporter" not in g.names()
    assert governor.tree(sid, agents=3) == {
        ("planner", "", 0),
        ("coordinator", "planner", 1),
        ("cleanup_data", "coordinator", 2),
    }


def test_the_fallback_hook_switches_to_a_constrained_agent(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(max_handoffs=2)
    calls: list[tuple[str, str]] = []

    def constrained(agent: Any, stop: Stopped) -> Any:
        calls.append((agent.name, stop.reason))
        # no more delegation: the planner's workflow goes on with its single-agent node
        return Command(goto="planner_alone", graph=Command.PARENT)

    g = instrument(on_stop=constrained)
    app = build(model, alone=True)
    result = run(app)
    assert calls == [("planner", "handoff_budget_exceeded")]
    assert last_text(result).startswith("planner_alone done")  # LangGraph's normal path
    assert asked(model, "reporter") == []
    sid = session_of(g)
    assert ("pre_handoff", "stop", "handoff_budget_exceeded") in governor.decisions(sid)
    # the constrained agent is the planner going on alone: no new agent in the graph, and
    # its model calls count as the planner's
    assert governor.tree(sid, agents=3) == {
        ("planner", "", 0),
        ("coordinator", "planner", 1),
        ("cleanup_data", "coordinator", 2),
    }
    planner = next(s for s in g.spans() if s.name == "invoke_agent planner")
    assert planner.attributes is not None
    assert planner.attributes["gen_ai.usage.input_tokens"] == 150  # 2 planner + 1 alone


def test_a_delegation_too_deep_is_refused_to_the_model(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(max_delegation_depth=1)
    g = instrument()
    app = build(model)
    result = run(app)
    assert last_text(result).startswith("planner done")
    assert app.executed == [("list_deployments", "/opt/app/releases")]
    refusal = told(model, "coordinator")[-1]
    assert refusal.startswith(
        "[agentgov] delegation stopped by the governor: delegation_depth_exceeded"
    )
    assert asked(model, "cleanup_data") == []
    assert asked(model, "reporter") != []  # the run went on past the refusal
    assert [(a.name, s.reason) for a, s in g.stops] == [
        ("coordinator", "delegation_depth_exceeded")
    ]
    sid = session_of(g)
    assert ("pre_handoff", "stop", "delegation_depth_exceeded") in governor.decisions(sid)
    assert "invoke_agent cleanup_data" not in g.names()


def test_a_tool_off_the_allowlist_is_refused_to_the_model(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(tool_allowlist=["list_deployments"])
    g = instrument()
    app = build(model, reporter=False)
    result = run(app)
    assert last_text(result).startswith("planner done")
    assert app.executed == [("list_deployments", "/opt/app/releases")]  # run_shell never ran
    refusal = told(model, "cleanup_data")
    assert "removed" not in refusal
    assert refusal[-1].startswith("[agentgov] tool call stopped by the governor: tool_not_allowed")
    assert "run_shell" in refusal[-1]
    assert [(a.name, s.reason) for a, s in g.stops] == [("cleanup_data", "tool_not_allowed")]
    sid = session_of(g)
    assert ("tool", "stop", "tool_not_allowed") in governor.decisions(sid)
    assert "execute_tool run_shell" not in g.names()
    g.instrumentor.uninstrument()

    # the hook's text is what the model is told instead
    g = instrument(on_stop=lambda agent, stop: f"{agent.name} works read-only: {stop.reason}")
    app = build(model, reporter=False)
    run(app)
    assert app.executed == [("list_deployments", "/opt/app/releases")]
    assert told(model, "cleanup_data")[-1] == "cleanup_data works read-only: tool_not_allowed"


def test_a_nested_run_too_deep_is_refused_in_its_tool(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(max_delegation_depth=1)
    g = instrument()
    app = build_ops(model)
    result = run(app, text="check app-v2")
    assert last_text(result).startswith("fixer done")
    assert asked(model, "auditor") == []
    refusal = told(model, "triage")[-1]
    assert refusal.startswith(
        "[agentgov] delegation stopped by the governor: delegation_depth_exceeded"
    )
    assert [(a.name, s.reason) for a, s in g.stops] == [("triage", "delegation_depth_exceeded")]
    assert ("pre_handoff", "stop", "delegation_depth_exceeded") in governor.decisions(session_of(g))


def test_a_nested_run_stopped_raises_out_of_invoke_or_is_replaced(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(max_handoffs=2)  # ops->triage, triage->auditor; not ops->fixer
    g = instrument()
    app = build_ops(model)
    with pytest.raises(Stopped) as stopped:
        run(app, text="check app-v2")
    assert (stopped.value.reason, stopped.value.phase) == ("handoff_budget_exceeded", "delegation")
    assert not isinstance(stopped.value, GraphBubbleUp)  # a node's failure, as LangGraph has it
    assert asked(model, "fixer") == []
    assert [(a.name, s.reason) for a, s in g.stops] == [("ops", "handoff_budget_exceeded")]
    spans = {s.name: s for s in g.spans()}
    assert "invoke_agent fixer" not in spans
    assert spans["invoke_workflow ops"].status.status_code.name == "ERROR"
    g.instrumentor.uninstrument()

    # the hook's graph runs in place of the stopped one, as the delegating agent
    def alone(agent: Any, stop: Stopped) -> Any:
        return create_agent(
            chat_model(model), [], system_prompt="You are ops_alone.", name="ops_alone"
        )

    g = instrument(on_stop=alone)
    app = build_ops(model)
    result = run(app, text="check app-v2")
    assert last_text(result).startswith("ops_alone done")
    assert asked(model, "fixer") == []
    sid = session_of(g)
    assert {n for n, _, _ in governor.tree(sid, agents=3)} == {"ops", "triage", "auditor"}
    ops = next(s for s in g.spans() if s.name == "invoke_agent ops")
    assert ops.attributes is not None and ops.attributes["gen_ai.usage.input_tokens"] == 50


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
def test_approvals_wait_for_a_reviewer_or_raise(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI, how: str
) -> None:
    governor.set_policy(require_approval_for=["run_shell"])
    reviewer = Reviewer(governor, hold=1.0)  # the run waits meanwhile
    g = instrument(approvals="wait")
    reviewer.start()
    app = build(model, reporter=False, loop_bound=how == "ainvoke")
    if how == "invoke":
        result = run(app)
    else:
        # the wait holds no event loop: a task of the same loop keeps ticking through it
        result, ticks = with_heartbeat(lambda: app.graph.ainvoke(start()))
    reviewed = reviewer.join(30)
    if how == "ainvoke":
        window = reviewer.window  # while the approval was pending
        during = [t for t in ticks if window[0] < t < window[1]]
        assert len(during) >= 10, (len(during), len(ticks))
    assert reviewed == [200]
    assert last_text(result).startswith("planner done")
    assert [e[0] for e in app.executed] == ["list_deployments", "run_shell"]  # once approved
    assert told(model, "cleanup_data")[-1] == "removed"
    g.instrumentor.uninstrument()

    g = instrument(approvals="raise")
    app = build(model, reporter=False, loop_bound=how == "ainvoke")
    run(app, how)
    assert [e[0] for e in app.executed] == ["list_deployments"]
    assert told(model, "cleanup_data")[-1].startswith(
        "[agentgov] approval stopped by the governor: awaiting_approval"
    )
    assert ("approval", "requested", "") in governor.decisions(session_of(g))


# == (c) a kill from another process ===========================================================


@pytest.mark.parametrize("where", ["run", "nested run", "async run"])
def test_a_kill_from_the_cli_stops_a_running_run(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI, where: str
) -> None:
    governor.set_policy()
    instrument()
    # the tool runs in a worker thread, in its agent's context
    killed = Kill(governor.url, lambda: len(model.requests))
    # killed while the coordinator lists (a subgraph of the run), or while cleanup_data
    # runs its command (two subgraphs down)
    if where == "nested run":
        app = build(model, on_shell=killed.now)
    else:
        app = build(model, on_list=killed.now, loop_bound=where == "async run")
    with pytest.raises(SessionKilled) as stopped:
        run(app, "ainvoke" if where == "async run" else "invoke")
    assert isinstance(stopped.value, GraphBubbleUp)  # no tool error handler keeps it
    assert stopped.value.reason == "session_killed"
    assert "wrong environment" in str(stopped.value)
    assert killed.acknowledged()  # by every agent running then
    # the run took no step after the kill: no model call, no tool, no delegation
    assert len(model.requests) == killed.asked_before
    if where == "nested run":
        assert [e[0] for e in app.executed] == ["list_deployments", "run_shell"]
    else:
        assert [e[0] for e in app.executed] == ["list_deployments"]
        assert asked(model, "cleanup_data") == []
    assert asked(model, "reporter") == []
    assert any(p[0] == "kill" for p in governor.decisions(killed.sid))


# == (d) opentelemetry-instrument runs an unmodified app =======================================

UNMODIFIED = '''
import sys
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.prebuilt import create_react_agent
from langgraph_supervisor import create_handoff_tool, create_supervisor


@tool
def run_shell(command: str) -> str:
    """Run a shell command."""
    return "removed"


model = ChatOpenAI(model="m")
cleanup = create_react_agent(model, [run_shell], prompt="You are cleanup_data.", name="cleanup_data")
app = create_supervisor(
    [cleanup], model=model, prompt="You are planner.", supervisor_name="planner"
).compile(name="planner")
print(app.invoke({"messages": [("user", sys.argv[1])]})["messages"][-1].content)
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
        "langgraph",
        UNMODIFIED,
        tmp_path,
        OPENAI_BASE_URL=model.base_url,
        OPENAI_API_KEY="dummy",
    )
    assert stdout.startswith("planner done:"), stdout

    sid = governor.session_with(intent)
    assert governor.tree(sid, agents=2) == {("planner", "", 0), ("cleanup_data", "planner", 1)}
    assert governor.audited(sid, 1) == {
        ("cleanup_data", "run_shell", "rm -rf /opt/app/releases/app-v0", ())
    }
    got = governor.decisions(sid)
    assert got[:2] == [("pre_handoff", "allow", ""), ("pre_handoff", "allow", "")]
    assert ("tool", "allow", "") in got


# == (e) uninstrument leaves no trace ==========================================================


def patched() -> dict[str, Any]:
    return {
        "stream": Pregel.__dict__["stream"],
        "astream": Pregel.__dict__["astream"],
        "run": BaseTool.__dict__["run"],
        "arun": BaseTool.__dict__["arun"],
    }


def test_uninstrument_puts_back_every_patched_attribute(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy()
    before = patched()
    hooks = list(lc_context._configure_hooks)
    app = build(model, reporter=False)

    g = instrument()
    during = patched()
    assert all(during[k] is not before[k] for k in before), during
    assert len(lc_context._configure_hooks) == len(hooks) + 1
    run(app)
    assert len(g.spans()) == 6
    g.instrumentor.uninstrument()
    sid = session_of(g)

    def listed() -> Any:
        rows = governor.get("/api/v1/sessions")["sessions"]
        return any(r["session_id"] == sid for r in rows) and rows

    sessions = {r["session_id"] for r in wait_for(listed, timeout=30)}

    after = patched()
    assert all(after[k] is before[k] for k in before), after
    assert lc_context._configure_hooks == hooks
    assert all(a is b for a, b in zip(lc_context._configure_hooks, hooks, strict=True))
    # and nothing more is traced or governed, not even by the graph compiled meanwhile
    g.exporter.clear()
    result = run(app, text="after uninstrument")
    assert last_text(result).startswith("planner done")
    assert g.spans() == []
    time.sleep(0.3)
    now = {r["session_id"]: r for r in governor.get("/api/v1/sessions")["sessions"]}
    assert now.keys() == sessions, [now[k] for k in now.keys() - sessions]
    # instrumenting again works as the first time
    again = instrument()
    run(build(model, reporter=False))
    assert len(again.spans()) == 6


def test_importing_the_instrumentor_loads_no_framework() -> None:
    assert loaded_by_importing("langgraph", "langgraph", "langchain_core", "langchain") == []


# == (f) with OpenInference's instrumentor too =================================================


@pytest.mark.parametrize("first", ["openinference", "agentgov"])
def test_with_openinference_too_the_app_works_and_every_span_is_there(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI, first: str
) -> None:
    from openinference.instrumentation.langchain import LangChainInstrumentor

    governor.set_policy()
    with alongside(LangChainInstrumentor(), first, instrument, collector=governor) as (
        g,
        oi_exporter,
    ):
        app = build(model)
        result = run(app)
        assert last_text(result).startswith("planner done")
        assert [e[0] for e in app.executed] == ["list_deployments", "run_shell"]
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
        assert lengths["execute_tool run_shell"] == 3 and lengths["invoke_agent reporter"] == 2
        theirs = oi_exporter.get_finished_spans()
        assert {"AGENT", "TOOL", "LLM"} <= span_kinds(theirs)  # OpenInference traced the run
        sid = session_of(g)
        assert len(governor.tree(sid, agents=4)) == 4
    each_agent_once(governor, ours)


# == sessions from LangGraph's threads =========================================================


def test_the_thread_id_names_the_agentgov_session(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy()
    g = instrument()
    thread = f"thread-{secrets.token_hex(4)}"
    run(build(model, reporter=False), configurable={"thread_id": thread})
    assert session_of(g) == thread
    g.exporter.clear()
    # a session has one root: the thread's next run gets a session named after it
    run(build(model, reporter=False), configurable={"thread_id": thread})
    again = session_of(g)
    assert again.startswith(f"{thread}-") and again != thread
    assert governor.decisions(again)[0] == ("pre_handoff", "allow", "")
