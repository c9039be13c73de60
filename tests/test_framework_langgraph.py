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
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
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
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import SecretStr

from agentgov.instrumentation import AsyncGovernorClient, SessionKilled, Stopped, current_lineage
from agentgov.instrumentation.frameworks.langgraph import LangGraphInstrumentor

from .conftest import CollectorProcess, free_port, make_provider, wait_for
from .scripted_openai import Reply, ScriptedOpenAI, ToolCall, system_text

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

AGENT_KEY = "agent-" + secrets.token_hex(12)
REVIEWER_KEY = "review-" + secrets.token_hex(12)
ADMIN_KEY = "admin-" + secrets.token_hex(12)
KEYS = {
    "AGENTGOV_API_KEYS": f"bot:agent:{AGENT_KEY},rev:reviewer:{REVIEWER_KEY},ops:admin:{ADMIN_KEY}"
}
INTENT = "clean up old deployments"


# -- the collector, its policy, the model ---------------------------------------------------


@dataclass
class Governor:
    collector: CollectorProcess
    policy: Path
    stamp: int = field(default_factory=time.time_ns)

    @property
    def url(self) -> str:
        return self.collector.url

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(
            f"{self.url}{path}",
            params=params,
            headers={"Authorization": f"Bearer {REVIEWER_KEY}"},
            timeout=30,
        )
        assert r.status_code == 200, (path, r.status_code, r.text)
        return r.json()

    def set_policy(self, **multi_agent: Any) -> None:
        """Write the policy and have the collector re-read it now."""
        staged = self.policy.with_suffix(".staged")
        staged.write_text(json.dumps({"multi_agent": multi_agent}))
        self.stamp += 1_000_000_000  # a strictly later mtime, whatever the file size
        os.utime(staged, ns=(self.stamp, self.stamp))
        os.replace(staged, self.policy)
        r = httpx.post(
            f"{self.url}/api/v1/policy/reload",
            json={},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        applied = r.json()["policy"]["multi_agent"]
        assert {k: applied[k] for k in multi_agent} == multi_agent

    def decisions(self, sid: str) -> list[tuple[str, str, str]]:
        rows = self.get(f"/api/v1/sessions/{sid}/decisions")["decisions"]
        return [(d["phase"], d["outcome"], d["reason"]) for d in rows]

    def graph(self, sid: str, agents: int) -> dict[str, Any]:
        """The session's graph once all ``agents`` are in it with their spans."""

        def ready() -> Any:
            r = httpx.get(
                f"{self.url}/api/v1/sessions/{sid}/graph",
                headers={"Authorization": f"Bearer {REVIEWER_KEY}"},
                timeout=30,
            )
            nodes = r.json()["nodes"] if r.status_code == 200 else []
            return len(nodes) == agents and all(n["name"] for n in nodes) and r.json()

        return dict(wait_for(ready, timeout=30))

    def tree(self, sid: str, agents: int) -> set[tuple[str, str, int]]:
        """(agent, parent agent, depth) of every agent of the session's graph."""
        nodes = self.graph(sid, agents)["nodes"]
        names = {n["id"]: n["name"] for n in nodes}
        assert all(n["lineage"] == "governor" and n["verified"] for n in nodes), nodes
        return {(n["name"], names.get(n["parent_id"], ""), n["depth"]) for n in nodes}

    def commands(self, sid: str, count: int) -> set[tuple[str, str, str, tuple[str, ...]]]:
        def ready() -> Any:
            rows = self.get(f"/api/v1/sessions/{sid}/audit")["commands"]
            return len(rows) == count and rows

        rows = wait_for(ready, timeout=30)
        assert all(c["verified"] for c in rows), rows
        return {(c["agent_name"], c["tool"], c["command"], tuple(c["resources"])) for c in rows}


@pytest.fixture(scope="module")
def governor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Governor]:
    base = tmp_path_factory.mktemp("langgraph")
    policy = base / "policy.yaml"
    policy.write_text("multi_agent: {}\n")
    c = CollectorProcess(base / "data", free_port(), free_port()).start(
        ("--policy", str(policy)), env=KEYS
    )
    yield Governor(c, policy)
    c.stop()


