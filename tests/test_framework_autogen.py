"""AutoGen AgentChat under agentgov's instrumentor: real teams and agents, offline, with a
scripted model (tests/scripted_openai.py behind AutoGen's own OpenAI client), against a
real collector process with API keys and a policy.

Two apps. A ``Swarm``: ``planner`` hands off to ``cleanup_data`` (which lists deployments
and runs a shell command), which hands off to ``cleanup_images`` (which prunes images),
which hands back to ``planner``. A team (``RoundRobinGroupChat`` or ``SelectorGroupChat``)
``cleanup_team``: ``coordinator`` lists deployments and asks ``cleanup_data`` (an
``AgentTool``), then ``reporter`` asks ``audit_team`` (a ``TeamTool``: a team whose
``auditor`` reads the logs). Covered:

- the graph read back from the API is the runs' real delegations (handoffs, the team's
  turns, agents and teams used as tools), with each tool on the agent that called it;
- policy stops inside AutoGen: a handoff over budget (the model is told, the agent keeps
  the floor), a team's turn over budget (the team ends through its own termination, or the
  ``on_stop`` hook's participant takes the turn), a tool off the allowlist and delegations
  too deep (the model is told); approvals wait or raise; the audit records each;
- a kill from another process (``agentgov kill``) stops a running team, and a running
  agent whose nested agent was killed, at the next step;
- ``opentelemetry-instrument`` runs an unmodified app whose governed spans reach the
  collector;
- ``uninstrument()`` puts back every patched attribute, the very objects;
- with OpenInference's instrumentor active too, the app works and agentgov's spans are all
  exported; importing the instrumentor loads no framework.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.base import TaskResult
from autogen_agentchat.conditions import MaxMessageTermination, TextMentionTermination
from autogen_agentchat.messages import BaseChatMessage, HandoffMessage, ToolCallExecutionEvent
from autogen_agentchat.teams import RoundRobinGroupChat, SelectorGroupChat, Swarm
from autogen_agentchat.teams._group_chat._base_group_chat_manager import BaseGroupChatManager
from autogen_agentchat.teams._group_chat._chat_agent_container import ChatAgentContainer
from autogen_agentchat.tools import AgentTool, TeamTool
from autogen_core import SingleThreadedAgentRuntime
from autogen_core.models import ModelFamily
from autogen_core.tools import FunctionTool
from autogen_ext.models.openai import OpenAIChatCompletionClient

from agentgov.instrumentation import SessionKilled, Stopped
from agentgov.instrumentation.frameworks.autogen import AutoGenInstrumentor
from tests.framework_harness import (
    INTENT,
    REVIEWER_KEY,
    Governed,
    Governor,
    Kill,
    Reviewer,
    agent_of,
    alongside,
    asked,
    chains,
    each_agent_once,
    governor_fixture,
    instrument_fixture,
    links,
    loaded_by_importing,
    provider_fixture,
    run_unmodified,
    span_kinds,
    tree,
)

from .conftest import wait_for
from .scripted_openai import Reply, ScriptedOpenAI, ToolCall, last_user_text

HANDED = "Transferred to {0}, adopting the role of {0} immediately."


# -- the collector, its policy, the model ---------------------------------------------------


governor = governor_fixture("autogen")


#: what each agent's model does, in order; after its plan, it answers with what it saw
PLANS: dict[str, list[ToolCall]] = {}
#: the agents whose answer ends the team (they say TERMINATE)
FINISHERS = {"planner", "reporter", "auditor"}
SWARM = {"planner", "cleanup_data", "cleanup_images"}
#: the scripted model server of this module
MODEL: list[ScriptedOpenAI] = []


def _executed(request: dict[str, Any]) -> list[str]:
    """Names of the tool calls of the request that already have a result."""
    names = {
        c["id"]: c["function"]["name"]
        for m in request.get("messages", [])
        for c in m.get("tool_calls") or []
    }
    return [
        names.get(m.get("tool_call_id"), "?") for m in request["messages"] if m["role"] == "tool"
    ]


def script(request: dict[str, Any]) -> Reply:
    asked = last_user_text(request)
    if "select the next role" in asked:  # SelectorGroupChat's speaker selection
        return Reply("reporter" if "coordinator done" in asked else "coordinator")
    agent = agent_of(request)
    done = _executed(request)
    for step in PLANS.get(agent, []):
        if step.name not in done:
            return Reply(tool_calls=[step])
    answered = [
        m
        for m in request["messages"]
        if m["role"] == "assistant" and str(m.get("content") or "").startswith(f"{agent} done")
    ]
    if answered:  # speaking again with nothing left to do: wrap up
        return Reply(f"{agent} alone: nothing left to do. TERMINATE")
    # what the tools said (a nested team's own TERMINATE is not this agent's)
    seen = [str(m.get("content")) for m in request["messages"] if m["role"] == "tool"]
    seen = [s.replace("TERMINATE", "(end)") for s in seen]
    # a Swarm agent whose handoff was stopped wraps up the work itself
    gave_up = agent in SWARM and any(s.startswith("[agentgov] delegation") for s in seen)
    end = " TERMINATE" if agent in FINISHERS or gave_up else ""
    return Reply(f"{agent} done: " + " | ".join(seen) + end)


@pytest.fixture(scope="module")
def model() -> Iterator[ScriptedOpenAI]:
    with ScriptedOpenAI(script) as server:
        MODEL[:] = [server]
        yield server


def told(server: ScriptedOpenAI, agent: str) -> list[str]:
    """The tool results ``agent``'s model saw last."""
    return [m["content"] for m in asked(server, agent)[-1]["messages"] if m["role"] == "tool"]


