"""The LangGraph side of :class:`LangGraphInstrumentor` (imports LangGraph and LangChain).

Four attributes are replaced while instrumented and one callback hook is registered; all
are put back exactly:

- ``langgraph.pregel.Pregel.stream`` and ``Pregel.astream`` (``invoke``, ``ainvoke``,
  ``batch``, ``stream_events`` and every subgraph run go through one of them): a run of a
  named graph is an agent acting. Outside any governed run it opens the root of a session;
  inside one it is the target of a handoff decided earlier, or else a delegation by the
  acting agent, decided before the graph starts. A graph with the acting agent's name (a
  supervisor's own agent inside its workflow), or with no name of its own, is the acting
  agent's own machinery.
- ``langchain_core.tools.BaseTool.run`` and ``BaseTool.arun``: each tool call of an acting
  agent is decided first and runs inside its ``execute_tool`` span; a handoff tool (one
  with ``__handoff_destination`` metadata) is decided as a delegation instead. A stop
  becomes the tool's result, the way LangChain reports a tool's failure to the model.
- a LangChain configure hook (``langchain_core.tracers.context.register_configure_hook``,
  the way LangChain's own tracer joins every run): a callback handler that checks for a
  kill before each model call and counts the acting agent's token usage.

Which agent acts is a context variable set around each step of its graph run; LangGraph
copies the context into the threads and tasks that run nodes and tools, and so does
everything they call.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage, ToolMessage
from langchain_core.tools import BaseTool
from langchain_core.tracers import context as lc_context
from langgraph.errors import GraphBubbleUp
from langgraph.pregel import Pregel
from langgraph.types import Command, Send
from opentelemetry import context as otel_context

from agentgov.instrumentation.frameworks._runtime import (
    Run,
    Runtime,
    arelease,
    ends_session,
    framework_error,
    release,
    stop_message,
)
from agentgov.instrumentation.governor import SessionKilled, Stopped
from agentgov.instrumentation.spans import AgentSpan

log = logging.getLogger("agentgov.instrumentation.frameworks.langgraph")

#: the name LangGraph gives a graph compiled without one
DEFAULT_NAME = "LangGraph"
#: the tool metadata that makes a tool a handoff (langgraph-supervisor, langgraph-swarm)
HANDOFF_DESTINATION = "__handoff_destination"
#: arguments of a handoff tool that carry the task it hands over
TASK_ARGUMENTS = ("task", "task_description", "input", "request", "instructions", "message")
#: the most of a non-message input kept as text (an intent or a task)
MAX_INPUT_TEXT = 4000
_HUMAN = frozenset({"human", "user"})


class SessionKilledByGovernor(SessionKilled, GraphBubbleUp):
    """A session kill, raised inside a LangGraph run: an agentgov
    :class:`~agentgov.instrumentation.governor.SessionKilled` that is also a
    ``langgraph.errors.GraphBubbleUp``, so LangGraph passes it up through every node, tool
    node error handler and retry policy to the caller of ``invoke``/``stream``, as it does
    its own interrupts."""


def killed(stop: SessionKilled) -> SessionKilledByGovernor:
    """``stop`` as the exception LangGraph lets through (same message and fields)."""
    return framework_error(stop, SessionKilledByGovernor)


# -- what a run is about --------------------------------------------------------------------


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            p if isinstance(p, str) else p.get("text") if isinstance(p, Mapping) else None
            for p in content
        ]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def _role_text(message: Any) -> tuple[str, str]:
    if isinstance(message, BaseMessage):
        return message.type, _content_text(message.content)
    if isinstance(message, str):
        return "human", message
    if isinstance(message, Mapping):
        role = message.get("role") or message.get("type") or ""
        return str(role), _content_text(message.get("content"))
    if isinstance(message, list | tuple) and len(message) == 2:
        return str(message[0]), _content_text(message[1])
    return "", ""


def _messages_of(value: Any) -> Sequence[Any] | None:
    if isinstance(value, Mapping):
        messages = value.get("messages")
    elif isinstance(value, list | tuple):
        messages = value
    else:
        messages = getattr(value, "messages", None)
    return messages if isinstance(messages, list | tuple) else None


def _last_human(messages: Sequence[Any]) -> str:
    for message in reversed(messages):
        role, text = _role_text(message)
        if role in _HUMAN:
            return text
    return ""


def input_text(value: Any) -> str:
    """A graph's input as text: the string, the last human message of its messages, or
    (another state) the state as JSON."""
    if isinstance(value, str):
        return value
    messages = _messages_of(value)
    if messages is not None:
        return _last_human(messages)
    if isinstance(value, Mapping) and value:
        return json.dumps(value, sort_keys=True, default=str)[:MAX_INPUT_TEXT]
    return ""


def _config_value(config: Any, section: str, key: str) -> str:
    part = config.get(section) if isinstance(config, Mapping) else None
    value = part.get(key) if isinstance(part, Mapping) else None
    return str(value) if value is not None and value != "" else ""


def _call_parts(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """The input and the config of a ``stream``/``astream`` call."""
    value = args[0] if args else kwargs.get("input")
    config = args[1] if len(args) > 1 else kwargs.get("config")
    return value, config


def _model_arguments(tool: BaseTool, tool_input: Any) -> Any:
    """The arguments the model gave a tool call: its input without what LangGraph injects
    (the graph's state, the store, the runtime)."""
    if not isinstance(tool_input, dict):
        return tool_input
    try:
        schema = tool.tool_call_schema
        if isinstance(schema, Mapping):
            fields: Any = schema.get("properties") or {}
        else:
            fields = getattr(schema, "model_fields", None)
    except Exception:  # a schema LangChain cannot build: keep the plain values
        fields = None
    if isinstance(fields, Mapping):
        return {k: v for k, v in tool_input.items() if k in fields}
    return {k: v for k, v in tool_input.items() if isinstance(v, str | int | float | bool)}


def handoff_task(tool: BaseTool, tool_input: Any) -> str:
    """What a handoff hands over: the task its arguments name (``task``,
    ``task_description``, ...), else its arguments as JSON, else (a handoff the model calls
    with no arguments) the last human message of the state the target takes over."""
    args = _model_arguments(tool, tool_input)
    if isinstance(args, str):
        return args
    if isinstance(args, Mapping) and args:
        for key in TASK_ARGUMENTS:
            value = args.get(key)
            if isinstance(value, str) and value:
                return value
        return json.dumps(args, sort_keys=True, default=str)[:MAX_INPUT_TEXT]
    if isinstance(tool_input, Mapping):
        for value in tool_input.values():
            messages = _messages_of(value) if isinstance(value, Mapping) else None
            if messages is not None:
                return _last_human(messages)
    return ""


def _destination(tool: BaseTool) -> str:
    metadata = tool.metadata
    target = metadata.get(HANDOFF_DESTINATION) if metadata else None
    return target if isinstance(target, str) and target else ""


def _goto_names(command: Command) -> list[str]:
    goto = command.goto
    items = goto if isinstance(goto, list | tuple) else [goto]
    names = [g.node if isinstance(g, Send) else g for g in items]
    return [n for n in names if isinstance(n, str) and n]


def _tool_result(content: str, tool: BaseTool, tool_call_id: Any) -> Any:
    """``content`` as the result of a refused tool call, in the shape LangChain gives a
    tool's failure: an error ``ToolMessage`` for a model's tool call, the text otherwise."""
    if tool_call_id is None:
        return content
    return ToolMessage(content, tool_call_id=tool_call_id, name=tool.name, status="error")


def _failure(exc: BaseException | None) -> BaseException | None:
    """What a graph run ended with, as its agent's span records it: LangGraph's own control
    flow (a handoff's ``ParentCommand``, an interrupt) and a consumer that stopped reading
    are not failures; a kill is."""
    if exc is None or isinstance(exc, GeneratorExit):
        return None
    if isinstance(exc, GraphBubbleUp) and not isinstance(exc, Stopped):
        return None
    return exc


# -- the agents of a run ----------------------------------------------------------------------


class _Session:
    """What the agents of one root graph run share, across the run's threads and tasks:
    handoffs decided and not yet taken by their target, and the nodes the ``on_stop`` hook
    routed to, which act as the agent whose step was stopped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[AgentSpan]] = {}
        self._bound: dict[str, _Activation] = {}

    def add_pending(self, name: str, target: AgentSpan) -> None:
        with self._lock:
            self._pending.setdefault(name, []).append(target)

    def take_pending(self, names: Sequence[str]) -> AgentSpan | None:
        with self._lock:
            for name in names:
                waiting = self._pending.get(name)
                if waiting:
                    return waiting.pop(0)
        return None

    def leftovers(self) -> list[AgentSpan]:
        """Handoffs allowed whose target never ran as a graph (taken out)."""
        with self._lock:
            out = [t for waiting in self._pending.values() for t in waiting]
            self._pending.clear()
        return out

    def bind(self, names: Sequence[str], activation: _Activation) -> None:
        with self._lock:
            for name in names:
                self._bound[name] = activation

    def bound(self, names: Sequence[str]) -> _Activation | None:
        with self._lock:
            for name in names:
                found = self._bound.get(name)
                if found is not None:
                    return found
        return None


class _Activation:
    """An agent acting: the governed run of a named graph (or, for a graph the ``on_stop``
    hook put in place, the run of the agent it acts as)."""

    def __init__(self, session: _Session, run: Run, graph: Any, parent: _Activation | None) -> None:
        assert run.first is not None
        self.session = session
        self.run = run
        self.agent: AgentSpan = run.first
        self.graph = graph
        #: the agent acting where this one started (None: the root of the session)
        self.parent = parent
        self.root = parent is None

    def returns_to(self, name: str) -> bool:
        """Whether handing off to ``name`` gives control back to this agent or to one it
        runs under (a worker's handoff back to its supervisor): no delegation."""
        acting: _Activation | None = self
        while acting is not None:
            if acting.agent.name == name:
                return True
            acting = acting.parent
        return False

    def close(self, error: BaseException | None) -> None:
        if self.root:
            for target in self.session.leftovers():
                release(target)  # allowed, never run as a graph: the governor frees it
        self.run.close(error)

    async def aclose(self, error: BaseException | None) -> None:
        if self.root:
            for target in self.session.leftovers():
                await arelease(target)
        await self.run.aclose(error)


_ACTING: ContextVar[_Activation | None] = ContextVar("agentgov_langgraph_acting", default=None)


@contextmanager
def _acting_as(acting: _Activation) -> Iterator[None]:
    """``acting``'s context around a step of its graph run: it is the acting agent, its span
    and lineage are current."""
    token = _ACTING.set(acting)
    ctx = otel_context.attach(acting.agent.context)
    try:
        yield
    finally:
        otel_context.detach(ctx)
        _ACTING.reset(token)


class _Start:
    """How a graph run that is an agent's run opens (at its first step)."""

    def __init__(
        self,
        runtime: Runtime,
        graph: Any,
        name: str,
        session: _Session,
        parent: _Activation | None = None,
        pending: AgentSpan | None = None,
        bound: _Activation | None = None,
        text: str = "",
        conversation: str | None = None,
    ) -> None:
        self.runtime = runtime
        self.graph = graph
        self.name = name
        self.session = session
        self.parent = parent
        self.pending = pending
        self.bound = bound
        self.text = text
        self.conversation = conversation

    def _opened(self, run: Run) -> _Activation:
        parent = self.parent
        assert run.first is not None
        if parent is not None and self.pending is None and self.text:
            parent.agent.message(run.first.agent_id, self.text)
        return _Activation(self.session, run, self.graph, parent)

    def _refused(self, stop: Stopped) -> Any:
        """A delegation to this graph was stopped: the graph the ``on_stop`` hook puts in
        its place (it runs as the delegating agent), else the stop raises."""
        parent = self.parent
        if isinstance(stop, SessionKilled):
            if parent is not None:
                parent.run.stopped(stop)
            raise killed(stop) from None
        if parent is None:
            raise stop
        answer = parent.run.fallback(parent.graph, stop)
        if not isinstance(answer, Pregel):
            raise stop
        if answer.name and answer.name != DEFAULT_NAME:
            self.session.bind([answer.name], parent)  # its later runs act as the parent too
        return answer

    def _options(self) -> dict[str, Any]:
        if self.pending is not None:
            return {"pending": self.pending, "framework_agent": self.graph}
        if self.parent is None:
            return {
                "input_text": self.text,
                "conversation_id": self.conversation,
                "workflow_name": self.name,
                "framework_agent": self.graph,
            }
        return {"input_text": self.text, "framework_agent": self.graph}

    def open(self) -> _Activation | Pregel:
        """The activation, or the graph that runs in place of this one."""
        if self.bound is not None:
            return self.bound
        try:
            run = self.runtime.open_run(self.name, **self._options())
        except Stopped as stop:
            return self._refused(stop)
        return self._opened(run)

    async def aopen(self) -> _Activation | Pregel:
        """:meth:`open` without holding the event loop."""
        if self.bound is not None:
            return self.bound
        try:
            run = await self.runtime.aopen_run(self.name, **self._options())
        except Stopped as stop:
            return self._refused(stop)
        return self._opened(run)


# -- callbacks: kill checkpoints before model calls, token usage --------------------------------


class _Checkpoints(BaseCallbackHandler):
    """Joins every LangChain run of the process; acts only inside a governed graph run."""

    #: a kill must end the model call, not be logged and passed over
    raise_error = True
    #: instant, local checks: run in the caller's own context (on its event loop)
    run_inline = True

    def __init__(self) -> None:
        self.active = True

    @property
    def ignore_chain(self) -> bool:
        return True

    @property
    def ignore_agent(self) -> bool:
        return True

    @property
    def ignore_retriever(self) -> bool:
        return True

    @property
    def ignore_retry(self) -> bool:
        return True

    @property
    def ignore_custom_event(self) -> bool:
        return True

    def _checkpoint(self) -> None:
        acting = _ACTING.get()
        if acting is None or not self.active:
            return
        try:
            acting.run.checkpoint()
        except SessionKilled as stop:
            raise killed(stop) from None

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self._checkpoint()

    def on_llm_start(self, serialized: Any, prompts: Any, **kwargs: Any) -> None:
        self._checkpoint()

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        acting = _ACTING.get()
        if acting is None or not self.active:
            return
        try:
            tokens_in, tokens_out = _usage(response)
            if tokens_in or tokens_out:
                acting.agent.usage(input_tokens=tokens_in, output_tokens=tokens_out)
        except Exception:  # counting must never break the model call
            log.exception("agentgov: could not read a model call's token usage")


def _usage(response: Any) -> tuple[int, int]:
    """Input and output tokens of a model call: the messages' ``usage_metadata``, else the
    provider's ``token_usage``."""
    tokens_in = tokens_out = 0
    found = False
    for generations in getattr(response, "generations", None) or []:
        for generation in generations:
            usage = getattr(getattr(generation, "message", None), "usage_metadata", None)
            if usage:
                found = True
                tokens_in += int(usage.get("input_tokens") or 0)
                tokens_out += int(usage.get("output_tokens") or 0)
    if not found:
        output = getattr(response, "llm_output", None) or {}
        usage = output.get("token_usage") or output.get("usage") or {}
        if isinstance(usage, Mapping):
            tokens_in = int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0)
            tokens_out = int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
    return tokens_in, tokens_out


# -- the patch ----------------------------------------------------------------------------------


class Patch:
    """What is replaced while instrumented; :meth:`remove` puts back the originals (the
    very objects that were there) and takes the callback hook out."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._stream_of = Pregel.__dict__["stream"]
        self._astream_of = Pregel.__dict__["astream"]
        self._run_of = BaseTool.__dict__["run"]
        self._arun_of = BaseTool.__dict__["arun"]
        self.handler = _Checkpoints()
        # a default value, not a value set in one context: every thread and task sees it
        self.hook: ContextVar[BaseCallbackHandler | None] = ContextVar(
            "agentgov_langgraph_callbacks", default=self.handler
        )
        patch = self

        def stream(graph: Any, *args: Any, **kwargs: Any) -> Any:
            return patch._stream(graph, args, kwargs)

        def astream(graph: Any, *args: Any, **kwargs: Any) -> Any:
            return patch._astream(graph, args, kwargs)

        def run(tool: BaseTool, tool_input: Any, *args: Any, **kwargs: Any) -> Any:
            return patch._run(tool, tool_input, args, kwargs)

        async def arun(tool: BaseTool, tool_input: Any, *args: Any, **kwargs: Any) -> Any:
            return await patch._arun(tool, tool_input, args, kwargs)

        for fn, original in (
            (stream, self._stream_of),
            (astream, self._astream_of),
            (run, self._run_of),
            (arun, self._arun_of),
        ):
            fn.__doc__ = original.__doc__
        #: (class, attribute, original, replacement)
        self.patched: list[tuple[type, str, Any, Any]] = [
            (Pregel, "stream", self._stream_of, stream),
            (Pregel, "astream", self._astream_of, astream),
            (BaseTool, "run", self._run_of, run),
            (BaseTool, "arun", self._arun_of, arun),
        ]

    def install(self) -> None:
        for cls, name, _, replacement in self.patched:
            setattr(cls, name, replacement)
        lc_context.register_configure_hook(self.hook, True)

    def remove(self) -> None:
        for cls, name, original, _ in self.patched:
            setattr(cls, name, original)
        # callback managers built meanwhile may keep the handler: it does nothing now
        self.handler.active = False
        hooks = lc_context._configure_hooks
        hooks[:] = [h for h in hooks if h[0] is not self.hook]

    # -- graph runs -----------------------------------------------------------------------------

    def _start(self, graph: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Start | None:
        """How this run of ``graph`` opens, or None when it is the acting agent's own."""
        value, config = _call_parts(args, kwargs)
        name = str(getattr(graph, "name", "") or DEFAULT_NAME)
        acting = _ACTING.get()
        if acting is None:
            conversation = _config_value(config, "configurable", "thread_id") or (
                _config_value(getattr(graph, "config", None), "configurable", "thread_id")
            )
            return _Start(
                self.runtime,
                graph,
                name,
                _Session(),
                text=input_text(value),
                conversation=conversation or None,
            )
        if graph is acting.graph or name == acting.agent.name:
            return None
        node = _config_value(config, "metadata", "langgraph_node")
        names = [n for n in dict.fromkeys((name, node)) if n and n != DEFAULT_NAME]
        if not names:
            return None
        session = acting.session
        bound = session.bound(names)
        if bound is acting:
            return None
        if bound is not None:
            return _Start(self.runtime, graph, bound.agent.name, session, bound=bound)
        pending = session.take_pending(names)
        if pending is None and name == DEFAULT_NAME:
            return None  # a subgraph of the acting agent, not a handoff's target
        return _Start(
            self.runtime,
            graph,
            name if name != DEFAULT_NAME else names[0],
            session,
            parent=acting,
            pending=pending,
            text=input_text(value) if pending is None else "",
        )

    def _stream(self, graph: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        start = self._start(graph, args, kwargs)
        if start is None:
            return self._stream_of(graph, *args, **kwargs)
        return self._governed(start, lambda g: self._stream_of(g, *args, **kwargs))

    def _astream(self, graph: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        start = self._start(graph, args, kwargs)
        if start is None:
            return self._astream_of(graph, *args, **kwargs)
        return self._agoverned(start, lambda g: self._astream_of(g, *args, **kwargs))

    def _governed(self, start: _Start, make: Callable[[Any], Iterator[Any]]) -> Iterator[Any]:
        opened = start.open()
        if not isinstance(opened, _Activation):
            yield from make(opened)  # the hook's graph, acting as the delegating agent
            return
        acting = opened
        inner = make(start.graph)
        error: BaseException | None = None
        try:
            while True:
                with _acting_as(acting):
                    try:
                        item = next(inner)
                    except StopIteration:
                        break
                yield item
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                close = getattr(inner, "close", None)
                if close is not None:
                    with _acting_as(acting):
                        close()
            finally:
                if start.bound is None:  # a bound graph's agent goes on after it
                    acting.close(_failure(error))

    async def _agoverned(
        self, start: _Start, make: Callable[[Any], AsyncIterator[Any]]
    ) -> AsyncIterator[Any]:
        opened = await start.aopen()
        if not isinstance(opened, _Activation):
            async for item in make(opened):
                yield item
            return
        acting = opened
        inner = make(start.graph)
        error: BaseException | None = None
        try:
            while True:
                with _acting_as(acting):
                    try:
                        item = await inner.__anext__()
                    except StopAsyncIteration:
                        break
                yield item
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                aclose = getattr(inner, "aclose", None)
                if aclose is not None:
                    with _acting_as(acting):
                        await aclose()
            finally:
                if start.bound is None:
                    await acting.aclose(_failure(error))

    # -- tool calls -----------------------------------------------------------------------------

    def _refused(self, acting: _Activation, tool: BaseTool, call_id: Any, stop: Stopped) -> Any:
        """The result of a tool call the governor stopped: what the ``on_stop`` hook
        answers (a text, a ToolMessage, a Command), else the stop's message."""
        answer = acting.run.fallback(acting.graph, stop)
        if answer is None:
            answer = stop_message(stop)
        if isinstance(answer, str):
            return _tool_result(answer, tool, call_id)
        if isinstance(answer, Command):
            # the nodes it routes to act as the stopped agent: a constrained mode
            acting.session.bind(_goto_names(answer), acting)
        return answer

    def _run(
        self, tool: BaseTool, tool_input: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        acting = _ACTING.get()
        if acting is None:
            return self._run_of(tool, tool_input, *args, **kwargs)
        run = acting.run
        call_id = kwargs.get("tool_call_id")
        destination = _destination(tool)
        if destination and acting.returns_to(destination):
            return self._run_of(tool, tool_input, *args, **kwargs)
        try:
            if destination:
                target = run.delegate(acting.agent, destination, handoff_task(tool, tool_input))
            else:
                span = run.tool(acting.agent, tool.name, _model_arguments(tool, tool_input))
                span.decide()
        except SessionKilled as stop:
            raise killed(run.stopped(stop)) from None
        except Stopped as stop:
            return self._refused(acting, tool, call_id, stop)
        if destination:
            # the target's graph run takes the delegation when it starts
            acting.session.add_pending(destination, target)
            return self._run_of(tool, tool_input, *args, **kwargs)
        span.open()
        try:
            result = self._run_of(tool, tool_input, *args, **kwargs)
        except BaseException as exc:
            span.close(_failure(exc))  # an interrupt in the tool is no failure
            if isinstance(exc, Stopped) and not ends_session(exc):
                # a delegation the tool made (an agent run inside it) was stopped
                return _tool_result(stop_message(exc), tool, call_id)
            raise
        span.close()
        return result

    async def _arun(
        self, tool: BaseTool, tool_input: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        acting = _ACTING.get()
        if acting is None:
            return await self._arun_of(tool, tool_input, *args, **kwargs)
        run = acting.run
        call_id = kwargs.get("tool_call_id")
        destination = _destination(tool)
        if destination and acting.returns_to(destination):
            return await self._arun_of(tool, tool_input, *args, **kwargs)
        try:
            if destination:
                task = handoff_task(tool, tool_input)
                target = await run.adelegate(acting.agent, destination, task)
            else:
                span = run.tool(acting.agent, tool.name, _model_arguments(tool, tool_input))
                await span.adecide()
        except SessionKilled as stop:
            raise killed(run.stopped(stop)) from None
        except Stopped as stop:
            return self._refused(acting, tool, call_id, stop)
        if destination:
            acting.session.add_pending(destination, target)
            return await self._arun_of(tool, tool_input, *args, **kwargs)
        span.open()
        try:
            result = await self._arun_of(tool, tool_input, *args, **kwargs)
        except BaseException as exc:
            span.close(_failure(exc))  # an interrupt in the tool is no failure
            if isinstance(exc, Stopped) and not ends_session(exc):
                return _tool_result(stop_message(exc), tool, call_id)
            raise
        span.close()
        return result


def install(runtime: Runtime) -> Patch:
    """Instrument LangGraph and LangChain tools for ``runtime``; the returned patch
    removes it."""
    patch = Patch(runtime)
    patch.install()
    return patch
