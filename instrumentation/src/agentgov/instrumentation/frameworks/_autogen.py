"""The AutoGen AgentChat side of :class:`AutoGenInstrumentor` (imports autogen-agentchat).

AutoGen runs a team as messages between agents of an agent runtime: the team's caller, the
team's manager and each participant's turn run in different asyncio tasks, and an app's own
runtime does not carry the caller's context to them. So a governed run is found by the
team's group topic (every manager and participant container knows it), and within a turn
by a context variable the turn sets (tool calls run in tasks created inside the turn).

Eight attributes are replaced while instrumented, and :meth:`Patch.remove` puts back the
very objects that were there:

- ``BaseGroupChat.run_stream``: every team run (``run``, ``run_stream``, a team used as a
  tool or as a participant of another team) is a governed run;
- ``BaseGroupChatManager._log_speaker_selection``: each speaker the manager picked is
  admitted before its turn is requested: a kill checkpoint, then a participant's first turn
  is the team's delegation to it, decided first (a ``Swarm``'s speakers come from handoffs
  instead); a stop ends the team through its own termination, naming the reason;
- ``ChatAgentContainer.on_message_impl`` (added; the container has none of its own): a
  participant's turn runs in its agent's context;
- ``AssistantAgent.on_messages_stream``: an ``AssistantAgent`` run outside a team (``run``,
  ``run_stream``, ``on_messages``, an ``AgentTool``) is a governed run;
- ``AssistantAgent._execute_tool_call``: each tool call is decided before it runs, a
  handoff as a delegation by the handing-off agent, an ``AgentTool`` / ``TeamTool`` call as
  a delegation to the nested agent or team; a stop becomes the call's result;
- ``AssistantAgent._check_and_handle_handoff``: a handoff the governor stopped is not
  handed over (the agent keeps the floor);
- ``AssistantAgent._call_llm`` and ``_reflect_on_tool_use_flow``: a kill checkpoint before
  each model call, the agent's token usage after it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from contextvars import ContextVar
from typing import Any

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.base import Response, TaskResult
from autogen_agentchat.messages import BaseChatMessage, StopMessage
from autogen_agentchat.teams import BaseGroupChat, Swarm
from autogen_agentchat.teams._group_chat._base_group_chat_manager import BaseGroupChatManager
from autogen_agentchat.teams._group_chat._chat_agent_container import ChatAgentContainer
from autogen_agentchat.teams._group_chat._events import GroupChatRequestPublish
from autogen_agentchat.tools._task_runner_tool import TaskRunnerTool
from autogen_core import FunctionCall
from autogen_core.models import CreateResult, FunctionExecutionResult
from opentelemetry import context as otel_context
from opentelemetry.trace import Status, StatusCode

from agentgov.instrumentation.frameworks._runtime import (
    MISSING,
    Run,
    Runtime,
    arelease,
    put_back,
    stop_message,
    task_text,
)
from agentgov.instrumentation.governor import SessionKilled, Stopped
from agentgov.instrumentation.spans import AgentSpan

# -- what a run is about ------------------------------------------------------------------------


def _message_text(message: Any) -> str:
    content = getattr(message, "content", None)
    if isinstance(content, str):
        return content
    try:
        return str(message.to_model_text())
    except Exception:  # a message kind that cannot say itself as text
        return ""


def input_text(task: Any) -> str:
    """A run's input as text: the string, the message, or the last message from the user
    (else the last message) of a list."""
    if task is None:
        return ""
    if isinstance(task, str):
        return task
    if isinstance(task, BaseChatMessage):
        return _message_text(task)
    if isinstance(task, Sequence):
        messages = [m for m in task if isinstance(m, BaseChatMessage)]
        for message in reversed(messages):
            if message.source == "user":
                return _message_text(message)
        return _message_text(messages[-1]) if messages else ""
    return ""


def _argument(args: tuple[Any, ...], kwargs: Mapping[str, Any], name: str, index: int) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def _handoff_of(agent: Any, tool_name: str, handoff_tools: Any) -> tuple[str, str] | None:
    """The target and message of the handoff ``tool_name`` of ``agent``, if it is one."""
    handoffs = getattr(agent, "_handoffs", None)
    if isinstance(handoffs, Mapping) and tool_name in handoffs:
        handoff = handoffs[tool_name]
        return str(handoff.target), str(getattr(handoff, "message", "") or "")
    if any(getattr(t, "name", None) == tool_name for t in handoff_tools or ()):
        return tool_name.removeprefix("transfer_to_"), ""
    return None


def _task_runner_of(workbenches: Any, tool_name: str) -> Any:
    """The agent or team an ``AgentTool`` / ``TeamTool`` named ``tool_name`` runs, if the
    call is one."""
    for workbench in workbenches or ():
        renamed = getattr(workbench, "_override_name_to_original", None) or {}
        name = renamed.get(tool_name, tool_name)
        for tool in getattr(workbench, "_tools", None) or ():
            if getattr(tool, "name", None) == name and isinstance(tool, TaskRunnerTool):
                return tool._task_runner
    return None


def _refused(tool_call: Any, stop: Stopped, extra: Any = None) -> tuple[Any, Any]:
    """A tool call's result that says the governor stopped it (the call never ran)."""
    text = stop_message(stop)
    if isinstance(extra, str) and extra:
        text = f"{text}\n{extra}"
    return tool_call, FunctionExecutionResult(
        content=text, call_id=tool_call.id, is_error=True, name=tool_call.name
    )