# -- the apps ------------------------------------------------------------------------------------


@dataclass
class App:
    """A team (or agent) to run, and what its tools really did."""

    runner: Any
    executed: list[tuple[str, str, str]]
    client: OpenAIChatCompletionClient


Hook = Callable[[str], Awaitable[None]]


def client() -> OpenAIChatCompletionClient:
    """A model client for the running event loop (its connections belong to one)."""
    return OpenAIChatCompletionClient(
        model="scripted",
        base_url=MODEL[0].base_url,
        api_key="dummy",
        parallel_tool_calls=False,
        model_info={
            "vision": False,
            "function_calling": True,
            "json_output": False,
            "family": ModelFamily.UNKNOWN,
            "structured_output": False,
        },
    )


def tools(agent: str, executed: list[tuple[str, str, str]], hook: Hook | None = None) -> Any:
    """The app's tools as ``agent`` owns them: each call logs (agent, tool, argument)."""

    async def list_deployments(path: str) -> str:
        executed.append((agent, "list_deployments", path))
        if hook is not None:
            await hook("list_deployments")
        return "app-v1 app-v2"

    async def run_shell(command: str) -> str:
        executed.append((agent, "run_shell", command))
        if hook is not None:
            await hook("run_shell")
        return "removed"

    async def prune_images(registry: str) -> str:
        executed.append((agent, "prune_images", registry))
        return "pruned 4 images"

    async def read_logs(path: str) -> str:
        executed.append((agent, "read_logs", path))
        return "no errors"

    return {
        "list_deployments": FunctionTool(list_deployments, "List deployments in a folder."),
        "run_shell": FunctionTool(run_shell, "Run a shell command (recorded, never run)."),
        "prune_images": FunctionTool(prune_images, "Prune old images of a registry."),
        "read_logs": FunctionTool(read_logs, "Read the logs in a folder."),
    }


def reset(**plans: list[ToolCall]) -> None:
    PLANS.clear()
    PLANS.update(plans)
    if MODEL:
        MODEL[0].requests.clear()


def swarm_app(hook: Hook | None = None, runtime: Any = None) -> App:
    executed: list[tuple[str, str, str]] = []
    model = client()
    data, images = tools("cleanup_data", executed, hook), tools("cleanup_images", executed)
    planner = AssistantAgent(
        "planner", model_client=model, handoffs=["cleanup_data"], system_message="You are planner."
    )
    cleanup_data = AssistantAgent(
        "cleanup_data",
        model_client=model,
        tools=[data["list_deployments"], data["run_shell"]],
        handoffs=["cleanup_images"],
        max_tool_iterations=5,
        system_message="You are cleanup_data.",
    )
    cleanup_images = AssistantAgent(
        "cleanup_images",
        model_client=model,
        tools=[images["prune_images"]],
        handoffs=["planner"],
        max_tool_iterations=5,
        system_message="You are cleanup_images.",
    )
    reset(
        planner=[ToolCall("transfer_to_cleanup_data")],
        cleanup_data=[
            ToolCall("list_deployments", {"path": "/opt/app/releases"}),
            ToolCall("run_shell", {"command": "rm -rf /opt/app/releases/app-v1"}),
            ToolCall("transfer_to_cleanup_images"),
        ],
        cleanup_images=[
            ToolCall("prune_images", {"registry": "registry.local/app"}),
            ToolCall("transfer_to_planner"),
        ],
    )
    team = Swarm(
        [planner, cleanup_data, cleanup_images],
        termination_condition=TextMentionTermination("TERMINATE") | MaxMessageTermination(30),
        runtime=runtime,
    )
    return App(team, executed, model)


