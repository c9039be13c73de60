"""What the framework instrumentors' test modules share: a real collector process with API
keys and a policy file (:class:`Governor`, made by :func:`governor_fixture`), a scripted
model's agents following their plans (:func:`following`), one tracer
provider per module exporting to it and kept in memory (:func:`provider_fixture`), the
instrumentor under test with a governor client of its own (:func:`instrument_fixture`,
:class:`Governed`), a kill from another process through the ``agentgov kill`` CLI
(:class:`Kill`), a reviewer approving a pending call (:class:`Reviewer`), an unmodified
app run by ``opentelemetry-instrument`` through the installed entry point
(:func:`run_unmodified`), OpenInference's instrumentor side by side with agentgov's
(:func:`alongside`), and the check that importing an instrumentor loads no framework
(:func:`loaded_by_importing`).

A test module declares its fixtures with the factories::

    governor = governor_fixture("crewai")
    provider = provider_fixture("crewai-app")
    instrument = instrument_fixture(CrewAIInstrumentor)
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
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentgov.instrumentation import AsyncGovernorClient, GovernorClient, Stopped, current_lineage
from agentgov.instrumentation.frameworks import FRAMEWORKS
from tests.conftest import CollectorProcess, free_port, make_provider, wait_for
from tests.scripted_openai import Reply, ScriptedOpenAI, ToolCall, system_text

AGENT_KEY = "agent-" + secrets.token_hex(12)
REVIEWER_KEY = "review-" + secrets.token_hex(12)
ADMIN_KEY = "admin-" + secrets.token_hex(12)
KEYS = {
    "AGENTGOV_API_KEYS": f"bot:agent:{AGENT_KEY},rev:reviewer:{REVIEWER_KEY},ops:admin:{ADMIN_KEY}"
}
INTENT = "clean up old deployments"
#: the instrumentation scope of agentgov's own spans
SCOPE = "agentgov.instrumentation"
#: the third-party instrumentors' entry points (OpenInference's), kept out of the
#: ``opentelemetry-instrument`` runs
THIRD_PARTY = (
    "openai_agents",
    "langchain",
    "crewai",
    "smolagents",
    "autogen_agentchat",
    "pydantic_ai",
)

Provider = tuple[TracerProvider, InMemorySpanExporter]


# -- the collector ----------------------------------------------------------------------------


@dataclass
class Governor:
    """The collector process, its policy file, and what its API says (as a reviewer)."""

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

    def decisions(self, sid: str, count: int = 1) -> list[tuple[str, str, str]]:
        """The session's audited decisions (phase, outcome, reason), once ``count`` are
        stored."""

        def stored() -> Any:
            rows = self.get(f"/api/v1/sessions/{sid}/decisions")["decisions"]
            return len(rows) >= count and [(d["phase"], d["outcome"], d["reason"]) for d in rows]

        return list(wait_for(stored, timeout=30))

    def decided(self, sid: str, decision: tuple[str, str, str]) -> bool:
        """Whether the audit has ``decision`` (waiting for it to be stored)."""
        try:
            wait_for(lambda: decision in self.decisions(sid), timeout=10)
        except AssertionError:
            return False
        return True

    def arrived(self, node: dict[str, Any]) -> bool:
        """Whether a node of a session's graph has its span (the governor knows an agent
        before its span arrives)."""
        return bool(node["name"])

    def graph(self, sid: str, agents: int, tasks: int = 0) -> dict[str, Any]:
        """The session's graph once all ``agents`` are in it with their spans
        (:meth:`arrived`), and ``tasks`` of its edges with theirs."""

        def ready() -> Any:
            r = httpx.get(
                f"{self.url}/api/v1/sessions/{sid}/graph",
                headers={"Authorization": f"Bearer {REVIEWER_KEY}"},
                timeout=30,
            )
            graph = r.json() if r.status_code == 200 else {"nodes": [], "edges": []}
            nodes, edges = graph["nodes"], graph["edges"]
            named = len(nodes) == agents and all(self.arrived(n) for n in nodes)
            return named and sum(bool(e["task"]) for e in edges) >= tasks and graph

        return dict(wait_for(ready, timeout=30))

    def tree(self, sid: str, agents: int) -> set[tuple[str, str, int]]:
        """(agent, parent agent, depth) of every agent of the session's graph, each
        verified as the governor's."""
        nodes = self.graph(sid, agents)["nodes"]
        assert all(n["lineage"] == "governor" and n["verified"] for n in nodes), nodes
        return set(tree(nodes))

    def commands(self, sid: str, count: int) -> list[dict[str, Any]]:
        """The session's audited tool calls, once all ``count`` arrived."""

        def arrived() -> Any:
            rows = self.get(f"/api/v1/sessions/{sid}/audit")["commands"]
            return len(rows) == count and rows

        return list(wait_for(arrived, timeout=30))

    def audited(self, sid: str, count: int) -> set[tuple[str, str, str, tuple[str, ...]]]:
        """(agent, tool, command, resources) of the session's ``count`` audited tool calls,
        each verified."""
        rows = self.commands(sid, count)
        assert all(c["verified"] for c in rows), rows
        return audited(rows)

    def session_with(self, intent: str) -> str:
        """The session whose intent is ``intent``, once listed."""

        def listed() -> Any:
            rows = self.get("/api/v1/sessions")["sessions"]
            return next((r["session_id"] for r in rows if r["intent"] == intent), None)

        return str(wait_for(listed, timeout=30))

    def pending(self, tool: str) -> list[dict[str, Any]]:
        """The approvals pending for calls of ``tool``."""
        rows = self.get("/api/v1/approvals", status="pending")["approvals"]
        return [a for a in rows if a["request"].get("tool") == tool]

    def approve(self, approval_id: str, comment: str) -> int:
        """Approve as the reviewer; the answer's status."""
        r = httpx.post(
            f"{self.url}/api/v1/approvals/{approval_id}/approve",
            json={"comment": comment},
            headers={"Authorization": f"Bearer {REVIEWER_KEY}"},
        )
        return r.status_code


