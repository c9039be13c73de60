"""smolagents under agentgov's instrumentor: real smolagents runs, offline, with a scripted
model (tests/scripted_openai.py behind smolagents' own ``OpenAIServerModel``), against a real
collector process with API keys and a policy.

The app: ``manager`` (a ToolCallingAgent) lists deployments, then asks its two managed
agents: ``cleanup_data`` (a ToolCallingAgent whose model asks for ``run_shell`` and
``list_deployments`` at once, so both run in parallel threads) and ``images`` (a CodeAgent
whose code prunes images and then asks its own managed agent ``auditor``, which lists the
images left). Covered:

- the graph read back from the API is the run's real delegations, with each tool (a
  CodeAgent's code included) on the agent that called it, token usage per agent, and the
  tasks and answers between agents as digests;
- policy stops inside smolagents: a tool off the allowlist (a parallel tool call, a tool
  called from code, the code itself), a delegation over the handoff budget or too deep:
  the step fails with the reason, the model is told and the run ends normally; the
  ``on_stop`` hook's agent takes over a stopped delegation; approvals wait or raise; the
  audit records each stop;
- a kill from another process (``agentgov kill``) stops a running run, whichever of its
  agents was running;
- ``opentelemetry-instrument`` runs an unmodified app whose governed spans reach the
  collector;
- ``uninstrument()`` puts back every patched attribute, the very objects;
- with OpenInference's instrumentor active too, the app works and agentgov's spans are all
  exported; streamed runs are traced and governed; importing the instrumentor loads no
  framework.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import smolagents.local_python_executor as code_executor
from smolagents import (
    CodeAgent,
    MultiStepAgent,
    OpenAIServerModel,
    Tool,
    ToolCallingAgent,
    tool,
)
from smolagents.memory import ActionStep, FinalAnswerStep
from smolagents.utils import AgentError

from agentgov.instrumentation import GovernorClient, SessionKilled, Stopped, current_lineage
from agentgov.instrumentation.frameworks.smolagents import SmolagentsInstrumentor
from tests import framework_harness
from tests.framework_harness import (
    INTENT,
    Governed,
    Kill,
    Reviewer,
    alongside,
    chains,
    each_agent_once,
    governor_fixture,
    instrument_fixture,
    links,
    loaded_by_importing,
    parents,
    provider_fixture,
    run_unmodified,
    session_of,
    tree,
)

from .scripted_openai import Reply, ScriptedOpenAI, ToolCall, system_text

EVERY_TOOL = ["list_deployments", "run_shell", "python_interpreter", "prune_images", "list_images"]


# -- the collector, its policy, the model ---------------------------------------------------


class Governor(framework_harness.Governor):
    def arrived(self, node: dict[str, Any]) -> bool:
        """A node has its own span (the governor knows an agent before any span arrives,
        and its tools' spans may arrive before its own, which carries the task it was
        given: every delegation here has one)."""
        return bool(node["name"] and (node["task"] or not node["parent_id"]))


governor = governor_fixture("smolagents", Governor)


#: what each agent's model does, step by step: tool calls (ToolCallingAgent) or code
#: (CodeAgent); after its plan, it gives its final answer, saying what it was told
PLANS: dict[str, list[list[ToolCall] | str]] = {}
#: the model calls made so far for each (agent, task)
STEPS: dict[tuple[str, str], int] = {}
LOCK = threading.Lock()
MODEL: list[ScriptedOpenAI] = []
AGENT_MARK = re.compile(r"\[agent (\w+)\]")


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content or "")


#: where smolagents' messages to the model start, once it merged those of one role
MESSAGE_START = re.compile(r"\n(?=Observation:\n|Call id: |Error:\n)")


def said_to(request: dict[str, Any]) -> list[str]:
    """What an agent's model was given as the user: its task, then each observation and
    error, in order (smolagents merges consecutive messages of one role into one)."""
    text = "\n".join(
        _text(m.get("content")) for m in request["messages"] if m.get("role") == "user"
    )
    return MESSAGE_START.split(text)


def told_in(request: dict[str, Any]) -> list[str]:
    """What an agent was told after its task: observations and errors, in order."""
    return said_to(request)[1:]


def script(request: dict[str, Any]) -> Reply:
    match = AGENT_MARK.search(system_text(request))
    if match is None:  # smolagents' closing request after the last step: no agent prompt
        return Reply("out of steps")
    agent = match.group(1)
    task = said_to(request)[0]
    with LOCK:
        step = STEPS[(agent, task)] = STEPS.get((agent, task), -1) + 1
    plan = PLANS.get(agent, [])
    coder = not request.get("tools")  # a CodeAgent offers no tools: its model writes code
    if step < len(plan):
        action = plan[step]
        if isinstance(action, str):
            return Reply(f"Thought: next.\n<code>\n{action}\n</code>")
        return Reply(tool_calls=action)
    seen = " | ".join(
        " ".join(t.replace("Observation:", "").split()) for t in told_in(request)
    ).replace("Calling tools:", "")
    answer = f"{agent} done: {seen}"
    if coder:
        return Reply(f"Thought: done.\n<code>\nfinal_answer({answer!r})\n</code>")
    return Reply(tool_calls=[ToolCall("final_answer", {"answer": answer})])


@pytest.fixture(scope="module")
def model() -> Iterator[ScriptedOpenAI]:
    with ScriptedOpenAI(script) as server:
        MODEL[:] = [server]
        yield server


def asked(server: ScriptedOpenAI, agent: str) -> list[dict[str, Any]]:
    """The model requests made for ``agent``."""
    return [r for r in server.requests if f"[agent {agent}]" in system_text(r)]


def told(server: ScriptedOpenAI, agent: str) -> str:
    """Everything ``agent`` was told, up to its last model call."""
    requests = asked(server, agent)
    return "\n".join(told_in(requests[-1])) if requests else ""


# -- the app -------------------------------------------------------------------------------------


@dataclass
class App:
    manager: ToolCallingAgent
    cleanup_data: ToolCallingAgent
    images: CodeAgent
    auditor: ToolCallingAgent
    #: the tool bodies that ran: (tool, its main argument)
    executed: list[tuple[str, str]]


Hook = Callable[[str], None]


def build(
    on_list: Hook | None = None,
    on_shell: Hook | None = None,
    on_prune: Hook | None = None,
) -> App:
    """A fresh app, its model's plans reset; a hook runs inside that tool's body."""
    executed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def ran(name: str, argument: str, hook: Hook | None) -> None:
        with lock:
            executed.append((name, argument))
        if hook is not None:
            hook(argument)

    @tool
    def list_deployments(path: str) -> str:
        """List the deployments under a folder.

        Args:
            path: the folder.
        """
        ran("list_deployments", path, on_list)
        return "app-v1 app-v2"

    @tool
    def run_shell(command: str) -> str:
        """Run a shell command (recorded, never executed).

        Args:
            command: the command line.
        """
        ran("run_shell", command, on_shell)
        return "removed"

    @tool
    def prune_images(older_than_days: int) -> str:
        """Delete the container images older than some days.

        Args:
            older_than_days: the age in days.
        """
        ran("prune_images", str(older_than_days), on_prune)
        return "pruned 4 images"

    @tool
    def list_images() -> str:
        """List the container images left."""
        ran("list_images", "", None)
        return "app:v7 app:v8"

    llm = OpenAIServerModel(model_id="m", api_base=MODEL[0].base_url, api_key="dummy")

    def kw(name: str) -> dict[str, Any]:
        return {
            "model": llm,
            "name": name,
            "instructions": f"[agent {name}]",
            "verbosity_level": -1,
            "max_steps": 5,
        }

    auditor = ToolCallingAgent(
        tools=[list_images], description="Lists the container images left.", **kw("auditor")
    )
    images = CodeAgent(
        tools=[prune_images],
        managed_agents=[auditor],
        description="Prunes old images, then has auditor list the rest.",
        **kw("images"),
    )
    cleanup_data = ToolCallingAgent(
        tools=[run_shell, list_deployments],
        description="Removes the data of old deployments.",
        **kw("cleanup_data"),
    )
    manager = ToolCallingAgent(
        tools=[list_deployments], managed_agents=[cleanup_data, images], **kw("manager")
    )
    with LOCK:
        STEPS.clear()
        PLANS.clear()
        PLANS["manager"] = [
            [ToolCall("list_deployments", {"path": "/opt/app/releases"})],
            [ToolCall("cleanup_data", {"task": "remove app-v1's data"})],
            [ToolCall("images", {"task": "prune images older than 30 days"})],
        ]
        PLANS["cleanup_data"] = [
            [
                ToolCall("run_shell", {"command": "rm -rf /opt/app/releases/app-v1"}),
                ToolCall("list_deployments", {"path": "/opt/app/releases/app-v1"}),
            ]
        ]
        PLANS["images"] = [
            "print(prune_images(older_than_days=30))",
            'print(auditor(task="list the images that remain"))',
        ]
        PLANS["auditor"] = [[ToolCall("list_images")]]
    MODEL[0].requests.clear()
    return App(manager, cleanup_data, images, auditor, executed)


# -- instrumenting ------------------------------------------------------------------------------


provider = provider_fixture("smolagents-app")
instrument = instrument_fixture(SmolagentsInstrumentor, client=GovernorClient)


def span_names(g: Governed) -> list[str]:
    return sorted(s.name for s in g.spans())


ALL_SPANS = sorted(
    [
        "invoke_workflow manager",
        "invoke_agent manager",
        "invoke_agent cleanup_data",
        "invoke_agent images",
        "invoke_agent auditor",
        "execute_tool list_deployments",
        "execute_tool list_deployments",
        "execute_tool run_shell",
        "execute_tool python_interpreter",
        "execute_tool python_interpreter",
        "execute_tool python_interpreter",
        "execute_tool prune_images",
        "execute_tool list_images",
    ]
)


# == (a) the graph is the run's real delegations ===============================================


def test_the_graph_is_the_runs_real_delegations(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy()
    g = instrument()
    app = build()
    answer = app.manager.run(INTENT)
    assert answer.startswith("manager done:")
    assert "Here is the final answer from your managed agent 'cleanup_data'" in answer
    assert "Here is the final answer from your managed agent 'images'" in answer
    assert sorted(app.executed) == [
        ("list_deployments", "/opt/app/releases"),
        ("list_deployments", "/opt/app/releases/app-v1"),
        ("list_images", ""),
        ("prune_images", "30"),
        ("run_shell", "rm -rf /opt/app/releases/app-v1"),
    ]

    sid = session_of(g)
    graph = governor.graph(sid, agents=4)
    assert set(tree(graph["nodes"])) == {
        ("manager", "", 0),
        ("cleanup_data", "manager", 1),
        ("images", "manager", 1),
        ("auditor", "images", 2),
    }
    assert all(n["lineage"] == "governor" and n["verified"] for n in graph["nodes"])
    assert set(links(graph)) == {
        ("manager", "cleanup_data", "remove app-v1's data"),
        ("manager", "images", "prune images older than 30 days"),
        ("images", "auditor", "list the images that remain"),
    }

    # each tool on the agent that called it (a tool two agents share, calls in parallel
    # threads, tools called from a CodeAgent's code, the code itself), commands and
    # resources from the arguments
    commands = governor.commands(sid, count=8)
    got = Counter(
        (c["agent_name"], c["tool"], c["command"], tuple(c["resources"]))
        for c in commands
        if not c["command"].startswith("final_answer(")
    )
    assert got == Counter(
        {
            ("manager", "list_deployments", "/opt/app/releases", ("/opt/app/releases",)): 1,
            ("cleanup_data", "run_shell", "rm -rf /opt/app/releases/app-v1", ()): 1,
            (
                "cleanup_data",
                "list_deployments",
                "/opt/app/releases/app-v1",
                ("/opt/app/releases/app-v1",),
            ): 1,
            ("images", "python_interpreter", "print(prune_images(older_than_days=30))", ()): 1,
            (
                "images",
                "python_interpreter",
                'print(auditor(task="list the images that remain"))',
                (),
            ): 1,
            ("images", "prune_images", "", ()): 1,
            ("auditor", "list_images", "", ()): 1,
        }
    )
    # the CodeAgent answered through its code, decided like any other
    (final,) = [c for c in commands if c["command"].startswith("final_answer(")]
    assert (final["agent_name"], final["tool"]) == ("images", "python_interpreter")
    assert all(c["verified"] for c in commands)

    spans = g.spans()
    assert span_names(g) == ALL_SPANS
    workflow = next(s for s in spans if s.name == "invoke_workflow manager")
    assert workflow.attributes is not None
    assert workflow.attributes["gen_ai.operation.name"] == "invoke_workflow"
    assert workflow.attributes["agentgov.intent"] == INTENT
    assert workflow.attributes["agentgov.framework"] == "smolagents"
    for s in spans:
        assert s.attributes is not None and s.attributes["gen_ai.conversation.id"] == sid
        assert s.attributes["agentgov.intent"] == INTENT
    agents = {s.name: s for s in spans if s.name.startswith("invoke_agent")}
    # token usage of each agent's own model calls (50 in, 10 out per call)
    usage = {
        n: (a.get("gen_ai.usage.input_tokens"), a.get("gen_ai.usage.output_tokens"))
        for n, s in agents.items()
        if (a := s.attributes) is not None
    }
    assert usage == {
        "invoke_agent manager": (200, 40),
        "invoke_agent cleanup_data": (100, 20),
        "invoke_agent images": (150, 30),
        "invoke_agent auditor": (100, 20),
    }
    assert {n: len(asked(model, n.split()[1])) for n in agents} == {
        "invoke_agent manager": 4,
        "invoke_agent cleanup_data": 2,
        "invoke_agent images": 3,
        "invoke_agent auditor": 2,
    }
    # the tasks and the answers between agents went as messages: digests and scores, never
    # the text
    ids = {n.split()[1]: str((s.attributes or {})["gen_ai.agent.id"]) for n, s in agents.items()}
    sent = {
        (n.split()[1], str((e.attributes or {})["agentgov.message.to"]))
        for n, s in agents.items()
        for e in s.events
        if e.name == "agentgov.message"
    }
    assert sent == {
        ("manager", ids["cleanup_data"]),
        ("manager", ids["images"]),
        ("cleanup_data", ids["manager"]),
        ("images", ids["auditor"]),
        ("images", ids["manager"]),
        ("auditor", ids["images"]),
    }
    for s in agents.values():
        for e in s.events:
            if e.name == "agentgov.message":
                attrs = e.attributes or {}
                assert str(attrs["agentgov.message.digest"]).startswith("sha256:")
                assert "agentgov.message.injection" in attrs
                assert "app-v1" not in json.dumps({k: str(v) for k, v in attrs.items()})
    # the governor saw every step first: the root, three delegations, eight tool calls
    decided = Counter(d for d in governor.decisions(sid) if d[0] in ("pre_handoff", "tool"))
    assert decided == {("pre_handoff", "allow", ""): 4, ("tool", "allow", ""): 8}
    assert g.stops == []


# == (b) policy stops inside smolagents ========================================================


@pytest.mark.parametrize("off", ["run_shell", "prune_images", "python_interpreter"])
def test_a_tool_off_the_allowlist_is_refused_to_the_model(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI, off: str
) -> None:
    governor.set_policy(tool_allowlist=[t for t in EVERY_TOOL if t != off])
    g = instrument()
    app = build()
    answer = app.manager.run(INTENT)
    assert answer.startswith("manager done:")  # the run ended through its normal path
    ran = {name for name, _ in app.executed}
    refused = "[agentgov] tool call stopped by the governor: tool_not_allowed"
    sid = session_of(g)
    assert ("tool", "stop", "tool_not_allowed") in governor.decisions(sid)
    assert f"execute_tool {off}" not in span_names(g)
    if off == "run_shell":
        # its parallel twin ran; run_shell did not, and cleanup_data's model was told why
        assert ran == {"list_deployments", "prune_images", "list_images"}
        assert (
            "Error executing tool 'run_shell' with arguments {'command': 'rm -rf "
            "/opt/app/releases/app-v1'}: StoppedByGovernor: " + refused
        ) in told(model, "cleanup_data")
        assert g.stopped() == [("cleanup_data", "tool_not_allowed")]
        assert governor.graph(sid, agents=4)
    elif off == "prune_images":
        # the code calling it failed at that line, naming the reason; the next step ran
        assert ran == {"list_deployments", "run_shell", "list_images"}
        said = told(model, "images")
        assert "Code execution failed at line 'print(prune_images(older_than_days=30))'" in said
        assert "StoppedByGovernor: " + refused in said
        assert g.stopped() == [("images", "tool_not_allowed")]
        assert len(asked(model, "auditor")) == 2
    else:
        # no code of the CodeAgent ran: not its tools, not its managed agent
        assert ran == {"list_deployments", "run_shell"}
        assert asked(model, "auditor") == []
        assert told(model, "images").count(refused) == app.images.max_steps - 1
        assert g.stopped() == [("images", "tool_not_allowed")] * app.images.max_steps
        step = app.images.memory.steps[1]
        assert isinstance(step, ActionStep) and isinstance(step.error, Stopped)
        assert isinstance(step.error, AgentError)  # smolagents' own kind of step error
        assert step.error.reason == "tool_not_allowed"


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ({"max_handoffs": 2}, "handoff_budget_exceeded"),  # the third delegation
        ({"max_delegation_depth": 1}, "delegation_depth_exceeded"),  # images -> auditor
    ],
)
def test_a_delegation_stopped_is_refused_to_the_model(
    governor: Governor,
    instrument: Callable[..., Governed],
    model: ScriptedOpenAI,
    rule: dict[str, int],
    reason: str,
) -> None:
    governor.set_policy(**rule)
    g = instrument()
    app = build()
    answer = app.manager.run(INTENT)
    assert answer.startswith("manager done:")
    assert asked(model, "auditor") == []  # the managed agent never started
    said = told(model, "images")
    assert (
        "due to: StoppedByGovernor: [agentgov] delegation stopped by the governor: " + (reason)
        in said
    )
    assert "list_images" not in {name for name, _ in app.executed}
    assert g.stopped() == [("images", reason)]
    sid = session_of(g)
    assert ("pre_handoff", "stop", reason) in governor.decisions(sid)
    graph = governor.graph(sid, agents=3)
    assert sorted(n["name"] for n in graph["nodes"]) == ["cleanup_data", "images", "manager"]
    assert "invoke_agent auditor" not in span_names(g)


def test_the_fallback_hook_does_a_stopped_delegation_as_the_delegating_agent(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(max_handoffs=2)
    calls: list[tuple[str, str]] = []
    alone: list[ToolCallingAgent] = []

    def constrained(agent: Any, stop: Stopped) -> Any:
        calls.append((agent.name, stop.reason))
        if stop.phase != "delegation":
            return None
        # the images agent carries on alone: a single agent with one read-only tool
        helper = agent.managed_agents["auditor"]
        alone.append(
            ToolCallingAgent(
                tools=list(helper.tools.values())[:1],
                model=agent.model,
                name="images_alone",
                instructions="[agent images_alone]",
                verbosity_level=-1,
                max_steps=3,
            )
        )
        return alone[0]

    g = instrument(on_stop=constrained)
    app = build()
    PLANS["images_alone"] = [[ToolCall("list_images")]]
    answer = app.manager.run(INTENT)
    assert calls == [("images", "handoff_budget_exceeded")]
    assert answer.startswith("manager done:")
    assert asked(model, "auditor") == []
    # the images agent's code got the stand-in's report in place of auditor's
    said = told(model, "images")
    assert "Here is the final answer from your managed agent 'images_alone'" in said
    assert "images_alone done: app:v7 app:v8" in said
    sid = session_of(g)
    assert ("pre_handoff", "stop", "handoff_budget_exceeded") in governor.decisions(sid)
    # the stand-in is the images agent going on alone: no new agent, its tool is images'
    graph = governor.graph(sid, agents=3)
    assert sorted(n["name"] for n in graph["nodes"]) == ["cleanup_data", "images", "manager"]
    commands = governor.commands(sid, count=8)
    assert [(c["agent_name"], c["depth"]) for c in commands if c["tool"] == "list_images"] == [
        ("images", 1)
    ]
    images = next(s for s in g.spans() if s.name == "invoke_agent images")
    assert (images.attributes or {})["gen_ai.usage.input_tokens"] == 150 + 100


def test_approvals_wait_for_a_reviewer_or_raise(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(require_approval_for=["run_shell"])
    g = instrument(approvals="wait")
    reviewer = Reviewer(governor).start()
    app = build()
    answer = app.manager.run(INTENT)
    assert reviewer.join(30) == [200]
    assert answer.startswith("manager done:")
    assert ("run_shell", "rm -rf /opt/app/releases/app-v1") in app.executed  # once approved
    assert g.stops == []
    g.instrumentor.uninstrument()

    g = instrument(approvals="raise")
    app = build()
    answer = app.manager.run(INTENT)
    assert answer.startswith("manager done:")
    assert "run_shell" not in {name for name, _ in app.executed}
    assert (
        "[agentgov] approval stopped by the governor: awaiting_approval - tool call run_shell"
    ) in told(model, "cleanup_data")
    assert g.stopped() == [("cleanup_data", "awaiting_approval")]
    assert ("approval", "requested", "") in governor.decisions(session_of(g))


# == (c) a kill from another process ===========================================================


@pytest.mark.parametrize("where", ["run", "nested run", "code"])
def test_a_kill_from_the_cli_stops_a_running_run(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI, where: str
) -> None:
    governor.set_policy()
    g = instrument()
    killed = Kill(governor.url, lambda: len(model.requests))

    def kill_now(argument: str) -> None:
        if killed.done or (where == "run" and argument != "/opt/app/releases"):
            return  # the manager's own listing only
        # the tool runs in its agent's context: a worker thread for parallel calls and code
        killed.now()

    if where == "run":
        app = build(on_list=kill_now)
    elif where == "nested run":
        app = build(on_shell=kill_now)
    else:
        app = build(on_prune=kill_now)
    with pytest.raises(SessionKilled) as stopped:
        app.manager.run(INTENT)
    assert isinstance(stopped.value, AgentError)  # smolagents' own kind, out of run()
    assert stopped.value.reason == "session_killed"
    assert "wrong environment" in str(stopped.value)
    names = {
        (s.attributes or {}).get("gen_ai.agent.id"): (s.attributes or {}).get("gen_ai.agent.name")
        for s in g.spans()
        if s.name.startswith("invoke_agent")
    }
    # each agent running when the kill arrived acknowledged it
    running = {names[a["agent_id"]] for a in killed.acknowledged()}
    # the run took no step after the kill: no model call, no delegation
    assert len(model.requests) == killed.asked_before
    ran = [name for name, _ in app.executed]
    if where == "run":
        assert running == {"manager"}
        assert ran == ["list_deployments"]
        assert asked(model, "cleanup_data") == []
    elif where == "nested run":
        assert running == {"manager", "cleanup_data"}
        assert "run_shell" in ran and "prune_images" not in ran
        assert asked(model, "images") == []
    else:
        assert running == {"manager", "images"}
        assert ran[-1] == "prune_images" and "list_images" not in ran
        assert asked(model, "auditor") == []
    assert g.stopped() == []  # a kill is not a step's stop: no fallback
    phases = governor.decisions(killed.sid)
    assert any(p[0] == "kill" for p in phases), phases
    workflow = next(s for s in g.spans() if s.name == "invoke_workflow manager")
    assert workflow.status.status_code.name == "ERROR"


# == (d) opentelemetry-instrument runs an unmodified app =======================================

UNMODIFIED = '''
import sys
from smolagents import OpenAIServerModel, ToolCallingAgent, tool


@tool
def run_shell(command: str) -> str:
    """Run a shell command.

    Args:
        command: the command line.
    """
    return "removed"


model = OpenAIServerModel(model_id="m")
cleanup = ToolCallingAgent(
    tools=[run_shell], model=model, name="cleanup_data", description="Removes old data.",
    instructions="[agent cleanup_data]", verbosity_level=-1,
)
manager = ToolCallingAgent(
    tools=[], model=model, managed_agents=[cleanup], name="manager",
    instructions="[agent manager]", verbosity_level=-1,
)
print(manager.run(sys.argv[1]))
'''


def test_opentelemetry_instrument_governs_an_unmodified_app(
    governor: Governor, model: ScriptedOpenAI, tmp_path: Path
) -> None:
    governor.set_policy()
    with LOCK:
        STEPS.clear()
        PLANS.clear()
        PLANS["manager"] = [[ToolCall("cleanup_data", {"task": "remove app-v0's data"})]]
        PLANS["cleanup_data"] = [
            [ToolCall("run_shell", {"command": "rm -rf /opt/app/releases/app-v0"})]
        ]
    stdout, intent = run_unmodified(
        governor,
        "smolagents",
        UNMODIFIED,
        tmp_path,
        OPENAI_BASE_URL=model.base_url,
        OPENAI_API_KEY="dummy",
    )
    assert stdout.startswith("manager done:") and "removed" in stdout, stdout

    sid = governor.session_with(intent)
    graph = governor.graph(sid, agents=2)
    assert parents(graph) == {
        ("manager", ""),
        ("cleanup_data", "manager"),
    }
    assert all(n["lineage"] == "governor" for n in graph["nodes"])
    commands = governor.commands(sid, count=1)
    assert [(c["agent_name"], c["command"], c["verified"]) for c in commands] == [
        ("cleanup_data", "rm -rf /opt/app/releases/app-v0", True)
    ]
    got = governor.decisions(sid)
    assert got[:2] == [("pre_handoff", "allow", ""), ("pre_handoff", "allow", "")]
    assert ("tool", "allow", "") in got


# == (e) uninstrument leaves no trace ==========================================================


def patched() -> dict[str, Any]:
    """Every attribute of the classes and the module the instrumentor patches."""
    owners: list[Any] = [MultiStepAgent, ToolCallingAgent, CodeAgent, Tool, code_executor]
    return {
        f"{getattr(o, '__name__', o)}.{name}": value
        for o in owners
        for name, value in vars(o).items()
    }


def test_uninstrument_puts_back_every_patched_attribute(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy()
    before = patched()
    app = build()
    tools = {n: dict(a.tools) for n, a in managed(app).items()}
    callbacks = {n: dict(a.step_callbacks._callbacks) for n, a in managed(app).items()}

    g = instrument()
    during = patched()
    changed = sorted(k for k in before if during[k] is not before[k])
    assert changed == [
        "MultiStepAgent.__call__",
        "MultiStepAgent._run_stream",
        "Tool.__call__",
        "smolagents.local_python_executor.ThreadPoolExecutor",
    ]
    app.manager.run(INTENT)
    assert span_names(g) == ALL_SPANS
    g.instrumentor.uninstrument()

    after = patched()
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    # the app's own objects were never touched
    for name, agent in managed(app).items():
        assert agent.tools == tools[name]
        assert all(agent.tools[t] is tools[name][t] for t in tools[name])
        assert dict(agent.step_callbacks._callbacks) == callbacks[name]
    # and nothing more is traced or governed
    g.exporter.clear()
    after_intent = f"after uninstrument ({secrets.token_hex(4)})"
    assert build().manager.run(after_intent).startswith("manager done:")
    assert g.spans() == []
    time.sleep(0.3)
    sessions = governor.get("/api/v1/sessions")["sessions"]
    assert [r for r in sessions if r["intent"] == after_intent] == []
    # instrumenting again works as the first time
    again = instrument()
    build().manager.run(INTENT)
    assert span_names(again) == ALL_SPANS


def managed(app: App) -> dict[str, MultiStepAgent]:
    return {
        "manager": app.manager,
        "cleanup_data": app.cleanup_data,
        "images": app.images,
        "auditor": app.auditor,
    }


# == (f) with OpenInference's instrumentor too =================================================


@pytest.mark.parametrize("first", ["openinference", "agentgov"])
def test_with_openinference_too_the_app_works_and_every_span_is_there(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI, first: str
) -> None:
    from openinference.instrumentation.smolagents import (
        SmolagentsInstrumentor as OpenInferenceInstrumentor,
    )

    governor.set_policy(tool_allowlist=[t for t in EVERY_TOOL if t != "run_shell"])
    before = patched()
    # the last one in goes out first, so each puts back what it found
    oi = OpenInferenceInstrumentor()
    with alongside(oi, first, instrument, uninstrument_both=True, collector=governor) as (
        g,
        oi_exporter,
    ):
        app = build()
        answer = app.manager.run(INTENT)
        assert answer.startswith("manager done:")
        assert {name for name, _ in app.executed} == {
            "list_deployments",
            "prune_images",
            "list_images",
        }
        assert g.stopped() == [("cleanup_data", "tool_not_allowed")]
        assert span_names(g) == [n for n in ALL_SPANS if n != "execute_tool run_shell"]
        lengths = chains(g.spans())
        assert lengths["execute_tool list_images"] == 3 and lengths["invoke_agent images"] == 2
        theirs = oi_exporter.get_finished_spans()
        kinds = Counter((s.attributes or {}).get("openinference.span.kind") for s in theirs)
        assert kinds["AGENT"] == 4  # OpenInference traced the same run
        assert {"TOOL", "LLM", "CHAIN"} <= set(kinds)
    each_agent_once(governor, g.spans())
    after = patched()
    assert all(after[k] is before[k] for k in before)


# == streamed runs, and a light import =========================================================


def test_a_streamed_run_is_traced_and_governed(
    governor: Governor, instrument: Callable[..., Governed], model: ScriptedOpenAI
) -> None:
    governor.set_policy(tool_allowlist=[t for t in EVERY_TOOL if t != "prune_images"])
    g = instrument()
    app = build()
    steps = []
    for step in app.manager.run(INTENT, stream=True):
        steps.append(step)
        # between the steps, the app's own code is not inside the agent's span or run
        assert current_lineage() is None
    assert isinstance(steps[-1], FinalAnswerStep)
    assert str(steps[-1].output).startswith("manager done:")
    assert "prune_images" not in {name for name, _ in app.executed}
    assert span_names(g) == [n for n in ALL_SPANS if n != "execute_tool prune_images"]
    assert g.stopped() == [("images", "tool_not_allowed")]
    assert ("tool", "stop", "tool_not_allowed") in governor.decisions(session_of(g))


def test_importing_the_instrumentor_loads_no_framework() -> None:
    assert loaded_by_importing("smolagents", "smolagents") == []
