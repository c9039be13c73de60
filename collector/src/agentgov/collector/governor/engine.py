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

from agentgov.collector.governor.blast import blast_radius, needs_approval
from agentgov.collector.governor.plan import Plan, check_plan
from agentgov.collector.governor.policy import MultiAgentPolicy, PolicySource
from agentgov.collector.governor.scope import agent_key
from agentgov.collector.governor.state import (
    ALLOW,
    APPROVAL,
    APPROVAL_REQUIRED,
    KILL,
    PLAN,
    PLAN_APPROVED,
    PLAN_PENDING,
    POST_HANDOFF,
    PRE_HANDOFF,
    STOP,
    STOPPED,
    TOOL,
    AgentState,
    Approval,
    PlanState,
    Record,
    SessionState,
    apply,
)
from agentgov.collector.governor.tokens import LineageClaims, LineageInvalid, LineageTokens
from agentgov.collector.risk import RiskRules
from agentgov.instrumentation.governor import Decision
from agentgov.instrumentation.permissions import is_production, is_write, uncovered

log = logging.getLogger(__name__)


#: the reason of an answer to a re-ask of an approval still waiting for a reviewer
AWAITING = "awaiting_approval"


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


@dataclass(frozen=True, slots=True)
class _Verdict:
    """What judging a step found, before it is recorded."""

    outcome: str
    reason: str = ""
    owner: str = ""
    #: more to say about a stop (which tool, which limit)
    detail: str = ""
    #: the approval the answer points to when it is not the step's own (the plan's)
    approval_id: str = ""
    #: what the step touches that the session's plan did not name
    drift: tuple[str, ...] = ()
    #: the plan approval that stood in for this step's own approval
    via_plan: str = ""


