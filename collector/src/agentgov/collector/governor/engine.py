"""Where decisions are made: the governor answers allow, stop or approval_required.

Decisions never wait on ClickHouse: each session's authoritative state lives here, every
decision takes one lock for a few microseconds (so concurrent requests from any number
of processes can never pass a limit together), and its audit record is handed to a
sink that writes it behind the answer.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from agentgov.collector.governor.policy import MultiAgentPolicy, PolicySource
from agentgov.collector.governor.state import (
    ALLOW,
    APPROVAL,
    APPROVAL_REQUIRED,
    KILL,
    POST_HANDOFF,
    PRE_HANDOFF,
    STOP,
    TOOL,
    Approval,
    Record,
    SessionState,
    apply,
)
from agentgov.collector.risk import RiskRules
from agentgov.instrumentation.governor import Decision
from agentgov.instrumentation.permissions import uncovered

log = logging.getLogger(__name__)

_WRITE = re.compile(r"(^|[._:/-])(write|delete|admin|exec)([._:/-]|$)", re.I)
_PROD = re.compile(r"(^|[^a-z])prod(uction)?([^a-z]|$)", re.I)


class GovernorError(RuntimeError):
    """A request the governor cannot act on (unknown approval, bad state)."""


class Forbidden(PermissionError):
    """The caller may not do this (e.g. approve its own request)."""


@dataclass
class HandoffRequest:
    session_id: str
    from_agent: str  # "" when the root agent of the session starts
    to_agent: str
    task: str = ""
    permissions: list[str] | None = None
    estimated_usd: float = 0.0
    to_role: str = ""
    #: the child's delegation depth as the agent sees it; used only when the governor
    #: has not seen the delegating agent itself
    depth: int | None = None
    approval_id: str = ""


@dataclass
class ToolRequest:
    session_id: str
    agent_id: str
    tool: str
    command: str = ""
    resources: list[str] = field(default_factory=list)
    approval_id: str = ""


@dataclass
class UsageRequest:
    session_id: str
    agent_id: str
    usd: float = 0.0
    tool_calls: int = 0
    finished: bool = False


Sink = Callable[[Record], None]
Listener = Callable[[str, dict[str, Any]], None]


class Governor:
    """Per-session state and the decisions made on it."""

    def __init__(
        self,
        policy: PolicySource,
        rules: RiskRules,
        sink: Sink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy_source = policy
        self.rules = rules
        self._sink = sink
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionState] = {}
        self._approvals: dict[str, Approval] = {}
        #: called with (event type, payload) for kills and approval changes
        self.listeners: list[Listener] = []

    @property
    def policy(self) -> MultiAgentPolicy:
        return self.policy_source.policy.multi_agent

    # -- records ---------------------------------------------------------------------------

    def _session(self, session_id: str) -> SessionState:
        state = self._sessions.get(session_id)
        if state is None:
            state = self._sessions[session_id] = SessionState(session_id)
        return state

    def _record(self, state: SessionState, phase: str, outcome: str, **fields: Any) -> Record:
        """Seal a record onto the session's hash chain, apply it and hand it to the sink."""
        record = Record(
            session_id=state.session_id,
            seq=state.seq + 1,
            time=round(self._clock(), 6),
            phase=phase,
            outcome=outcome,
            mode=self.policy.mode,
            **fields,
        ).seal(state.last_hash)
        apply(state, record, self._approvals)
        if self._sink is not None:
            self._sink(record)
        return record

    def replay(self, records: Iterable[Record]) -> int:
        """Rebuild state from stored records (in session and sequence order)."""
        n = 0
        with self._lock:
            for record in records:
                apply(self._session(record.session_id), record, self._approvals)
                n += 1
        return n

    def _emit(self, kind: str, payload: dict[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(kind, payload)
            except Exception:
                log.exception("governor listener failed")

    def _finish(
        self, decision: Decision, record_outcome: str, state: SessionState | None = None
    ) -> Decision:
        """Shadow mode answers allow but reports what enforce would have said; a stop for a
        killed session says who killed it and why."""
        if state is not None and decision.reason == "session_killed" and state.killed:
            decision = replace(
                decision, killed={"actor": state.kill_actor, "reason": state.kill_reason}
            )
        if self.policy.mode == "shadow" and record_outcome != ALLOW:
            return Decision(
                ALLOW,
                risk=decision.risk,
                shadow={"outcome": decision.outcome, "reason": decision.reason},
            )
        return decision

    # -- approvals -------------------------------------------------------------------------

    def _request_approval(
        self,
        state: SessionState,
        kind: str,
        agent: str,
        caller: str,
        request: dict[str, Any],
    ) -> str:
        aid = f"apr-{random.getrandbits(64):016x}"
        now = self._clock()
        self._record(
            state,
            APPROVAL,
            "requested",
            from_agent=agent,
            detail={
                "approval_id": aid,
                "kind": kind,
                "requester": caller,
                "request": request,
                "expires": now + self.policy.approval_ttl_s,
            },
        )
        self._emit("approval", self._approvals[aid].public())
        return aid

    def _approval_gate(
        self, state: SessionState, approval_id: str, kind: str, matches: dict[str, Any]
    ) -> tuple[str, str] | None:
        """(outcome, reason) when an approval settles the request, None to go on deciding."""
        approval = self._approvals.get(approval_id)
        if approval is None or approval.session_id != state.session_id or approval.kind != kind:
            return STOP, "approval_unknown"
        if any(approval.request.get(k) != v for k, v in matches.items()):
            return STOP, "approval_mismatch"
        if approval.status == "pending" and self._clock() >= approval.expires:
            self._expire(approval)
        if approval.status == "approved":
            return None
        if approval.status == "pending":
            return APPROVAL_REQUIRED, "awaiting_approval"
        if approval.status == "cancelled":
            return STOP, "session_killed"
        return STOP, "approval_expired" if approval.status == "expired" else "approval_denied"

    def approvals(
        self, status: str | None = None, include_escalated: bool = False
    ) -> list[dict[str, Any]]:
        """Approvals, newest last; those folded into a session-level approval only when
        ``include_escalated`` (a reviewer decides the session-level one instead)."""
        with self._lock:
            self._expire_due()
            return [
                a.public()
                for a in self._approvals.values()
                if (status is None or a.status == status)
                and (include_escalated or not a.escalated_to or a.status != "pending")
            ]

    def pending_approvals(self, session_id: str) -> list[Approval]:
        """The session's per-request approvals still waiting for a reviewer."""
        with self._lock:
            state = self._sessions.get(session_id)
            if state is None:
                return []
            found = (self._approvals.get(aid) for aid in state.approval_ids)
            return [a for a in found if a and a.status == "pending" and a.kind != "session"]

    def escalate(self, session_id: str, actor: str, reason: str) -> str | None:
        """Fold the session's pending approvals into one session-level approval.

        Approving or denying it approves or denies every request it covers; each agent
        waiting on its own approval then proceeds or stops as usual. Returns the new
        approval's id, or None when nothing is pending.
        """
        with self._lock:
            covers = [
                a.approval_id
                for a in self._approvals.values()
                if a.session_id == session_id
                and a.status == "pending"
                and a.kind != "session"
                and not a.escalated_to
            ]
            if not covers:
                return None
            aid = f"apr-{random.getrandbits(64):016x}"
            self._record(
                self._session(session_id),
                APPROVAL,
                "requested",
                actor=actor,
                reason=reason,
                detail={
                    "approval_id": aid,
                    "kind": "session",
                    "requester": actor,
                    "request": {"covers": covers, "reason": reason},
                    "expires": self._clock() + self.policy.approval_ttl_s,
                },
            )
            payload = self._approvals[aid].public()
        self._emit("approval", payload)
        return aid

    def get_approval(self, approval_id: str) -> dict[str, Any]:
        with self._lock:
            self._expire_due()
            approval = self._approvals.get(approval_id)
            if approval is None:
                raise GovernorError(f"unknown approval {approval_id!r}")
            return approval.public()

    def decide_approval(
        self, approval_id: str, approve: bool, approver: str, comment: str = "", caller: str = ""
    ) -> dict[str, Any]:
        """Approve or deny a pending request. The requester may not decide its own."""
        with self._lock:
            approval = self._approvals.get(approval_id)
            if approval is None:
                raise GovernorError(f"unknown approval {approval_id!r}")
            if self._clock() >= approval.expires and approval.status == "pending":
                self._expire(approval)
            if approval.status != "pending":
                raise GovernorError(
                    f"approval {approval_id} is already {approval.status}; ask the agent to retry"
                )
            if approver in (approval.requested_by, approval.requester) or (
                caller and caller in (approval.requested_by, approval.requester)
            ):
                raise Forbidden("an agent cannot approve or deny its own request")
            state = self._session(approval.session_id)
            outcome = "approved" if approve else "denied"
            self._record(
                state,
                APPROVAL,
                outcome,
                from_agent=approval.requested_by,
                actor=approver,
                detail={"approval_id": approval_id, "comment": comment},
            )
            settled = [approval.public()]
            for covered_id in (
                approval.request.get("covers", ()) if approval.kind == "session" else ()
            ):
                covered = self._approvals.get(covered_id)
                if covered is None or covered.status != "pending":
                    continue
                self._record(
                    state,
                    APPROVAL,
                    outcome,
                    from_agent=covered.requested_by,
                    actor=approver,
                    detail={"approval_id": covered_id, "comment": comment, "via": approval_id},
                )
                settled.append(covered.public())
        for item in settled:
            self._emit("approval", item)
        return settled[0]

    def _expire(self, approval: Approval) -> None:
        self._record(
            self._session(approval.session_id),
            APPROVAL,
            "expired",
            from_agent=approval.requested_by,
            actor="governor",
            reason="approval_expired",
            detail={"approval_id": approval.approval_id},
        )
        self._emit("approval", approval.public())

    def _expire_due(self) -> int:
        now = self._clock()
        due = [a for a in self._approvals.values() if a.status == "pending" and now >= a.expires]
        for approval in due:
            self._expire(approval)
        return len(due)

    def expire_approvals(self) -> int:
        """Deny (``approval_expired``) every approval whose TTL has passed."""
        with self._lock:
            return self._expire_due()

    # -- decisions -------------------------------------------------------------------------

    def handoff(self, req: HandoffRequest, caller: str = "") -> Decision:
        """Decide a delegation from ``from_agent`` to ``to_agent`` (or the root's start)."""
        with self._lock:
            state = self._session(req.session_id)
            parent = state.agents.get(req.from_agent) if req.from_agent else None
            if parent is not None:
                depth = parent.depth + 1
            elif req.from_agent:
                depth = req.depth if req.depth is not None else 1
            else:
                depth = 0
            outcome, reason, owner = self._judge_handoff(state, req, parent, depth)
            approval_id = req.approval_id
            if outcome == APPROVAL_REQUIRED and not approval_id:
                approval_id = self._request_approval(
                    state,
                    "handoff",
                    req.from_agent or req.to_agent,
                    caller,
                    {
                        "from_agent": req.from_agent,
                        "to_agent": req.to_agent,
                        "task": req.task,
                        "permissions": req.permissions,
                    },
                )
            perms = req.permissions
            if perms is None and parent is not None:
                perms = list(parent.permissions) if parent.permissions is not None else None
            self._record(
                state,
                PRE_HANDOFF,
                outcome,
                reason=reason,
                owner=owner,
                from_agent=req.from_agent,
                to_agent=req.to_agent,
                task=req.task,
                depth=depth,
                actor=caller,
                detail={
                    "permissions": perms,
                    "estimated_usd": req.estimated_usd,
                    "role": req.to_role,
                    "approval_id": approval_id,
                    "lock": self.policy.ownership_lock,
                },
            )
            decision = Decision(outcome, reason, owner, approval_id)
            return self._finish(decision, outcome, state)

    def _judge_handoff(
        self, state: SessionState, req: HandoffRequest, parent: Any, depth: int
    ) -> tuple[str, str, str]:
        p = self.policy
        if state.killed:
            return STOP, "session_killed", ""
        approved = False
        if req.approval_id:
            gate = self._approval_gate(
                state,
                req.approval_id,
                "handoff",
                # an approval covers exactly what it was asked for, permissions included
                {
                    "from_agent": req.from_agent,
                    "to_agent": req.to_agent,
                    "task": req.task,
                    "permissions": req.permissions,
                },
            )
            if gate is not None:
                return gate[0], gate[1], ""
            approved = True
        if req.task:
            owner_role = p.owner_of(req.task)
            if (
                owner_role is not None
                and owner_role not in (req.to_role, req.to_agent)
                and not (req.to_agent.startswith(owner_role + "-"))
            ):
                return STOP, "ownership_conflict", owner_role
            holder = state.owners.get(req.task)
            if p.ownership_lock and holder and holder != req.to_agent:
                holder_state = state.agents.get(holder)
                if holder_state is not None and holder_state.active:
                    return STOP, "ownership_conflict", holder
        if p.max_delegation_depth is not None and depth > p.max_delegation_depth:
            return STOP, "delegation_depth_exceeded", ""
        if req.from_agent and p.max_handoffs is not None and state.handoffs >= p.max_handoffs:
            return STOP, "handoff_budget_exceeded", ""
        if req.to_agent not in state.agents:
            if p.max_agents_per_run is not None and len(state.agents) >= p.max_agents_per_run:
                return STOP, "agent_budget_exceeded", ""
            if (
                p.max_concurrent_agents is not None
                and state.active_agents >= p.max_concurrent_agents
            ):
                return STOP, "concurrency_limit", ""
        if p.shared_max_usd is not None and state.usd + req.estimated_usd > p.shared_max_usd:
            return STOP, "shared_budget_exceeded", ""
        if p.shared_max_tool_calls is not None and state.tool_calls >= p.shared_max_tool_calls:
            return STOP, "shared_budget_exceeded", ""
        wanted = req.permissions
        if wanted is not None:
            if parent is not None and parent.permissions is not None:
                if uncovered(wanted, parent.permissions):
                    return STOP, "permission_escalation", ""
            role_grants = p.permissions.get(req.to_role) if req.to_role else None
            if role_grants is not None and uncovered(wanted, role_grants):
                return STOP, "permission_escalation", ""
        if not approved:
            risky = p.high_risk_delegation
            perms = wanted or []
            if (risky.write and any(_WRITE.search(x) for x in perms)) or (
                risky.production and (any(_PROD.search(x) for x in perms) or _PROD.search(req.task))
            ):
                return APPROVAL_REQUIRED, "high_risk_delegation", ""
            if req.task and f"task:{req.task}" in p.require_approval_for:
                return APPROVAL_REQUIRED, "approval_required_for_task", ""
        return ALLOW, "", ""

    def tool(self, req: ToolRequest, caller: str = "") -> Decision:
        """Decide a tool or command call; the answer carries the command's risk score."""
        risk = self.rules.assess(req.command, req.resources).score
        with self._lock:
            state = self._session(req.session_id)
            outcome, reason = self._judge_tool(state, req)
            approval_id = req.approval_id
            if outcome == APPROVAL_REQUIRED and not approval_id:
                approval_id = self._request_approval(
                    state,
                    "tool",
                    req.agent_id,
                    caller,
                    {"agent_id": req.agent_id, "tool": req.tool, "command": req.command},
                )
            agent = state.agents.get(req.agent_id)
            self._record(
                state,
                TOOL,
                outcome,
                reason=reason,
                from_agent=req.agent_id,
                depth=agent.depth if agent else 0,
                actor=caller,
                detail={
                    "tool": req.tool,
                    "command": req.command,
                    "resources": req.resources,
                    "risk": risk,
                    "approval_id": approval_id,
                },
            )
            return self._finish(Decision(outcome, reason, "", approval_id, risk), outcome, state)

    def _judge_tool(self, state: SessionState, req: ToolRequest) -> tuple[str, str]:
        p = self.policy
        if state.killed:
            return STOP, "session_killed"
        if p.tool_allowlist is not None and req.tool not in p.tool_allowlist:
            return STOP, "tool_not_allowed"
        if p.shared_max_tool_calls is not None and state.tool_calls >= p.shared_max_tool_calls:
            return STOP, "shared_budget_exceeded"
        if req.tool in p.require_approval_for:
            if not req.approval_id:
                return APPROVAL_REQUIRED, "approval_required_for_tool"
            gate = self._approval_gate(
                state,
                req.approval_id,
                "tool",
                {"agent_id": req.agent_id, "tool": req.tool, "command": req.command},
            )
            if gate is not None:
                return gate
        return ALLOW, ""

    def usage(self, req: UsageRequest, caller: str = "") -> Decision:
        """Record spend after a handoff ran; stop the agent once the shared budget is spent."""
        with self._lock:
            state = self._session(req.session_id)
            agent = state.agents.get(req.agent_id)
            p = self.policy
            after_usd = state.usd + max(
                0.0,
                (agent.spent_usd + req.usd - max(agent.estimated_usd, agent.spent_usd))
                if agent
                else req.usd,
            )
            after_calls = state.tool_calls + req.tool_calls
            if state.killed:
                outcome, reason = STOP, "session_killed"
            elif (p.shared_max_usd is not None and after_usd > p.shared_max_usd) or (
                p.shared_max_tool_calls is not None and after_calls > p.shared_max_tool_calls
            ):
                outcome, reason = STOP, "shared_budget_exceeded"
            else:
                outcome, reason = ALLOW, ""
            self._record(
                state,
                POST_HANDOFF,
                outcome,
                reason=reason,
                from_agent=agent.parent if agent else "",
                to_agent=req.agent_id,
                task=agent.task if agent else "",
                depth=agent.depth if agent else 0,
                actor=caller,
                detail={
                    "usd": req.usd,
                    "tool_calls": req.tool_calls,
                    "finished": req.finished,
                    "budget_usd": round(state.usd, 6),
                },
            )
            return self._finish(Decision(outcome, reason), outcome, state)

    def kill(self, session_id: str, actor: str, reason: str = "") -> dict[str, Any]:
        """Stop every agent of a session, now and later; cancel its pending approvals."""
        with self._lock:
            state = self._session(session_id)
            already = state.killed
            pending = [
                a.approval_id
                for a in self._approvals.values()
                if a.session_id == session_id and a.status == "pending"
            ]
            self._record(
                state,
                KILL,
                "killed",
                reason=reason,
                actor=actor,
                detail={"cancelled_approvals": pending, "repeated": already},
            )
            payload = {
                "session_id": session_id,
                "actor": actor,
                "reason": reason,
                "cancelled_approvals": pending,
            }
        self._emit("kill", payload)
        return {**payload, "status": "killed"}

    def session(self, session_id: str) -> dict[str, Any] | None:
        with self._lock:
            state = self._sessions.get(session_id)
            return state.summary() if state is not None else None

    def is_killed(self, session_id: str) -> bool:
        state = self._sessions.get(session_id)
        return bool(state and state.killed)

    def kill_info(self, session_id: str) -> dict[str, Any] | None:
        state = self._sessions.get(session_id)
        if state is None or not state.killed:
            return None
        return {"session_id": session_id, "actor": state.kill_actor, "reason": state.kill_reason}