def governor_fixture(name: str, cls: type[Governor] = Governor) -> Any:
    """The module's collector (a fixture): API keys on, a policy file it reloads."""

    @pytest.fixture(scope="module")
    def governor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Governor]:
        base = tmp_path_factory.mktemp(name)
        policy = base / "policy.yaml"
        policy.write_text("multi_agent: {}\n")
        c = CollectorProcess(base / "data", free_port(), free_port()).start(
            ("--policy", str(policy)), env=KEYS
        )
        yield cls(c, policy)
        c.stop()

    return governor


def tree(nodes: Sequence[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """(agent, parent agent, depth) of each node of a session's graph, in its order."""
    names = {n["id"]: n["name"] for n in nodes}
    return [(n["name"], names.get(n["parent_id"], ""), n["depth"]) for n in nodes]


def parents(graph: dict[str, Any]) -> set[tuple[str, str]]:
    """(agent, parent agent) of the nodes of a session's graph."""
    return {(name, parent) for name, parent, _ in tree(graph["nodes"])}


def links(graph: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(delegating agent, delegated agent, task) of each edge of a session's graph, in its
    order."""
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    return [(names[e["source"]], names[e["target"]], e["task"]) for e in graph["edges"]]


def audited(rows: list[dict[str, Any]]) -> set[tuple[str, str, str, tuple[str, ...]]]:
    """(agent, tool, command, resources) of each audited tool call."""
    return {(c["agent_name"], c["tool"], c["command"], tuple(c["resources"])) for c in rows}


# -- the scripted model ------------------------------------------------------------------------


def agent_of(request: dict[str, Any]) -> str:
    """The agent a model request is made for (its system prompt says ``You are <agent>.``),
    else ``?``."""
    match = re.search(r"You are (\w+)\.", system_text(request))
    return match.group(1) if match else "?"


def asked(server: ScriptedOpenAI, agent: str) -> list[dict[str, Any]]:
    """The model requests made for ``agent``."""
    return [r for r in server.requests if f"You are {agent}." in system_text(r)]


def following(plans: Mapping[str, list[ToolCall]]) -> Callable[[dict[str, Any]], Reply]:
    """A scripted model's script: each agent calls the tools of its plan (``plans``, read
    at each request) that it has not called yet, in order; then it answers with what its
    tools said."""

    def script(request: dict[str, Any]) -> Reply:
        agent = agent_of(request)
        called = {
            (c.get("function") or c).get("name")
            for m in request.get("messages", [])
            for c in m.get("tool_calls") or []
        }
        for step in plans.get(agent, []):
            if step.name not in called:
                return Reply(tool_calls=[step])
        seen = [str(m.get("content")) for m in request["messages"] if m.get("role") == "tool"]
        return Reply(f"{agent} done: " + " | ".join(seen))

    return script


# -- the instrumentor under test --------------------------------------------------------------


def provider_fixture(service: str) -> Any:
    """One tracer provider for the module (a fixture): exporting to the collector, and kept
    in memory for each test to read what was exported."""

    @pytest.fixture(scope="module")
    def provider(governor: Governor) -> Iterator[Provider]:
        provider = make_provider(
            governor.url, service=service, api_key=AGENT_KEY, schedule_delay_millis=50
        )
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        yield provider, exporter
        provider.shutdown()

    return provider


@dataclass
class Governed:
    """An instrumentor instrumented for a test, with its governor client and the stops its
    ``on_stop`` hook saw (unless the test gave a hook of its own)."""

    instrumentor: Any
    exporter: InMemorySpanExporter
    client: GovernorClient
    stops: list[tuple[Any, Stopped]]
    #: only agentgov's own spans count (the framework exports its own to the same provider)
    only_ours: bool = False

    def spans(self) -> list[ReadableSpan]:
        spans = self.exporter.get_finished_spans()
        if self.only_ours:
            return [
                s
                for s in spans
                if s.instrumentation_scope is not None and s.instrumentation_scope.name == SCOPE
            ]
        return list(spans)

    def names(self) -> list[str]:
        return sorted(s.name for s in self.spans())

    def session(self) -> str:
        """The one session of every span exported."""
        spans = self.spans()
        sids = {s.attributes.get("agentgov.session.id") for s in spans if s.attributes is not None}
        assert len(sids) == 1, sids
        return str(next(iter(sids)))

    def stopped(self) -> list[tuple[str, str]]:
        """(agent, reason) of each stop the hook saw."""
        return [(agent.name, stop.reason) for agent, stop in self.stops]


def session_of(g: Governed) -> str:
    return g.session()


def instrument_fixture(
    instrumentor: type[Any],
    client: type[GovernorClient] = AsyncGovernorClient,
    only_ours: bool = False,
) -> Any:
    """A fixture that instruments the framework (``instrument(**options)``, any number of
    times in a test; ``provider=``: another tracer provider) and uninstruments it after."""

    @pytest.fixture
    def instrument(governor: Governor, provider: Provider) -> Iterator[Callable[..., Governed]]:
        made: list[Governed] = []
        tracer_provider, exporter = provider

        def make(provider: TracerProvider | None = None, **options: Any) -> Governed:
            exporter.clear()
            governed_by = client(governor.url, api_key=AGENT_KEY, approval_timeout=20)
            stops: list[tuple[Any, Stopped]] = []
            options.setdefault("on_stop", lambda agent, stop: stops.append((agent, stop)))
            inst = instrumentor()
            inst.instrument(
                tracer_provider=provider or tracer_provider, governor=governed_by, **options
            )
            made.append(Governed(inst, exporter, governed_by, stops, only_ours))
            return made[-1]

        yield make
        for g in made:
            if g.instrumentor.is_instrumented_by_opentelemetry:
                g.instrumentor.uninstrument()
            g.client.close()

    return instrument


def usage(spans: Sequence[ReadableSpan]) -> dict[str, tuple[Any, Any]]:
    """The input and output tokens on each agent's span, by span name."""
    return {
        s.name: (a.get("gen_ai.usage.input_tokens"), a.get("gen_ai.usage.output_tokens"))
        for s in spans
        if (a := s.attributes) is not None and s.name.startswith("invoke_agent")
    }


def chains(spans: Sequence[ReadableSpan]) -> dict[str, int]:
    """The delegation chain's length on each span that has one, by span name."""
    return {
        s.name: len(s.attributes["agentgov.delegation.chain"])  # type: ignore[arg-type]
        for s in spans
        if s.attributes and "agentgov.delegation.chain" in s.attributes
    }


# -- a kill from another process, a reviewer ------------------------------------------------------


class Kill:
    """A kill of the running session with ``agentgov kill`` (another process, ``--wait``:
    until the agents running here acknowledged it), made from inside an agent's step (a
    tool, in its agent's context) by :meth:`now` (:meth:`anow` in a coroutine), whatever
    the step passes it. What it saw: :attr:`sid`, the session; :attr:`asked_before`, the
    model requests made until then (``asked()``); :attr:`cli`, the command's outcome."""

    def __init__(self, url: str, asked: Callable[[], int]) -> None:
        self.url = url
        self.asked = asked
        self.sid = ""
        self.asked_before = -1
        self.cli: subprocess.CompletedProcess[str] | None = None

    @property
    def done(self) -> bool:
        return bool(self.sid)

    def _command(self) -> list[str]:
        lineage = current_lineage()
        assert lineage is not None
        self.sid = lineage.session_id
        self.asked_before = self.asked()
        return [
            *(sys.executable, "-m", "agentgov.collector.cli", "kill", self.sid),
            *("--reason", "wrong environment", "--wait", "10", "--json", "--url", self.url),
        ]

    def now(self, *_: Any) -> None:
        self.cli = subprocess.run(
            self._command(),
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "AGENTGOV_API_KEY": ADMIN_KEY},
        )

    async def anow(self, *_: Any) -> None:
        """:meth:`now` without holding the event loop."""
        command = self._command()
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "AGENTGOV_API_KEY": ADMIN_KEY},
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        self.cli = subprocess.CompletedProcess(command, proc.returncode, out.decode(), err.decode())

    def acknowledged(self) -> list[dict[str, Any]]:
        """The agents that were running when the kill arrived, as the CLI's answer says,
        once it said that each of them acknowledged the kill."""
        cli = self.cli
        assert cli is not None, "no kill was made"
        assert cli.returncode == 0, (cli.stdout, cli.stderr)
        answer = json.loads(cli.stdout)
        running = [a for a in answer["agents"] if a["running_at_kill"]]
        assert all(a["acknowledged"] for a in running), running
        return running