_ALLOWED = _Verdict(ALLOW)


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
        journal: Sink | None = None,
    ) -> None:
        """``journal(record, row)`` makes a record durable before it is applied (the
        local audit log); it raises to refuse the record, which then changes nothing.
        ``sink(record, row)`` sees each record after it was applied."""
        self.policy_source = policy
        self.rules = rules
        self._sink = sink
        self._encode = encode
        self._journal = journal
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
        if self._journal is not None:
            # durable before it is applied: no answer, no state, without its record
            self._journal(record, row)
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
        approval_id: str = "",
    ) -> str:
        aid = approval_id or f"apr-{secrets.token_hex(8)}"
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
            return APPROVAL_REQUIRED, AWAITING
        if approval.status == "cancelled":
            return STOP, "session_killed"
        return STOP, "approval_expired" if approval.status == "expired" else "approval_denied"

    def _still_waiting(
        self,
        verdict: _Verdict,
        approval_id: str,
        state: SessionState,
        risk: int | None = None,
        renewed: str = "",
    ) -> Decision:
        """The answer to a re-ask of an approval still pending: no record. A waiting agent
        asks again whenever it wakes; the request and the reviewer's decision are the
        records, never each ask in between (one wait would otherwise add hundreds of
        hash-chained records, replayed at every restart)."""
        decision = Decision(
            APPROVAL_REQUIRED,
            AWAITING,
            "",
            approval_id,
            risk,
            lineage_token=renewed,
            detail=verdict.detail,
        )
        return self._finish(decision, APPROVAL_REQUIRED, state)

    def withdraw_approval(self, approval_id: str, caller: str = "") -> dict[str, Any]:
        """The requesting agent stopped waiting: its pending request is cancelled (reason
        ``withdrawn``) so reviewers no longer see it. Only the API key that asked may
        withdraw (with keys off, anyone who can reach the API, as for every request)."""
        with self._lock:
            approval = self._approvals.get(approval_id)
            if approval is None:
                raise GovernorError(f"unknown approval {approval_id!r}")
            if approval.requester != caller:
                raise Forbidden(
                    f"approval {approval_id} was asked for with another API key: only the "
                    "agent that asked may withdraw it"
                )
            if approval.status != "pending":
                return approval.public()  # decided, expired or withdrawn already: nothing to do
            self._record(
                self._session(approval.session_id),
                APPROVAL,
                "cancelled",
                reason="withdrawn",
                from_agent=approval.requested_by,
                actor=caller,
                detail={"approval_id": approval_id},
            )
            payload = approval.public()
        self._emit("approval", payload)
        return payload

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
                # a plan is approved on its own, with a TTL, never folded
                and a.kind not in ("session", "plan")
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
        self,
        approval_id: str,
        approve: bool,
        approver: str,
        comment: str = "",
        caller: str = "",
        ttl_s: float | None = None,
    ) -> dict[str, Any]:
        """Approve or deny a pending request. The requester may not decide its own.

        A session plan is approved for ``ttl_s`` seconds (required, at most the policy's
        ``session_approval.max_ttl_s``): while it holds, the session's steps inside the
        plan need no approval of their own; afterwards they stop.
        """
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
            detail: dict[str, Any] = {"approval_id": approval_id, "comment": comment}
            if approval.kind == "plan" and approve:
                longest = self.policy.session_approval.max_ttl_s
                if ttl_s is None or not 0 < ttl_s <= longest:
                    raise ValueError(
                        "a plan approval holds for a stated time: give ttl_s, more than 0 and "
                        f"at most {longest} seconds (session_approval.max_ttl_s)"
                    )
                detail["ttl_s"] = ttl_s
                detail["holds_until"] = round(self._clock() + ttl_s, 6)
            elif ttl_s is not None and approval.kind != "plan":
                raise ValueError("ttl_s is for plan approvals only: leave it out")
            state = self._session(approval.session_id)
            outcome = "approved" if approve else "denied"
            self._record(
                state,
                APPROVAL,
                outcome,
                from_agent=approval.requested_by,
                actor=approver,
                detail=detail,
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
                state = who.session or self._session(req.session_id)  # a root: named session
                self._check_planner(state, parent, caller)
            except _Refused as refused:
                return self._refuse(refused, caller)
            from_agent = parent.agent_id if parent is not None else ""
            depth = parent.depth + 1 if parent is not None else 0
            back = self._task_return(state, req, parent)
            verdict = self._judge_handoff(state, req, parent, depth, caller, back)
            outcome, reason = verdict.outcome, verdict.reason
            approval_id = verdict.approval_id or req.approval_id
            if reason == AWAITING:
                return self._still_waiting(verdict, approval_id, state)
            if outcome == APPROVAL_REQUIRED and not approval_id:
                request: dict[str, Any] = {
                    "from_agent": from_agent,
                    "to_agent": req.to_agent,
                    "task": req.task,
                    "permissions": req.permissions,
                }
                if verdict.drift:  # the reviewer sees what lies outside the plan
                    request["out_of_scope"] = list(verdict.drift)
                request["reason"] = reason  # why a reviewer is asked (approvals list, Slack)
                approval_id = self._request_approval(
                    state, "handoff", from_agent or req.to_agent, caller, request
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
            detail: dict[str, Any] = {
                "permissions": perms,
                "estimated_usd": req.estimated_usd,
                "role": req.to_role,
                "approval_id": approval_id,
                "lock": self.policy.ownership_lock,
                "chain": list(chain),
                "token_id": token_id,
                "verified": who.verified,
            }
            self._note(detail, verdict, back, req.permissions is None and perms is not None)
            self._record(
                state,
                PRE_HANDOFF,
                outcome,
                reason=reason,
                owner=verdict.owner,
                from_agent=from_agent,
                to_agent=req.to_agent,
                task=req.task,
                depth=depth,
                actor=caller,
                detail=detail,
            )
            decision = Decision(
                outcome,
                reason,
                verdict.owner,
                approval_id,
                lineage_token=token,
                detail=verdict.detail,
            )
            return self._finish(decision, outcome, state)

    @staticmethod
    def _note(
        detail: dict[str, Any],
        verdict: _Verdict,
        back: tuple[str, int] | None = None,
        inherited: bool = False,
    ) -> None:
        """What a record says beyond the request, only when there is something to say (the
        common step's record stays as small as before)."""
        if verdict.drift:
            detail["drift"] = list(verdict.drift)
        if verdict.via_plan:
            detail["via_plan"] = verdict.via_plan
        if back is not None:
            detail["return"] = {"agent": back[0], "count": back[1]}
        if inherited:
            # the child named no permissions and holds its parent's: a replay judges the
            # request as made, not as recorded
            detail["inherited"] = True

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

    @staticmethod
    def _check_planner(state: SessionState, parent: AgentState | None, caller: str) -> None:
        """A planned session's root starts with the API key that declared the plan: a plan
        (and its approval) cannot be borrowed by another caller."""
        plan = state.plan
        if parent is None and plan is not None and plan.declared_by != caller:
            raise _Refused(
                "lineage_invalid",
                f"session {state.session_id}'s plan was declared with another API key: its "
                "root agent starts with the key that declared it",
            )

    @staticmethod
    def _task_return(
        state: SessionState, req: HandoffRequest, parent: AgentState | None
    ) -> tuple[str, int] | None:
        """(agent, returns so far) when this delegation hands a task back to an agent that
        had it before: the same agent again, or an agent of the same role (or name) up
        the delegating chain (A hands to B, B back to A). None for a first hand."""
        if not req.task:
            return None
        key = agent_key(req.to_role, req.to_agent)
        existing = state.agents.get(req.to_agent)
        back = existing is not None and existing.task == req.task
        if not back and parent is not None:
            for aid in reversed(parent.chain):
                held = state.agents.get(aid)
                if (
                    held is not None
                    and held.task == req.task
                    and agent_key(held.role, held.agent_id) == key
                ):
                    back = True
                    break
        if not back:
            return None
        return key, state.task_returns.get((key, req.task), 0) + 1

    def _plan_held(self, plan: PlanState, asked_with: str) -> _Verdict | None:
        """:meth:`_plan_gate`, with a re-ask of the plan's pending approval (the waiting
        agent sends its id back) answered as still waiting: no record for each ask."""
        held = self._plan_gate(plan)
        if held is not None and held.reason == "plan_approval_required":
            if asked_with and asked_with == plan.approval_id:
                return _Verdict(APPROVAL_REQUIRED, AWAITING, approval_id=plan.approval_id)
        return held

    def _plan_gate(self, plan: PlanState) -> _Verdict | None:
        """What the plan's approval says before anything else: wait for it, stop (denied,
        expired, taken back), or go on judging (None)."""
        status = plan.status
        if status == PLAN_APPROVED:
            if plan.holds_until is not None and self._clock() >= plan.holds_until:
                return _Verdict(
                    STOP,
                    "plan_approval_expired",
                    detail=f"the plan approval {plan.approval_id} by {plan.approved_by} held "
                    f"{plan.ttl_s:g} s; a new session with a new plan goes on",
                )
            return None
        if status == PLAN_PENDING:
            approval = self._approvals.get(plan.approval_id)
            if approval is not None and self._clock() >= approval.expires:
                self._expire(approval)  # the plan's status follows (apply)
            else:
                return _Verdict(
                    APPROVAL_REQUIRED, "plan_approval_required", approval_id=plan.approval_id
                )
            status = plan.status
        if status == "denied":
            return _Verdict(STOP, "approval_denied", detail="a reviewer denied the session's plan")
        if status == "expired":
            return _Verdict(STOP, "approval_expired", detail="nobody approved the plan in time")
        if status in ("revoked", "cancelled"):
            return _Verdict(STOP, "session_killed")
        return None

    def _out_of_scope(self, drift: tuple[str, ...]) -> _Verdict:
        """A step outside the plan: stopped, or sent to a reviewer, as the policy says."""
        detail = "outside the session's plan: " + "; ".join(drift)
        if self.policy.session_approval.out_of_scope == "stop":
            return _Verdict(STOP, "out_of_scope", detail=detail, drift=drift)
        return _Verdict(APPROVAL_REQUIRED, "out_of_scope", detail=detail, drift=drift)

    def _judge_handoff(
        self,
        state: SessionState,
        req: HandoffRequest,
        parent: AgentState | None,
        depth: int,
        caller: str,
        back: tuple[str, int] | None = None,
    ) -> _Verdict:
        p = self.policy
        if state.killed:
            return _Verdict(STOP, "session_killed")
        plan = state.plan
        if plan is not None:
            held = self._plan_held(plan, req.approval_id)
            if held is not None:
                return held
        approved = False
        from_agent = parent.agent_id if parent is not None else ""
        # the plan's own approval id comes back with the root's start: it is no step's
        if req.approval_id and (plan is None or req.approval_id != plan.approval_id):
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
                return _Verdict(gate[0], gate[1])
            approved = True
        if req.task:
            owner_role = p.owner_of(req.task)
            if (
                owner_role is not None
                and owner_role not in (req.to_role, req.to_agent)
                and not (req.to_agent.startswith(owner_role + "-"))
            ):
                return _Verdict(STOP, "ownership_conflict", owner_role)
            holder = state.owners.get(req.task)
            if p.ownership_lock and holder and holder != req.to_agent:
                holder_state = state.agents.get(holder)
                if holder_state is not None and holder_state.active:
                    return _Verdict(STOP, "ownership_conflict", holder)
        if p.max_delegation_depth is not None and depth > p.max_delegation_depth:
            return _Verdict(STOP, "delegation_depth_exceeded")
        if parent is not None and p.max_handoffs is not None and state.handoffs >= p.max_handoffs:
            return _Verdict(STOP, "handoff_budget_exceeded")
        new_agent = req.to_agent not in state.agents
        if new_agent:
            if p.max_agents_per_run is not None and len(state.agents) >= p.max_agents_per_run:
                return _Verdict(STOP, "agent_budget_exceeded")
            if (
                p.max_concurrent_agents is not None
                and state.active_agents >= p.max_concurrent_agents
            ):
                return _Verdict(STOP, "concurrency_limit")
        if p.shared_max_usd is not None and state.usd + req.estimated_usd > p.shared_max_usd:
            return _Verdict(STOP, "shared_budget_exceeded")
        if p.shared_max_tool_calls is not None and state.tool_calls >= p.shared_max_tool_calls:
            return _Verdict(STOP, "shared_budget_exceeded")
        if back is not None and p.max_task_returns is not None and back[1] > p.max_task_returns:
            return _Verdict(
                STOP,
                "delegation_loop",
                detail=f"task {req.task[:120]!r} would come back to {back[0]} for the "
                f"{back[1]}th time (max_task_returns {p.max_task_returns})",
            )
        wanted = req.permissions
        if wanted is not None:
            if parent is not None and parent.permissions is not None:
                if uncovered(wanted, parent.permissions):
                    return _Verdict(STOP, "permission_escalation")
            role_grants = p.permissions.get(req.to_role) if req.to_role else None
            if role_grants is not None and uncovered(wanted, role_grants):
                return _Verdict(STOP, "permission_escalation")
        # what the child may do: its own grants, or its parent's when it names none
        grants = (
            list(wanted)
            if wanted is not None
            else list(parent.permissions or () if parent is not None else ())
        )
        if plan is not None and not approved:
            drift = plan.scope.handoff_drift(
                req.to_role,
                req.to_agent,
                grants,
                req.task,
                depth,
                new_agent,
                self._of_role(state, plan, req.to_role, req.to_agent),
                sum(1 for a in state.agents.values() if a.parent == from_agent)
                if parent is not None
                else None,
                state.usd + req.estimated_usd,
            )
            if drift:
                return self._out_of_scope(drift)
        if not approved:
            risky = p.high_risk_delegation
            asks = ""
            if (risky.write and any(is_write(x) for x in grants)) or (
                risky.production
                and (any(is_production(x) for x in grants) or is_production(req.task))
            ):
                asks = "high_risk_delegation"
            elif req.task and f"task:{req.task}" in p.require_approval_for:
                asks = "approval_required_for_task"
            if asks:
                if plan is not None and plan.by_reviewer:
                    # inside a plan a reviewer approved: that approval answers for the step
                    return _Verdict(ALLOW, via_plan=plan.approval_id)
                return _Verdict(APPROVAL_REQUIRED, asks)
        return _ALLOWED

    @staticmethod
    def _of_role(state: SessionState, plan: PlanState, role: str, agent_id: str) -> int:
        """How many agents of the planned role the delegation's target belongs to have
        started in the session."""
        target = plan.scope.role_of(role, agent_id)
        if target is None:
            return 0
        return sum(
            1 for a in state.agents.values() if plan.scope.role_of(a.role, a.agent_id) is target
        )

    def tool(self, req: ToolRequest, caller: str = "") -> Decision:
        """Decide a tool or command call; the answer carries the command's risk score."""
        # scored before the lock: RE2 is linear in the command, and the lock stays short
        assessed = self.rules.assess(req.command, req.resources)
        risk = assessed.score
        with self._lock:
            try:
                who = self._identify(req.session_id, req.agent_id, req.token, caller)
            except _Refused as refused:
                return self._refuse(refused, caller)
            state, agent = who.session, who.agent
            assert state is not None and agent is not None
            verdict = self._judge_tool(state, agent, req, caller, assessed.rules)
            outcome, reason = verdict.outcome, verdict.reason
            approval_id = verdict.approval_id or req.approval_id
            if reason == AWAITING:
                return self._still_waiting(verdict, approval_id, state, risk, self._renewal(who))
            if outcome == APPROVAL_REQUIRED and not approval_id:
                request: dict[str, Any] = {
                    "agent_id": agent.agent_id,
                    "tool": req.tool,
                    "command": req.command,
                }
                if state.plan is not None:
                    # in a planned session what a call touches is part of its scope
                    request["resources"] = req.resources
                if verdict.drift:
                    request["out_of_scope"] = list(verdict.drift)
                request["reason"] = reason  # why a reviewer is asked (approvals list, Slack)
                approval_id = self._request_approval(state, "tool", agent.agent_id, caller, request)
            detail: dict[str, Any] = {
                "tool": req.tool,
                "command": req.command,
                "resources": req.resources,
                "risk": risk,
                "approval_id": approval_id,
                "verified": who.verified,
            }
            if verdict is not _ALLOWED:
                self._note(detail, verdict)
            self._record(
                state,
                TOOL,
                outcome,
                reason=reason,
                from_agent=agent.agent_id,
                depth=agent.depth,
                actor=caller,
                detail=detail,
            )
            decision = Decision(
                outcome,
                reason,
                "",
                approval_id,
                risk,
                lineage_token=self._renewal(who),
                detail=verdict.detail,
            )
            return self._finish(decision, outcome, state)

    def _judge_tool(
        self,
        state: SessionState,
        agent: AgentState,
        req: ToolRequest,
        caller: str,
        risk_rules: tuple[str, ...] = (),
    ) -> _Verdict:
        p = self.policy
        if state.killed:
            return _Verdict(STOP, "session_killed")
        plan = state.plan
        if plan is not None:
            held = self._plan_held(plan, req.approval_id)
            if held is not None:
                return held
        if p.tool_allowlist is not None and req.tool not in p.tool_allowlist:
            allowed = ", ".join(p.tool_allowlist[:20]) or "(none)"
            return _Verdict(
                STOP,
                "tool_not_allowed",
                detail=f"tool {req.tool!r} is not on the allowlist: {allowed}",
            )
        if p.shared_max_tool_calls is not None and state.tool_calls >= p.shared_max_tool_calls:
            return _Verdict(STOP, "shared_budget_exceeded")
        asks = req.tool in p.require_approval_for
        approved = False
        own = req.approval_id and (plan is None or req.approval_id != plan.approval_id)
        if own and (asks or plan is not None):
            matches: dict[str, Any] = {
                "agent_id": agent.agent_id,
                "tool": req.tool,
                "command": req.command,
            }
            if plan is not None:
                matches["resources"] = req.resources
            gate = self._approval_gate(state, req.approval_id, "tool", matches, caller)
            if gate is not None:
                return _Verdict(gate[0], gate[1])
            approved = True
        if plan is not None and not approved:
            drift = plan.scope.tool_drift(
                agent.role,
                agent.agent_id,
                req.tool,
                req.resources,
                risk_rules,
                state.tool_calls + 1,
            )
            if drift:
                return self._out_of_scope(drift)
        if asks and not approved:
            if plan is not None and plan.by_reviewer:
                # inside a plan a reviewer approved: that approval answers for the call
                return _Verdict(ALLOW, via_plan=plan.approval_id)
            return _Verdict(APPROVAL_REQUIRED, "approval_required_for_tool")
        return _ALLOWED

    def usage(self, req: UsageRequest, caller: str = "") -> Decision:
        """Record spend after a handoff ran; stop the agent once the shared budget is spent."""
        with self._lock:
            try:
                who = self._identify(req.session_id, req.agent_id, req.token, caller)
            except _Refused as refused:
                return self._refuse(refused, caller)
            state, agent = who.session, who.agent
            assert state is not None and agent is not None
            verdict = self._judge_usage(state, agent, req)
            detail: dict[str, Any] = {
                "usd": req.usd,
                "tool_calls": req.tool_calls,
                "finished": req.finished,
                "budget_usd": round(state.usd, 6),
                "verified": who.verified,
            }
            if verdict is not _ALLOWED:
                self._note(detail, verdict)
            self._record(
                state,
                POST_HANDOFF,
                verdict.outcome,
                reason=verdict.reason,
                from_agent=agent.parent,
                to_agent=agent.agent_id,
                task=agent.task,
                depth=agent.depth,
                actor=caller,
                detail=detail,
            )
            decision = Decision(
                verdict.outcome,
                verdict.reason,
                lineage_token=self._renewal(who),
                detail=verdict.detail,
            )
            return self._finish(decision, verdict.outcome, state)

    def _judge_usage(self, state: SessionState, agent: AgentState, req: UsageRequest) -> _Verdict:
        p = self.policy
        after_usd = state.usd + max(
            0.0, agent.spent_usd + req.usd - max(agent.estimated_usd, agent.spent_usd)
        )
        after_calls = state.tool_calls + req.tool_calls
        if state.killed:
            return _Verdict(STOP, "session_killed")
        if (p.shared_max_usd is not None and after_usd > p.shared_max_usd) or (
            p.shared_max_tool_calls is not None and after_calls > p.shared_max_tool_calls
        ):
            return _Verdict(STOP, "shared_budget_exceeded")
        plan = state.plan
        if plan is not None and req.usd and after_usd > plan.scope.budget_usd:
            # spent, not asked: the spend is recorded as drift whatever the answer
            drift = (f"budget: {after_usd:g} USD beyond the planned {plan.scope.budget_usd:g}",)
            if p.session_approval.out_of_scope == "stop" and not req.finished:
                return _Verdict(STOP, "out_of_scope", detail=drift[0], drift=drift)
            return _Verdict(ALLOW, drift=drift)
        return _ALLOWED

    # -- plans -----------------------------------------------------------------------------

    def declare_plan(self, session_id: str, plan: Plan, caller: str = "") -> dict[str, Any]:
        """Take a session's plan before its first agent starts: check it against the
        policy, compute its blast radius and, when the policy says so, ask a reviewer.

        :class:`~agentgov.collector.governor.plan.PlanError` when the plan goes beyond the
        policy; :class:`GovernorError` when the session has started, has a plan or was
        killed. The answer is the plan's view (:meth:`plan_view`).
        """
        check_plan(plan, self.policy)
        radius = blast_radius(plan, self.rules, self.policy).as_json()
        reasons = needs_approval(radius, self.policy.session_approval)
        normalized = plan.model_dump()
        with self._lock:
            state = self._sessions.get(session_id)
            if state is not None:
                if state.killed:
                    raise GovernorError(f"session {session_id} was killed: start a new session")
                if state.plan is not None:
                    raise GovernorError(
                        f"session {session_id} has a plan already: a plan is declared once"
                    )
                if state.agents:
                    raise GovernorError(
                        f"session {session_id} has started: declare the plan before its "
                        "first agent starts"
                    )
            state = self._session(session_id)
            aid = f"apr-{secrets.token_hex(8)}" if reasons else ""
            self._record(
                state,
                PLAN,
                "approval_required" if reasons else "declared",
                actor=caller,
                detail={
                    "plan": normalized,
                    "blast_radius": radius,
                    "approval_id": aid,
                    "needs_approval": reasons,
                },
            )
            if aid:
                self._request_approval(
                    state,
                    "plan",
                    "",
                    caller,
                    {
                        "intent": plan.intent,
                        "blast_radius": radius,
                        "needs_approval": reasons,
                    },
                    approval_id=aid,
                )
            assert state.plan is not None
            return {"session_id": session_id, **state.plan.public(self._clock())}

    def check_plan(self, plan: Plan) -> dict[str, Any]:
        """What declaring ``plan`` would meet now: its blast radius and why a reviewer
        would be asked (:class:`~agentgov.collector.governor.plan.PlanError` when the
        policy refuses it). Changes nothing."""
        check_plan(plan, self.policy)
        radius = blast_radius(plan, self.rules, self.policy).as_json()
        return {
            "blast_radius": radius,
            "needs_approval": needs_approval(radius, self.policy.session_approval),
        }

    def plan_view(self, session_id: str) -> dict[str, Any] | None:
        """A session's plan, blast radius, approval and drift; None: it has no plan."""
        with self._lock:
            state = self._sessions.get(session_id)
            if state is None or state.plan is None:
                return None
            return {"session_id": session_id, **state.plan.public(self._clock())}

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
            plan = state.plan
            revoked = plan.approval_id if plan is not None and plan.by_reviewer else None
            detail: dict[str, Any] = {"cancelled_approvals": pending, "repeated": already}
            if revoked:
                detail["revoked_plan_approval"] = revoked
            self._record(state, KILL, "killed", reason=reason, actor=actor, detail=detail)
            payload: dict[str, Any] = {
                "session_id": session_id,
                "actor": actor,
                "reason": reason,
                "cancelled_approvals": pending,
            }
            if revoked:  # only planned sessions say so: the kill of any other is as before
                payload["revoked_plan_approval"] = revoked
            status = self._kill_status(state)
            changed = [self._approvals[a].public() for a in [*pending, revoked] if a]
        self._emit("kill", payload)
        for item in changed:
            self._emit("approval", item)
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
