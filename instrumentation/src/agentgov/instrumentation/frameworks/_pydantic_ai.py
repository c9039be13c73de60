"""The Pydantic AI side of :class:`PydanticAIInstrumentor` (imports Pydantic AI).

One attribute is replaced while instrumented, and restored exactly:
``pydantic_ai.Agent._bind_run_capabilities``, through which every run of every agent
(``run``, ``run_sync``, ``run_stream``, ``iter``, and runs started inside another run's
tools) binds its per-run capabilities. The replacement adds one more: agentgov's
:class:`GovernedCapability`, whose hooks are Pydantic AI's own extension points:

- ``wrap_run`` opens a governed :class:`~._runtime.Run`: the root of a new session (its
  id: the run's conversation id), or, for a run started inside a step of a governed run
  (a tool's body), a delegation by that run's agent, decided first;
- ``before_model_request`` is a kill checkpoint; ``after_model_request`` counts each model
  response's tokens (and, where Pydantic AI can price the model, its cost in USD, reported
  to the governor's shared budget) on the agent that asked;
- ``before_tool_execute`` decides each tool call on its final arguments (after the app's
  own capabilities changed them) and opens its ``execute_tool`` span, which
  ``wrap_tool_execute`` ends once the call is over; a stop is raised as Pydantic AI's
  ``ToolFailed``: the tool does not run and the model receives a failed tool result naming
  the reason. A delegation the governor stopped inside a tool's body reaches that tool's
  caller the same way, unless the app's ``on_stop`` hook returns an agent, which then does
  the task as the delegating agent;
- a kill, or the shared budget spent, ends every run it reaches, the nested runs and the
  runs around them (:class:`SessionKilledByGovernor`, :class:`StoppedByGovernor`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from pydantic_ai import Agent
from pydantic_ai.agent import AbstractAgent
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.capabilities.abstract import (
    ValidatedToolArgs,
    WrapRunHandler,
    WrapToolExecuteHandler,
    leaf_capabilities,
)
from pydantic_ai.exceptions import AgentRunError, ToolFailed
from pydantic_ai.messages import ModelResponse, ToolCallPart
from pydantic_ai.models import ModelRequestContext
from pydantic_ai.run import AgentRunResult
from pydantic_ai.tools import RunContext, ToolDefinition

from agentgov.instrumentation.frameworks._runtime import (
    Run,
    Runtime,
    ends_session,
    framework_error,
    open_detached,
    put_back,
    stop_message,
)
from agentgov.instrumentation.governor import SessionKilled, Stopped
from agentgov.instrumentation.lineage import current_lineage, with_lineage
from agentgov.instrumentation.spans import AgentSpan, ToolSpan

log = logging.getLogger("agentgov.instrumentation.frameworks")

#: the private method every run binds its capabilities through (``iter`` and
#: ``realtime_session`` both call it)
PATCHED = "_bind_run_capabilities"
CAPABILITY_ID = "agentgov"


class StoppedByGovernor(Stopped, AgentRunError):
    """The governor's stop, raised out of a Pydantic AI run: an agentgov
    :class:`~agentgov.instrumentation.governor.Stopped` that is also Pydantic AI's own
    :class:`~pydantic_ai.exceptions.AgentRunError`."""


class SessionKilledByGovernor(SessionKilled, AgentRunError):
    """A session kill, raised out of a Pydantic AI run (see :class:`StoppedByGovernor`)."""


def run_error(stop: Stopped) -> Stopped:
    """``stop`` as an exception of Pydantic AI's kind (same message and fields)."""
    message = str(stop.args[0]) if stop.args else ""
    return framework_error(stop, StoppedByGovernor, SessionKilledByGovernor, message=message)


@dataclasses.dataclass
class _Frame:
    """A governed run as its hooks find it: the run, the agent span its steps belong to, and
    the Pydantic AI agent acting as that span."""

    run: Run
    span: AgentSpan
    agent: object
    #: the run ends here (False for a constrained replacement acting as its delegator)
    owner: bool = True


@dataclasses.dataclass
class _Call:
    """One tool call between ``wrap_tool_execute`` and ``before_tool_execute``."""

    span: ToolSpan | None = None
    token: object = None


_FRAME: ContextVar[_Frame | None] = ContextVar("agentgov_pydantic_ai_run", default=None)
_CALL: ContextVar[_Call | None] = ContextVar("agentgov_pydantic_ai_call", default=None)
#: set while the app's fallback agent runs a stopped delegation's task in its delegator's
#: place: that run takes the delegator's span instead of opening one
_ACTING: ContextVar[_Frame | None] = ContextVar("agentgov_pydantic_ai_acting", default=None)


# -- what a run is about ----------------------------------------------------------------------