def with_heartbeat(main: Callable[[], Awaitable[Any]]) -> tuple[Any, list[float]]:
    """Run ``main()`` on a new event loop with a task of the same loop noting the time
    every 20 ms: its result, and those times (gaps in them: the loop was held)."""
    ticks: list[float] = []

    async def beating() -> Any:
        async def heartbeat() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.02)

        beat = asyncio.create_task(heartbeat())
        try:
            return await main()
        finally:
            beat.cancel()

    return asyncio.run(beating()), ticks


class Reviewer:
    """A reviewer in another thread: approves the one call of ``tool`` that comes to wait
    for approval after it was made, ``hold`` seconds after it found it (the run waits
    meanwhile)."""

    def __init__(
        self,
        governor: Governor,
        tool: str = "run_shell",
        comment: str = "old release, fine",
        hold: float = 0.0,
    ) -> None:
        self.governor = governor
        self.tool = tool
        self.comment = comment
        self.hold = hold
        #: the status of each approval's answer
        self.reviewed: list[int] = []
        #: when the approval was found, and when it was answered
        self.window: list[float] = []
        #: other runs' requests, left pending
        self._earlier = {a["approval_id"] for a in governor.pending(tool)}
        self._thread = threading.Thread(target=self._review)

    def start(self) -> Reviewer:
        self._thread.start()
        return self

    def join(self, timeout: float = 30) -> list[int]:
        self._thread.join(timeout)
        return self.reviewed

    def _review(self) -> None:
        (approval,) = wait_for(
            lambda: [
                a for a in self.governor.pending(self.tool) if a["approval_id"] not in self._earlier
            ],
            timeout=20,
        )
        self.window.append(time.monotonic())
        time.sleep(self.hold)
        self.window.append(time.monotonic())
        self.reviewed.append(self.governor.approve(approval["approval_id"], self.comment))


