"""The OpenAI Agents SDK side of :class:`OpenAIAgentsInstrumentor` (imports the SDK).

Four attributes of the SDK are replaced while instrumented, and restored exactly:

- the default agent runner (``agents.run.set_default_agent_runner``): every run, nested
  agent-as-tool runs included, opens a governed :class:`~._runtime.Run` and gets run hooks
  that wrap the app's own (kill checkpoints before each model call, token usage);
- ``agents.run_internal.tool_execution._execute_tool_input_guardrails``: after the app's
  own tool guardrails, the governor decides each function-tool call (a call of an agent
  used as a tool is decided as a delegation); a stop becomes the tool's result, the SDK's
  own way of rejecting a call, and the tool does not run;
- ``agents.run_internal.tool_execution._invoke_function_tool_with_metadata``: the call runs
  inside its ``execute_tool`` span (an agent tool's nested run inside its caller's context);
- ``agents.run_internal.turn_resolution.execute_handoffs``: each handoff is decided as a
  delegation by the handing-off agent before the SDK hands over; the target's span is
  started as the source's child.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import agents.run as sdk_run
from agents import RunHooks
from agents.exceptions import AgentsException
from agents.run_internal import tool_execution, turn_resolution
from opentelemetry import context as otel_context

from agentgov.instrumentation.frameworks._runtime import (
    Run,
    Runtime,
    ends_session,
    framework_error,
    stop_message,
    task_text,
)
from agentgov.instrumentation.governor import SessionKilled, Stopped
from agentgov.instrumentation.spans import AgentSpan, ToolSpan


class StoppedByGovernor(Stopped, AgentsException):
    """The governor's stop, raised inside an OpenAI Agents run: an agentgov
    :class:`~agentgov.instrumentation.governor.Stopped` that the SDK passes on unchanged, as
    it does its own :class:`~agents.exceptions.AgentsException`."""


class SessionKilledByGovernor(SessionKilled, AgentsException):
    """A session kill, raised inside an OpenAI Agents run (see :class:`StoppedByGovernor`)."""


def sdk_error(stop: Stopped) -> Stopped:
    """``stop`` as an exception the SDK lets through unchanged (same message and fields)."""
    return framework_error(stop, StoppedByGovernor, SessionKilledByGovernor, run_data=None)


@dataclasses.dataclass
class _Delegation:
    """An agent-as-tool call the governor allowed: the nested run takes ``child``."""

    child: AgentSpan
    started: bool = False
    #: the governor's stop that ended the nested run (the SDK turns it into a tool error)
    stop: Stopped | None = None


class _State:
    """One governed run of the SDK, as the patched functions find it (a context variable)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.run: Run | None = None
        #: decided calls until the SDK invokes them, by the identity of their ToolContext
        #: (held with them, so that identity is not reused meanwhile)
        self.tools: dict[int, tuple[object, ToolSpan]] = {}
        self.delegations: dict[int, tuple[object, _Delegation]] = {}
        #: what a streamed run needs to open once its loop runs
        self.opener: Callable[[], Awaitable[Run]] | None = None

    async def ensure_open(self) -> Run:
        if self.run is None:
            if self.opener is None:
                raise RuntimeError("the run was not opened")
            opener, self.opener = self.opener, None
            try:
                self.run = await opener()
            except Stopped as stop:
                raise sdk_error(stop) from None
        return self.run

    def take_tool(self, context: object) -> ToolSpan | None:
        entry = self.tools.pop(id(context), None)
        return entry[1] if entry is not None and entry[0] is context else None

    def take_delegation(self, context: object) -> _Delegation | None:
        entry = self.delegations.pop(id(context), None)
        return entry[1] if entry is not None and entry[0] is context else None

    async def close(self, error: BaseException | None) -> None:
        """End the run; delegations allowed but never invoked end too (the governor frees
        them)."""
        leftover, self.delegations = list(self.delegations.values()), {}
        for _, delegation in leftover:
            if not delegation.started:
                await delegation.child.astart()
                await delegation.child.aend()
        self.tools.clear()
        if self.run is not None:
            await self.run.aclose(error)

    def checkpoint(self) -> None:
        if self.run is not None:
            try:
                self.run.checkpoint()
            except Stopped as stop:
                raise sdk_error(stop) from None


