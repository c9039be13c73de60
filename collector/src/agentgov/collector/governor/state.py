"""Governor state as plain data, changed only by applying audit records.

Every decision the governor makes is an audit :class:`Record`; :func:`apply` is the one
place that turns a record into state. Live decisions and the replay after a restart go
through it alike, so a restarted governor reaches exactly the state it had: spent budget
stays spent, a killed session stays killed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from agentgov.collector.governor.scope import PlanScope
from agentgov.collector.risk import risk_from_log_sum, risk_log_term

# phases of audit records
PRE_HANDOFF = "pre_handoff"
POST_HANDOFF = "post_handoff"
TOOL = "tool"
APPROVAL = "approval"
KILL = "kill"
#: a session plan was declared (before its first agent started)
PLAN = "plan"
#: an agent acknowledged its session's stop (or was refused a step after it)
STOPPED = "stopped"

ALLOW, STOP, APPROVAL_REQUIRED = "allow", "stop", "approval_required"


@dataclass
class Record:
    """One decision or control event of a session, as stored in ``agentgov_decisions``."""

    session_id: str
    seq: int
    time: float
    phase: str
    outcome: str
    reason: str = ""
    owner: str = ""
    from_agent: str = ""
    to_agent: str = ""
    task: str = ""
    depth: int = 0
    actor: str = ""
    mode: str = "enforce"
    detail: dict[str, Any] = field(default_factory=dict)
    prev_hash: str = ""
    hash: str = ""

    @property
    def step_agent(self) -> str:
        """The agent that took the step: a usage report (post-handoff) is the receiving
        agent's step, recorded as its parent's handoff; every other record names it first."""
        return self.to_agent if self.phase == POST_HANDOFF else self.from_agent

    def canonical(self) -> bytes:
        """The bytes the hash covers: every field but the hash itself, in a fixed order
        (time in whole microseconds, as stored)."""
        return json.dumps(
            [
                self.session_id,
                self.seq,
                round(self.time * 1_000_000),
                self.phase,
                self.outcome,
                self.reason,
                self.owner,
                self.from_agent,
                self.to_agent,
                self.task,
                self.depth,
                self.actor,
                self.mode,
                self.detail,
                self.prev_hash,
            ],
            sort_keys=True,
            separators=(",", ":"),
            # NaN and infinity have no JSON form: a record holding one is refused before
            # it changes anything, never stored as a hash over text it does not have
            allow_nan=False,
        ).encode()

    def seal(self, prev_hash: str) -> Record:
        self.prev_hash = prev_hash
        self.hash = hashlib.sha256(self.canonical()).hexdigest()
        return self

    @property
    def effective(self) -> bool:
        """Whether the step went ahead: allowed, or decided in shadow mode (never blocks)."""
        return self.outcome == ALLOW or (self.mode == "shadow" and self.outcome != "")


@dataclass
class AgentState:
    agent_id: str
    parent: str
    depth: int
    role: str
    task: str
    permissions: tuple[str, ...] | None
    estimated_usd: float = 0.0
    spent_usd: float = 0.0
    active: bool = True
    #: from the root agent to this one, as the governor allowed it
    chain: tuple[str, ...] = ()
    #: the API key (name) that started it: tokenless requests for it must come from it
    key: str = ""
    #: the id of the last lineage token issued to it
    token_id: str = ""
    #: when it acknowledged its session's stop (or was refused a step after the kill)
    stopped_at: float | None = None
    #: whether it was running when its session was killed
    running_at_kill: bool = False


@dataclass
class Approval:
    approval_id: str
    session_id: str
    #: "handoff", "tool", "plan" (a session's plan), or "session" (folds a session's
    #: pending approvals)
    kind: str
    requested_by: str  # agent id
    requester: str  # API key name of the caller, "" when keys are off
    request: dict[str, Any]
    created: float
    expires: float
    #: pending, approved, denied, expired, cancelled; a plan approval a kill took back:
    #: revoked
    status: str = "pending"
    approver: str = ""
    comment: str = ""
    decided_at: float | None = None
    #: the session-level approval this one was folded into
    escalated_to: str = ""

    def public(self) -> dict[str, Any]:
        return asdict(self)


#: the most drift entries a session keeps (each names what one step touched off-plan);
#: the count goes on
MAX_DRIFT = 200

#: plan statuses: holds without a reviewer; waits for one; approved by one (until
#: ``holds_until``); denied; not decided in time; taken back by a kill; a kill before any
#: decision
PLAN_ACTIVE, PLAN_PENDING, PLAN_APPROVED = "active", "pending", "approved"


@dataclass
class PlanState:
    """A session's plan: what was declared, its blast radius, its approval, its drift."""

    plan: dict[str, Any]
    blast_radius: dict[str, Any]
    scope: PlanScope
    declared_at: float
    #: the API key (name) that declared it: the session's root starts with that key
    declared_by: str
    needs_approval: list[str]
    approval_id: str = ""
    status: str = PLAN_ACTIVE
    approved_by: str = ""
    approved_at: float | None = None
    ttl_s: float | None = None
    holds_until: float | None = None
    #: the steps that went off-plan, oldest first (at most MAX_DRIFT)
    drift: list[dict[str, Any]] = field(default_factory=list)
    drift_count: int = 0

    @property
    def by_reviewer(self) -> bool:
        """A person approved the plan: its scope stands in for per-step approvals."""
        return self.status == PLAN_APPROVED

    def public(self, now: float) -> dict[str, Any]:
        status = self.status
        if status == PLAN_APPROVED and self.holds_until is not None and now >= self.holds_until:
            status = "expired"
        return {
            "status": status,
            "plan": self.plan,
            "blast_radius": self.blast_radius,
            "declared_at": self.declared_at,
            "declared_by": self.declared_by or None,
            "needs_approval": self.needs_approval,
            "approval": {
                "approval_id": self.approval_id,
                "approved_by": self.approved_by or None,
                "approved_at": self.approved_at,
                "ttl_s": self.ttl_s,
                "holds_until": self.holds_until,
            }
            if self.approval_id
            else None,
            "drift_count": self.drift_count,
            "drift": self.drift,
        }