def prompt_text(prompt: str | Sequence[Any] | None) -> str:
    """A run's input as text: the prompt, or the text parts of a multi-part prompt."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    texts = []
    for part in prompt:
        text = part if isinstance(part, str) else getattr(part, "content", None)
        if isinstance(text, str):
            texts.append(text)
    return " ".join(texts)


def _name(agent: Any) -> str:
    name = getattr(agent, "name", None)
    return name if isinstance(name, str) and name else "agent"


def _durable(agent: Any) -> bool:
    """The agent runs under a durable-execution engine (Temporal, DBOS, Prefect), which
    refuses capabilities added for a run and replays hooks: agentgov leaves it alone."""
    root = getattr(agent, "_effective_root_capability", None)
    if root is None:
        return False
    try:
        leaves = leaf_capabilities(root())
    except Exception:  # an agent shape this version does not know: govern it
        return False
    return any(getattr(c, "_one_per_agent", None) for c in leaves)


def _cost(response: ModelResponse) -> float:
    """The response's price in USD, when Pydantic AI's price table knows the model."""
    if not response.model_name:
        return 0.0
    try:
        return float(response.cost().total_price)
    except (LookupError, ValueError, AssertionError, TypeError):
        return 0.0


def _current(span: Any, frame: _Frame) -> otel_context.Context:
    """The current context with ``span`` current and the frame's lineage on it: the
    framework's own context (its spans, its baggage) stays underneath."""
    ctx = trace.set_span_in_context(span, otel_context.get_current())
    return with_lineage(frame.span.lineage, ctx)


# -- the capability ---------------------------------------------------------------------------


@dataclasses.dataclass
class GovernedCapability(AbstractCapability[Any]):
    """agentgov's hooks on every run (one instance, shared by all runs: the state of a run
    lives in context variables, which follow it into its tools and nested runs)."""

    runtime: Runtime | None = None
    id: str | None = CAPABILITY_ID

    # -- runs -----------------------------------------------------------------------------------

    async def wrap_run(
        self, ctx: RunContext[Any], *, handler: WrapRunHandler
    ) -> AgentRunResult[Any]:
        runtime = self.runtime
        if runtime is None or ctx.realtime:
            return await handler()
        agent = ctx.agent
        acting = _ACTING.get()
        if acting is not None:
            # the app's fallback agent, doing a stopped delegation's work as its delegator
            _ACTING.set(None)
            acting.run.bind(agent, acting.span)
            frame = _Frame(acting.run, acting.span, agent, owner=False)
        else:
            opened = await self._open(runtime, ctx)
            if not isinstance(opened, _Frame):
                return opened  # the fallback agent's result
            frame = opened
        frame_token = _FRAME.set(frame)
        ctx_token = otel_context.attach(_current(frame.span.span, frame))
        error: BaseException | None = None
        try:
            return await handler()
        except BaseException as exc:
            error = exc
            raise
        finally:
            otel_context.detach(ctx_token)
            _FRAME.reset(frame_token)
            if frame.owner:
                await _close(frame.run, error)

    async def _open(self, runtime: Runtime, ctx: RunContext[Any]) -> _Frame | AgentRunResult[Any]:
        agent = ctx.agent
        name = _name(agent)
        text = prompt_text(ctx.prompt)
        parent = _FRAME.get()
        lineage = current_lineage()
        if parent is not None and lineage is not None and lineage.agent_id == parent.span.agent_id:
            # started inside a step of a governed run (a tool's body): that run's agent
            # delegates, and the new run takes the decided delegation
            try:
                child = await parent.run.adelegate(parent.span, name, text)
            except SessionKilled as stop:
                raise run_error(stop) from None
            except Stopped as stop:
                replacement = parent.run.fallback(parent.agent, stop)
                if isinstance(replacement, AbstractAgent):
                    return await _run_instead(replacement, parent, ctx)
                raise run_error(stop) from None
            try:
                run = await runtime.aopen_run(name, framework_agent=agent, pending=child)
            except Stopped as stop:
                raise run_error(stop) from None
        else:
            try:
                run = await runtime.aopen_run(
                    name,
                    input_text=text,
                    conversation_id=ctx.conversation_id,
                    workflow_name=name,
                    framework_agent=agent,
                )
            except Stopped as stop:
                raise run_error(stop) from None
        assert run.first is not None
        return _Frame(run, run.first, agent)

    # -- model requests -------------------------------------------------------------------------

    async def before_model_request(
        self, ctx: RunContext[Any], request_context: ModelRequestContext
    ) -> ModelRequestContext:
        frame = _FRAME.get()
        if frame is not None:
            try:
                frame.run.checkpoint()  # a killed session takes no further model call
            except Stopped as stop:
                raise run_error(stop) from None
        return request_context

    async def after_model_request(
        self,
        ctx: RunContext[Any],
        *,
        request_context: ModelRequestContext,
        response: ModelResponse,
    ) -> ModelResponse:
        frame = _FRAME.get()
        if frame is not None:
            usage = response.usage
            try:
                await frame.span.ausage(
                    input_tokens=int(usage.input_tokens or 0),
                    output_tokens=int(usage.output_tokens or 0),
                    usd=_cost(response),
                )
            except Stopped as stop:  # past the shared budget
                frame.run.fallback(frame.agent, stop)
                raise run_error(stop) from None
        return response

    # -- tool calls -----------------------------------------------------------------------------

    async def wrap_tool_execute(
        self,
        ctx: RunContext[Any],
        *,
        call: ToolCallPart,
        tool_def: ToolDefinition,
        args: ValidatedToolArgs,
        handler: WrapToolExecuteHandler,
    ) -> Any:
        frame = _FRAME.get()
        if frame is None or ctx.realtime:
            return await handler(args)
        slot = _Call()
        slot_token = _CALL.set(slot)
        try:
            result = await handler(args)
        except Stopped as stop:
            _end_call(slot, stop)
            if ends_session(stop):
                raise
            # a stop out of the tool's body: a delegation (or a step of it) the governor
            # refused; its caller's model is told, as for a stop of the call itself
            raise ToolFailed(stop_message(stop)) from None
        except BaseException as exc:
            _end_call(slot, exc)
            raise
        finally:
            _CALL.reset(slot_token)
        _end_call(slot, None)
        return result

    async def before_tool_execute(
        self,
        ctx: RunContext[Any],
        *,
        call: ToolCallPart,
        tool_def: ToolDefinition,
        args: ValidatedToolArgs,
    ) -> ValidatedToolArgs:
        frame = _FRAME.get()
        slot = _CALL.get()
        if frame is None or slot is None or ctx.realtime:
            return args
        _end_call(slot, None)  # an app's wrapper running the call again: the last one ended
        run = frame.run
        span = run.tool(frame.span, call.tool_name, args)
        try:
            await span.adecide()
        except SessionKilled as stop:
            raise run_error(run.stopped(stop)) from None
        except Stopped as stop:
            run.fallback(frame.agent, stop)
            raise ToolFailed(stop_message(stop)) from None
        # the tool's body runs on top of the framework's current context (its spans, its
        # baggage), not on its agent's
        slot.span = open_detached(span)
        slot.token = otel_context.attach(_current(span.span, frame))
        return args


