"""Where agent and tool spans are created.

:class:`Governance` is the entry point (one per tracer provider). It opens
:class:`SessionScope` (the root session and the human instruction), :class:`AgentSpan`
(``invoke_agent``) and :class:`ToolSpan` (``execute_tool``). Every span carries the
session id, the delegation chain and the intent, so any span alone answers "who asked".

Each governed step has an awaitable twin for asyncio code (:meth:`SessionScope.aagent`,
:meth:`Governance.aagent`, :meth:`AgentSpan.adelegate`, ``async with agent.atool(...)``,
:meth:`AgentSpan.ausage`, ``async with agent``): the same step, with the decision awaited
on an :class:`~agentgov.instrumentation.governor.AsyncGovernorClient` (or, with a blocking
client, in a worker thread) so the event loop is never held.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider

from agentgov.instrumentation import conventions as cv
from agentgov.instrumentation.governor import (
    AsyncGovernorClient,
    Decision,
    GovernorClient,
    Stopped,
)
from agentgov.instrumentation.injection import score_message
from agentgov.instrumentation.lineage import (
    Lineage,
    TokenCell,
    check_id,
    current_lineage,
    new_id,
    new_session_id,
    with_lineage,
)
from agentgov.instrumentation.lineage_token import SpanProver
from agentgov.instrumentation.permissions import normalize_all, uncovered
from agentgov.instrumentation.plan import PlanAnswer, PlannedAgent, plan_body
from agentgov.instrumentation.propagation import extract, inject, inject_env

INSTRUMENTATION_NAME = "agentgov.instrumentation"
INSTRUMENTATION_VERSION = "0.1.0"


class NoSessionError(RuntimeError):
    """An agent was started outside any session."""


StopHook = Callable[["AgentSpan", Stopped], None]


def _check_permissions(permissions: Sequence[str] | None) -> tuple[str, ...] | None:
    """Permissions in normal form; a malformed one (empty, commas, ``..``) raises
    :class:`~agentgov.instrumentation.permissions.InvalidPermission`."""
    return None if permissions is None else normalize_all(list(permissions))


async def _adecide(governor: GovernorClient, step: str, **request: Any) -> Decision:
    """Ask the governor without holding the event loop: awaited on an async client, in a
    worker thread (the context goes along) on a blocking one."""
    if isinstance(governor, AsyncGovernorClient):
        if step == "handoff":
            return await governor.ahandoff(**request)
        if step == "tool":
            return await governor.atool(**request)
        return await governor.ausage(**request)
    blocking: Callable[..., Decision] = getattr(governor, step)
    return await asyncio.to_thread(blocking, **request)


async def _awatch(governor: GovernorClient, session_id: str) -> None:
    if isinstance(governor, AsyncGovernorClient):
        await governor.awatch(session_id)
    else:
        await asyncio.to_thread(governor.watch, session_id)


def _prove(span: Span, prover: SpanProver | None) -> None:
    """Mark ``span`` as made by the token holder (token id and proof, never the token)."""
    if prover is not None:
        ctx = span.get_span_context()
        attrs = prover.attributes(ctx.trace_id, ctx.span_id)
        if attrs:
            span.set_attributes(attrs)


class _Scope:
    """A context manager that attaches a context and, if it owns one, ends a span."""

    _token: object | None = None
    span: Span | None = None

    def _attach(self, ctx: otel_context.Context) -> None:
        self._token = otel_context.attach(ctx)

    def _detach(self) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None

    def _finish(self, exc: BaseException | None) -> None:
        span = self.span
        if span is None:
            return
        if exc is not None:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()


class SessionScope(_Scope):
    """The root session: a session id assigned before any agent starts, and the intent."""

    def __init__(self, gov: Governance, lineage: Lineage) -> None:
        self._gov = gov
        self.lineage = lineage

    @property
    def session_id(self) -> str:
        return self.lineage.session_id

    @property
    def intent(self) -> str:
        return self.lineage.intent

    def plan(
        self,
        agents: Sequence[PlannedAgent | Mapping[str, Any]],
        max_fanout: int,
        max_depth: int,
        budget_usd: float,
        max_tool_calls: int | None = None,
    ) -> PlanAnswer:
        """Declare what this run will do, before its first agent starts: the roles it will
        use (each with its permissions, tools, resources, environments and egress), its
        fan-out, depth and budget.

        The governor answers with the plan's blast radius and, when the policy asks for
        one, a reviewer's approval to wait for: the root agent's start then waits for it
        (``approval_timeout``). While the plan holds, steps inside it need no approval of
        their own; steps outside it are stopped or sent to a reviewer (``out_of_scope``).
        A plan the governor refuses raises
        :class:`~agentgov.instrumentation.plan.PlanRejected` naming the field and the fix.
        """
        return self._governor_for_plan().declare_plan(
            self.session_id,
            plan_body(agents, max_fanout, max_depth, budget_usd, max_tool_calls, self.intent),
        )

    async def aplan(
        self,
        agents: Sequence[PlannedAgent | Mapping[str, Any]],
        max_fanout: int,
        max_depth: int,
        budget_usd: float,
        max_tool_calls: int | None = None,
    ) -> PlanAnswer:
        """:meth:`plan`, declared without holding the event loop."""
        body = plan_body(agents, max_fanout, max_depth, budget_usd, max_tool_calls, self.intent)
        governor = self._governor_for_plan()
        if isinstance(governor, AsyncGovernorClient):
            return await governor.adeclare_plan(self.session_id, body)
        return await asyncio.to_thread(governor.declare_plan, self.session_id, body)

    def _governor_for_plan(self) -> GovernorClient:
        governor = self._gov.governor
        if governor is None:
            raise RuntimeError(
                "a plan is declared to the governor: pass governor=GovernorClient(url) to "
                "Governance"
            )
        return governor

    def agent(self, name: str, **kwargs: Any) -> AgentSpan:
        """Open the root agent of this session (depth 0); with a governor, its start is
        decided like a delegation from the human who opened the session."""
        root, request = self._root(name, kwargs)
        governor = self._gov.governor
        if governor is not None:
            governor.remember(self.session_id, root.lineage.token)
            governor.watch(self.session_id)
            root.lineage.token.value = governor.handoff(**request).lineage_token
        return root

    async def aagent(self, name: str, **kwargs: Any) -> AgentSpan:
        """:meth:`agent`, with the start decided without holding the event loop."""
        root, request = self._root(name, kwargs)
        governor = self._gov.governor
        if governor is not None:
            governor.remember(self.session_id, root.lineage.token)
            # the session's events are listened to from the root's start, once it holds a
            # token (the stream answers an agent key nothing before); the governor itself
            # refuses the root of a session killed already
            decision = await _adecide(governor, "handoff", **request)
            root.lineage.token.value = decision.lineage_token
            root._decided_here = True
        return root

    def _root(self, name: str, kwargs: dict[str, Any]) -> tuple[AgentSpan, dict[str, Any]]:
        estimated_usd = float(kwargs.pop("estimated_usd", 0.0))
        root = self._gov._agent(name, parent=self.lineage, parent_ctx=None, **kwargs)
        request = self._gov._handoff_request(
            self.session_id,
            "",
            root.agent_id,
            task=root.task,
            permissions=root.lineage.permissions,
            estimated_usd=estimated_usd,
            role=root.lineage.role,
            token="",
        )
        return root, request

    def __enter__(self) -> SessionScope:
        self._attach(with_lineage(self.lineage))
        return self

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._detach()


class AgentSpan(_Scope):
    """One agent invocation: an ``invoke_agent`` span with its lineage.

    Use it as a context manager. Inside, :meth:`tool` records commands, :meth:`delegate`
    starts a sub-agent in this process, :meth:`handoff` prepares a carrier for a sub-agent
    in another process, :meth:`message` records inter-agent messages and :meth:`usage`
    accumulates tokens and spend.
    """

    def __init__(
        self,
        gov: Governance,
        name: str,
        lineage: Lineage,
        parent_ctx: otel_context.Context | None,
        task: str,
    ) -> None:
        self._gov = gov
        self.name = name
        self.lineage = lineage
        self.task = task
        self._parent_ctx = parent_ctx
        self._ctx: otel_context.Context | None = None
        self._input_tokens = 0
        self._output_tokens = 0
        self._usd = 0.0
        #: set once the governor stopped one of this agent's delegations: an orchestrator
        #: checks it to fall back to a constrained single-agent mode
        self.constrained = False
        self._prover: SpanProver | None = None
        #: this process asked the governor for this agent's start (and was allowed)
        self._decided_here = False

    @property
    def agent_id(self) -> str:
        return self.lineage.agent_id

    @property
    def session_id(self) -> str:
        return self.lineage.session_id

    @property
    def parent_id(self) -> str:
        return self.lineage.chain[-2] if len(self.lineage.chain) > 1 else ""

    @property
    def depth(self) -> int:
        return self.lineage.depth

    @property
    def token(self) -> str:
        """This agent's signed lineage token ('' when no governor issued one)."""
        return self.lineage.token.value

    def _span_prover(self) -> SpanProver | None:
        token = self.lineage.token.value
        if not token:
            return None
        if self._prover is None or self._prover.token != token:
            self._prover = SpanProver(token)
        return self._prover

    def _renewed(self, decision: Decision) -> None:
        """Take the renewed token an answer to this agent's own request may carry."""
        if decision.lineage_token:
            self.lineage.token.value = decision.lineage_token

    @property
    def context(self) -> otel_context.Context:
        """The context in which this agent's children run (span + lineage)."""
        if self._ctx is None:
            raise RuntimeError("the agent has not started: use it in a 'with' block")
        return self._ctx

    def start(self) -> AgentSpan:
        """Start the span without attaching it (for use across threads).

        With a governor, an agent of a killed session is refused here, before it runs.
        """
        governor = self._gov.governor
        if governor is not None:
            governor.remember(self.session_id, self.lineage.token)
            governor.watch(self.session_id)
            governor.check(self.session_id)
        return self._open()

    async def astart(self) -> AgentSpan:
        """:meth:`start`, waiting for the session's state without holding the event loop
        (no wait for an agent whose start this process had decided: the governor's
        allow says the session was running)."""
        governor = self._gov.governor
        if governor is not None:
            governor.remember(self.session_id, self.lineage.token)
            if self._decided_here:
                governor._watch(self.session_id)
            else:
                await _awatch(governor, self.session_id)
            governor.check(self.session_id)
        return self._open()

    def _open(self) -> AgentSpan:
        governor = self._gov.governor
        lin = self.lineage
        attrs: dict[str, Any] = {
            cv.OPERATION_NAME: cv.OP_INVOKE_AGENT,
            cv.AGENT_ID: lin.agent_id,
            cv.AGENT_NAME: self.name,
            cv.SESSION_ID: lin.session_id,
            cv.CONVERSATION_ID: lin.session_id,
            cv.DELEGATION_CHAIN: lin.chain,
            cv.DELEGATION_DEPTH: lin.depth,
            cv.INTENT: lin.intent,
        }
        parent_id = self.parent_id
        if parent_id:
            attrs[cv.PARENT_AGENT_ID] = parent_id
        if self.task:
            attrs[cv.TASK] = self.task
        if lin.role:
            attrs[cv.AGENT_ROLE] = lin.role
        if lin.permissions is not None:
            attrs[cv.PERMISSIONS] = lin.permissions
        self.span = self._gov.tracer.start_span(
            f"invoke_agent {self.name}",
            context=self._parent_ctx,
            kind=SpanKind.INTERNAL,
            attributes=attrs,
        )
        _prove(self.span, self._span_prover())
        if governor is not None:
            governor.running(lin.session_id, lin.agent_id, lin.token)
        self._ctx = with_lineage(lin, trace.set_span_in_context(self.span, self._parent_ctx))
        return self

    def end(self, exc: BaseException | None = None) -> None:
        """End the span (records usage and, if given, the exception).

        With a governor, the agent reports that it finished, which frees its concurrency
        slot and the tasks it owned.
        """
        governor = self._gov.governor
        if governor is not None and self.span is not None:
            governor.finished(self.session_id, self.agent_id)
            try:
                governor.usage(**self._finish_request())
            except Stopped:
                pass  # finishing is never refused; the governor logged what it needed
        self._close(exc)

    async def aend(self, exc: BaseException | None = None) -> None:
        """:meth:`end`, reporting the finish without holding the event loop."""
        governor = self._gov.governor
        if governor is not None and self.span is not None:
            governor.finished(self.session_id, self.agent_id)
            try:
                await _adecide(governor, "usage", **self._finish_request())
            except Stopped:
                pass
        self._close(exc)

    def _finish_request(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "agent_id": self.agent_id,
            "finished": True,
            "token": self.token,
        }

    def _close(self, exc: BaseException | None) -> None:
        span = self.span
        if span is not None and (self._input_tokens or self._output_tokens or self._usd):
            span.set_attributes(
                {
                    cv.USAGE_INPUT_TOKENS: self._input_tokens,
                    cv.USAGE_OUTPUT_TOKENS: self._output_tokens,
                    cv.COST_USD: self._usd,
                }
            )
        self._finish(exc)

    def __enter__(self) -> AgentSpan:
        if self.span is None:
            self.start()
        self._attach(self.context)
        return self

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._detach()
        self.end(exc)

    async def __aenter__(self) -> AgentSpan:
        if self.span is None:
            await self.astart()
        self._attach(self.context)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._detach()
        await self.aend(exc)

    # -- governance ---------------------------------------------------------------------

    def checkpoint(self) -> None:
        """A governed step with no request: raises :class:`SessionKilled` once the session
        was stopped. Long-running agents call it between units of work."""
        if self._gov.governor is not None:
            self._gov.governor.check(self.session_id)

    def _record_decision(self, phase: str, decision: Decision) -> None:
        if self.span is not None:
            attrs: dict[str, Any] = {
                "agentgov.decision.phase": phase,
                "agentgov.decision.outcome": decision.outcome,
            }
            if decision.reason:
                attrs["agentgov.decision.reason"] = decision.reason
            self.span.add_event("agentgov.decision", attrs)

    def _stopped(self, stop: Stopped) -> None:
        self.constrained = True
        if self.span is not None:
            self.span.add_event(
                "agentgov.decision",
                {
                    "agentgov.decision.phase": stop.phase,
                    "agentgov.decision.outcome": "stop",
                    "agentgov.decision.reason": stop.reason,
                },
            )
        if self._gov.on_stop is not None:
            self._gov.on_stop(self, stop)

    def _ask_handoff(
        self,
        to_agent: str,
        task: str,
        role: str,
        permissions: tuple[str, ...] | None,
        estimated_usd: float,
    ) -> str:
        """Ask the governor to delegate to ``to_agent``; the new agent's token."""
        governor = self._gov.governor
        if governor is None:
            return ""
        request = self._gov._handoff_request(
            self.session_id,
            self.agent_id,
            to_agent,
            task,
            permissions,
            estimated_usd,
            role,
            self.token,
        )
        try:
            decision = governor.handoff(**request)
        except Stopped as stop:
            self._stopped(stop)
            raise
        self._record_decision("pre_handoff", decision)
        return decision.lineage_token

    async def _aask_handoff(
        self,
        to_agent: str,
        task: str,
        role: str,
        permissions: tuple[str, ...] | None,
        estimated_usd: float,
    ) -> str:
        governor = self._gov.governor
        if governor is None:
            return ""
        request = self._gov._handoff_request(
            self.session_id,
            self.agent_id,
            to_agent,
            task,
            permissions,
            estimated_usd,
            role,
            self.token,
        )
        try:
            decision = await _adecide(governor, "handoff", **request)
        except Stopped as stop:
            self._stopped(stop)
            raise
        self._record_decision("pre_handoff", decision)
        return decision.lineage_token

    # -- what an agent does -------------------------------------------------------------

    def tool(
        self,
        tool_name: str,
        command: str = "",
        resources: Sequence[str] = (),
        risk: int | None = None,
    ) -> ToolSpan:
        """Record a tool or command call (an ``execute_tool`` span) by this agent."""
        return ToolSpan(self, tool_name, command, tuple(resources), risk)

    def atool(
        self,
        tool_name: str,
        command: str = "",
        resources: Sequence[str] = (),
        risk: int | None = None,
    ) -> ToolSpan:
        """:meth:`tool` for ``async with``: the call is decided without holding the loop."""
        return ToolSpan(self, tool_name, command, tuple(resources), risk)

    def delegate(
        self,
        name: str,
        task: str = "",
        role: str = "",
        permissions: Sequence[str] | None = None,
        agent_id: str | None = None,
        estimated_usd: float = 0.0,
    ) -> AgentSpan:
        """Start a sub-agent in this process (any thread): its parent is this agent.

        With a governor the delegation is decided first; a stop raises :class:`Stopped`
        (after the ``on_stop`` hook ran and :attr:`constrained` was set).
        """
        child = self._child(name, task, role, permissions, agent_id)
        child.lineage.token.value = self._ask_handoff(
            child.agent_id, task, role, _check_permissions(permissions), estimated_usd
        )
        return child

    async def adelegate(
        self,
        name: str,
        task: str = "",
        role: str = "",
        permissions: Sequence[str] | None = None,
        agent_id: str | None = None,
        estimated_usd: float = 0.0,
    ) -> AgentSpan:
        """:meth:`delegate`, decided without holding the event loop."""
        child = self._child(name, task, role, permissions, agent_id)
        child.lineage.token.value = await self._aask_handoff(
            child.agent_id, task, role, _check_permissions(permissions), estimated_usd
        )
        child._decided_here = self._gov.governor is not None
        return child

    def _child(
        self,
        name: str,
        task: str,
        role: str,
        permissions: Sequence[str] | None,
        agent_id: str | None,
    ) -> AgentSpan:
        return self._gov._agent(
            name,
            parent=self.lineage,
            parent_ctx=self.context,
            task=task,
            role=role,
            permissions=permissions,
            agent_id=agent_id,
        )

    def handoff(
        self,
        to: str,
        task: str = "",
        role: str = "",
        permissions: Sequence[str] | None = None,
        agent_id: str | None = None,
        estimated_usd: float = 0.0,
    ) -> Handoff:
        """Prepare a delegation to an agent in another process.

        ``to`` names the agent; the returned :class:`Handoff` carries trace context and
        lineage as W3C headers or environment variables for the receiving process, which
        opens it with :meth:`Governance.agent` ``(carrier=...)``.
        """
        target = check_id(agent_id, "agent id") if agent_id else new_id(to)
        perms = _check_permissions(permissions)
        token = self._ask_handoff(target, task, role, perms, estimated_usd)
        lin = Lineage(
            session_id=self.lineage.session_id,
            intent=self.lineage.intent,
            chain=self.lineage.chain,
            permissions=perms if perms is not None else self.lineage.permissions,
            task=task,
            handoff_to=target,
            role=role,
            token=TokenCell(token),
        )
        return Handoff(to, target, task, with_lineage(lin, self.context))

    def message(self, to: str, content: str | bytes) -> None:
        """Record a message this agent sends to another agent (content kept as a digest)."""
        data = content.encode("utf-8") if isinstance(content, str) else content
        if self.span is not None:
            # scored here: the text itself never leaves this process
            scored = score_message(data.decode("utf-8", "replace"))
            attrs: dict[str, Any] = {
                cv.MESSAGE_FROM: self.agent_id,
                cv.MESSAGE_TO: to,
                cv.MESSAGE_DIGEST: "sha256:" + hashlib.sha256(data).hexdigest(),
                cv.MESSAGE_SIZE: len(data),
                cv.MESSAGE_INJECTION: scored.score,
            }
            if scored.signals:
                attrs[cv.MESSAGE_INJECTION_SIGNALS] = scored.signals
            self.span.add_event(cv.MESSAGE_EVENT, attrs)

    def usage(self, input_tokens: int = 0, output_tokens: int = 0, usd: float = 0.0) -> None:
        """Add model usage and spend to this agent (set on its span when it ends).

        With a governor the spend is reported at once: past the shared budget this raises
        :class:`Stopped` (``shared_budget_exceeded``).
        """
        governor = self._add_usage(input_tokens, output_tokens, usd)
        if governor is not None:
            try:
                decision = governor.usage(
                    self.session_id, self.agent_id, usd=float(usd), token=self.token
                )
            except Stopped as stop:
                self._stopped(stop)
                raise
            self._renewed(decision)

    async def ausage(self, input_tokens: int = 0, output_tokens: int = 0, usd: float = 0.0) -> None:
        """:meth:`usage`, reporting spend without holding the event loop."""
        governor = self._add_usage(input_tokens, output_tokens, usd)
        if governor is not None:
            try:
                decision = await _adecide(
                    governor,
                    "usage",
                    session_id=self.session_id,
                    agent_id=self.agent_id,
                    usd=float(usd),
                    token=self.token,
                )
            except Stopped as stop:
                self._stopped(stop)
                raise
            self._renewed(decision)

    def _add_usage(
        self, input_tokens: int, output_tokens: int, usd: float
    ) -> GovernorClient | None:
        """Count usage; the governor to report spend to, if there is spend and a governor."""
        self._input_tokens += int(input_tokens)
        self._output_tokens += int(output_tokens)
        self._usd += float(usd)
        return self._gov.governor if usd else None