def team_app(kind: str = "round_robin", delegate: bool = True, hook: Hook | None = None) -> App:
    executed: list[tuple[str, str, str]] = []
    model = client()
    coord, data = tools("coordinator", executed), tools("cleanup_data", executed, hook)
    cleanup_data = AssistantAgent(
        "cleanup_data",
        model_client=model,
        tools=[data["run_shell"]],
        max_tool_iterations=5,
        description="Removes old data.",
        system_message="You are cleanup_data.",
    )
    auditor = AssistantAgent(
        "auditor",
        model_client=model,
        tools=[tools("auditor", executed)["read_logs"]],
        max_tool_iterations=5,
        system_message="You are auditor.",
    )
    audit_team = RoundRobinGroupChat(
        [auditor], name="audit_team", termination_condition=TextMentionTermination("TERMINATE")
    )
    coordinator = AssistantAgent(
        "coordinator",
        model_client=model,
        tools=[coord["list_deployments"], AgentTool(cleanup_data)],
        max_tool_iterations=5,
        description="Coordinates the cleanup.",
        system_message="You are coordinator.",
    )
    reporter = AssistantAgent(
        "reporter",
        model_client=model,
        tools=[TeamTool(audit_team, name="audit_team", description="Audit the cleanup.")],
        max_tool_iterations=5,
        description="Reports on the cleanup.",
        system_message="You are reporter.",
    )
    plan = [ToolCall("list_deployments", {"path": "/opt/app/releases"})]
    if delegate:
        plan.append(ToolCall("cleanup_data", {"task": "remove app-v1's data"}))
    reset(
        coordinator=plan,
        cleanup_data=[ToolCall("run_shell", {"command": "rm -rf /opt/app/releases/app-v1"})],
        reporter=[ToolCall("audit_team", {"task": "check the logs"})] if delegate else [],
        auditor=[ToolCall("read_logs", {"path": "/var/log/app"})],
    )
    # the nested runs' messages stream through the team too: only its own agents end it
    done = TextMentionTermination("TERMINATE", sources=["coordinator", "reporter"]) | (
        MaxMessageTermination(30)
    )
    if kind == "selector":
        team: Any = SelectorGroupChat(
            [coordinator, reporter],
            model_client=model,
            name="cleanup_team",
            termination_condition=done,
        )
    else:
        team = RoundRobinGroupChat(
            [coordinator, reporter], name="cleanup_team", termination_condition=done
        )
    return App(team, executed, model)


def run(build: Callable[[], App], task: str = INTENT) -> tuple[Any, App]:
    """Build the app in a fresh event loop and run it; the result and the app."""
    holder: list[App] = []

    async def main() -> Any:
        app = build()
        holder.append(app)
        try:
            return await app.runner.run(task=task)
        finally:
            await app.client.close()

    return asyncio.run(main()), holder[0]


# -- instrumenting ------------------------------------------------------------------------------


provider = provider_fixture("autogen-app")
# AutoGen's own spans go to the same provider: agentgov's are those of its scope
instrument = instrument_fixture(AutoGenInstrumentor, only_ours=True)


def agent_tree(graph: dict[str, Any]) -> list[tuple[str, str, int]]:
    return sorted(tree(graph["nodes"]))


def edges(graph: dict[str, Any]) -> list[tuple[str, str, str]]:
    return sorted(links(graph))


def handoffs(result: TaskResult) -> list[tuple[str, str]]:
    return [(m.source, m.target) for m in result.messages if isinstance(m, HandoffMessage)]


def said(result: TaskResult) -> list[str]:
    """Who spoke in the team, in order (chat messages, not the events of their turns)."""
    return [m.source for m in result.messages if isinstance(m, BaseChatMessage)]


def tool_results(result: TaskResult, name: str) -> list[str]:
    return [
        r.content
        for m in result.messages
        if isinstance(m, ToolCallExecutionEvent)
        for r in m.content
        if r.name == name
    ]


# == (a) the graph is the runs' real delegations ===============================================


def in_app_runtime(build: Callable[[SingleThreadedAgentRuntime], App]) -> tuple[Any, App]:
    """Run a team on a runtime the app started itself, before the run (so the run's context
    does not reach the runtime's tasks)."""
    holder: list[App] = []

    async def main() -> Any:
        runtime = SingleThreadedAgentRuntime()
        runtime.start()
        app = build(runtime)
        holder.append(app)
        try:
            return await app.runner.run(task=INTENT)
        finally:
            await runtime.stop_when_idle()
            await app.client.close()

    return asyncio.run(main()), holder[0]


