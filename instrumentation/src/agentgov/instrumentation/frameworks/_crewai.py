"""The CrewAI side of :class:`CrewAIInstrumentor` (imports CrewAI).

Four methods of CrewAI's classes are replaced while instrumented, and restored exactly:

- ``Crew.kickoff`` and ``Crew.akickoff``: a kickoff outside any agentgov agent is the root of
  a session (intent: its inputs); its root agent is the crew's orchestrator: the manager of
  a hierarchical crew, or, in a sequential crew, an agent named after the crew, which
  assigns each task;
- ``Agent.execute_task`` and ``Agent.aexecute_task``: every execution of a task runs in its
  agent's span: a task the crew assigns is a delegation by the root agent (decided first),
  a coworker's execution takes the delegation its manager's tool call was allowed, and an
  agent's task run outside any crew is a run of its own.

Inside each execution, CrewAI's execution-scoped hooks (``crewai.hooks.dispatch``) decide
every tool call before it runs: a call of a delegation tool ("Delegate work to coworker",
"Ask question to coworker") is a delegation to the coworker it names, any other call an
``execute_tool`` span; a stop blocks the call, CrewAI's own way of refusing one, and the
model is told the reason as the call's result. Before each model call a killed session's
run stops, and the model's token usage goes to the agent that made the call.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from crewai import Agent, Crew, Process, Task
from crewai.agents.agent_builder.base_agent import BaseAgent
from crewai.hooks import HookAborted, InterceptionPoint
from crewai.hooks.dispatch import get_scoped_hooks, scoped_hooks
from crewai.tools.agent_tools.base_agent_tools import BaseAgentTool
from crewai.utilities.i18n import I18N_DEFAULT, get_i18n
from opentelemetry import context as otel_context

from agentgov.instrumentation.frameworks._runtime import (
    MISSING,
    Run,
    Runtime,
    ends_session,
    framework_error,
    put_back,
    release,
    stop_message,
)
from agentgov.instrumentation.governor import SessionKilled, Stopped
from agentgov.instrumentation.lineage import current_lineage
from agentgov.instrumentation.spans import AgentSpan, ToolSpan

log = logging.getLogger("agentgov.instrumentation.frameworks.crewai")

#: the longest task text the governor takes with a delegation
TASK_LIMIT = 1000


class StoppedByGovernor(Stopped, HookAborted):
    """The governor's stop, raised inside a CrewAI run: an agentgov
    :class:`~agentgov.instrumentation.governor.Stopped` that is also CrewAI's own
    ``HookAborted``, so CrewAI neither retries the execution nor wraps the error."""

    #: who aborted, as CrewAI's hook dispatch reports it
    source: Any = "agentgov"


class SessionKilledByGovernor(SessionKilled, HookAborted):
    """A session kill, raised inside a CrewAI run (see :class:`StoppedByGovernor`)."""

    source: Any = "agentgov"


def crew_error(stop: Stopped) -> Stopped:
    """``stop`` as an exception CrewAI passes on unchanged (same message and fields)."""
    return framework_error(stop, StoppedByGovernor, SessionKilledByGovernor)


def _clip(text: str) -> str:
    return text[:TASK_LIMIT]


# -- what the run knows ---------------------------------------------------------------------


class _Governed:
    """One governed run (a crew's kickoff, or an agent's task outside any crew), and the
    agent id each delegation gave a CrewAI agent: the same agent delegated to again by the
    same agent is the same agentgov agent (the governor's re-delegation)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self._ids: dict[tuple[str, int], str] = {}
        #: the agents keyed by identity, held so an id is not reused while the run lasts
        self._held: list[object] = []
        self._lock = threading.Lock()

    def _known(self, source: AgentSpan, target: object) -> str | None:
        with self._lock:
            return self._ids.get((source.agent_id, id(target)))

    def _took(self, source: AgentSpan, target: object, child: AgentSpan) -> AgentSpan:
        with self._lock:
            key = (source.agent_id, id(target))
            if key not in self._ids:
                self._ids[key] = child.agent_id
                self._held.append(target)
        return child

    def delegate(self, source: AgentSpan, target: Any, task: str, content: str) -> AgentSpan:
        """Decide a delegation by ``source`` to the CrewAI agent ``target`` (a stop raises,
        after it was noted in the run); ``content`` goes as a message (digest and score)."""
        known = self._known(source, target)
        child = self.run.delegate(
            source, str(target.role), _clip(task), agent_id=known, message=content
        )
        return self._took(source, target, child)

    async def adelegate(self, source: AgentSpan, target: Any, task: str, content: str) -> AgentSpan:
        """:meth:`delegate`, decided without holding the event loop."""
        known = self._known(source, target)
        child = await self.run.adelegate(
            source, str(target.role), _clip(task), agent_id=known, message=content
        )
        return self._took(source, target, child)


@dataclass
class _CrewRun:
    """A kickoff in progress: the crew, its governed run, and its root agent."""

    crew: Any
    governed: _Governed
    root: AgentSpan

    @property
    def hierarchical(self) -> bool:
        return bool(self.crew.process == Process.hierarchical)

    def assigns(self, task: object) -> bool:
        """Whether ``task`` is one of the crew's own tasks (not a coworker's request)."""
        return any(t is task for t in self.crew.tasks)


class _Meter:
    """The token counters of one LLM object, read around the governed calls of it.

    CrewAI counts an LLM's tokens on the LLM object, which agents may share, and its hooks
    do not tell a call's own usage. So each call is measured from a cursor on the
    counters: while no governed call of the LLM is in flight the cursor follows the
    counters (what others spent is nobody's here); a call's end counts what the counters
    grew since the cursor and moves it on. Calls of one LLM made one after another each
    get exactly their own tokens; calls at the same time never count a token twice,
    though one of them may get the other's.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cursor: Any = None
        self._open = 0

    def start(self, llm: Any) -> None:
        with self._lock:
            if self._open == 0:
                self._cursor = llm.get_token_usage_summary()
            self._open += 1

    def stop(self, llm: Any) -> tuple[int, int]:
        """The input and output tokens counted since the cursor."""
        with self._lock:
            now = llm.get_token_usage_summary()
            used = now.delta_since(self._cursor) if self._cursor is not None else None
            self._cursor = now
            self._open = max(0, self._open - 1)
        if used is None:
            return 0, 0
        return int(used.prompt_tokens), int(used.completion_tokens)


#: the meter of each LLM object (by identity, for as long as the object lives)
_METERS: dict[int, tuple[weakref.ref[Any], _Meter]] = {}
_METERS_LOCK = threading.Lock()


def _meter_of(llm: Any) -> _Meter | None:
    if not callable(getattr(llm, "get_token_usage_summary", None)):
        return None
    key = id(llm)
    with _METERS_LOCK:
        entry = _METERS.get(key)
        if entry is not None and entry[0]() is llm:
            return entry[1]

        def forget(ref: weakref.ref[Any]) -> None:
            with _METERS_LOCK:
                if _METERS.get(key, (None,))[0] is ref:
                    del _METERS[key]

        meter = _Meter()
        _METERS[key] = (weakref.ref(llm, forget), meter)
        return meter


class _Execution:
    """One agent executing one task, in ``span``; counts the usage of its model calls."""

    def __init__(self, governed: _Governed, span: AgentSpan, agent: Any, task: Any) -> None:
        self.governed = governed
        self.span = span
        self.agent = agent
        self.task = task
        self._lock = threading.Lock()
        #: the LLM of the model call in progress, and its meter
        self._pending: tuple[Any, _Meter] | None = None

    def before_model_call(self, llm: Any) -> None:
        meter = _meter_of(llm)
        if meter is not None:
            meter.start(llm)
        with self._lock:
            self._pending = (llm, meter) if meter is not None else None

    def settle(self) -> None:
        """Count the model call that ended since :meth:`before_model_call`: the agent's
        next step (a tool call, the next model call, the end) comes after it, and a
        coworker's calls only happen inside a tool call."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        llm, meter = pending
        input_tokens, output_tokens = meter.stop(llm)
        if input_tokens or output_tokens:
            self.span.usage(input_tokens=input_tokens, output_tokens=output_tokens)


@dataclass
class _Delegation:
    """A coworker's execution the governor allowed: ``child`` is the coworker's span."""

    target: Any
    child: AgentSpan
    started: bool = False
    #: the stop that ended the coworker's execution (CrewAI turns it into the tool's text)
    stop: Stopped | None = None


@dataclass
class _Call:
    """A tool call between its before- and after-hook (both run in its context)."""

    source: _Execution
    tool: ToolSpan | None = None
    delegation: _Delegation | None = None
    stop: Stopped | None = None
    #: the coworker's task and context, when the call delegates
    task: str = ""
    context: str = ""
    delegating: bool = False
    #: the agent the app's ``on_stop`` gave to do a stopped delegation's work itself
    stand_in: Any = None


_CREW: ContextVar[_CrewRun | None] = ContextVar("agentgov_crewai_crew", default=None)
_EXEC: ContextVar[_Execution | None] = ContextVar("agentgov_crewai_execution", default=None)
_CALL: ContextVar[_Call | None] = ContextVar("agentgov_crewai_call", default=None)


# -- what a run is about --------------------------------------------------------------------


def input_of(crew: Any, inputs: Any) -> str:
    """What a kickoff is asked: its one text input, or all its inputs as JSON. Without
    inputs, the crew's first task when the kickoff is a session's root (its intent); ""
    when it is an agent's delegation, which then gives the crew no task of its own (the
    crew's first task is the one the crew hands on, and the governor lets one agent at a
    time own a task)."""
    if isinstance(inputs, Mapping) and inputs:
        if len(inputs) == 1:
            (only,) = inputs.values()
            if isinstance(only, str) and only:
                return only
        return json.dumps(dict(inputs), sort_keys=True, default=str)
    lineage = current_lineage()
    if lineage is not None and lineage.agent_id:
        return ""
    tasks = getattr(crew, "tasks", None) or []
    return str(getattr(tasks[0], "description", "") or "") if tasks else ""


def root_name(crew: Any) -> str:
    """The name of a kickoff's root agent: the manager of a hierarchical crew (CrewAI's own
    "Crew Manager" when it makes one), else the crew's name."""
    if crew.process == Process.hierarchical:
        manager = getattr(crew, "manager_agent", None)
        if manager is not None:
            return str(manager.role)
        role = get_i18n(prompt_file=crew.prompt_file).retrieve("hierarchical_manager_agent", "role")
        return str(role)
    return str(getattr(crew, "name", None) or "crew")


def _content(task: str, context: str | None) -> str:
    """What a delegation sends its target: the task, and the context it comes with."""
    return f"{task}\n\n{context}" if context else task


def coworker_of(call: Any) -> tuple[Any, str, str] | None:
    """The coworker a delegation tool's call names (CrewAI's own matching of roles: case,
    spaces and quotes ignored, the first of a list), with its task and context; None for
    any other tool, or a coworker the tool does not know (the tool then says so)."""
    tool = getattr(getattr(call, "tool", None), "_original_tool", None)
    if not isinstance(tool, BaseAgentTool):
        return None
    args = call.tool_input if isinstance(call.tool_input, Mapping) else {}
    name = args.get("coworker") or args.get("co_worker")
    if not isinstance(name, str):
        return None
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1].split(",")[0]
    wanted = tool.sanitize_agent_name(name)
    target = next((a for a in tool.agents if tool.sanitize_agent_name(a.role) == wanted), None)
    if target is None:
        return None
    task = args.get("task") or args.get("question") or ""
    context = args.get("context") or ""
    return target, str(task), str(context)