def _bound(original: Any, instance: Any, owner: type) -> Callable[..., Any]:
    """``original`` (a class attribute: function, static or class method, or another
    instrumentation's wrapper of one) as the callable a lookup on ``instance`` gives."""
    get = getattr(original, "__get__", None)
    return get(instance, owner) if get is not None else original


def _dress(function: Any, owner: type, name: str) -> None:
    """Make a replacement look like the attribute it replaces (its module, name and
    signature), so that code finding methods by their qualified name, as other
    instrumentations do, finds it where the original was."""
    original = getattr(owner, name)
    original = getattr(original, "__func__", original)
    function.__module__ = owner.__module__
    function.__name__ = name
    function.__qualname__ = f"{owner.__qualname__}.{name}"
    function.__doc__ = getattr(original, "__doc__", None)
    function.__wrapped__ = original


# -- governed runs -----------------------------------------------------------------------------


@dataclasses.dataclass
class _Delegation:
    """A call of an agent or team used as a tool that the governor allowed: the nested run
    of ``runner`` takes ``child``."""

    child: AgentSpan
    runner: object
    started: bool = False

    def take(self, runner: object) -> AgentSpan | None:
        if self.started or runner is not self.runner:
            return None
        self.started = True
        return self.child


@dataclasses.dataclass(eq=False)
class _Turn:
    """An agent's turn within a governed run: whom its tool calls and model calls belong to."""

    state: _State
    agent: AgentSpan
    framework_agent: object
    #: ids of the calls the governor stopped in this turn (a stopped handoff is not handed
    #: over)
    refused: set[str] = dataclasses.field(default_factory=set)

    @property
    def live(self) -> bool:
        return not self.state.closed and self.state.run is not None

    def usage(self, usage: Any) -> None:
        if usage is not None:
            self.agent.usage(
                input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            )


_TURN: ContextVar[_Turn | None] = ContextVar("agentgov_autogen_turn", default=None)
_PENDING: ContextVar[_Delegation | None] = ContextVar("agentgov_autogen_delegation", default=None)