@dataclass
class SessionState:
    session_id: str
    agents: dict[str, AgentState] = field(default_factory=dict)
    handoffs: int = 0
    tool_calls: int = 0
    owners: dict[str, str] = field(default_factory=dict)  # task -> owning agent id
    killed: bool = False
    kill_actor: str = ""
    kill_reason: str = ""
    kill_time: float | None = None
    #: running noisy-OR log-sum of the risks of allowed tool calls
    decided_risk_log_sum: float = 0.0
    #: this session's approvals (ids), so per-session lookups skip everyone else's
    approval_ids: list[str] = field(default_factory=list)
    #: the session's declared plan; None: a session without one (decided as ever)
    plan: PlanState | None = None
    #: (agent role or name, task) -> how often that task came back to that agent
    task_returns: dict[tuple[str, str], int] = field(default_factory=dict)
    seq: int = 0
    last_hash: str = ""

    @property
    def active_agents(self) -> int:
        return sum(1 for a in self.agents.values() if a.active)

    @property
    def usd(self) -> float:
        """Budget in use: per agent, the larger of its estimate and what it reported spent."""
        return sum(max(a.estimated_usd, a.spent_usd) for a in self.agents.values())

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "session_id": self.session_id,
            "status": "killed" if self.killed else "active",
            "killed_by": self.kill_actor or None,
            "kill_reason": self.kill_reason or None,
            "governed_agents": len(self.agents),
            "active_agents": self.active_agents,
            "governed_handoffs": self.handoffs,
            "budget_usd": round(self.usd, 6),
            "governed_tool_calls": self.tool_calls,
            "decided_risk": risk_from_log_sum(self.decided_risk_log_sum),
            "decisions": self.seq,
        }
        if self.plan is not None:
            out["plan"] = {
                "status": self.plan.status,
                "blast_radius_risk": self.plan.blast_radius.get("risk"),
                "approval_id": self.plan.approval_id or None,
                "holds_until": self.plan.holds_until,
                "drift": self.plan.drift_count,
            }
        return out