#: what each agent's model does, in order; after its plan, it answers with what it saw
PLANS: dict[str, list[ToolCall]] = {}


def script(request: dict[str, Any]) -> Reply:
    match = re.search(r"You are (\w+)\.", system_text(request))
    agent = match.group(1) if match else "?"
    called = {
        (c.get("function") or c).get("name")
        for m in request.get("messages", [])
        for c in m.get("tool_calls") or []
    }
    for step in PLANS.get(agent, []):
        if step.name not in called:
            return Reply(tool_calls=[step])
    seen = [str(m.get("content")) for m in request["messages"] if m.get("role") == "tool"]
    return Reply(f"{agent} done: " + " | ".join(seen))


@pytest.fixture(scope="module")
def model() -> Iterator[ScriptedOpenAI]:
    with ScriptedOpenAI(script) as server:
        yield server


def chat_model(server: ScriptedOpenAI, loop_bound: bool = False) -> ChatOpenAI:
    """A chat model on the scripted server; ``loop_bound``: with an HTTP client of its own
    for the running event loop (an async client's connections belong to one loop)."""
    extra: dict[str, Any] = {"http_async_client": httpx.AsyncClient()} if loop_bound else {}
    return ChatOpenAI(model="m", base_url=server.base_url, api_key=SecretStr("dummy"), **extra)


def asked(server: ScriptedOpenAI, agent: str) -> list[dict[str, Any]]:
    """The model requests made for ``agent``."""
    return [r for r in server.requests if f"You are {agent}." in system_text(r)]


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


@dataclass
class Governed:
    instrumentor: LangGraphInstrumentor
    exporter: InMemorySpanExporter
    client: AsyncGovernorClient
    stops: list[tuple[Any, Stopped]]

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def names(self) -> list[str]:
        return sorted(s.name for s in self.spans())


