"""The smolagents side of :class:`SmolagentsInstrumentor` (imports smolagents).

Four attributes of smolagents are replaced while instrumented, and restored exactly:

- ``MultiStepAgent._run_stream``, the loop of steps behind every ``run`` (streamed or not):
  each agent run opens a governed :class:`~._runtime.Run` (the root of a session, or the
  managed agent's side of a delegation its manager's call decided); its steps run in the
  agent's context; a ``CodeAgent``'s code is decided as a ``python_interpreter`` call before
  it runs; after each step the run is checked for a session kill; the token usage of its
  steps is added when it ends;
- ``MultiStepAgent.__call__``, how a manager calls a managed agent: the delegation is
  decided first, as the calling agent's;
- ``Tool.__call__``: every tool call of a governed run (``final_answer`` excepted) is
  decided first and runs inside its ``execute_tool`` span;
- ``smolagents.local_python_executor.ThreadPoolExecutor``: a ``CodeAgent`` runs its code in
  a worker thread; the replacement carries the caller's context into it, so that the tools
  and agents the code calls are found in the agent's run.

A stop surfaces where smolagents reports a failed step: the tool, the managed agent or the
code does not run, the step's error names the reason (``[agentgov] ...``), the model sees it
and the run goes on. A session kill ends the run at its next step: ``run`` raises
:class:`SessionKilledByGovernor`.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import smolagents.local_python_executor as code_executor
from opentelemetry import context as otel_context
from smolagents import CodeAgent, MultiStepAgent, Tool
from smolagents.memory import ActionStep, FinalAnswerStep, PlanningStep, ToolCall
from smolagents.utils import AgentExecutionError

from agentgov.instrumentation.frameworks._runtime import (
    Run,
    Runtime,
    ends_session,
    framework_error,
    open_detached,
    put_back,
    release,
    stop_message,
)
from agentgov.instrumentation.governor import SessionKilled, Stopped
from agentgov.instrumentation.spans import AgentSpan, ToolSpan

log = logging.getLogger("agentgov.instrumentation.frameworks")

#: the name smolagents gives a CodeAgent's code action (its ``ToolCall``)
CODE_TOOL = "python_interpreter"
FINAL_ANSWER = "final_answer"


class StoppedByGovernor(Stopped, AgentExecutionError):
    """The governor's stop inside a smolagents run: an agentgov
    :class:`~agentgov.instrumentation.governor.Stopped` that smolagents treats as one of its
    own execution errors. Its text (``[agentgov] <phase> stopped by the governor: <reason>
    ...``) becomes the failed step's error, which the model is shown."""


class SessionKilledByGovernor(SessionKilled, AgentExecutionError):
    """A session kill inside a smolagents run (see :class:`StoppedByGovernor`); raised out of
    ``run`` at the run's next step."""


def agent_error(stop: Stopped) -> Stopped:
    """``stop`` as an error smolagents handles as its own (same fields; the text the model
    is shown starts with ``[agentgov]``)."""
    text = stop_message(stop)
    # ``message``: AgentError's own field (read by ActionStep.dict); its __init__ is not
    # called, as it logs the error through an agent's logger, which a stop here has not
    return framework_error(
        stop, StoppedByGovernor, SessionKilledByGovernor, text=text, message=text
    )


def _kill_in(error: BaseException | None) -> SessionKilled | None:
    """The session kill that caused ``error``, however smolagents wrapped it (a managed
    agent's failure, a tool's, the code's)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, SessionKilled):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _agent_name(agent: Any) -> str:
    name = getattr(agent, "name", None)
    return name if isinstance(name, str) and name else type(agent).__name__


def _arguments(tool: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """A tool call's arguments by name (positional ones named after the tool's inputs)."""
    named = {k: v for k, v in kwargs.items() if k != "sanitize_inputs_outputs"}
    if len(args) == 1 and not named and isinstance(args[0], dict):
        return args[0]  # smolagents' own convention: one dict holds every argument
    inputs = getattr(tool, "inputs", None)
    for name, value in zip(list(inputs) if isinstance(inputs, dict) else [], args, strict=False):
        named.setdefault(name, value)
    return named


# -- what the patched functions find in the context ----------------------------------------


@dataclass
class _Delegation:
    """A managed agent's call the governor allowed: its run takes ``child``."""

    target: object
    child: AgentSpan
    source: AgentSpan
    started: bool = False