@pytest.mark.parametrize("runtime", ["embedded", "the app's"])
def test_a_swarms_graph_is_its_handoffs(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI, runtime: str
) -> None:
    governor.set_policy()
    g = instrument()
    if runtime == "embedded":
        result, app = run(swarm_app)
    else:
        result, app = in_app_runtime(lambda rt: swarm_app(runtime=rt))

    # what AutoGen did, by its own messages and the tools' own log
    assert handoffs(result) == [
        ("planner", "cleanup_data"),
        ("cleanup_data", "cleanup_images"),
        ("cleanup_images", "planner"),
    ]
    assert result.stop_reason == "Text 'TERMINATE' mentioned"
    assert app.executed == [
        ("cleanup_data", "list_deployments", "/opt/app/releases"),
        ("cleanup_data", "run_shell", "rm -rf /opt/app/releases/app-v1"),
        ("cleanup_images", "prune_images", "registry.local/app"),
    ]

    # the Swarm's first speaker is the root; each handoff a delegation by the handing-off
    # agent (the return to planner too: a new invocation of it, under cleanup_images)
    sid = g.session()
    assert sid == app.runner._team_id  # the team's id names the session
    graph = governor.graph(sid, agents=4)
    assert agent_tree(graph) == [
        ("cleanup_data", "planner", 1),
        ("cleanup_images", "cleanup_data", 2),
        ("planner", "", 0),
        ("planner", "cleanup_images", 3),
    ]
    assert all(n["lineage"] == "governor" and n["verified"] for n in graph["nodes"])
    assert edges(graph) == [
        ("cleanup_data", "cleanup_images", HANDED.format("cleanup_images")),
        ("cleanup_images", "planner", HANDED.format("planner")),
        ("planner", "cleanup_data", HANDED.format("cleanup_data")),
    ]
    commands = governor.commands(sid, 3)
    got = {(c["agent_name"], c["tool"], c["command"], tuple(c["resources"])) for c in commands}
    assert got == {
        ("cleanup_data", "list_deployments", "/opt/app/releases", ("/opt/app/releases",)),
        ("cleanup_data", "run_shell", "rm -rf /opt/app/releases/app-v1", ()),
        ("cleanup_images", "prune_images", "registry.local/app", ()),
    }
    assert all(c["verified"] for c in commands)

    spans = g.spans()
    assert g.names() == [
        "execute_tool list_deployments",
        "execute_tool prune_images",
        "execute_tool run_shell",
        "invoke_agent cleanup_data",
        "invoke_agent cleanup_images",
        "invoke_agent planner",
        "invoke_agent planner",
        "invoke_workflow Swarm",
    ]
    workflow = next(s for s in spans if s.name == "invoke_workflow Swarm")
    assert workflow.attributes is not None
    assert workflow.attributes["agentgov.intent"] == INTENT
    assert workflow.attributes["agentgov.framework"] == "autogen"
    for s in spans:
        assert s.attributes is not None and s.attributes["gen_ai.conversation.id"] == sid
    # token usage of each agent's own model calls (50 in, 10 out per call)
    usage = sorted(
        (s.name, a.get("gen_ai.usage.input_tokens"), a.get("gen_ai.usage.output_tokens"))
        for s in spans
        if (a := s.attributes) is not None and s.name.startswith("invoke_agent")
    )
    assert usage == [
        ("invoke_agent cleanup_data", 150, 30),
        ("invoke_agent cleanup_images", 100, 20),
        ("invoke_agent planner", 50, 10),
        ("invoke_agent planner", 50, 10),
    ]
    # the handoff's content went as a message: a digest and a score, never the text
    by_name = {s.name: s for s in spans}
    messages = [
        e for e in by_name["invoke_agent cleanup_data"].events if e.name == "agentgov.message"
    ]
    assert len(messages) == 1 and messages[0].attributes is not None
    assert str(messages[0].attributes["agentgov.message.digest"]).startswith("sha256:")
    assert "Transferred" not in json.dumps({k: str(v) for k, v in messages[0].attributes.items()})
    # the governor saw every step first: the root's start, then each handoff
    assert [d for d in governor.decisions(sid) if d[0] == "pre_handoff"] == [
        ("pre_handoff", "allow", "")
    ] * 4
    assert g.stops == []


@pytest.mark.parametrize("kind", ["round_robin", "selector"])
def test_a_teams_graph_is_its_turns_and_nested_runs(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI, kind: str
) -> None:
    governor.set_policy()
    g = instrument()
    result, app = run(lambda: team_app(kind))
    assert result.stop_reason == "Text 'TERMINATE' mentioned"
    assert result.messages[-1].source == "reporter"
    assert app.executed == [
        ("coordinator", "list_deployments", "/opt/app/releases"),
        ("cleanup_data", "run_shell", "rm -rf /opt/app/releases/app-v1"),
        ("auditor", "read_logs", "/var/log/app"),
    ]

    # the team is the agent that gives the turns; the agent and the team used as tools
    # are delegations by the agents that called them
    sid = g.session()
    graph = governor.graph(sid, agents=6)
    assert agent_tree(graph) == [
        ("audit_team", "reporter", 2),
        ("auditor", "audit_team", 3),
        ("cleanup_data", "coordinator", 2),
        ("cleanup_team", "", 0),
        ("coordinator", "cleanup_team", 1),
        ("reporter", "cleanup_team", 1),
    ]
    assert edges(graph) == [
        ("audit_team", "auditor", ""),
        ("cleanup_team", "coordinator", ""),
        ("cleanup_team", "reporter", ""),
        ("coordinator", "cleanup_data", "remove app-v1's data"),
        ("reporter", "audit_team", "check the logs"),
    ]
    commands = governor.commands(sid, 3)
    got = {(c["agent_name"], c["tool"], c["command"]) for c in commands}
    assert got == {
        ("coordinator", "list_deployments", "/opt/app/releases"),
        ("cleanup_data", "run_shell", "rm -rf /opt/app/releases/app-v1"),
        ("auditor", "read_logs", "/var/log/app"),
    }
    assert g.names() == [
        "execute_tool list_deployments",
        "execute_tool read_logs",
        "execute_tool run_shell",
        "invoke_agent audit_team",
        "invoke_agent auditor",
        "invoke_agent cleanup_data",
        "invoke_agent cleanup_team",
        "invoke_agent coordinator",
        "invoke_agent reporter",
        "invoke_workflow cleanup_team",
    ]
    # what one participant said reached the other as a message from it
    spans = {s.name: s for s in g.spans()}
    relayed = [
        e.attributes
        for e in spans["invoke_agent coordinator"].events
        if e.name == "agentgov.message" and e.attributes is not None
    ]
    reporter_id = spans["invoke_agent reporter"].attributes["gen_ai.agent.id"]  # type: ignore[index]
    assert [a["agentgov.message.to"] for a in relayed][-1] == reporter_id
    assert g.stops == []


