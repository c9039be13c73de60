"""Where agent and tool spans are created.

:class:`Governance` is the entry point (one per tracer provider). It opens
:class:`SessionScope` (the root session and the human instruction), :class:`AgentSpan`
(``invoke_agent``) and :class:`ToolSpan` (``execute_tool``). Every span carries the
session id, the delegation chain and the intent, so any span alone answers "who asked".
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider

from agentgov.instrumentation import conventions as cv
from agentgov.instrumentation.governor import Decision, GovernorClient, Stopped
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

    def agent(self, name: str, **kwargs: Any) -> AgentSpan:
        """Open the root agent of this session (depth 0); with a governor, its start is
        decided like a delegation from the human who opened the session."""
        estimated_usd = float(kwargs.pop("estimated_usd", 0.0))
        root = self._gov._agent(name, parent=self.lineage, parent_ctx=None, **kwargs)
        governor = self._gov.governor
        if governor is not None:
            governor.remember(self.session_id, root.lineage.token)
            governor.watch(self.session_id)
            decision = governor.handoff(
                self.session_id,
                "",
                root.agent_id,
                task=root.task,
                permissions=list(root.lineage.permissions)
                if root.lineage.permissions is not None
                else None,
                estimated_usd=estimated_usd,
                to_role=root.lineage.role,
            )
            root.lineage.token.value = decision.lineage_token
        return root

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
        lin = self.lineage
        if governor is not None:
            governor.remember(lin.session_id, lin.token)
            governor.watch(lin.session_id)
            governor.check(lin.session_id)
        attrs: dict[str, Any] = {
            cv.OPERATION_NAME: cv.OP_INVOKE_AGENT,
            cv.AGENT_ID: lin.agent_id,
            cv.AGENT_NAME: self.name,
            cv.SESSION_ID: lin.session_id,
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
                governor.usage(self.session_id, self.agent_id, finished=True, token=self.token)
            except Stopped:
                pass  # finishing is never refused; the governor logged what it needed
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
        try:
            decision = governor.handoff(
                self.session_id,
                self.agent_id,
                to_agent,
                task=task,
                permissions=list(permissions) if permissions is not None else None,
                estimated_usd=estimated_usd,
                to_role=role,
                token=self.token,
            )
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
        child = self._gov._agent(
            name,
            parent=self.lineage,
            parent_ctx=self.context,
            task=task,
            role=role,
            permissions=permissions,
            agent_id=agent_id,
        )
        child.lineage.token.value = self._ask_handoff(
            child.agent_id, task, role, _check_permissions(permissions), estimated_usd
        )
        return child

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
        self._input_tokens += int(input_tokens)
        self._output_tokens += int(output_tokens)
        self._usd += float(usd)
        governor = self._gov.governor
        if governor is not None and usd:
            try:
                decision = governor.usage(
                    self.session_id, self.agent_id, usd=float(usd), token=self.token
                )
            except Stopped as stop:
                self._stopped(stop)
                raise
            self._renewed(decision)


class ToolSpan(_Scope):
    """One tool or command call: an ``execute_tool`` span, self-contained for audit."""

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

    def __enter__(self) -> ToolSpan:
        agent = self.agent
        lin = agent.lineage
        governor = agent._gov.governor
        if governor is not None:
            try:
                decision = governor.tool(
                    lin.session_id,
                    lin.agent_id,
                    self.tool_name,
                    self.command,
                    list(self.resources),
                    token=agent.token,
                )
            except Stopped as stop:
                agent._stopped(stop)
                raise
            agent._record_decision("tool", decision)
            agent._renewed(decision)
            if decision.risk is not None and self.risk is None:
                self.risk = decision.risk
        attrs: dict[str, Any] = {
            cv.OPERATION_NAME: cv.OP_EXECUTE_TOOL,
            cv.TOOL_NAME: self.tool_name,
            cv.AGENT_ID: lin.agent_id,
            cv.AGENT_NAME: agent.name,
            cv.SESSION_ID: lin.session_id,
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

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._detach()
        self._finish(exc)


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
    needs no arguments.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        governor: GovernorClient | None = None,
        on_stop: StopHook | None = None,
    ) -> None:
        self.tracer: Tracer = trace.get_tracer(
            INSTRUMENTATION_NAME, INSTRUMENTATION_VERSION, tracer_provider=tracer_provider
        )
        #: asks the central governor before every delegation and tool call, when set
        self.governor = governor
        #: called with (agent, stop) whenever the governor stops one of an agent's steps
        self.on_stop = on_stop

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
        else:
            self._decide_start(child, parent, estimated_usd)
        return child

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
            decision = governor.handoff(
                lin.session_id,
                parent.agent_id,
                lin.agent_id,
                task=child.task,
                permissions=list(lin.permissions) if lin.permissions is not None else None,
                estimated_usd=estimated_usd,
                to_role=lin.role,
                token=parent.token.value,
            )
        except Stopped as stop:
            if self.on_stop is not None:
                self.on_stop(child, stop)
            raise
        lin.token.value = decision.lineage_token

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