@dataclass
class _StandIn:
    """The agent the app's ``on_stop`` hook put in place of a stopped delegation: it acts as
    the delegating agent (same span, same lineage)."""

    agent: object
    source: _State
    taken: bool = False


class _State:
    """One governed agent run, as the patched functions find it while its steps run."""

    def __init__(
        self,
        run: Run,
        agent: Any,
        span: AgentSpan,
        owner: bool,
        reply_to: AgentSpan | None = None,
    ) -> None:
        self.run = run
        self.agent = agent
        self.span = span
        #: False for a stand-in, which acts within its delegating agent's run
        self.owner = owner
        #: a managed agent's delegating agent, which its final answer goes to
        self.reply_to = reply_to
        steps = getattr(getattr(agent, "memory", None), "steps", None)
        #: where this run's steps start in the agent's memory (``reset=False`` keeps others)
        self.first_step = len(steps) if isinstance(steps, list) else 0
        #: the code action running now (CodeAgent)
        self.code: ToolSpan | None = None

    def advance(self, inner: Generator[Any, Any, Any], error: BaseException | None) -> Any:
        """The next item of the run's own loop, made in the agent's context (its span and
        lineage current, no delegation pending); ``error`` is thrown in as the step's."""
        tokens = (_CURRENT.set(self), _PENDING.set(None), _STAND_IN.set(None))
        ctx = otel_context.attach(self.span.context)
        try:
            return inner.throw(error) if error is not None else next(inner)
        finally:
            otel_context.detach(ctx)
            _STAND_IN.reset(tokens[2])
            _PENDING.reset(tokens[1])
            _CURRENT.reset(tokens[0])

    def stop_or_kill(self, stop: Stopped) -> Stopped:
        """The error a stopped step raises: a kill ends the run; any other stop is the
        step's failure, after the app's ``on_stop`` hook saw it."""
        if ends_session(stop):
            self.run.stopped(stop)
        else:
            self.run.fallback(self.agent, stop)
        return agent_error(stop)

    def check_kill(self) -> None:
        """Raise the session's kill, if there was one."""
        try:
            self.run.checkpoint()
        except SessionKilled as stop:
            raise agent_error(stop) from None

    def decide_code(self, code: Any) -> Stopped | None:
        """Decide a CodeAgent's code before it runs: the error to fail its step with, or
        None with its span open."""
        span = self.run.tool(self.span, CODE_TOOL, {"code": str(code)})
        try:
            span.decide()
        except Stopped as stop:
            return self.stop_or_kill(stop)
        # not made current: this runs between two items of the loop, in the app's frames
        # (a streamed run's consumer); what the code calls is recorded on its agent
        self.code = open_detached(span)
        return None

    def end_code(self, error: BaseException | None) -> None:
        if self.code is not None:
            code, self.code = self.code, None
            code.close(error)

    def after_step(self, step: ActionStep | PlanningStep) -> None:
        """A step ended: close its code span; a killed session ends the run here, before
        the next model call."""
        error = getattr(step, "error", None)
        self.end_code(error if isinstance(error, BaseException) else None)
        kill = _kill_in(error if isinstance(error, BaseException) else None)
        if kill is None:
            try:
                self.run.checkpoint()
            except SessionKilled as stop:
                kill = stop
        if kill is not None:
            raise agent_error(self.run.stopped(kill))

    def answered(self, output: Any) -> None:
        """A managed agent's final answer goes back to its delegating agent: recorded as a
        message (digest and injection score)."""
        if self.reply_to is not None and self.owner:
            self.span.message(self.reply_to.agent_id, str(output))

    def close(self, error: BaseException | None) -> None:
        """The run ended: its steps' token usage goes to its agent, then its spans end."""
        self.end_code(error)
        steps = getattr(getattr(self.agent, "memory", None), "steps", None)
        for step in steps[self.first_step :] if isinstance(steps, list) else []:
            usage = getattr(step, "token_usage", None)
            if isinstance(step, ActionStep | PlanningStep) and usage is not None:
                self.span.usage(
                    input_tokens=int(getattr(usage, "input_tokens", 0) or 0),
                    output_tokens=int(getattr(usage, "output_tokens", 0) or 0),
                )
        if self.owner:
            self.run.close(error)