class _State:
    """One governed run: a team's run, or an ``AssistantAgent``'s run outside a team."""

    def __init__(self, runtime: Runtime, team: Any = None, text: str = "") -> None:
        self.runtime = runtime
        self.team = team
        self.text = text
        self.run: Run | None = None
        #: the team's own agent, which delegates the turns (None for a Swarm started on its
        #: own: its first speaker is the run's root and its handoffs are the delegations)
        self.leader: AgentSpan | None = None
        self.swarm = isinstance(team, Swarm)
        self.members: dict[str, Any] = {
            str(p.name): p for p in (getattr(team, "_participants", None) or ())
        }
        #: each participant's agent in this run, once admitted
        self.participants: dict[str, AgentSpan] = {}
        #: handoffs the governor allowed whose target has not taken over yet, by target
        self.pending: dict[str, tuple[AgentSpan, AgentSpan]] = {}
        self.killed: SessionKilled | None = None
        #: the stop that ended the team (through its own termination)
        self.ended_by: Stopped | None = None
        self.closed = False
        #: what opens a Swarm's run when its first speaker is known (in the caller's context)
        self.opener: Callable[[str], Awaitable[Run]] | None = None

    def checkpoint(self) -> None:
        if self.run is not None:
            try:
                self.run.checkpoint()
            except SessionKilled as kill:
                self.killed = kill
                raise

    def note_kill(self, kill: SessionKilled) -> None:
        self.killed = kill
        if self.run is not None:
            self.run.stopped(kill)

    def fallback(self, framework_agent: object, stop: Stopped) -> Any:
        if self.run is not None:
            return self.run.fallback(framework_agent, stop)
        hook = self.runtime.settings.on_stop
        return hook(framework_agent, stop) if hook is not None else None

    async def hold(self, target_name: str, source: AgentSpan, target: AgentSpan) -> None:
        """Keep an allowed handoff until its target's turn (a newer one to the same target
        replaces it)."""
        previous = self.pending.pop(target_name, None)
        if previous is not None:
            await arelease(previous[1])
        self.pending[target_name] = (source, target)

    # -- turns of a team ----------------------------------------------------------------------

    async def admit(self, name: str) -> None:
        """Let participant ``name`` take its turn: a kill checkpoint; a pending handoff to it
        takes over; its first turn is the team's delegation to it. Raises on a stop."""
        run = self.run
        member = self.members.get(name)
        if run is None:
            assert self.opener is not None
            opener, self.opener = self.opener, None
            run = self.run = await opener(name)
            assert run.first is not None
            self.participants[name] = run.first
            return
        self.checkpoint()
        held = self.pending.pop(name, None)
        if held is not None:
            source, target = held
            # in a Swarm the handing-off agent acts again only through a new handoff
            ends = self.swarm and source is not self.leader
            await run.atake(source, target, member, ends_source=ends)
            if ends:
                for other, agent in list(self.participants.items()):
                    if agent is source:
                        del self.participants[other]
            self.participants[name] = target
            return
        if name in self.participants:
            return
        delegator = self.leader or run.current
        assert delegator is not None
        # a turn carries no task of its own: the participant answers the conversation (what
        # it receives from the others is recorded as their messages at its turn)
        chosen = await run.adelegate(delegator, name)
        await run.atake(delegator, chosen, member, ends_source=False)
        self.participants[name] = chosen

    async def admit_speakers(self, manager: Any, speakers: list[str]) -> None:
        """Admit every speaker the manager picked; ``speakers`` is changed in place to those
        that take a turn. A stop the app's ``on_stop`` hook does not replace by an admitted
        participant ends the team."""
        admitted: list[str] = []
        ended: Stopped | None = None
        for name in list(speakers):
            try:
                await self.admit(name)
                admitted.append(name)
            except SessionKilled as kill:
                self.note_kill(kill)
                ended = kill
                break
            except Stopped as stop:
                replacement = self._member_name(self.fallback(self.team, stop))
                if replacement in self.participants and replacement not in admitted:
                    admitted.append(str(replacement))  # constrained: an admitted agent goes on
                    continue
                ended = stop
                break
        if ended is None:
            speakers[:] = admitted
            return
        speakers[:] = []
        self.ended_by = ended
        await _terminate(manager, ended)

    def _member_name(self, choice: Any) -> str | None:
        if isinstance(choice, str):
            return choice
        name = getattr(choice, "name", None)
        return str(name) if isinstance(name, str) and self.members.get(name) is choice else None

    def relay(self, container: Any, receiver: AgentSpan) -> None:
        """Record what the receiver gets from the other participants for this turn, as
        messages from them (digests and injection scores, never the text)."""
        for message in list(getattr(container, "_message_buffer", None) or ()):
            sender = self.participants.get(getattr(message, "source", ""))
            if sender is None or sender is receiver:
                continue
            text = _message_text(message)
            if text:
                sender.message(receiver.agent_id, text)

    async def close(self, error: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        leftover, self.pending = list(self.pending.values()), {}
        for _, target in leftover:
            await arelease(target)
        if self.run is not None:
            await self.run.aclose(error)


async def _terminate(manager: Any, stop: Stopped) -> None:
    """End a team through its own termination path, as a termination condition would: the
    team's result names the stop as its ``stop_reason``."""
    condition = getattr(manager, "_termination_condition", None)
    if condition is not None:
        await condition.reset()
    manager._current_turn = 0
    name = str(getattr(manager, "_name", "") or "agentgov")
    await manager._signal_termination(StopMessage(content=stop_message(stop), source=name))


async def _in_turn(
    inner: AsyncIterator[Any], enter: Callable[[], tuple[otel_context.Context | None, _Turn | None]]
) -> AsyncGenerator[Any, None]:
    """Iterate ``inner`` with the run's context attached around each step only: what the
    framework starts within a step (its runtime, tool calls) inherits it, the consumer of
    the stream does not."""
    try:
        while True:
            ctx, turn = enter()
            token = otel_context.attach(ctx) if ctx is not None else None
            turn_token = _TURN.set(turn)
            try:
                item = await inner.__anext__()
            except StopAsyncIteration:
                return
            finally:
                _TURN.reset(turn_token)
                if token is not None:
                    otel_context.detach(token)
            yield item
    finally:
        close = getattr(inner, "aclose", None)
        if close is not None:
            await close()


# -- the patch ---------------------------------------------------------------------------------


class Patch:
    """The AutoGen attributes replaced while instrumented; :meth:`remove` puts back the
    originals (the very objects that were there)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.active = False
        #: governed team runs, by their group topic (what managers and containers know)
        self.teams: dict[str, _State] = {}
        replacements: list[tuple[type, str, Any]] = [
            (BaseGroupChat, "run_stream", self._team_run_stream()),
            (BaseGroupChatManager, "_log_speaker_selection", self._speaker_selection()),
            (ChatAgentContainer, "on_message_impl", self._container_message()),
            (AssistantAgent, "on_messages_stream", self._agent_messages_stream()),
            (AssistantAgent, "_execute_tool_call", staticmethod(self._execute_tool_call())),
            (
                AssistantAgent,
                "_check_and_handle_handoff",
                staticmethod(self._check_and_handle_handoff()),
            ),
            (AssistantAgent, "_call_llm", classmethod(self._model_call("_call_llm"))),
            (
                AssistantAgent,
                "_reflect_on_tool_use_flow",
                classmethod(self._model_call("_reflect_on_tool_use_flow")),
            ),
        ]
        for owner, name, replacement in replacements:
            _dress(getattr(replacement, "__func__", replacement), owner, name)
        #: (owner, attribute, original in the owner's own namespace or MISSING, replacement)
        self.patched: list[tuple[type, str, Any, Any]] = [
            (owner, name, owner.__dict__.get(name, MISSING), replacement)
            for owner, name, replacement in replacements
        ]
        self._originals = {(o, n): orig for o, n, orig, _ in self.patched}

    def install(self) -> None:
        for owner, name, _, replacement in self.patched:
            setattr(owner, name, replacement)
        self.active = True

    def remove(self) -> None:
        """Put the originals back. An attribute another instrumentation wrapped since is
        left to it; the wrapper of ours inside passes every call through from now on."""
        self.active = False
        for owner, name, original, replacement in self.patched:
            put_back(owner, name, original, replacement)

    def _original(self, owner: type, name: str, instance: Any, cls: type | None = None) -> Any:
        original = self._originals[(owner, name)]
        if original is MISSING:  # inherited: what the owner's bases give
            return getattr(super(owner, instance), name)
        return _bound(original, instance, cls or type(instance))

    # -- teams --------------------------------------------------------------------------------

    def _team_run_stream(self) -> Callable[..., Any]:
        patch = self

        def run_stream(team: Any, *args: Any, **kwargs: Any) -> Any:
            call = patch._original(BaseGroupChat, "run_stream", team)
            if not patch.active:
                return call(*args, **kwargs)
            return patch._team_run(team, call, args, kwargs)

        return run_stream

    async def _team_run(
        self,
        team: Any,
        call: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> AsyncGenerator[Any, None]:
        key = str(getattr(team, "_group_topic_type", ""))
        if not key or key in self.teams:  # not a team this knows how to follow
            async for item in call(*args, **kwargs):
                yield item
            return
        state = _State(self.runtime, team, input_text(_argument(args, kwargs, "task", 0)))
        turn = _TURN.get()
        live = turn is not None and turn.live and turn.framework_agent is team
        adopted = turn.agent if turn is not None and live else None
        delegation = _PENDING.get()
        pending = delegation.take(team) if delegation is not None else None
        name = str(team.name)
        if adopted is not None:
            # a participant of another team: its turn is this team's agent, owned there
            run = Run(self.runtime, adopted.session_id, None)
            run.first = run.current = adopted
            run.bind(team, adopted)
            state.run, state.leader = run, adopted
        elif pending is not None or not state.swarm:
            state.run = await self.runtime.aopen_run(
                name,
                input_text=state.text,
                conversation_id=None if pending is not None else str(team._team_id),
                workflow_name=name,
                framework_agent=team,
                pending=pending,
            )
            state.leader = state.run.first
        else:
            caller = otel_context.get_current()

            async def opener(first: str) -> Run:
                token = otel_context.attach(caller)
                try:
                    return await self.runtime.aopen_run(
                        first,
                        input_text=state.text,
                        conversation_id=str(team._team_id),
                        workflow_name=name,
                        framework_agent=state.members.get(first),
                    )
                finally:
                    otel_context.detach(token)

            state.opener = opener

        def enter() -> tuple[otel_context.Context | None, _Turn | None]:
            return (state.leader.context if state.leader is not None else None), None

        self.teams[key] = state

        async def finish(error: BaseException | None) -> None:
            if self.teams.get(key) is state:
                del self.teams[key]
            await state.close(error or state.ended_by)

        error: BaseException | None = None
        try:
            async with aclosing(_in_turn(call(*args, **kwargs), enter)) as steps:
                async for item in steps:
                    if isinstance(item, TaskResult):
                        if state.killed is not None:
                            raise state.killed
                        await finish(None)  # the result is the team's last word
                    yield item
        except GeneratorExit:
            raise  # the consumer stopped listening: not the team's error
        except BaseException as exc:
            error = exc
            if state.killed is not None and exc is not state.killed:
                # the team ended with the error of a turn the kill stopped: say why
                error = state.killed
                raise state.killed from exc
            raise
        finally:
            await finish(error)

    def _speaker_selection(self) -> Callable[..., Any]:
        patch = self

        async def _log_speaker_selection(
            manager: Any, speaker_names: Any, *a: Any, **k: Any
        ) -> Any:
            call = patch._original(BaseGroupChatManager, "_log_speaker_selection", manager)
            state = None
            if patch.active and isinstance(speaker_names, list):
                state = patch.teams.get(str(getattr(manager, "_group_topic_type", "")))
            if state is not None and not state.closed:
                await state.admit_speakers(manager, speaker_names)
            return await call(speaker_names, *a, **k)

        return _log_speaker_selection

    def _container_message(self) -> Callable[..., Any]:
        patch = self

        async def on_message_impl(container: Any, message: Any, ctx: Any) -> Any:
            call = patch._original(ChatAgentContainer, "on_message_impl", container)
            state = None
            if patch.active and isinstance(message, GroupChatRequestPublish):
                state = patch.teams.get(str(getattr(container, "_parent_topic_type", "")))
            member = getattr(container, "_agent", None)
            agent = state.participants.get(str(getattr(member, "name", ""))) if state else None
            if state is None or state.closed or agent is None:
                return await call(message, ctx)
            state.relay(container, agent)
            turn_token = _TURN.set(_Turn(state, agent, member))
            token = otel_context.attach(agent.context)
            try:
                return await call(message, ctx)
            finally:
                otel_context.detach(token)
                _TURN.reset(turn_token)

        return on_message_impl

    # -- an AssistantAgent on its own ---------------------------------------------------------

    def _agent_messages_stream(self) -> Callable[..., Any]:
        patch = self

        def on_messages_stream(agent: Any, *args: Any, **kwargs: Any) -> Any:
            call = patch._original(AssistantAgent, "on_messages_stream", agent)
            turn = _TURN.get()
            if not patch.active or (
                turn is not None and turn.live and turn.framework_agent is agent
            ):
                return call(*args, **kwargs)  # a turn of a governed run already
            return patch._agent_run(agent, call, args, kwargs)

        return on_messages_stream

    async def _agent_run(
        self,
        agent: Any,
        call: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> AsyncGenerator[Any, None]:
        state = _State(self.runtime, None, input_text(_argument(args, kwargs, "messages", 0)))
        delegation = _PENDING.get()
        pending = delegation.take(agent) if delegation is not None else None
        token = _PENDING.set(None)  # deeper runs are not this delegation
        try:
            state.run = await self.runtime.aopen_run(
                str(agent.name), input_text=state.text, framework_agent=agent, pending=pending
            )
        finally:
            _PENDING.reset(token)
        leader = state.leader = state.run.first
        assert leader is not None
        turn = _Turn(state, leader, agent)
        error: BaseException | None = None
        try:
            async with aclosing(
                _in_turn(call(*args, **kwargs), lambda: (leader.context, turn))
            ) as steps:
                async for item in steps:
                    if isinstance(item, Response):
                        if state.killed is not None:
                            raise state.killed  # a kill met at a tool call ends the run here
                        # the response is the run's last word (``on_messages`` stops here)
                        await state.close(None)
                    yield item
        except GeneratorExit:
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            await state.close(error)

    # -- tool calls, handoffs, nested agents --------------------------------------------------

    def _execute_tool_call(self) -> Callable[..., Any]:
        patch = self

        async def _execute_tool_call(*args: Any, **kwargs: Any) -> Any:
            call = patch._original(AssistantAgent, "_execute_tool_call", None, AssistantAgent)
            turn = _TURN.get()
            if not patch.active or turn is None or not turn.live:
                return await call(*args, **kwargs)
            return await patch._tool_call(turn, call, args, kwargs)

        return _execute_tool_call

    async def _tool_call(
        self,
        turn: _Turn,
        call: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        tool_call = _argument(args, kwargs, "tool_call", 0)
        if not isinstance(tool_call, FunctionCall):
            return await call(*args, **kwargs)
        state, run = turn.state, turn.state.run
        assert run is not None
        name = str(tool_call.name)
        arguments = tool_call.arguments
        try:
            handoff = _handoff_of(
                turn.framework_agent, name, _argument(args, kwargs, "handoff_tools", 2)
            )
            if handoff is not None:
                target_name, handoff_message = handoff
                task = task_text(arguments) or handoff_message
                target = await run.adelegate(turn.agent, target_name, task)
                await state.hold(target_name, turn.agent, target)
                return await call(*args, **kwargs)
            runner = _task_runner_of(_argument(args, kwargs, "workbench", 1), name)
            if runner is not None:
                child = await run.adelegate(
                    turn.agent, str(getattr(runner, "name", name)), task_text(arguments, "task")
                )
                return await self._nested(child, runner, call, args, kwargs)
            span = run.tool(turn.agent, name, arguments)
            await span.adecide()
        except SessionKilled as kill:
            state.note_kill(kill)
            turn.refused.add(str(tool_call.id))
            return _refused(tool_call, kill)
        except Stopped as stop:
            extra = run.fallback(turn.framework_agent, stop)
            turn.refused.add(str(tool_call.id))
            return _refused(tool_call, stop, extra)
        span.open()
        try:
            result = await call(*args, **kwargs)
        except BaseException as exc:
            span.close(exc)
            raise
        outcome = result[1] if isinstance(result, tuple) and len(result) == 2 else None
        if isinstance(outcome, FunctionExecutionResult) and outcome.is_error and span.span:
            span.span.set_status(Status(StatusCode.ERROR, outcome.content[:200]))
        span.close()
        return result

    async def _nested(
        self,
        child: AgentSpan,
        runner: object,
        call: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Run an ``AgentTool`` / ``TeamTool`` call whose delegation was allowed: the nested
        run takes it (its errors are the tool's result, as AutoGen makes them)."""
        delegation = _Delegation(child, runner)
        token = _PENDING.set(delegation)
        try:
            return await call(*args, **kwargs)
        finally:
            _PENDING.reset(token)
            if not delegation.started:
                await arelease(child)

    def _check_and_handle_handoff(self) -> Callable[..., Any]:
        patch = self

        def _check_and_handle_handoff(*args: Any, **kwargs: Any) -> Any:
            call = patch._original(
                AssistantAgent, "_check_and_handle_handoff", None, AssistantAgent
            )
            turn = _TURN.get()
            if not patch.active or turn is None or not turn.refused:
                return call(*args, **kwargs)
            result = _argument(args, kwargs, "model_result", 0)
            handoffs = _argument(args, kwargs, "handoffs", 3)
            calls = [
                c for c in getattr(result, "content", None) or () if isinstance(c, FunctionCall)
            ]
            stopped = {c.name for c in calls if c.id in turn.refused}
            stopped -= {c.name for c in calls if c.id not in turn.refused}
            if not stopped or not isinstance(handoffs, Mapping):
                return call(*args, **kwargs)
            allowed = {k: v for k, v in handoffs.items() if k not in stopped}
            if "handoffs" in kwargs:
                return call(*args, **{**kwargs, "handoffs": allowed})
            return call(*args[:3], allowed, *args[4:], **kwargs)

        return _check_and_handle_handoff

    # -- model calls ----------------------------------------------------------------------------

    def _model_call(self, name: str) -> Callable[..., Any]:
        patch = self

        async def model_call(cls: type, *args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
            turn = _TURN.get()
            governed = patch.active and turn is not None and turn.live
            if governed:
                assert turn is not None
                turn.state.checkpoint()  # a killed session asks the model nothing more
            inner = patch._original(AssistantAgent, name, None, cls)(*args, **kwargs)
            try:
                async for item in inner:
                    if governed:
                        assert turn is not None
                        if isinstance(item, CreateResult):
                            turn.usage(item.usage)
                        elif isinstance(item, Response):
                            turn.usage(getattr(item.chat_message, "models_usage", None))
                    yield item
            finally:
                await inner.aclose()

        return model_call


def install(runtime: Runtime) -> Patch:
    """Instrument AutoGen AgentChat for ``runtime``; the returned patch removes it."""
    patch = Patch(runtime)
    patch.install()
    return patch


__all__ = ["Patch", "input_text", "install"]