class ToolSpan(_Scope):
    """One tool or command call: an ``execute_tool`` span, self-contained for audit.

    Use it with ``with`` or ``async with``: the call is decided, then the span opens. Code
    that must decide in one place and run the call in another uses :meth:`decide` (or
    :meth:`adecide`), then :meth:`open` and :meth:`close` around the call itself.
    """

    def __init__(
        self,
        agent: AgentSpan,
        tool_name: str,
        command: str,
        resources: tuple[str, ...],
        risk: int | None,
    ) -> None:
        self.agent = agent
        self.tool_name = tool_name
        self.command = command
        self.resources = resources
        self.risk = risk

    def _request(self) -> dict[str, Any]:
        agent = self.agent
        gov = agent._gov
        return {
            "session_id": agent.session_id,
            "agent_id": agent.agent_id,
            "tool": self.tool_name,
            "command": self.command,
            "resources": list(self.resources),
            "token": agent.token,
            "approvals": gov.approvals,
            "approval_timeout": gov.approval_timeout,
        }

    def _decided(self, decision: Decision) -> None:
        self.agent._record_decision("tool", decision)
        self.agent._renewed(decision)
        if decision.risk is not None and self.risk is None:
            self.risk = decision.risk

    def decide(self) -> None:
        """Ask the governor for this call; a stop raises :class:`Stopped` (after the
        ``on_stop`` hook ran)."""
        governor = self.agent._gov.governor
        if governor is None:
            return
        try:
            decision = governor.tool(**self._request())
        except Stopped as stop:
            self.agent._stopped(stop)
            raise
        self._decided(decision)

    async def adecide(self) -> None:
        """:meth:`decide` without holding the event loop."""
        governor = self.agent._gov.governor
        if governor is None:
            return
        try:
            decision = await _adecide(governor, "tool", **self._request())
        except Stopped as stop:
            self.agent._stopped(stop)
            raise
        self._decided(decision)

    def open(self) -> ToolSpan:
        """Start the span (a decided call) and make it current."""
        agent = self.agent
        lin = agent.lineage
        attrs: dict[str, Any] = {
            cv.OPERATION_NAME: cv.OP_EXECUTE_TOOL,
            cv.TOOL_NAME: self.tool_name,
            cv.AGENT_ID: lin.agent_id,
            cv.AGENT_NAME: agent.name,
            cv.SESSION_ID: lin.session_id,
            cv.CONVERSATION_ID: lin.session_id,
            cv.DELEGATION_CHAIN: lin.chain,
            cv.DELEGATION_DEPTH: lin.depth,
            cv.INTENT: lin.intent,
        }
        if agent.parent_id:
            attrs[cv.PARENT_AGENT_ID] = agent.parent_id
        if self.command:
            attrs[cv.COMMAND] = self.command
        if self.resources:
            attrs[cv.RESOURCES] = self.resources
        if self.risk is not None:
            attrs[cv.RISK_SCORE] = max(0, min(100, int(self.risk)))
        if lin.role:
            attrs[cv.AGENT_ROLE] = lin.role
        if lin.permissions is not None:
            # the caller's scope, so a command can be judged against it on its own
            attrs[cv.PERMISSIONS] = lin.permissions
        self.span = agent._gov.tracer.start_span(
            f"execute_tool {self.tool_name}", context=agent.context, attributes=attrs
        )
        _prove(self.span, agent._span_prover())
        self._attach(trace.set_span_in_context(self.span, agent.context))
        return self

    def close(self, exc: BaseException | None = None) -> None:
        """End the span (recording ``exc``, if given) and restore the context."""
        self._detach()
        self._finish(exc)

    def __enter__(self) -> ToolSpan:
        self.decide()
        return self.open()

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(exc)

    async def __aenter__(self) -> ToolSpan:
        await self.adecide()
        return self.open()

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(exc)


