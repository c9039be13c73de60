"""Where decisions are made: the governor answers allow, stop or approval_required.

Decisions never wait on ClickHouse: each session's authoritative state lives here, every
decision takes one lock for a few microseconds (so concurrent requests from any number
of processes can never pass a limit together), and its audit record is handed to a
sink that writes it behind the answer.

Who asks is established here, never taken from the request body: an agent is the holder
of the lineage token the governor issued it when it allowed the agent's start, and its
session, parent, chain, depth and permissions are what the governor recorded then. A
request without a token (clients that predate tokens, where the policy allows them) may
only speak for an agent the governor started, with the API key that started it. A request
the governor cannot attribute is answered ``stop`` and changes nothing: it is not written
into any session's audit chain, which would let anyone append to anyone's.
"""

from __future__ import annotations

import logging
import secrets
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
    STOPPED,
    TOOL,
    AgentState,
    Approval,
    Record,
    SessionState,
    apply,
)
from agentgov.collector.governor.tokens import LineageClaims, LineageInvalid, LineageTokens
from agentgov.collector.risk import RiskRules
from agentgov.instrumentation.governor import Decision
from agentgov.instrumentation.permissions import is_production, is_write, uncovered

log = logging.getLogger(__name__)


class GovernorError(RuntimeError):
    """A request the governor cannot act on (unknown approval, bad state)."""


class UnknownSession(GovernorError):
    """A session the governor has never seen: a kill of it must say it means it."""


class Forbidden(PermissionError):
    """The caller may not do this (e.g. approve its own request)."""