def apply(state: SessionState, record: Record, approvals: dict[str, Approval]) -> None:
    """Change ``state`` (and ``approvals``) by what ``record`` says happened."""
    state.seq = record.seq
    state.last_hash = record.hash
    d = record.detail
    if record.reason == "session_killed" and record.outcome == STOP:
        # refused a step after the kill: the agent has learned of the stop
        refused = state.agents.get(record.step_agent)
        if refused is not None and refused.stopped_at is None:
            refused.stopped_at = record.time
    if record.phase == PRE_HANDOFF and record.effective:
        perms = d.get("permissions")
        estimate = float(d.get("estimated_usd", 0.0))
        known = state.agents.get(record.to_agent)
        chain = tuple(d.get("chain") or ())
        if known is not None:
            # delegated again: what it spent stays spent; the new estimate comes on top
            known.active = True
            known.estimated_usd = max(known.estimated_usd, known.spent_usd) + estimate
            known.task = record.task or known.task
            known.permissions = tuple(perms) if perms is not None else known.permissions
            known.token_id = str(d.get("token_id", "")) or known.token_id
        else:
            state.agents[record.to_agent] = AgentState(
                agent_id=record.to_agent,
                parent=record.from_agent,
                depth=record.depth,
                role=str(d.get("role", "")),
                task=record.task,
                permissions=tuple(perms) if perms is not None else None,
                estimated_usd=estimate,
                chain=chain or (record.to_agent,),
                key=record.actor,
                token_id=str(d.get("token_id", "")),
            )
        if record.from_agent:
            state.handoffs += 1
        if record.task and d.get("lock"):
            state.owners[record.task] = record.to_agent
        back = d.get("return")
        if back:  # the task came back to an agent that had it before
            state.task_returns[(str(back["agent"]), record.task)] = int(back["count"])
    elif record.phase == TOOL and record.effective:
        state.tool_calls += 1
        state.decided_risk_log_sum += risk_log_term(int(d.get("risk", 0)))
    elif record.phase == POST_HANDOFF:
        agent = state.agents.get(record.to_agent)
        usd = float(d.get("usd", 0.0))
        if agent is not None:
            agent.spent_usd += usd
        elif usd or not d.get("finished"):
            # records written before identities were checked may name an agent the
            # governor never saw start: its spend still counts against the run
            agent = state.agents[record.to_agent] = AgentState(
                record.to_agent, "", record.depth, "", "", None, 0.0, usd, True
            )
        state.tool_calls += int(d.get("tool_calls", 0))
        if d.get("finished") and agent is not None:
            agent.active = False
            for task, owner in list(state.owners.items()):
                if owner == record.to_agent:
                    del state.owners[task]
    elif record.phase == PLAN:
        declared = dict(d.get("plan") or {})
        aid = str(d.get("approval_id", ""))
        state.plan = PlanState(
            plan=declared,
            blast_radius=dict(d.get("blast_radius") or {}),
            scope=PlanScope(declared),
            declared_at=record.time,
            declared_by=record.actor,
            needs_approval=list(d.get("needs_approval") or ()),
            approval_id=aid,
            status=PLAN_PENDING if aid else PLAN_ACTIVE,
        )
    elif record.phase == KILL:
        plan = state.plan
        if plan is not None and plan.status == PLAN_PENDING:
            plan.status = "cancelled"  # with every other pending approval, below
        if plan is not None and plan.status == PLAN_APPROVED:
            # a kill takes the plan's approval back: nothing runs on it any more
            plan.status = "revoked"
            revoked = approvals.get(plan.approval_id)
            if revoked is not None:
                revoked.status = "revoked"
                revoked.decided_at = record.time
        if not state.killed:
            state.kill_time = record.time
            for agent in state.agents.values():
                agent.running_at_kill = agent.active
        state.killed = True
        state.kill_actor = record.actor
        state.kill_reason = record.reason
        for approval in approvals.values():
            if approval.session_id == state.session_id and approval.status == "pending":
                approval.status = "cancelled"
                approval.decided_at = record.time
    elif record.phase == STOPPED:
        agent = state.agents.get(record.from_agent)
        if agent is not None and agent.stopped_at is None:
            agent.stopped_at = record.time
            agent.active = False
    elif record.phase == APPROVAL:
        aid = str(d.get("approval_id", ""))
        if record.outcome == "requested":
            state.approval_ids.append(aid)
            approvals[aid] = Approval(
                approval_id=aid,
                session_id=record.session_id,
                kind=str(d.get("kind", "")),
                requested_by=record.from_agent,
                requester=str(d.get("requester", "")),
                request=dict(d.get("request", {})),
                created=record.time,
                expires=float(d.get("expires", record.time)),
            )
            for covered in d.get("request", {}).get("covers", ()):
                if covered in approvals:
                    approvals[covered].escalated_to = aid
        elif aid in approvals:
            approval = approvals[aid]
            approval.status = record.outcome
            approval.approver = record.actor
            approval.comment = str(d.get("comment", ""))
            approval.decided_at = record.time
            plan = state.plan
            if plan is not None and aid == plan.approval_id:
                plan.status = record.outcome
                if record.outcome == PLAN_APPROVED:
                    plan.approved_by = record.actor
                    plan.approved_at = record.time
                    ttl, until = d.get("ttl_s"), d.get("holds_until")
                    plan.ttl_s = float(ttl) if ttl is not None else None
                    plan.holds_until = float(until) if until is not None else None
    drift = d.get("drift")
    if drift and state.plan is not None:
        plan = state.plan
        plan.drift_count += 1
        if len(plan.drift) < MAX_DRIFT:
            plan.drift.append(
                {
                    "seq": record.seq,
                    "time": record.time,
                    "phase": record.phase,
                    "agent_id": record.from_agent if record.phase == TOOL else record.to_agent,
                    "outcome": record.outcome,
                    "reason": record.reason,
                    "items": list(drift),
                }
            )