_RUN: ContextVar[_State | None] = ContextVar("agentgov_openai_agents_run", default=None)
_PENDING: ContextVar[_Delegation | None] = ContextVar(
    "agentgov_openai_agents_delegation", default=None
)


# -- what a run is about ----------------------------------------------------------------------


def _text_of(item: Any) -> str:
    content = item.get("content") if isinstance(item, dict) else getattr(item, "content", None)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            p.get("text") if isinstance(p, dict) else getattr(p, "text", None) for p in content
        ]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def input_text(value: Any) -> str:
    """A run's input as text: the string, or the last user message of a list of items (of a
    resumed run's original input)."""
    original = getattr(value, "_original_input", None)
    if original is not None:
        value = original
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for item in reversed(value):
            role = item.get("role") if isinstance(item, dict) else getattr(item, "role", None)
            if role == "user":
                return _text_of(item)
    return ""


def _conversation(kwargs: dict[str, Any]) -> str | None:
    conversation = kwargs.get("conversation_id")
    if isinstance(conversation, str) and conversation:
        return conversation
    session_id = getattr(kwargs.get("session"), "session_id", None)
    return session_id if isinstance(session_id, str) and session_id else None


def _workflow_name(kwargs: dict[str, Any], agent: Any) -> str:
    config = kwargs.get("run_config")
    name = (
        config.get("workflow_name")
        if isinstance(config, dict)
        else getattr(config, "workflow_name", None)
    )
    if not isinstance(name, str) or not name or name == "Agent workflow":
        return str(agent.name)
    return name


def _starting_agent(starting_agent: Any, value: Any) -> Any:
    current = getattr(value, "_current_agent", None)
    return current if current is not None else starting_agent


# -- run hooks ----------------------------------------------------------------------------------


class _Hooks(RunHooks[Any]):
    """The run's hooks: agentgov's checkpoints and usage, then the app's own hooks."""

    def __init__(self, app: Any, state: _State) -> None:
        self._app = app
        self._state = state

    async def on_agent_start(self, context: Any, agent: Any) -> None:
        await self._state.ensure_open()
        self._state.checkpoint()
        if self._app is not None:
            await self._app.on_agent_start(context, agent)

    async def on_agent_end(self, context: Any, agent: Any, output: Any) -> None:
        if self._app is not None:
            await self._app.on_agent_end(context, agent, output)

    async def on_handoff(self, context: Any, from_agent: Any, to_agent: Any) -> None:
        if self._app is not None:
            await self._app.on_handoff(context, from_agent, to_agent)

    async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
        if self._app is not None:
            await self._app.on_tool_start(context, agent, tool)

    async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: Any) -> None:
        if self._app is not None:
            await self._app.on_tool_end(context, agent, tool, result)

    async def on_llm_start(
        self, context: Any, agent: Any, system_prompt: Any, input_items: Any
    ) -> None:
        self._state.checkpoint()  # a killed session takes no further model call
        if self._app is not None:
            await self._app.on_llm_start(context, agent, system_prompt, input_items)

    async def on_llm_end(self, context: Any, agent: Any, response: Any) -> None:
        run = self._state.run
        usage = getattr(response, "usage", None)
        if run is not None and usage is not None:
            run.agent_of(agent).usage(
                input_tokens=int(getattr(usage, "input_tokens", 0) or 0),
                output_tokens=int(getattr(usage, "output_tokens", 0) or 0),
            )
        if self._app is not None:
            await self._app.on_llm_end(context, agent, response)


# -- the runner ---------------------------------------------------------------------------------