class Handoff:
    """A delegation in flight to another process: carriers for its context and lineage."""

    def __init__(self, to: str, agent_id: str, task: str, ctx: otel_context.Context) -> None:
        self.to = to
        self.agent_id = agent_id
        self.task = task
        self._ctx = ctx

    def headers(self) -> dict[str, str]:
        """``traceparent`` and ``baggage`` headers, e.g. for an HTTP call to the agent."""
        out: dict[str, str] = {}
        inject(out, self._ctx)
        return out

    def env(self) -> dict[str, str]:
        """``TRACEPARENT`` and ``BAGGAGE`` variables for a child process's environment."""
        return inject_env(None, self._ctx)


class Governance:
    """Entry point of the instrumentation: sessions and agents on one tracer.

    ``tracer_provider`` defaults to the global OpenTelemetry provider, so an application
    configured by ``opentelemetry-instrument`` or :func:`agentgov.instrumentation.configure`
    needs no arguments. ``approvals`` (``wait`` or ``raise``) and ``approval_timeout``
    override the governor client's own for this governance's steps.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        governor: GovernorClient | None = None,
        on_stop: StopHook | None = None,
        approvals: str | None = None,
        approval_timeout: float | None = None,
    ) -> None:
        self.tracer: Tracer = trace.get_tracer(
            INSTRUMENTATION_NAME, INSTRUMENTATION_VERSION, tracer_provider=tracer_provider
        )
        #: asks the central governor before every delegation and tool call, when set
        self.governor = governor
        #: called with (agent, stop) whenever the governor stops one of an agent's steps
        self.on_stop = on_stop
        self.approvals = approvals
        self.approval_timeout = approval_timeout

    def _handoff_request(
        self,
        session_id: str,
        from_agent: str,
        to_agent: str,
        task: str,
        permissions: Sequence[str] | None,
        estimated_usd: float,
        role: str,
        token: str,
    ) -> dict[str, Any]:
        return {
            "session_id": session_id,
            "from_agent": from_agent,
            "to_agent": to_agent,
            "task": task,
            "permissions": list(permissions) if permissions is not None else None,
            "estimated_usd": estimated_usd,
            "to_role": role,
            "token": token,
            "approvals": self.approvals,
            "approval_timeout": self.approval_timeout,
        }

    def session(self, intent: str, session_id: str | None = None) -> SessionScope:
        """Open a root session for one human instruction.

        The session id is assigned here, before any agent starts, and travels in baggage
        to every agent of the session in every process.
        """
        sid = check_id(session_id, "session id") if session_id else new_session_id()
        return SessionScope(self, Lineage(session_id=sid, intent=intent))

    def agent(
        self,
        name: str,
        task: str = "",
        role: str = "",
        permissions: Sequence[str] | None = None,
        agent_id: str | None = None,
        carrier: Mapping[str, str] | None = None,
        estimated_usd: float = 0.0,
    ) -> AgentSpan:
        """Open an agent under the current lineage, or under the one in ``carrier``.

        With ``carrier`` (headers or environment from :meth:`AgentSpan.handoff`) the agent
        takes the handoff's id, task, role and permissions; it may narrow the permissions,
        never widen them (:class:`Stopped`, ``permission_escalation``). The sender's
        governor already decided that handoff. Without a handoff, the new agent is a
        delegation from the current agent (or the session's root) and is decided here.
        """
        child, parent, received = self._prepare(name, task, role, permissions, agent_id, carrier)
        if not received:
            self._decide_start(child, parent, estimated_usd)
        return child

    async def aagent(
        self,
        name: str,
        task: str = "",
        role: str = "",
        permissions: Sequence[str] | None = None,
        agent_id: str | None = None,
        carrier: Mapping[str, str] | None = None,
        estimated_usd: float = 0.0,
    ) -> AgentSpan:
        """:meth:`agent`, with the start decided without holding the event loop."""
        child, parent, received = self._prepare(name, task, role, permissions, agent_id, carrier)
        if not received:
            await self._adecide_start(child, parent, estimated_usd)
        return child

    def _prepare(
        self,
        name: str,
        task: str,
        role: str,
        permissions: Sequence[str] | None,
        agent_id: str | None,
        carrier: Mapping[str, str] | None,
    ) -> tuple[AgentSpan, Lineage, bool]:
        """The new agent, its parent lineage, and whether it takes a received handoff."""
        ctx = extract(carrier) if carrier is not None else otel_context.get_current()
        parent = current_lineage(ctx)
        if parent is None:
            raise NoSessionError(
                "no agentgov session is active: open one with Governance.session(intent) "
                "or pass the carrier of a handoff (carrier=os.environ)"
            )
        received = carrier is not None and bool(parent.handoff_to)
        if received:
            agent_id = agent_id or parent.handoff_to
            task = task or parent.task
            role = role or parent.role
            if permissions is not None and parent.permissions is not None:
                wider = uncovered(list(permissions), parent.permissions)
                if wider:
                    raise Stopped(
                        "permission_escalation",
                        "handoff",
                        detail=f"{', '.join(wider)} not granted by the handoff",
                    )
        child = self._agent(
            name,
            parent=parent,
            parent_ctx=ctx,
            task=task,
            role=role,
            permissions=permissions,
            agent_id=agent_id,
        )
        if received:
            child.lineage.token.value = parent.token.value  # the handoff target's own token
        return child, parent, received

    def _start_request(
        self, child: AgentSpan, parent: Lineage, estimated_usd: float
    ) -> dict[str, Any]:
        lin = child.lineage
        return self._handoff_request(
            lin.session_id,
            parent.agent_id,
            lin.agent_id,
            child.task,
            lin.permissions,
            estimated_usd,
            lin.role,
            parent.token.value,
        )

    def _decide_start(self, child: AgentSpan, parent: Lineage, estimated_usd: float) -> None:
        """Ask the governor to start ``child``: delegated by the current agent (with its
        token), or as the session's root."""
        governor = self.governor
        if governor is None:
            return
        lin = child.lineage
        governor.remember(lin.session_id, parent.token if parent.token.value else lin.token)
        governor.watch(lin.session_id)
        try:
            decision = governor.handoff(**self._start_request(child, parent, estimated_usd))
        except Stopped as stop:
            if self.on_stop is not None:
                self.on_stop(child, stop)
            raise
        lin.token.value = decision.lineage_token

    async def _adecide_start(self, child: AgentSpan, parent: Lineage, estimated_usd: float) -> None:
        governor = self.governor
        if governor is None:
            return
        lin = child.lineage
        governor.remember(lin.session_id, parent.token if parent.token.value else lin.token)
        await _awatch(governor, lin.session_id)
        try:
            decision = await _adecide(
                governor, "handoff", **self._start_request(child, parent, estimated_usd)
            )
        except Stopped as stop:
            if self.on_stop is not None:
                self.on_stop(child, stop)
            raise
        lin.token.value = decision.lineage_token
        child._decided_here = True

    def _agent(
        self,
        name: str,
        parent: Lineage,
        parent_ctx: otel_context.Context | None,
        task: str = "",
        role: str = "",
        permissions: Sequence[str] | None = None,
        agent_id: str | None = None,
    ) -> AgentSpan:
        aid = check_id(agent_id, "agent id") if agent_id else new_id(name)
        lineage = parent.child(aid, role=role, permissions=_check_permissions(permissions))
        return AgentSpan(self, name, lineage, parent_ctx, task)