# -- the patch ------------------------------------------------------------------------------


class Patch:
    """The CrewAI attributes replaced while instrumented; :meth:`remove` puts back the
    originals (the very objects, own or inherited as they were)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.active = False
        self._kickoff_of = Crew.kickoff
        self._akickoff_of = Crew.akickoff
        self._execute_of = Agent.execute_task
        self._aexecute_of = Agent.aexecute_task
        patch = self

        @functools.wraps(self._kickoff_of)
        def kickoff(crew: Any, *args: Any, **kwargs: Any) -> Any:
            return patch.kickoff(crew, args, kwargs)

        @functools.wraps(self._akickoff_of)
        async def akickoff(crew: Any, *args: Any, **kwargs: Any) -> Any:
            return await patch.akickoff(crew, args, kwargs)

        @functools.wraps(self._execute_of)
        def execute_task(
            agent: Any, task: Any, context: str | None = None, tools: Any = None
        ) -> Any:
            return patch.execute(agent, task, context, tools)

        @functools.wraps(self._aexecute_of)
        async def aexecute_task(
            agent: Any, task: Any, context: str | None = None, tools: Any = None
        ) -> Any:
            return await patch.aexecute(agent, task, context, tools)

        #: (class, attribute, what its own dictionary held, replacement)
        self.patched: list[tuple[type, str, Any, Any]] = [
            (Crew, "kickoff", Crew.__dict__.get("kickoff", MISSING), kickoff),
            (Crew, "akickoff", Crew.__dict__.get("akickoff", MISSING), akickoff),
            (Agent, "execute_task", Agent.__dict__.get("execute_task", MISSING), execute_task),
            (
                Agent,
                "aexecute_task",
                Agent.__dict__.get("aexecute_task", MISSING),
                aexecute_task,
            ),
        ]
        #: this patch's hooks, by interception point (added to each execution's scope)
        self.hooks: dict[InterceptionPoint, Callable[[Any], Any]] = {
            InterceptionPoint.PRE_TOOL_CALL: self.before_tool_call,
            InterceptionPoint.POST_TOOL_CALL: self.after_tool_call,
            InterceptionPoint.PRE_MODEL_CALL: self.before_model_call,
            InterceptionPoint.POST_MODEL_CALL: self.after_model_call,
        }

    def install(self) -> None:
        for cls, name, _, replacement in self.patched:
            setattr(cls, name, replacement)
        self.active = True

    def remove(self) -> None:
        """Put back every original; an attribute someone replaced after us stays theirs
        (our replacement, if they wrapped it, then passes every call through)."""
        self.active = False
        for cls, name, original, replacement in self.patched:
            put_back(cls, name, original, replacement)

    @contextmanager
    def _hooks_in_scope(self) -> Iterator[None]:
        """This patch's hooks in the current execution scope (once: a coworker's execution
        inside its manager's scope finds them there already)."""
        scope = {point: get_scoped_hooks(point) for point in InterceptionPoint}
        if all(hook in scope[point] for point, hook in self.hooks.items()):
            yield
            return
        for point, hook in self.hooks.items():
            if hook not in scope[point]:
                scope[point].append(hook)
        with scoped_hooks(scope):
            yield

    # -- kickoffs -------------------------------------------------------------------------

    @staticmethod
    def _inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return kwargs["inputs"] if "inputs" in kwargs else (args[0] if args else None)

    def _passes(self, crew: Any, kwargs: dict[str, Any]) -> bool:
        # a streamed kickoff runs a plain one for the stream (governed then); a resumed
        # one calls kickoff again on the restored crew
        return (
            not self.active
            or bool(getattr(crew, "stream", False))
            or kwargs.get("from_checkpoint") is not None
        )

    @classmethod
    def _root(cls, crew: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """What a kickoff's run opens with: its root agent, intent and workflow."""
        hierarchical = crew.process == Process.hierarchical
        return {
            "agent_name": root_name(crew),
            "input_text": _clip(input_of(crew, cls._inputs(args, kwargs))),
            "workflow_name": str(getattr(crew, "name", None) or "crew"),
            "framework_agent": crew.manager_agent if hierarchical else crew,
        }

    @contextmanager
    def _kicked_off(self, crew: Any, run: Run) -> Iterator[None]:
        """The kickoff's context: its crew run, its root agent's span and lineage (so that
        anything CrewAI runs between tasks is the root's), no execution or call yet."""
        assert run.first is not None
        tokens = (
            _CREW.set(_CrewRun(crew, _Governed(run), run.first)),
            _EXEC.set(None),
            _CALL.set(None),
        )
        ctx = otel_context.attach(run.first.context)
        try:
            yield
        finally:
            otel_context.detach(ctx)
            _CALL.reset(tokens[2])
            _EXEC.reset(tokens[1])
            _CREW.reset(tokens[0])

    def kickoff(self, crew: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._passes(crew, kwargs):
            return self._kickoff_of(crew, *args, **kwargs)
        try:
            run = self.runtime.open_run(**self._root(crew, args, kwargs))
        except Stopped as stop:
            raise crew_error(stop) from None
        error: BaseException | None = None
        try:
            with self._kicked_off(crew, run):
                return self._kickoff_of(crew, *args, **kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            run.close(error)

    async def akickoff(self, crew: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._passes(crew, kwargs):
            return await self._akickoff_of(crew, *args, **kwargs)
        try:
            run = await self.runtime.aopen_run(**self._root(crew, args, kwargs))
        except Stopped as stop:
            raise crew_error(stop) from None
        error: BaseException | None = None
        try:
            with self._kicked_off(crew, run):
                return await self._akickoff_of(crew, *args, **kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            await run.aclose(error)

    # -- executions -----------------------------------------------------------------------

    @contextmanager
    def _executing(
        self, governed: _Governed, span: AgentSpan, agent: Any, task: Any
    ) -> Iterator[None]:
        """An execution's context: its span and lineage, this patch's hooks, no tool call
        yet (the caller's is not this execution's); its last model call counted at the
        end."""
        execution = _Execution(governed, span, agent, task)
        exec_token = _EXEC.set(execution)
        call_token = _CALL.set(None)
        ctx_token = otel_context.attach(span.context)
        try:
            with self._hooks_in_scope():
                yield
        finally:
            try:
                execution.settle()
            finally:
                otel_context.detach(ctx_token)
                _CALL.reset(call_token)
                _EXEC.reset(exec_token)

    def _within(
        self,
        governed: _Governed,
        span: AgentSpan,
        agent: Any,
        task: Any,
        args: tuple[Any, ...],
        ends: bool,
    ) -> Any:
        """Run ``agent``'s execution of ``task`` in ``span`` (ending it when ``ends``)."""
        error: BaseException | None = None
        try:
            with self._executing(governed, span, agent, task):
                return self._execute_of(agent, task, *args)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if ends:
                span.end(error)

    async def _awithin(
        self,
        governed: _Governed,
        span: AgentSpan,
        agent: Any,
        task: Any,
        args: tuple[Any, ...],
        ends: bool,
    ) -> Any:
        """:meth:`_within` for ``aexecute_task``."""
        error: BaseException | None = None
        try:
            with self._executing(governed, span, agent, task):
                return await self._aexecute_of(agent, task, *args)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if ends:
                await span.aend(error)

    @staticmethod
    def _retrying(agent: Any, task: Any) -> bool:
        # CrewAI retries a failed execution by calling execute_task again, inside it
        current = _EXEC.get()
        return current is not None and current.agent is agent and current.task is task

    def execute(self, agent: Any, task: Any, context: str | None, tools: Any) -> Any:
        args = (context, tools)
        if not self.active or self._retrying(agent, task):
            return self._execute_of(agent, task, *args)
        call = _CALL.get()
        if call is not None:
            delegation = call.delegation
            if delegation is not None and delegation.target is agent and not delegation.started:
                delegation.started = True
                return self._delegated(call, delegation, agent, task, args)
            if call.stand_in is not None and call.stand_in is agent:
                call.stand_in = None
                # constrained mode: the app's agent does the work as the delegating agent
                source = call.source
                source.governed.run.bind(agent, source.span)
                return self._within(source.governed, source.span, agent, task, args, False)
        crew = _CREW.get()
        if crew is not None and crew.assigns(task):
            return self._assigned(crew, agent, task, args)
        return self._standalone(agent, task, args)

    async def aexecute(self, agent: Any, task: Any, context: str | None, tools: Any) -> Any:
        args = (context, tools)
        if not self.active or self._retrying(agent, task):
            return await self._aexecute_of(agent, task, *args)
        crew = _CREW.get()
        if crew is not None and crew.assigns(task):
            return await self._aassigned(crew, agent, task, args)
        return await self._astandalone(agent, task, args)

    def _delegated(
        self, call: _Call, delegation: _Delegation, agent: Any, task: Any, args: tuple[Any, ...]
    ) -> Any:
        """A coworker's execution, in the span of the delegation its caller was allowed."""
        governed = call.source.governed
        try:
            delegation.child.start()
        except SessionKilled as stop:
            delegation.stop = governed.run.stopped(stop)
            raise crew_error(stop) from None
        try:
            return self._within(governed, delegation.child, agent, task, args, True)
        except Stopped as stop:
            delegation.stop = stop
            raise

    def _assigned(self, crew: _CrewRun, agent: Any, task: Any, args: tuple[Any, ...]) -> Any:
        """A task the crew gives an agent: the manager of a hierarchical crew acts as the
        root agent; any other agent is the root's delegation, decided first."""
        governed = crew.governed
        if crew.hierarchical and agent is crew.crew.manager_agent:
            governed.run.bind(agent, crew.root)
            return self._within(governed, crew.root, agent, task, args, False)
        description = str(task.description)
        try:
            child = governed.delegate(crew.root, agent, description, _content(description, args[0]))
        except SessionKilled as stop:
            raise crew_error(stop) from None
        except Stopped as stop:
            stand_in = governed.run.fallback(crew.crew, stop)
            if not isinstance(stand_in, BaseAgent):
                raise crew_error(stop) from None
            # constrained mode: the app's agent does the task as the root agent
            governed.run.bind(stand_in, crew.root)
            return self._within(governed, crew.root, stand_in, task, (args[0], None), False)
        try:
            child.start()
        except SessionKilled as stop:
            raise crew_error(governed.run.stopped(stop)) from None
        return self._within(governed, child, agent, task, args, True)

    async def _aassigned(self, crew: _CrewRun, agent: Any, task: Any, args: tuple[Any, ...]) -> Any:
        """:meth:`_assigned` for ``aexecute_task``."""
        governed = crew.governed
        if crew.hierarchical and agent is crew.crew.manager_agent:
            governed.run.bind(agent, crew.root)
            return await self._awithin(governed, crew.root, agent, task, args, False)
        description = str(task.description)
        try:
            child = await governed.adelegate(
                crew.root, agent, description, _content(description, args[0])
            )
        except SessionKilled as stop:
            raise crew_error(stop) from None
        except Stopped as stop:
            stand_in = governed.run.fallback(crew.crew, stop)
            if not isinstance(stand_in, BaseAgent):
                raise crew_error(stop) from None
            governed.run.bind(stand_in, crew.root)
            return await self._awithin(governed, crew.root, stand_in, task, (args[0], None), False)
        try:
            await child.astart()
        except SessionKilled as stop:
            raise crew_error(governed.run.stopped(stop)) from None
        return await self._awithin(governed, child, agent, task, args, True)

    def _standalone(self, agent: Any, task: Any, args: tuple[Any, ...]) -> Any:
        """An agent's task outside any crew: a run of its own (a delegation when it runs
        inside an agentgov agent)."""
        try:
            run = self.runtime.open_run(
                str(agent.role), input_text=_clip(str(task.description)), framework_agent=agent
            )
        except Stopped as stop:
            raise crew_error(stop) from None
        assert run.first is not None
        error: BaseException | None = None
        try:
            return self._within(_Governed(run), run.first, agent, task, args, False)
        except BaseException as exc:
            error = exc
            raise
        finally:
            run.close(error)

    async def _astandalone(self, agent: Any, task: Any, args: tuple[Any, ...]) -> Any:
        """:meth:`_standalone` for ``aexecute_task``."""
        try:
            run = await self.runtime.aopen_run(
                str(agent.role), input_text=_clip(str(task.description)), framework_agent=agent
            )
        except Stopped as stop:
            raise crew_error(stop) from None
        assert run.first is not None
        error: BaseException | None = None
        try:
            return await self._awithin(_Governed(run), run.first, agent, task, args, False)
        except BaseException as exc:
            error = exc
            raise
        finally:
            await run.aclose(error)

    # -- the hooks (synchronous, on CrewAI's worker threads, in the execution's context) ---

    def before_tool_call(self, hook: Any) -> None:
        """Decide the call; a stop blocks it (CrewAI's own refusal of a tool call)."""
        execution = _EXEC.get()
        if execution is None or not self.active:
            return
        execution.settle()
        call = _Call(execution)
        _CALL.set(call)
        governed = execution.governed
        run = governed.run
        try:
            run.checkpoint()
            coworker = coworker_of(hook)
            if coworker is not None:
                target, call.task, call.context = coworker
                call.delegating = True
                child = governed.delegate(
                    execution.span, target, call.task, _content(call.task, call.context)
                )
                call.delegation = _Delegation(target, child)
            else:
                span = run.tool(execution.span, str(hook.tool_name), hook.tool_input)
                span.decide()
                call.tool = span.open()
        except SessionKilled as stop:
            call.stop = run.stopped(stop)
            raise crew_error(stop) from None
        except Stopped as stop:
            call.stop = stop
            answer = run.fallback(hook.agent, stop)
            if call.delegating and isinstance(answer, BaseAgent):
                call.stand_in = answer
            raise crew_error(stop) from None

    def after_tool_call(self, hook: Any) -> str | None:
        """End the call's span; tell the model why a call was stopped; end the run on a
        kill (raised here, where CrewAI lets it through)."""
        call = _CALL.get()
        if call is None:
            return None
        try:
            return self._after(call)
        finally:
            _CALL.set(None)

    def _after(self, call: _Call) -> str | None:
        if call.tool is not None:
            call.tool.close()
            return None
        delegation = call.delegation
        if delegation is not None:
            if not delegation.started:
                # CrewAI never ran the coworker: the allowed delegation still ends, so the
                # governor frees it (a killed session's kill ends the call)
                kill = release(delegation.child)
                if kill is not None:
                    delegation.stop = kill
        stopped = delegation.stop if delegation is not None else call.stop
        if stopped is None:
            return None
        if ends_session(stopped):
            raise crew_error(stopped)
        if call.stand_in is not None:
            return self._stand_in(call, stopped)
        return stop_message(stopped)

    def _stand_in(self, call: _Call, stop: Stopped) -> str:
        """The app's agent does the stopped delegation's work, as the delegating agent
        (its execution comes back through :meth:`execute`); its answer is the call's."""
        agent = call.stand_in
        request = Task(
            description=call.task,
            expected_output=I18N_DEFAULT.slice("manager_request"),
            agent=agent,
        )
        try:
            return str(agent.execute_task(request, call.context or None))
        except HookAborted:
            raise
        except Exception:
            log.exception("the on_stop agent failed to do the delegated work")
            return stop_message(stop)

    def before_model_call(self, hook: Any) -> None:
        """A killed session's run stops here; the call's usage is counted after it."""
        execution = _EXEC.get()
        if execution is None or not self.active:
            return
        execution.settle()
        try:
            execution.governed.run.checkpoint()
        except SessionKilled as stop:
            raise crew_error(stop) from None
        execution.before_model_call(getattr(hook, "llm", None))

    def after_model_call(self, hook: Any) -> None:
        execution = _EXEC.get()
        if execution is not None:
            execution.settle()


def install(runtime: Runtime) -> Patch:
    """Instrument CrewAI for ``runtime``; the returned patch removes it."""
    patch = Patch(runtime)
    patch.install()
    return patch