class GovernedRunner(sdk_run.AgentRunner):
    """Opens a governed run around every run of the runner it replaced."""

    def __init__(self, inner: sdk_run.AgentRunner, runtime: Runtime) -> None:
        self.inner = inner
        self.runtime = runtime

    def _opener(
        self, starting_agent: Any, value: Any, kwargs: dict[str, Any]
    ) -> Callable[[], Awaitable[Run]]:
        agent = _starting_agent(starting_agent, value)
        delegation = _PENDING.get()
        pending = None
        if delegation is not None and not delegation.started:
            delegation.started = True
            pending = delegation.child
        conversation = _conversation(kwargs)
        workflow = _workflow_name(kwargs, agent)
        text = input_text(value)

        def opener() -> Awaitable[Run]:
            return self.runtime.aopen_run(
                str(agent.name),
                input_text=text,
                conversation_id=conversation,
                workflow_name=workflow,
                framework_agent=agent,
                pending=pending,
            )

        return opener

    async def run(self, starting_agent: Any, input: Any, **kwargs: Any) -> Any:
        state = _State(self.runtime)
        delegation = _PENDING.get()
        state.opener = self._opener(starting_agent, input, kwargs)
        pending_token = _PENDING.set(None)  # deeper runs are not this delegation
        try:
            run = await state.ensure_open()
            assert run.first is not None
            kwargs["hooks"] = _Hooks(kwargs.get("hooks"), state)
            run_token = _RUN.set(state)
            ctx_token = otel_context.attach(run.first.context)
            error: BaseException | None = None
            try:
                return await self.inner.run(starting_agent, input, **kwargs)
            except BaseException as exc:
                error = exc
                if delegation is not None and isinstance(exc, Stopped):
                    delegation.stop = exc  # the caller's tool call reads it: the SDK swallows it
                raise
            finally:
                otel_context.detach(ctx_token)
                _RUN.reset(run_token)
                await state.close(error)
        finally:
            _PENDING.reset(pending_token)

    def run_streamed(self, starting_agent: Any, input: Any, **kwargs: Any) -> Any:
        state = _State(self.runtime)
        state.opener = self._opener(starting_agent, input, kwargs)  # opened on the loop
        kwargs["hooks"] = _Hooks(kwargs.get("hooks"), state)
        run_token = _RUN.set(state)
        pending_token = _PENDING.set(None)
        try:
            result = self.inner.run_streamed(starting_agent, input, **kwargs)
        finally:
            _PENDING.reset(pending_token)
            _RUN.reset(run_token)
        task = getattr(result, "run_loop_task", None)
        if isinstance(task, asyncio.Task):
            task.add_done_callback(lambda done: _finish_streamed(state, done))
        return result


def _finish_streamed(state: _State, task: asyncio.Task[Any]) -> None:
    """End a streamed run's spans once its loop ended, in a worker thread: the loop may be
    on its way out, and reporting that agents finished is a request."""
    run = state.run
    if run is None:
        return
    error = None if task.cancelled() else task.exception()
    task.get_loop().run_in_executor(None, run.close, error)


# -- the patched functions ----------------------------------------------------------------------


def _is_agent_tool(tool: Any) -> bool:
    return bool(getattr(tool, "_is_agent_tool", False)) and hasattr(tool, "_agent_instance")