@pytest.fixture(scope="module")
def provider(governor: Governor) -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """One tracer provider for the module (exporting to the collector, and kept in memory
    for each test to read what was exported)."""
    provider = make_provider(
        governor.url, service="langgraph-app", api_key=AGENT_KEY, schedule_delay_millis=50
    )
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def instrument(
    governor: Governor,
    model: ScriptedOpenAI,
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> Iterator[Callable[..., Governed]]:
    made: list[Governed] = []
    tracer_provider, exporter = provider

    def make(**options: Any) -> Governed:
        exporter.clear()
        client = AsyncGovernorClient(governor.url, api_key=AGENT_KEY, approval_timeout=20)
        stops: list[tuple[Any, Stopped]] = []
        options.setdefault("on_stop", lambda agent, stop: stops.append((agent, stop)))
        inst = LangGraphInstrumentor()
        inst.instrument(tracer_provider=tracer_provider, governor=client, **options)
        made.append(Governed(inst, exporter, client, stops))
        return made[-1]

    yield make
    for g in made:
        if g.instrumentor.is_instrumented_by_opentelemetry:
            g.instrumentor.uninstrument()
        g.client.close()


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


def session_of(g: Governed) -> str:
    sids = {s.attributes.get("agentgov.session.id") for s in g.spans() if s.attributes is not None}
    assert len(sids) == 1, sids
    return str(next(iter(sids)))


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
    order = [
        m.group(1)
        for r in model.requests
        if (m := re.search(r"You are (\w+)\.", system_text(r))) is not None
    ]
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
    graph = governor.graph(sid, agents=4)
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    edges = {(names[e["source"]], names[e["target"]], e["task"]) for e in graph["edges"]}
    assert edges == {
        ("planner", "coordinator", INTENT),
        ("coordinator", "cleanup_data", "remove app-v1's data"),
        ("planner", "reporter", INTENT),
    }
    # each tool on the agent that called it, commands and resources from the arguments
    assert governor.commands(sid, 2) == {
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
    usage = {
        n: (a.get("gen_ai.usage.input_tokens"), a.get("gen_ai.usage.output_tokens"))
        for n, s in by_name.items()
        if (a := s.attributes) is not None and n.startswith("invoke_agent")
    }
    assert usage == {
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
    graph = governor.graph(sid, agents=4)
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    assert {(names[e["source"]], names[e["target"]], e["task"]) for e in graph["edges"]} == {
        ("ops", "triage", "check app-v2"),
        ("triage", "auditor", "is app-v2 healthy?"),
        ("ops", "fixer", "restart app-v2"),
    }
    assert governor.commands(sid, 2) == {
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
    reviewed: list[int] = []
    window: list[float] = []  # while the approval was pending

    headers = {"Authorization": f"Bearer {REVIEWER_KEY}"}

    def pending() -> list[dict[str, Any]]:
        rows = httpx.get(
            f"{governor.url}/api/v1/approvals", params={"status": "pending"}, headers=headers
        ).json()["approvals"]
        return [a for a in rows if a["request"].get("tool") == "run_shell"]

    earlier = {a["approval_id"] for a in pending()}  # other runs' requests, left pending

    def review() -> None:
        (approval,) = wait_for(
            lambda: [a for a in pending() if a["approval_id"] not in earlier], timeout=20
        )
        window.append(time.monotonic())
        time.sleep(1.0)  # the run waits meanwhile
        window.append(time.monotonic())
        r = httpx.post(
            f"{governor.url}/api/v1/approvals/{approval['approval_id']}/approve",
            json={"comment": "old release, fine"},
            headers=headers,
        )
        reviewed.append(r.status_code)

    g = instrument(approvals="wait")
    reviewer = threading.Thread(target=review)
    reviewer.start()
    app = build(model, reporter=False, loop_bound=how == "ainvoke")
    if how == "invoke":
        result = run(app)
    else:
        # the wait holds no event loop: a task of the same loop keeps ticking through it
        ticks: list[float] = []

        async def main() -> Any:
            async def heartbeat() -> None:
                while True:
                    ticks.append(time.monotonic())
                    await asyncio.sleep(0.02)

            beat = asyncio.create_task(heartbeat())
            try:
                return await app.graph.ainvoke(start())
            finally:
                beat.cancel()

        result = asyncio.run(main())
    reviewer.join(30)
    if how == "ainvoke":
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
    killed: dict[str, Any] = {}

    def kill_now() -> None:
        # the tool runs in a worker thread, in its agent's context
        lineage = current_lineage()
        assert lineage is not None
        killed["sid"] = sid = lineage.session_id
        killed["asked_before"] = len(model.requests)
        killed["cli"] = subprocess.run(
            [
                sys.executable,
                "-m",
                "agentgov.collector.cli",
                "kill",
                sid,
                "--reason",
                "wrong environment",
                "--wait",
                "10",
                "--json",
                "--url",
                governor.url,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "AGENTGOV_API_KEY": ADMIN_KEY},
        )

    # killed while the coordinator lists (a subgraph of the run), or while cleanup_data
    # runs its command (two subgraphs down)
    if where == "nested run":
        app = build(model, on_shell=kill_now)
    else:
        app = build(model, on_list=kill_now, loop_bound=where == "async run")
    with pytest.raises(SessionKilled) as stopped:
        run(app, "ainvoke" if where == "async run" else "invoke")
    assert isinstance(stopped.value, GraphBubbleUp)  # no tool error handler keeps it
    assert stopped.value.reason == "session_killed"
    assert "wrong environment" in str(stopped.value)
    cli = killed["cli"]
    assert cli.returncode == 0, (cli.stdout, cli.stderr)
    answer = json.loads(cli.stdout)
    running = {a["agent_id"]: a for a in answer["agents"] if a["running_at_kill"]}
    assert running and all(a["acknowledged"] for a in running.values())
    # the run took no step after the kill: no model call, no tool, no delegation
    assert len(model.requests) == killed["asked_before"]
    if where == "nested run":
        assert [e[0] for e in app.executed] == ["list_deployments", "run_shell"]
    else:
        assert [e[0] for e in app.executed] == ["list_deployments"]
        assert asked(model, "cleanup_data") == []
    assert asked(model, "reporter") == []
    assert any(p[0] == "kill" for p in governor.decisions(killed["sid"]))


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

ENTRY_POINT = "agentgov_langgraph"


def entry_point_path(base: Path) -> str:
    """Where the instrumentor's entry point is found: the installed distribution's, or
    (in a checkout installed before it was declared) the same declaration on the path."""
    if any(ep.name == ENTRY_POINT for ep in entry_points(group="opentelemetry_instrumentor")):
        return ""
    dist = base / "agentgov_langgraph_entry_point-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: agentgov-langgraph-entry-point\nVersion: 0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[opentelemetry_instrumentor]\n"
        f"{ENTRY_POINT} = agentgov.instrumentation.frameworks.langgraph:LangGraphInstrumentor\n"
    )
    return str(base)


def test_opentelemetry_instrument_governs_an_unmodified_app(
    governor: Governor, model: ScriptedOpenAI, tmp_path: Path
) -> None:
    governor.set_policy()
    PLANS.clear()
    PLANS["planner"] = [ToolCall("transfer_to_cleanup_data")]
    PLANS["cleanup_data"] = [ToolCall("run_shell", {"command": "rm -rf /opt/app/releases/app-v0"})]
    app = tmp_path / "app.py"
    app.write_text(UNMODIFIED)
    intent = f"{INTENT} ({secrets.token_hex(4)})"
    extra_path = entry_point_path(tmp_path / "entry-point")
    python_path = os.pathsep.join(p for p in (extra_path, os.environ.get("PYTHONPATH", "")) if p)
    env = {
        **os.environ,
        "PYTHONPATH": python_path,
        "OTEL_SERVICE_NAME": "unmodified-app",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": governor.url,
        "OTEL_EXPORTER_OTLP_HEADERS": f"Authorization=Bearer%20{AGENT_KEY}",
        # this test is about agentgov's LangGraph entry point: the others stay out
        "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "openai_agents,langchain,crewai,smolagents,"
        "autogen_agentchat,pydantic_ai,agentgov_openai_agents,agentgov_crewai,"
        "agentgov_autogen,agentgov_pydantic_ai,agentgov_smolagents",
        "AGENTGOV_URL": governor.url,
        "AGENTGOV_API_KEY": AGENT_KEY,
        "OPENAI_BASE_URL": model.base_url,
        "OPENAI_API_KEY": "dummy",
    }
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(
        [str(bin_dir / "opentelemetry-instrument"), sys.executable, str(app), intent],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("planner done:"), done.stdout

    def session() -> Any:
        rows = governor.get("/api/v1/sessions")["sessions"]
        return next((r["session_id"] for r in rows if r["intent"] == intent), None)

    sid = wait_for(session, timeout=30)
    assert governor.tree(sid, agents=2) == {("planner", "", 0), ("cleanup_data", "planner", 1)}
    assert governor.commands(sid, 1) == {
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
    code = (
        "import sys\n"
        "import agentgov.instrumentation.frameworks.langgraph as m\n"
        "m.LangGraphInstrumentor()\n"
        "loaded = [n for n in ('langgraph', 'langchain_core', 'langchain') if n in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == ""


# == (f) with OpenInference's instrumentor too =================================================


@pytest.mark.parametrize("first", ["openinference", "agentgov"])
def test_with_openinference_too_the_app_works_and_every_span_is_there(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI, first: str
) -> None:
    from openinference.instrumentation.langchain import LangChainInstrumentor

    governor.set_policy()
    oi_exporter = InMemorySpanExporter()
    oi_provider = TracerProvider()
    oi_provider.add_span_processor(SimpleSpanProcessor(oi_exporter))
    oi = LangChainInstrumentor()
    try:
        if first == "openinference":
            oi.instrument(tracer_provider=oi_provider)
            g = instrument()
        else:
            g = instrument()
            oi.instrument(tracer_provider=oi_provider)
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
        chains = {
            s.name: len(s.attributes["agentgov.delegation.chain"])  # type: ignore[arg-type]
            for s in ours
            if s.attributes and "agentgov.delegation.chain" in s.attributes
        }
        assert chains["execute_tool run_shell"] == 3 and chains["invoke_agent reporter"] == 2
        theirs = oi_exporter.get_finished_spans()
        kinds = {(s.attributes or {}).get("openinference.span.kind") for s in theirs}
        assert {"AGENT", "TOOL", "LLM"} <= kinds  # OpenInference traced the same run
        sid = session_of(g)
        assert len(governor.tree(sid, agents=4)) == 4
    finally:
        oi.uninstrument()
        oi_provider.shutdown()


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