def _end_call(slot: _Call, error: BaseException | None) -> None:
    span, token = slot.span, slot.token
    slot.span = slot.token = None
    if token is not None:
        otel_context.detach(token)  # type: ignore[arg-type]
    if span is not None:
        span.close(error)


async def _run_instead(
    replacement: AbstractAgent[Any, Any], parent: _Frame, ctx: RunContext[Any]
) -> AgentRunResult[Any]:
    """Constrained mode: the app's agent does the stopped delegation's task itself, as the
    delegating agent (its span, its lineage: no new agent), and its result is the run's."""
    token = _ACTING.set(parent)
    try:
        return await replacement.run(ctx.prompt, deps=ctx.deps, usage=ctx.usage)
    finally:
        _ACTING.reset(token)


async def _close(run: Run, error: BaseException | None) -> None:
    """End the run's spans; a run cancelled (e.g. an ``iter`` left early) still ends them,
    shielded from a further cancellation."""
    closing = asyncio.ensure_future(run.aclose(error))
    await asyncio.shield(closing)


# -- installing ---------------------------------------------------------------------------------


class Patch:
    """``Agent._bind_run_capabilities`` replaced while instrumented; :meth:`remove` puts back
    the very function that was there."""

    def __init__(self, runtime: Runtime) -> None:
        original = Agent.__dict__.get(PATCHED)
        if not callable(original):
            raise RuntimeError(
                f"pydantic_ai.Agent has no {PATCHED}: this Pydantic AI version is not supported"
            )
        self.original: Callable[..., list[AbstractCapability[Any]]] = original
        self.capability = GovernedCapability(runtime=runtime)
        capability = self.capability
        bind = original

        def _bind_run_capabilities(
            agent: Any, extra_capabilities: list[AbstractCapability[Any]]
        ) -> list[AbstractCapability[Any]]:
            if capability.runtime is None or _durable(agent):
                return bind(agent, extra_capabilities)
            return bind(agent, [*extra_capabilities, capability])

        self.replacement = _bind_run_capabilities

    def install(self) -> None:
        setattr(Agent, PATCHED, self.replacement)

    def remove(self) -> None:
        # a run that still gets the capability (through a wrapper put over this patch) is
        # not governed; runs already going on finish as they started
        self.capability.runtime = None
        if not put_back(Agent, PATCHED, self.original, self.replacement):
            log.warning(
                "Agent.%s was replaced again since agentgov's patch: left as it is", PATCHED
            )


def install(runtime: Runtime) -> Patch:
    """Instrument Pydantic AI for ``runtime``; the returned patch removes it."""
    patch = Patch(runtime)
    patch.install()
    return patch