class Patch:
    """The SDK attributes replaced while instrumented; :meth:`remove` puts back the originals
    (the very objects that were there)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.previous_runner = sdk_run.get_default_agent_runner()
        self.runner = GovernedRunner(self.previous_runner, runtime)
        self._guardrails_of = tool_execution._execute_tool_input_guardrails
        self._invoke_of = tool_execution._invoke_function_tool_with_metadata
        self._handoffs_of = turn_resolution.execute_handoffs
        #: (module, attribute, original, replacement)
        self.patched: list[tuple[Any, str, Any, Any]] = [
            (
                tool_execution,
                "_execute_tool_input_guardrails",
                self._guardrails_of,
                self._guardrails,
            ),
            (tool_execution, "_invoke_function_tool_with_metadata", self._invoke_of, self._invoke),
            (turn_resolution, "execute_handoffs", self._handoffs_of, self._handoffs),
        ]

    def install(self) -> None:
        for module, name, _, replacement in self.patched:
            setattr(module, name, replacement)
        sdk_run.set_default_agent_runner(self.runner)

    def remove(self) -> None:
        for module, name, original, _ in self.patched:
            setattr(module, name, original)
        if sdk_run.get_default_agent_runner() is self.runner:
            sdk_run.set_default_agent_runner(self.previous_runner)

    # -- tools ----------------------------------------------------------------------------------

    async def _guardrails(self, **kwargs: Any) -> str | None:
        rejected: str | None = await self._guardrails_of(**kwargs)
        state = _RUN.get()
        if rejected is not None or state is None or state.run is None:
            return rejected
        run = state.run
        tool = kwargs["func_tool"]
        context = kwargs["tool_context"]
        agent = kwargs["agent"]
        caller = run.agent_of(agent)
        try:
            if _is_agent_tool(tool):
                task = task_text(getattr(context, "tool_arguments", ""))
                child = await run.adelegate(caller, str(tool._agent_instance.name), task)
                state.delegations[id(context)] = (context, _Delegation(child))
            else:
                span = run.tool(caller, str(tool.name), getattr(context, "tool_arguments", ""))
                await span.adecide()
                state.tools[id(context)] = (context, span)
        except SessionKilled as stop:
            raise sdk_error(run.stopped(stop)) from None
        except Stopped as stop:
            run.fallback(agent, stop)
            return stop_message(stop)
        return None

    async def _invoke(self, **kwargs: Any) -> Any:
        state = _RUN.get()
        if state is None or state.run is None:
            return await self._invoke_of(**kwargs)
        context = kwargs["context"]
        delegation = state.take_delegation(context)
        if delegation is not None:
            return await self._invoke_delegation(state.run, delegation, kwargs)
        span = state.take_tool(context)
        if span is None:  # a call the guardrail step did not see (e.g. an approved one)
            run = state.run
            tool = kwargs["function_tool"]
            span = run.tool(
                run.agent_of(getattr(context, "agent", None)),
                str(tool.name),
                kwargs.get("arguments", ""),
            )
            try:
                await span.adecide()
            except SessionKilled as stop:
                raise sdk_error(run.stopped(stop)) from None
            except Stopped as stop:
                run.fallback(getattr(context, "agent", None), stop)
                return _result(stop_message(stop))
        span.open()
        try:
            result = await self._invoke_of(**kwargs)
        except BaseException as exc:
            span.close(exc)
            raise
        span.close()
        return result

    async def _invoke_delegation(
        self, run: Run, delegation: _Delegation, kwargs: dict[str, Any]
    ) -> Any:
        child = delegation.child
        token = _PENDING.set(delegation)
        ctx = otel_context.attach(child._parent_ctx or otel_context.get_current())
        try:
            result = await self._invoke_of(**kwargs)
        finally:
            otel_context.detach(ctx)
            _PENDING.reset(token)
        if not delegation.started:
            # the SDK never ran the agent (its tool failed first): the allowed delegation
            # still ends, so the governor frees it
            await child.astart()
            await child.aend()
        stop = delegation.stop
        if stop is not None and ends_session(stop):
            raise sdk_error(run.stopped(stop))
        if stop is not None:
            # the SDK told the model "an error occurred"; say what it was
            return dataclasses.replace(
                result, output=stop_message(stop), is_sdk_generated_error=False
            )
        return result

    # -- handoffs -------------------------------------------------------------------------------

    async def _handoffs(self, **kwargs: Any) -> Any:
        state = _RUN.get()
        if state is None or state.run is None:
            return await self._handoffs_of(**kwargs)
        run = state.run
        public_agent = kwargs["public_agent"]
        chosen = kwargs["run_handoffs"][0]
        source = run.agent_of(public_agent)
        task = task_text(chosen.tool_call.arguments)
        try:
            target = await run.adelegate(source, str(chosen.handoff.agent_name), task)
        except SessionKilled as stop:
            raise sdk_error(run.stopped(stop)) from None
        except Stopped as stop:
            replacement = run.fallback(public_agent, stop)
            if replacement is None:
                raise sdk_error(stop) from None
            # constrained mode: the app's replacement takes over as the same agent
            run.bind(replacement, source)
            redirected = dataclasses.replace(
                chosen.handoff, on_invoke_handoff=_returning(replacement)
            )
            kwargs["run_handoffs"] = [
                dataclasses.replace(chosen, handoff=redirected),
                *kwargs["run_handoffs"][1:],
            ]
            return await self._handoffs_of(**kwargs)
        try:
            result = await self._handoffs_of(**kwargs)
        except BaseException as exc:
            await target.astart()
            await target.aend(exc)
            raise
        new_agent = getattr(getattr(result, "next_step", None), "new_agent", None)
        await run.atake(source, target, new_agent)
        return result


def _returning(agent: Any) -> Callable[[Any, str], Awaitable[Any]]:
    async def invoke(context: Any, arguments: str) -> Any:
        return agent

    return invoke


def _result(output: str) -> Any:
    from agents.tool import _FunctionToolInvocationResult

    return _FunctionToolInvocationResult(output)


def install(runtime: Runtime) -> Patch:
    """Instrument the SDK for ``runtime``; the returned patch removes it."""
    patch = Patch(runtime)
    patch.install()
    return patch