_CURRENT: contextvars.ContextVar[_State | None] = contextvars.ContextVar(
    "agentgov_smolagents_run", default=None
)
_PENDING: contextvars.ContextVar[_Delegation | None] = contextvars.ContextVar(
    "agentgov_smolagents_delegation", default=None
)
_STAND_IN: contextvars.ContextVar[_StandIn | None] = contextvars.ContextVar(
    "agentgov_smolagents_stand_in", default=None
)


def _close_quietly(inner: Generator[Any, Any, Any]) -> None:
    """Close smolagents' loop. Closed mid-step (an app that stopped reading a streamed run),
    the loop yields from its ``finally`` and Python says so with a RuntimeError; smolagents
    alone would leave that to the garbage collector, so it is not the app's error here."""
    try:
        inner.close()
    except RuntimeError as exc:
        log.debug("smolagents run closed mid-step: %s", exc)


# -- the patch -------------------------------------------------------------------------------


class Patch:
    """The smolagents attributes replaced while instrumented; :meth:`remove` puts back the
    originals (the very objects that were there). The replacements pass every call through
    once removed, in case another instrumentor wrapped them meanwhile."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.active = False
        run_stream = MultiStepAgent.__dict__["_run_stream"]
        call = MultiStepAgent.__dict__["__call__"]
        tool_call = Tool.__dict__["__call__"]
        executor = code_executor.ThreadPoolExecutor
        #: (owner, attribute, original, replacement)
        self.patched: list[tuple[Any, str, Any, Any]] = [
            (MultiStepAgent, "_run_stream", run_stream, self._run_stream(run_stream)),
            (MultiStepAgent, "__call__", call, self._call(call)),
            (Tool, "__call__", tool_call, self._tool_call(tool_call)),
            (code_executor, "ThreadPoolExecutor", executor, _context_carrying(executor)),
        ]

    def install(self) -> None:
        for owner, name, _, replacement in self.patched:
            setattr(owner, name, replacement)
        self.active = True

    def remove(self) -> None:
        self.active = False
        for owner, name, original, replacement in self.patched:
            if not put_back(owner, name, original, replacement):
                # wrapped again since: the wrapper stays, and ours passes calls through
                log.debug("smolagents %s.%s was patched again; left in place", owner, name)

    # -- runs --------------------------------------------------------------------------------

    def _run_stream(self, original: Any) -> Callable[..., Any]:
        patch = self

        @functools.wraps(original)
        def run_stream(agent: Any, *args: Any, **kwargs: Any) -> Any:
            bound = original.__get__(agent, type(agent))
            if not patch.active:
                return bound(*args, **kwargs)
            # taken when ``run`` calls it, in the caller's context (a streamed run's
            # generator is iterated later, maybe elsewhere)
            return patch._governed(agent, bound, args, kwargs, _PENDING.get(), _STAND_IN.get())

        return run_stream

    def _open(
        self, agent: Any, task: str, pending: _Delegation | None, stand_in: _StandIn | None
    ) -> _State:
        if stand_in is not None and stand_in.agent is agent and not stand_in.taken:
            stand_in.taken = True
            source = stand_in.source
            source.run.bind(agent, source.span)
            return _State(source.run, agent, source.span, owner=False)
        name = _agent_name(agent)
        reply_to = None
        try:
            if pending is not None and pending.target is agent and not pending.started:
                pending.started = True
                reply_to = pending.source
                run = self.runtime.open_run(name, framework_agent=agent, pending=pending.child)
            else:
                run = self.runtime.open_run(
                    name, input_text=task, workflow_name=name, framework_agent=agent
                )
        except Stopped as stop:
            raise agent_error(stop) from None
        assert run.first is not None
        return _State(run, agent, run.first, owner=True, reply_to=reply_to)

    def _governed(
        self,
        agent: Any,
        original: Callable[..., Generator[Any, Any, Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        pending: _Delegation | None,
        stand_in: _StandIn | None,
    ) -> Iterator[Any]:
        """The run's loop of steps, governed (a generator, as smolagents' own)."""
        task = args[0] if args else kwargs.get("task", "")
        state = self._open(agent, str(task or ""), pending, stand_in)
        inner = original(*args, **kwargs)
        error: BaseException | None = None
        throw: BaseException | None = None
        try:
            while True:
                try:
                    item = state.advance(inner, throw)
                except StopIteration:
                    return
                throw = None
                if isinstance(item, ToolCall):
                    if item.name == CODE_TOOL and isinstance(agent, CodeAgent):
                        # the code runs once the consumer asks for the next item: a stop
                        # goes back in as the step's error, and the code never runs
                        throw = state.decide_code(item.arguments)
                elif isinstance(item, ActionStep | PlanningStep):
                    state.after_step(item)
                elif isinstance(item, FinalAnswerStep):
                    state.answered(item.output)
                yield item
        except GeneratorExit:
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            _close_quietly(inner)
            state.close(error)

    # -- delegations ---------------------------------------------------------------------------

    def _call(self, original: Any) -> Callable[..., Any]:
        patch = self

        @functools.wraps(original)
        def call(agent: Any, task: Any, *args: Any, **kwargs: Any) -> Any:
            state = _CURRENT.get()
            if not patch.active or state is None:
                return original.__get__(agent, type(agent))(task, *args, **kwargs)
            run = state.run
            try:
                child = run.delegate(state.span, _agent_name(agent), str(task))
            except SessionKilled as stop:
                raise agent_error(run.stopped(stop)) from None
            except Stopped as stop:
                replacement = run.fallback(state.agent, stop)
                if not isinstance(replacement, MultiStepAgent):
                    raise agent_error(stop) from None
                # constrained mode: the app's agent does the task as the delegating agent
                standing = _STAND_IN.set(_StandIn(replacement, state))
                try:
                    return original.__get__(replacement, type(replacement))(task, *args, **kwargs)
                finally:
                    _STAND_IN.reset(standing)
            delegation = _Delegation(agent, child, state.span)
            token = _PENDING.set(delegation)
            try:
                return original.__get__(agent, type(agent))(task, *args, **kwargs)
            finally:
                _PENDING.reset(token)
                if not delegation.started:
                    release(child)  # its run never started: the governor frees it

        return call

    # -- tools ---------------------------------------------------------------------------------

    def _tool_call(self, original: Any) -> Callable[..., Any]:
        patch = self

        @functools.wraps(original)
        def tool_call(tool: Any, *args: Any, **kwargs: Any) -> Any:
            state = _CURRENT.get()
            bound = original.__get__(tool, type(tool))
            if not patch.active or state is None:
                return bound(*args, **kwargs)
            name = str(getattr(tool, "name", "") or type(tool).__name__)
            if name == FINAL_ANSWER:
                state.check_kill()  # a killed session gives no answer
                return bound(*args, **kwargs)
            span = state.run.tool(state.span, name, _arguments(tool, args, kwargs))
            try:
                span.decide()
            except Stopped as stop:
                raise state.stop_or_kill(stop) from None
            span.open()
            try:
                result = bound(*args, **kwargs)
            except BaseException as exc:
                span.close(exc)
                raise
            span.close()
            return result

        return tool_call


def _context_carrying(factory: Any) -> Callable[..., Any]:
    """A stand-in for the executor class of smolagents' code runner whose pools run each
    submitted call in a copy of the submitter's context."""

    def executor(*args: Any, **kwargs: Any) -> Any:
        pool = factory(*args, **kwargs)
        submit = pool.submit

        def submit_in_context(fn: Callable[..., Any], /, *a: Any, **kw: Any) -> Any:
            return submit(contextvars.copy_context().run, fn, *a, **kw)

        pool.submit = submit_in_context
        return pool

    return executor


def install(runtime: Runtime) -> Patch:
    """Instrument smolagents for ``runtime``; the returned patch removes it."""
    patch = Patch(runtime)
    patch.install()
    return patch