def test_a_team_as_a_participant_is_the_outer_teams_delegation(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy()
    g = instrument()

    def build() -> App:
        executed: list[tuple[str, str, str]] = []
        model_client = client()
        coordinator = AssistantAgent(
            "coordinator",
            model_client=model_client,
            tools=[tools("coordinator", executed)["list_deployments"]],
            max_tool_iterations=5,
            system_message="You are coordinator.",
        )
        auditor = AssistantAgent(
            "auditor",
            model_client=model_client,
            tools=[tools("auditor", executed)["read_logs"]],
            max_tool_iterations=5,
            system_message="You are auditor.",
        )
        audit_team = RoundRobinGroupChat(
            [auditor], name="audit_team", termination_condition=MaxMessageTermination(2)
        )
        reset(
            coordinator=[ToolCall("list_deployments", {"path": "/opt/app/releases"})],
            auditor=[ToolCall("read_logs", {"path": "/var/log/app"})],
        )
        team = RoundRobinGroupChat(
            [coordinator, audit_team],
            name="cleanup_team",
            termination_condition=TextMentionTermination("TERMINATE", sources=["auditor"]),
        )
        return App(team, executed, model_client)

    result, app = run(build)
    assert said(result)[-1] == "auditor"
    assert app.executed == [
        ("coordinator", "list_deployments", "/opt/app/releases"),
        ("auditor", "read_logs", "/var/log/app"),
    ]
    graph = governor.graph(g.session(), agents=4)
    assert agent_tree(graph) == [
        ("audit_team", "cleanup_team", 1),
        ("auditor", "audit_team", 2),
        ("cleanup_team", "", 0),
        ("coordinator", "cleanup_team", 1),
    ]
    commands = governor.commands(g.session(), 2)
    assert {(c["agent_name"], c["tool"]) for c in commands} == {
        ("coordinator", "list_deployments"),
        ("auditor", "read_logs"),
    }


def test_streamed_runs_are_traced_and_governed(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(tool_allowlist=["list_deployments", "read_logs", "prune_images"])
    g = instrument()

    async def main() -> tuple[list[Any], list[Any], App]:
        app = swarm_app()
        streamed_team = [item async for item in app.runner.run_stream(task=INTENT)]
        # an agent on its own, its model streaming too
        agent = AssistantAgent(
            "cleanup_data",
            model_client=app.client,
            tools=[tools("cleanup_data", app.executed)["run_shell"]],
            model_client_stream=True,
            system_message="You are cleanup_data.",
        )
        reset(cleanup_data=[ToolCall("run_shell", {"command": "rm -rf /tmp/old"})])
        streamed_agent = [item async for item in agent.run_stream(task="remove /tmp/old")]
        await app.client.close()
        return streamed_team, streamed_agent, app

    streamed_team, streamed_agent, app = asyncio.run(main())
    assert isinstance(streamed_team[-1], TaskResult) and isinstance(streamed_agent[-1], TaskResult)
    assert handoffs(streamed_team[-1])[-1] == ("cleanup_images", "planner")
    assert app.executed == [
        ("cleanup_data", "list_deployments", "/opt/app/releases"),
        ("cleanup_images", "prune_images", "registry.local/app"),
    ]
    (refusal,) = tool_results(streamed_agent[-1], "run_shell")
    assert refusal.startswith("[agentgov] tool call stopped by the governor: tool_not_allowed")
    assert [(a.name, s.reason) for a, s in g.stops] == [
        ("cleanup_data", "tool_not_allowed"),
        ("cleanup_data", "tool_not_allowed"),
    ]
    sessions = {
        s.attributes["agentgov.session.id"]: s.name
        for s in g.spans()
        if s.attributes and s.name.startswith("invoke_workflow")
    }
    assert sorted(sessions.values()) == ["invoke_workflow Swarm", "invoke_workflow cleanup_data"]
    agent_span = next(
        s
        for s in g.spans()
        if s.name == "invoke_agent cleanup_data"
        and s.attributes
        and s.attributes["agentgov.delegation.depth"] == 0
    )
    assert agent_span.attributes is not None
    assert agent_span.attributes["gen_ai.usage.input_tokens"] == 50  # its streamed model call


# == (b) policy stops inside AutoGen ===========================================================


def test_a_handoff_over_budget_is_refused_and_the_agent_keeps_the_floor(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(max_handoffs=1)  # planner -> cleanup_data only
    g = instrument()
    result, app = run(swarm_app)
    assert handoffs(result) == [("planner", "cleanup_data")]  # no handoff to cleanup_images
    refusal = tool_results(result, "transfer_to_cleanup_images")
    assert len(refusal) == 1
    assert refusal[0].startswith(
        "[agentgov] delegation stopped by the governor: handoff_budget_exceeded"
    )
    # the agent's model was told, and the team ended through its normal path
    assert told(model, "cleanup_data")[-1] == refusal[0]
    assert result.stop_reason == "Text 'TERMINATE' mentioned"
    assert result.messages[-1].source == "cleanup_data"
    assert asked(model, "cleanup_images") == []  # the target never ran
    assert [(a.name, s.reason) for a, s in g.stops] == [("cleanup_data", "handoff_budget_exceeded")]
    sid = g.session()
    assert ("pre_handoff", "stop", "handoff_budget_exceeded") in governor.decisions(sid)
    assert sorted(n["name"] for n in governor.graph(sid, agents=2)["nodes"]) == [
        "cleanup_data",
        "planner",
    ]


def test_a_turn_over_budget_ends_the_team_or_the_fallback_takes_it(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(max_handoffs=1)  # the team -> coordinator only
    g = instrument()

    async def twice() -> tuple[TaskResult, TaskResult, App]:
        app = team_app(delegate=False)
        try:
            first = await app.runner.run(task=INTENT)
            # the team was ended as a termination condition ends it: it runs again
            return first, await app.runner.run(task="and the staging ones"), app
        finally:
            await app.client.close()

    result, again, app = asyncio.run(twice())
    # the team ended through its own termination, naming the stop
    assert result.stop_reason is not None
    assert result.stop_reason.startswith(
        "[agentgov] delegation stopped by the governor: handoff_budget_exceeded"
    )
    assert said(result) == ["user", "coordinator"]
    assert asked(model, "reporter") == []
    assert [(a.name, s.reason) for a, s in g.stops] == [("cleanup_team", "handoff_budget_exceeded")]
    sid = app.runner._team_id
    assert ("pre_handoff", "stop", "handoff_budget_exceeded") in governor.decisions(sid)
    workflow = next(s for s in g.spans() if s.name == "invoke_workflow cleanup_team")
    assert workflow.status.status_code.name == "ERROR"
    # and it was ended as a termination condition ends a team: the next run goes on with
    # the conversation (the coordinator, with nothing left to do, ends it), in a session
    # of its own named after the team
    assert said(again) == ["user", "coordinator"]
    assert again.stop_reason == "Text 'TERMINATE' mentioned"
    sids = {str(s.attributes["agentgov.session.id"]) for s in g.spans() if s.attributes}
    (second,) = sids - {sid}
    assert second.startswith(f"{sid}-")
    assert governor.decisions(second)[:2] == [("pre_handoff", "allow", "")] * 2
    g.instrumentor.uninstrument()

    # constrained: the hook gives the turn to a participant already in the run
    calls: list[tuple[str, str]] = []

    def constrained(agent: Any, stop: Stopped) -> Any:
        calls.append((agent.name, stop.reason))
        return "coordinator"

    g = instrument(on_stop=constrained)
    result, _ = run(lambda: team_app(delegate=False))
    assert calls == [("cleanup_team", "handoff_budget_exceeded")]
    assert result.stop_reason == "Text 'TERMINATE' mentioned"
    assert said(result) == ["user", "coordinator", "coordinator"]
    assert str(result.messages[-1].content).startswith("coordinator alone")
    assert asked(model, "reporter") == []
    sid = g.session()
    assert sorted(n["name"] for n in governor.graph(sid, agents=2)["nodes"]) == [
        "cleanup_team",
        "coordinator",
    ]


def test_a_tool_off_the_allowlist_is_refused_to_the_model(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(tool_allowlist=["list_deployments", "read_logs"])
    g = instrument()
    result, app = run(team_app)
    assert result.stop_reason == "Text 'TERMINATE' mentioned"  # the normal path
    assert [e[1] for e in app.executed] == ["list_deployments", "read_logs"]  # no run_shell
    # the nested agent's model was told why, naming the reason
    (refusal,) = told(model, "cleanup_data")
    assert refusal.startswith("[agentgov] tool call stopped by the governor: tool_not_allowed")
    assert "run_shell" in refusal
    assert [(a.name, s.reason) for a, s in g.stops] == [("cleanup_data", "tool_not_allowed")]
    assert ("tool", "stop", "tool_not_allowed") in governor.decisions(g.session())
    assert "execute_tool run_shell" not in g.names()


def test_delegations_too_deep_are_refused_to_the_model(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(max_delegation_depth=1)  # the team's turns, nothing under them
    g = instrument()
    result, app = run(team_app)
    assert result.stop_reason == "Text 'TERMINATE' mentioned"
    assert [e[1] for e in app.executed] == ["list_deployments"]
    for caller, tool in (("coordinator", "cleanup_data"), ("reporter", "audit_team")):
        (refusal,) = tool_results(result, tool)
        assert refusal.startswith(
            "[agentgov] delegation stopped by the governor: delegation_depth_exceeded"
        )
        assert refusal in told(model, caller)
    assert asked(model, "cleanup_data") == [] and asked(model, "auditor") == []
    assert [(a.name, s.reason) for a, s in g.stops] == [
        ("coordinator", "delegation_depth_exceeded"),
        ("reporter", "delegation_depth_exceeded"),
    ]
    assert ("pre_handoff", "stop", "delegation_depth_exceeded") in governor.decisions(g.session())
    assert "invoke_agent cleanup_data" not in g.names()


def test_approvals_wait_for_a_reviewer_or_raise(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(require_approval_for=["run_shell"])
    g = instrument(approvals="wait")
    reviewer = Reviewer(governor).start()
    result, app = run(swarm_app)
    assert reviewer.join(30) == [200]
    assert [e[1] for e in app.executed] == ["list_deployments", "run_shell", "prune_images"]
    assert tool_results(result, "run_shell") == ["removed"]  # ran once approved
    g.instrumentor.uninstrument()

    g = instrument(approvals="raise")
    result, app = run(swarm_app)
    assert [e[1] for e in app.executed] == ["list_deployments", "prune_images"]
    (refusal,) = tool_results(result, "run_shell")
    assert refusal.startswith("[agentgov] approval stopped by the governor: awaiting_approval")
    assert ("approval", "requested", "") in governor.decisions(g.session())


# == (c) a kill from another process ===========================================================


@pytest.mark.parametrize("where", ["team", "nested agent"])
def test_a_kill_from_the_cli_stops_a_running_run(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI, where: str
) -> None:
    governor.set_policy()
    instrument()
    # an async tool runs in its agent's context
    killed = Kill(governor.url, lambda: len(MODEL[0].requests))
    hook = killed.anow
    # killed while cleanup_data lists (a Swarm's turn), or while cleanup_data runs its
    # command as the coordinator's AgentTool (a nested run, whose errors AutoGen turns into
    # the tool's result: the coordinator's next step stops)
    with pytest.raises(SessionKilled) as stopped:
        if where == "team":
            run(lambda: swarm_app(hook))
        else:
            run(lambda: team_app(hook=hook))
    assert stopped.value.reason == "session_killed"
    assert "wrong environment" in str(stopped.value)
    assert killed.acknowledged()  # by every agent running then
    # the run took no step after the kill: no model call, no tool, no handoff
    assert len(model.requests) == killed.asked_before
    assert asked(model, "cleanup_images") == [] and asked(model, "reporter") == []
    phases = governor.decisions(killed.sid)
    assert any(p[0] == "kill" for p in phases), phases


# == (d) opentelemetry-instrument runs an unmodified app =======================================

UNMODIFIED = """
import asyncio, os, sys
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.conditions import TextMentionTermination
from autogen_agentchat.teams import Swarm
from autogen_core import SingleThreadedAgentRuntime
from autogen_core.models import ModelFamily
from autogen_core.tools import FunctionTool
from autogen_ext.models.openai import OpenAIChatCompletionClient


async def run_shell(command: str) -> str:
    return "removed"


async def main() -> None:
    model = OpenAIChatCompletionClient(
        model="m", base_url=os.environ["MODEL_URL"], api_key="dummy", parallel_tool_calls=False,
        model_info={"vision": False, "function_calling": True, "json_output": False,
                    "family": ModelFamily.UNKNOWN, "structured_output": False},
    )
    planner = AssistantAgent("planner", model_client=model, handoffs=["cleanup_data"],
                             system_message="You are planner.")
    cleanup = AssistantAgent("cleanup_data", model_client=model, max_tool_iterations=3,
                             tools=[FunctionTool(run_shell, "Run a command.")],
                             system_message="You are cleanup_data.")
    team = Swarm([planner, cleanup], termination_condition=TextMentionTermination("TERMINATE"))
    result = await team.run(task=sys.argv[1])
    print(result.messages[-1].content)
    await model.close()


asyncio.run(main())
"""


def test_opentelemetry_instrument_governs_an_unmodified_app(
    governor: Governor, model: ScriptedOpenAI, tmp_path: Path
) -> None:
    governor.set_policy()
    reset(
        planner=[ToolCall("transfer_to_cleanup_data")],
        cleanup_data=[ToolCall("run_shell", {"command": "rm -rf /opt/app/releases/app-v0"})],
    )
    FINISHERS.add("cleanup_data")
    try:
        stdout, intent = run_unmodified(
            governor, "autogen", UNMODIFIED, tmp_path, MODEL_URL=model.base_url
        )
    finally:
        FINISHERS.discard("cleanup_data")
    assert stdout.startswith("cleanup_data done:") and "removed" in stdout, stdout

    sid = governor.session_with(intent)
    # AutoGen's own GenAI spans (from the global provider opentelemetry-instrument set up)
    # reach the collector too, nested in agentgov's; the governed agents are agentgov's

    def governed() -> Any:
        r = httpx.get(
            f"{governor.url}/api/v1/sessions/{sid}/graph",
            headers={"Authorization": f"Bearer {REVIEWER_KEY}"},
            timeout=30,
        )
        nodes = [n for n in r.json()["nodes"] if n["lineage"] == "governor"]
        return len(nodes) == 2 and all(n["name"] and n["verified"] for n in nodes) and nodes

    nodes = wait_for(governed, timeout=30)
    names = {n["id"]: n["name"] for n in nodes}
    assert sorted((n["name"], names.get(n["parent_id"], ""), n["depth"]) for n in nodes) == [
        ("cleanup_data", "planner", 1),
        ("planner", "", 0),
    ]

    def verified() -> Any:
        rows = governor.get(f"/api/v1/sessions/{sid}/audit")["commands"]
        return [(c["agent_name"], c["command"]) for c in rows if c["verified"]]

    assert wait_for(verified, timeout=30) == [("cleanup_data", "rm -rf /opt/app/releases/app-v0")]
    got = governor.decisions(sid)
    assert got[:2] == [("pre_handoff", "allow", ""), ("pre_handoff", "allow", "")]
    assert ("tool", "allow", "") in got


# == (e) uninstrument leaves no trace ==========================================================

PATCHED = [
    ("BaseGroupChat", "run_stream"),
    ("BaseGroupChatManager", "_log_speaker_selection"),
    ("ChatAgentContainer", "on_message_impl"),
    ("AssistantAgent", "on_messages_stream"),
    ("AssistantAgent", "_execute_tool_call"),
    ("AssistantAgent", "_check_and_handle_handoff"),
    ("AssistantAgent", "_call_llm"),
    ("AssistantAgent", "_reflect_on_tool_use_flow"),
]


def patched() -> dict[str, Any]:
    """What each class holds in its own namespace for every attribute the instrumentor
    replaces (None: nothing of its own)."""
    from autogen_agentchat.teams import BaseGroupChat

    owners = {
        "BaseGroupChat": BaseGroupChat,
        "BaseGroupChatManager": BaseGroupChatManager,
        "ChatAgentContainer": ChatAgentContainer,
        "AssistantAgent": AssistantAgent,
    }
    return {f"{o}.{n}": owners[o].__dict__.get(n) for o, n in PATCHED}


def test_uninstrument_puts_back_every_patched_attribute(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy()
    before = patched()
    assert before["ChatAgentContainer.on_message_impl"] is None  # inherited, not its own

    async def agent_run(text: str) -> Any:
        # an AssistantAgent on its own (outside a team) is a governed run too
        executed: list[tuple[str, str, str]] = []
        model_client = client()
        agent = AssistantAgent(
            "cleanup_data",
            model_client=model_client,
            tools=[tools("cleanup_data", executed)["run_shell"]],
            system_message="You are cleanup_data.",
        )
        reset(cleanup_data=[ToolCall("run_shell", {"command": "rm -rf /tmp/old"})])
        try:
            return await agent.run(task=text), executed
        finally:
            await model_client.close()

    g = instrument()
    during = patched()
    assert all(during[k] is not before[k] for k in before), during
    result, executed = asyncio.run(agent_run(INTENT))
    assert executed == [("cleanup_data", "run_shell", "rm -rf /tmp/old")]
    assert g.names() == [
        "execute_tool run_shell",
        "invoke_agent cleanup_data",
        "invoke_workflow cleanup_data",
    ]
    assert ("tool", "allow", "") in governor.decisions(g.session())
    g.instrumentor.uninstrument()

    after = patched()
    assert all(after[k] is before[k] for k in before), after
    # and nothing more is traced or governed
    g.exporter.clear()
    after_text = f"after uninstrument {secrets.token_hex(4)}"
    result, executed = asyncio.run(agent_run(after_text))
    assert executed and result.messages[-1].content == "removed"
    team_result, _ = run(swarm_app, task=after_text)
    assert handoffs(team_result)[-1] == ("cleanup_images", "planner")
    assert g.exporter.get_finished_spans() == ()
    time.sleep(0.5)
    intents = {r["intent"] for r in governor.get("/api/v1/sessions")["sessions"]}
    assert INTENT in intents and after_text not in intents
    # instrumenting again works as the first time
    again = instrument()
    asyncio.run(agent_run(INTENT))
    assert len(again.spans()) == 3


# == (f) with OpenInference's instrumentor too =================================================


@pytest.mark.parametrize("first", ["openinference", "agentgov"])
def test_with_openinference_too_the_app_works_and_every_span_is_there(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI, first: str
) -> None:
    from openinference.instrumentation.autogen_agentchat import (
        AutogenAgentChatInstrumentor as OpenInferenceInstrumentor,
    )

    governor.set_policy()
    before = patched()
    with alongside(OpenInferenceInstrumentor(), first, instrument, collector=governor) as (
        g,
        oi_exporter,
    ):
        result, app = run(swarm_app)
        assert handoffs(result)[-1] == ("cleanup_images", "planner")
        assert [e[1] for e in app.executed] == ["list_deployments", "run_shell", "prune_images"]
        assert g.names() == [
            "execute_tool list_deployments",
            "execute_tool prune_images",
            "execute_tool run_shell",
            "invoke_agent cleanup_data",
            "invoke_agent cleanup_images",
            "invoke_agent planner",
            "invoke_agent planner",
            "invoke_workflow Swarm",
        ]
        assert chains(g.spans())["execute_tool prune_images"] == 3
        theirs = oi_exporter.get_finished_spans()
        assert {"AGENT", "TOOL", "LLM"} <= span_kinds(theirs)  # OpenInference traced the run
    each_agent_once(governor, g.spans())
    g.instrumentor.uninstrument()
    assert patched() == before


def test_importing_the_instrumentor_loads_no_framework() -> None:
    prefixes = ("autogen_agentchat", "autogen_core", "autogen_ext", "opentelemetry.sdk")
    assert loaded_by_importing("autogen", *prefixes) == []