class _Refused(Exception):
    """A request the governor will not attribute to any agent: answered ``stop``, never
    recorded (see the module docstring)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class _Who:
    """Who asks, as the governor established it."""

    session: SessionState | None  # None: a session the governor has not seen yet
    agent: AgentState | None  # None: the root of a session is being started
    verified: bool  # identified by a valid lineage token
    claims: LineageClaims | None


@dataclass
class HandoffRequest:
    session_id: str
    from_agent: str  # "" when the root agent of the session starts
    to_agent: str
    task: str = ""
    permissions: list[str] | None = None
    estimated_usd: float = 0.0
    to_role: str = ""
    #: ignored (older clients sent it): depth is the governor's, never the caller's
    depth: int | None = None
    approval_id: str = ""
    #: the delegating agent's lineage token, from the request header (never the body)
    token: str = ""


@dataclass
class ToolRequest:
    session_id: str
    agent_id: str
    tool: str
    command: str = ""
    resources: list[str] = field(default_factory=list)
    approval_id: str = ""
    token: str = ""


@dataclass
class UsageRequest:
    session_id: str
    agent_id: str
    usd: float = 0.0
    tool_calls: int = 0
    finished: bool = False
    token: str = ""


#: receives each record with its audit row, serialized before the record was applied
Sink = Callable[[Record, str], None]
#: a record's audit row; raises (e.g. on a number JSON cannot hold) to refuse the record
Encoder = Callable[[Record], str]
Listener = Callable[[str, dict[str, Any]], None]


class Governor:
    """Per-session state and the decisions made on it."""

    def __init__(
        self,
        policy: PolicySource,
        rules: RiskRules,
        sink: Sink | None = None,
        clock: Callable[[], float] = time.time,
        tokens: LineageTokens | None = None,
        encode: Encoder | None = None,
    ) -> None:
        self.policy_source = policy
        self.rules = rules
        self._sink = sink
        self._encode = encode
        self._clock = clock
        #: issues and verifies lineage tokens; None: a governor that issues none
        self.tokens = tokens
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionState] = {}
        self._approvals: dict[str, Approval] = {}
        #: called with (event type, payload) for kills and approval changes
        self.listeners: list[Listener] = []
        #: requests answered stop because nobody could be held to them, by reason
        self.refused: dict[str, int] = {}
        self._refusal_log_at = 0.0

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
        # serialized before it is applied: a record that cannot be stored changes nothing
        row = self._encode(record) if self._encode is not None else ""
        apply(state, record, self._approvals)
        if self._sink is not None:
            self._sink(record, row)
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
                lineage_token=decision.lineage_token,
            )
        return decision

    # -- identity --------------------------------------------------------------------------

    def _refuse(self, refused: _Refused, caller: str) -> Decision:
        """Answer a request nobody can be held to: stop, with what is wrong; count it."""
        self.refused[refused.reason] = self.refused.get(refused.reason, 0) + 1
        now = time.monotonic()
        if now >= self._refusal_log_at:  # at most one line a second: forgers fill no disk
            self._refusal_log_at = now + 1.0
            log.warning(
                "refused a request of %s: %s (%s)",
                caller or "anonymous",
                refused.reason,
                refused.detail,
            )
        return Decision(STOP, refused.reason, detail=refused.detail)

    def _identify(
        self, session_id: str, agent_id: str, token: str, caller: str, root: bool = False
    ) -> _Who:
        """Who asks: the holder of ``token``; without one, the agent named, if the
        governor started it with ``caller``'s key. ``root``: an empty ``agent_id`` starts
        a new session."""
        if token:
            if self.tokens is None:
                raise _Refused("lineage_invalid", "this governor issues no lineage tokens")
            try:
                claims = self.tokens.verify(token)
            except LineageInvalid as exc:
                raise _Refused(exc.reason, str(exc)) from None
            if session_id and session_id != claims.session_id:
                raise _Refused(
                    "lineage_invalid",
                    f"the lineage token is for session {claims.session_id}, not {session_id}",
                )
            if agent_id and agent_id != claims.agent_id:
                raise _Refused(
                    "lineage_invalid",
                    f"the lineage token is agent {claims.agent_id}'s; the request names {agent_id}",
                )
            state = self._sessions.get(claims.session_id)
            agent = state.agents.get(claims.agent_id) if state is not None else None
            if state is None or agent is None:
                raise _Refused(
                    "lineage_invalid",
                    "the lineage token names an agent this governor never started",
                )
            return _Who(state, agent, True, claims)
        if not session_id:
            raise _Refused(
                "lineage_invalid",
                "a request without a lineage token names its session_id (and agent)",
            )
        state = self._sessions.get(session_id)
        if not agent_id and root:
            if state is not None and state.agents and not state.killed:
                raise _Refused(
                    "lineage_invalid",
                    f"session {session_id} has its root agent already: further agents are "
                    "delegated by one of its agents, with that agent's lineage token",
                )
            return _Who(state, None, False, None)
        if self.policy.require_verified_lineage:
            raise _Refused(
                "lineage_required",
                "the policy requires a lineage token on every request "
                "(header Agentgov-Lineage-Token); agentgov's SDK sends it",
            )
        agent = state.agents.get(agent_id) if state is not None else None
        if state is None or agent is None:
            raise _Refused(
                "unknown_agent",
                f"the governor never started agent {agent_id or '(none)'} in session "
                f"{session_id}: agents start with an allowed delegation",
            )
        if caller and agent.key and caller != agent.key:
            raise _Refused(
                "lineage_invalid",
                f"agent {agent_id} was started with API key {agent.key!r}; without its "
                "lineage token, only that key may speak for it",
            )
        return _Who(state, agent, False, None)

    def _renewal(self, who: _Who) -> str:
        """A fresh token for the caller when its own is past half its life."""
        claims, agent = who.claims, who.agent
        if claims is None or agent is None or self.tokens is None:
            return ""
        if not self.tokens.needs_renewal(claims) or who.session is None or who.session.killed:
            return ""
        token, _ = self.tokens.issue(
            claims.session_id,
            claims.agent_id,
            claims.parent_id,
            claims.chain,
            claims.role,
            "",
            claims.permissions,
            digest=claims.task_digest,
            ttl_s=self.policy.lineage_ttl_s,
        )
        return token

    # -- approvals -------------------------------------------------------------------------

    def _request_approval(
        self,
        state: SessionState,
        kind: str,
        agent: str,
        caller: str,
        request: dict[str, Any],
    ) -> str:
        aid = f"apr-{secrets.token_hex(8)}"
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
        self,
        state: SessionState,
        approval_id: str,
        kind: str,
        matches: dict[str, Any],
        caller: str,
    ) -> tuple[str, str] | None:
        """(outcome, reason) when an approval settles the request, None to go on deciding.

        An approval answers one request, by one agent, through one API key: the same
        request sent by anyone else is a mismatch, so an approval cannot be replayed.
        """
        approval = self._approvals.get(approval_id)
        if approval is None or approval.session_id != state.session_id or approval.kind != kind:
            return STOP, "approval_unknown"
        if approval.requester != caller or any(
            approval.request.get(k) != v for k, v in matches.items()
        ):
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
            aid = f"apr-{secrets.token_hex(8)}"
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
        """Decide a delegation by the token's holder to ``to_agent`` (or a session's root
        start, without a token); an allowed answer carries ``to_agent``'s token."""
        with self._lock:
            try:
                who = self._identify(req.session_id, req.from_agent, req.token, caller, root=True)
                parent = who.agent
                self._check_target(who, req.to_agent)
            except _Refused as refused:
                return self._refuse(refused, caller)
            state = who.session or self._session(req.session_id)  # a root: named session
            from_agent = parent.agent_id if parent is not None else ""
            depth = parent.depth + 1 if parent is not None else 0
            outcome, reason, owner = self._judge_handoff(state, req, parent, depth, caller)
            approval_id = req.approval_id
            if outcome == APPROVAL_REQUIRED and not approval_id:
                approval_id = self._request_approval(
                    state,
                    "handoff",
                    from_agent or req.to_agent,
                    caller,
                    {
                        "from_agent": from_agent,
                        "to_agent": req.to_agent,
                        "task": req.task,
                        "permissions": req.permissions,
                    },
                )
            perms = req.permissions
            if perms is None and parent is not None:
                perms = list(parent.permissions) if parent.permissions is not None else None
            chain = (*parent.chain, req.to_agent) if parent is not None else (req.to_agent,)
            goes_ahead = outcome == ALLOW or self.policy.mode == "shadow"
            token, token_id = "", ""
            if goes_ahead and self.tokens is not None:
                token, token_id = self.tokens.issue(
                    state.session_id,
                    req.to_agent,
                    from_agent,
                    chain,
                    req.to_role,
                    req.task,
                    perms,
                    ttl_s=self.policy.lineage_ttl_s,
                )
            self._record(
                state,
                PRE_HANDOFF,
                outcome,
                reason=reason,
                owner=owner,
                from_agent=from_agent,
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
                    "chain": list(chain),
                    "token_id": token_id,
                    "verified": who.verified,
                },
            )
            decision = Decision(outcome, reason, owner, approval_id, lineage_token=token)
            return self._finish(decision, outcome, state)

    def _check_target(self, who: _Who, to_agent: str) -> None:
        """The new agent's id must be new to the session (or a re-delegation by the same
        parent) and must not close a cycle in the chain."""
        parent = who.agent
        existing = who.session.agents.get(to_agent) if who.session is not None else None
        from_agent = parent.agent_id if parent is not None else ""
        if existing is not None and existing.parent != from_agent:
            raise _Refused(
                "lineage_invalid",
                f"agent id {to_agent} belongs to another agent of this session: "
                "give the new agent an id of its own",
            )
        if parent is not None and to_agent in parent.chain:
            raise _Refused("lineage_invalid", f"{to_agent} is in its own delegation chain: a cycle")

    def _judge_handoff(
        self,
        state: SessionState,
        req: HandoffRequest,
        parent: AgentState | None,
        depth: int,
        caller: str,
    ) -> tuple[str, str, str]:
        p = self.policy
        if state.killed:
            return STOP, "session_killed", ""
        approved = False
        from_agent = parent.agent_id if parent is not None else ""
        if req.approval_id:
            gate = self._approval_gate(
                state,
                req.approval_id,
                "handoff",
                # an approval covers exactly what it was asked for, permissions included
                {
                    "from_agent": from_agent,
                    "to_agent": req.to_agent,
                    "task": req.task,
                    "permissions": req.permissions,
                },
                caller,
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
        if parent is not None and p.max_handoffs is not None and state.handoffs >= p.max_handoffs:
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
            # what the child may do: its own grants, or its parent's when it names none
            grants = (
                list(wanted)
                if wanted is not None
                else list(parent.permissions or () if parent is not None else ())
            )
            if (risky.write and any(is_write(x) for x in grants)) or (
                risky.production
                and (any(is_production(x) for x in grants) or is_production(req.task))
            ):
                return APPROVAL_REQUIRED, "high_risk_delegation", ""
            if req.task and f"task:{req.task}" in p.require_approval_for:
                return APPROVAL_REQUIRED, "approval_required_for_task", ""
        return ALLOW, "", ""

    def tool(self, req: ToolRequest, caller: str = "") -> Decision:
        """Decide a tool or command call; the answer carries the command's risk score."""
        # scored before the lock: RE2 is linear in the command, and the lock stays short
        risk = self.rules.assess(req.command, req.resources).score
        with self._lock:
            try:
                who = self._identify(req.session_id, req.agent_id, req.token, caller)
            except _Refused as refused:
                return self._refuse(refused, caller)
            state, agent = who.session, who.agent
            assert state is not None and agent is not None
            outcome, reason, detail = self._judge_tool(state, agent, req, caller)
            approval_id = req.approval_id
            if outcome == APPROVAL_REQUIRED and not approval_id:
                approval_id = self._request_approval(
                    state,
                    "tool",
                    agent.agent_id,
                    caller,
                    {"agent_id": agent.agent_id, "tool": req.tool, "command": req.command},
                )
            self._record(
                state,
                TOOL,
                outcome,
                reason=reason,
                from_agent=agent.agent_id,
                depth=agent.depth,
                actor=caller,
                detail={
                    "tool": req.tool,
                    "command": req.command,
                    "resources": req.resources,
                    "risk": risk,
                    "approval_id": approval_id,
                    "verified": who.verified,
                },
            )
            decision = Decision(
                outcome,
                reason,
                "",
                approval_id,
                risk,
                lineage_token=self._renewal(who),
                detail=detail,
            )
            return self._finish(decision, outcome, state)

    def _judge_tool(
        self, state: SessionState, agent: AgentState, req: ToolRequest, caller: str
    ) -> tuple[str, str, str]:
        p = self.policy
        if state.killed:
            return STOP, "session_killed", ""
        if p.tool_allowlist is not None and req.tool not in p.tool_allowlist:
            allowed = ", ".join(p.tool_allowlist[:20]) or "(none)"
            return STOP, "tool_not_allowed", f"tool {req.tool!r} is not on the allowlist: {allowed}"
        if p.shared_max_tool_calls is not None and state.tool_calls >= p.shared_max_tool_calls:
            return STOP, "shared_budget_exceeded", ""
        if req.tool in p.require_approval_for:
            if not req.approval_id:
                return APPROVAL_REQUIRED, "approval_required_for_tool", ""
            gate = self._approval_gate(
                state,
                req.approval_id,
                "tool",
                {"agent_id": agent.agent_id, "tool": req.tool, "command": req.command},
                caller,
            )
            if gate is not None:
                return gate[0], gate[1], ""
        return ALLOW, "", ""

    def usage(self, req: UsageRequest, caller: str = "") -> Decision:
        """Record spend after a handoff ran; stop the agent once the shared budget is spent."""
        with self._lock:
            try:
                who = self._identify(req.session_id, req.agent_id, req.token, caller)
            except _Refused as refused:
                return self._refuse(refused, caller)
            state, agent = who.session, who.agent
            assert state is not None and agent is not None
            p = self.policy
            after_usd = state.usd + max(
                0.0, agent.spent_usd + req.usd - max(agent.estimated_usd, agent.spent_usd)
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
                from_agent=agent.parent,
                to_agent=agent.agent_id,
                task=agent.task,
                depth=agent.depth,
                actor=caller,
                detail={
                    "usd": req.usd,
                    "tool_calls": req.tool_calls,
                    "finished": req.finished,
                    "budget_usd": round(state.usd, 6),
                    "verified": who.verified,
                },
            )
            decision = Decision(outcome, reason, lineage_token=self._renewal(who))
            return self._finish(decision, outcome, state)

    # -- kills -----------------------------------------------------------------------------

    def knows(self, session_id: str) -> bool:
        """Whether the governor has seen the session (decided a step of it, or killed it)."""
        return session_id in self._sessions

    def governs(self, session_id: str) -> bool:
        """Whether agents of the session run under the governor (it started one): then
        only spans a lineage token vouches for are evidence of what they did. A session
        it only killed (an alert on spans, a pre-kill) is not governed."""
        state = self._sessions.get(session_id)
        return state is not None and bool(state.agents)

    def kill(
        self, session_id: str, actor: str, reason: str = "", unseen: bool = False
    ) -> dict[str, Any]:
        """Stop every agent of a session, now and later; cancel its pending approvals.

        A session the governor has never seen raises :class:`UnknownSession` unless
        ``unseen``: the caller knows of it from elsewhere (its spans) or pre-kills an id
        whose agents have not started yet.
        """
        with self._lock:
            if session_id not in self._sessions and not unseen:
                raise UnknownSession(
                    f"unknown session {session_id!r}: no agent of it ever asked the governor"
                )
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
            status = self._kill_status(state)
        self._emit("kill", payload)
        return {**payload, **status}

    def stopped(
        self, session_id: str, agent_id: str, token: str, caller: str = ""
    ) -> dict[str, Any]:
        """An agent acknowledges its session's stop (the SDK does it on the kill event)."""
        with self._lock:
            try:
                who = self._identify(session_id, agent_id, token, caller)
            except _Refused as refused:
                raise Forbidden(f"{refused.reason}: {refused.detail}") from None
            state, agent = who.session, who.agent
            assert state is not None and agent is not None
            if not state.killed:
                raise GovernorError(f"session {state.session_id} is not killed")
            if agent.stopped_at is None:
                self._record(
                    state,
                    STOPPED,
                    "acknowledged",
                    from_agent=agent.agent_id,
                    depth=agent.depth,
                    actor=caller,
                    detail={"verified": who.verified},
                )
            return {
                "session_id": state.session_id,
                "agent_id": agent.agent_id,
                "stopped_at": agent.stopped_at,
            }

    def kill_status(self, session_id: str) -> dict[str, Any]:
        """Each known agent of the session: running at the kill, and when it stopped."""
        with self._lock:
            state = self._sessions.get(session_id)
            if state is None:
                raise UnknownSession(f"unknown session {session_id!r}")
            return self._kill_status(state)

    @staticmethod
    def _kill_status(state: SessionState) -> dict[str, Any]:
        agents = [
            {
                "agent_id": a.agent_id,
                "parent_id": a.parent or None,
                "role": a.role or None,
                "running_at_kill": a.running_at_kill,
                "acknowledged": a.stopped_at is not None,
                "stopped_at": a.stopped_at,
            }
            for a in state.agents.values()
        ]
        return {
            "status": "killed" if state.killed else "active",
            "killed_at": state.kill_time,
            "agents": agents,
            "running_at_kill": sum(1 for a in agents if a["running_at_kill"]),
            "acknowledged": sum(1 for a in agents if a["acknowledged"]),
        }

    def session(self, session_id: str) -> dict[str, Any] | None:
        with self._lock:
            state = self._sessions.get(session_id)
            return state.summary() if state is not None else None

    def lineage(self, session_id: str) -> dict[str, dict[str, Any]]:
        """The session's agents as the governor allowed them (parent, chain, depth)."""
        with self._lock:
            state = self._sessions.get(session_id)
            if state is None:
                return {}
            return {
                a.agent_id: {
                    "parent_id": a.parent,
                    "chain": list(a.chain),
                    "depth": a.depth,
                    "role": a.role,
                    "token_id": a.token_id,
                }
                for a in state.agents.values()
            }

    def is_killed(self, session_id: str) -> bool:
        state = self._sessions.get(session_id)
        return bool(state and state.killed)

    def kill_info(self, session_id: str) -> dict[str, Any] | None:
        state = self._sessions.get(session_id)
        if state is None or not state.killed:
            return None
        return {"session_id": session_id, "actor": state.kill_actor, "reason": state.kill_reason}