# -- opentelemetry-instrument, OpenInference, a light import ----------------------------------


def entry_point(framework: str) -> str:
    """The name of agentgov's ``opentelemetry_instrumentor`` entry point for ``framework``."""
    module, _ = FRAMEWORKS[framework]
    return "agentgov_" + module.rsplit(".", 1)[1]


def run_unmodified(
    governor: Governor,
    framework: str,
    source: str,
    tmp_path: Path,
    *args: str,
    service: str = "unmodified-app",
    **env: str,
) -> tuple[str, str]:
    """Run the app ``source`` unmodified under ``opentelemetry-instrument``, exporting to
    and governed by ``governor`` through agentgov's installed entry point for ``framework``
    (every other instrumentor kept out: each would import its framework), with a new intent
    as its first argument and ``args`` after it, ``env`` added to its environment. Its
    output, and the intent."""
    own = entry_point(framework)
    installed = {ep.name for ep in entry_points(group="opentelemetry_instrumentor")}
    assert own in installed, f"the {own} entry point is not installed: install the workspace"
    others = [*THIRD_PARTY, *(e for e in map(entry_point, FRAMEWORKS) if e != own)]
    app = tmp_path / "app.py"
    app.write_text(source)
    intent = f"{INTENT} ({secrets.token_hex(4)})"
    environ = {
        **os.environ,
        "OTEL_SERVICE_NAME": service,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": governor.url,
        "OTEL_EXPORTER_OTLP_HEADERS": f"Authorization=Bearer%20{AGENT_KEY}",
        "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": ",".join(others),
        "AGENTGOV_URL": governor.url,
        "AGENTGOV_API_KEY": AGENT_KEY,
        **env,
    }
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(
        [str(bin_dir / "opentelemetry-instrument"), sys.executable, str(app), intent, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, intent


@contextmanager
def alongside(
    openinference: Any,
    first: str,
    instrument: Callable[[], Governed],
    uninstrument_both: bool = False,
    collector: Governor | None = None,
) -> Iterator[tuple[Governed, InMemorySpanExporter]]:
    """agentgov's instrumentor and OpenInference's ``openinference`` (exporting to a
    provider of its own, kept in memory and, given a ``collector``, sent to it as an app
    running both would), instrumented in the order ``first`` says (``openinference`` or
    ``agentgov``); OpenInference's is uninstrumented at the end (and, ``uninstrument_both``,
    agentgov's too, the last one in going out first)."""
    exporter = InMemorySpanExporter()
    provider = (
        make_provider(
            collector.url, service="openinference-app", api_key=AGENT_KEY, schedule_delay_millis=50
        )
        if collector is not None
        else TracerProvider()
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    g: Governed | None = None
    try:
        if first == "openinference":
            openinference.instrument(tracer_provider=provider)
            g = instrument()
        else:
            g = instrument()
            openinference.instrument(tracer_provider=provider)
        yield g, exporter
    finally:
        ours = g.instrumentor if uninstrument_both and g is not None else None
        if ours is not None and first == "openinference":
            ours.uninstrument()
        openinference.uninstrument()
        if ours is not None and first != "openinference":
            ours.uninstrument()
        provider.shutdown()


def each_agent_once(governor: Governor, ours: Sequence[ReadableSpan]) -> None:
    """The session of agentgov's spans ``ours``, once OpenInference's spans of the same run
    are stored and resolved too: its graph has each agent agentgov traced exactly once,
    every node the governor's (none made of OpenInference's spans alone) and none
    contradicted by what OpenInference's spans say; and each tool call agentgov traced is
    in the audit once, not once per instrumentation."""
    sids = {(s.attributes or {}).get("agentgov.session.id") for s in ours}
    assert len(sids) == 1, sids
    sid = str(next(iter(sids)))
    agents = {
        (s.attributes or {}).get("gen_ai.agent.id"): s.name.removeprefix("invoke_agent ")
        for s in ours
        if s.name.startswith("invoke_agent ")
    }
    expected = sorted(agents.values())

    seen: list[Any] = []

    def settled() -> Any:
        seen[:] = governor.get(f"/api/v1/sessions/{sid}/graph")["nodes"]
        return sorted(n["name"] for n in seen) == expected and list(seen)

    try:
        wait_for(settled, timeout=30)
    except AssertionError:
        raise AssertionError(f"not each of {expected} once: {seen}") from None
    # foreign spans are resolved in groups once their trace is quiet (at most 2 s after a
    # change): wait out a resolution round, then the graph must still show each agent once
    time.sleep(2.5)
    nodes = wait_for(settled, timeout=10)
    assert all(n["lineage"] == "governor" and n["verified"] for n in nodes), nodes
    assert not [n["name"] for n in nodes if n["contradicted"]], nodes
    traced = Counter(
        str((s.attributes or {}).get("gen_ai.tool.name"))
        for s in ours
        if s.name.startswith("execute_tool ")
    )
    audited = Counter(c["tool"] for c in governor.get(f"/api/v1/sessions/{sid}/audit")["commands"])
    assert traced and {t: audited[t] for t in traced} == dict(traced), (traced, audited)


def span_kinds(spans: Sequence[ReadableSpan]) -> set[Any]:
    """OpenInference's span kinds among ``spans``."""
    return {(s.attributes or {}).get("openinference.span.kind") for s in spans}


def loaded_by_importing(framework: str, *prefixes: str) -> list[str]:
    """The modules named with one of ``prefixes`` that a fresh interpreter has loaded once
    it imported agentgov's instrumentor for ``framework`` and made one."""
    module, name = FRAMEWORKS[framework]
    code = (
        "import json, sys\n"
        f"import {module} as m\n"
        f"assert m.{name}().instrumentation_dependencies()\n"
        f"print(json.dumps(sorted(n for n in sys.modules if n.startswith({prefixes!r}))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))
