"""Policy simulation: the recorded decisions of stored sessions, decided again under a
candidate policy, and what would have changed.

Each session's audit records are replayed in order through a governor of its own (the
same judging code as the live one, with the candidate policy, the collector's risk
rules, no sink, no tokens, no listeners, and a clock that reads each record's time), so
nothing of the live governor, the store or the alert engine is touched.

- A **step** is a recorded delegation, tool call or usage report; its re-asks with an
  approval id are the same step. Each step is decided once, as first asked, and compared
  with the recorded first answer: a *new stop* or *new approval* (by the candidate's
  reason), a *lifted* stop or approval (by the recorded reason), or a changed reason.
- The replay follows the candidate's answers: an agent whose start the candidate stops
  never runs, and its recorded steps are counted as ``not_reached``. A step the candidate
  sends to a reviewer is taken as approved, unless the history holds that reviewer's
  answer (denied, expired, never given): then that answer stands.
- Kills, kill acknowledgements and a plan's approval are replayed as recorded (a plan the
  candidate would not send to a reviewer holds without one; one it newly would is taken
  as approved, without a time limit). A plan the candidate refuses outright stops the
  whole session (``plan_refused``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from clickhouse_connect.driver.client import Client

from agentgov.collector.governor import audit
from agentgov.collector.governor.blast import needs_approval
from agentgov.collector.governor.engine import (
    Governor,
    HandoffRequest,
    ToolRequest,
    UsageRequest,
)
from agentgov.collector.governor.plan import Plan, policy_problems
from agentgov.collector.governor.policy import Policy, PolicySource
from agentgov.collector.governor.state import (
    ALLOW,
    APPROVAL,
    APPROVAL_REQUIRED,
    KILL,
    PLAN,
    POST_HANDOFF,
    PRE_HANDOFF,
    STOP,
    STOPPED,
    TOOL,
    Record,
    SessionState,
    apply,
)
from agentgov.collector.risk import RiskRules

STEPS = (PRE_HANDOFF, TOOL, POST_HANDOFF)
#: what one simulation reports in detail; the totals count everything
MAX_CHANGED_SESSIONS = 1000
MAX_CHANGES = 100
#: the most sessions one simulation replays, and how many are read from the store at once
MAX_SESSIONS = 100_000
_CHUNK = 1000


@dataclass
class Change:
    """One step whose answer the candidate policy changes."""

    seq: int
    phase: str
    agent_id: str
    #: the delegated agent, or the tool (and command) called
    target: str
    kind: str  # new_stop, new_approval, lifted_stop, lifted_approval, reason
    recorded: dict[str, str]
    candidate: dict[str, str]


@dataclass
class SessionChanges:
    """What the candidate policy changes in one session."""

    session_id: str
    steps: int = 0
    new_stops: Counter[str] = field(default_factory=Counter)
    new_approvals: Counter[str] = field(default_factory=Counter)
    lifted_stops: Counter[str] = field(default_factory=Counter)
    lifted_approvals: Counter[str] = field(default_factory=Counter)
    changed_reasons: int = 0
    #: recorded steps of agents the candidate would never have started
    not_reached: int = 0
    changes: list[Change] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(
            self.new_stops
            or self.new_approvals
            or self.lifted_stops
            or self.lifted_approvals
            or self.changed_reasons
            or self.not_reached
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "steps": self.steps,
            "new_stops": dict(self.new_stops),
            "new_approvals": dict(self.new_approvals),
            "lifted_stops": dict(self.lifted_stops),
            "lifted_approvals": dict(self.lifted_approvals),
            "changed_reasons": self.changed_reasons,
            "not_reached": self.not_reached,
            "changes": [vars(c) for c in self.changes],
        }


@dataclass
class Report:
    """What a candidate policy would have changed across the replayed sessions."""

    mode: str
    sessions: int = 0
    records: int = 0
    steps: int = 0
    new_stops: Counter[str] = field(default_factory=Counter)
    new_approvals: Counter[str] = field(default_factory=Counter)
    lifted_stops: Counter[str] = field(default_factory=Counter)
    lifted_approvals: Counter[str] = field(default_factory=Counter)
    changed_reasons: int = 0
    not_reached: int = 0
    changed: list[SessionChanges] = field(default_factory=list)
    changed_sessions: int = 0
    elapsed_s: float = 0.0

    def add(self, session: SessionChanges, records: int) -> None:
        self.sessions += 1
        self.records += records
        self.steps += session.steps
        self.new_stops.update(session.new_stops)
        self.new_approvals.update(session.new_approvals)
        self.lifted_stops.update(session.lifted_stops)
        self.lifted_approvals.update(session.lifted_approvals)
        self.changed_reasons += session.changed_reasons
        self.not_reached += session.not_reached
        if session.changed:
            self.changed_sessions += 1
            if len(self.changed) < MAX_CHANGED_SESSIONS:
                self.changed.append(session)

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "sessions": self.sessions,
            "records": self.records,
            "steps": self.steps,
            "changed_sessions": self.changed_sessions,
            "totals": {
                "new_stops": dict(self.new_stops),
                "new_approvals": dict(self.new_approvals),
                "lifted_stops": dict(self.lifted_stops),
                "lifted_approvals": dict(self.lifted_approvals),
                "changed_reasons": self.changed_reasons,
                "not_reached": self.not_reached,
            },
            "sessions_changed": [s.as_json() for s in self.changed],
            "elapsed_s": round(self.elapsed_s, 3),
        }


class _ReplayClock:
    """The simulated governor's clock: the time of the record being replayed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Simulator:
    """Replays sessions' records under ``candidate`` (see the module docstring)."""

    def __init__(self, candidate: Policy, rules: RiskRules) -> None:
        source = PolicySource(None)
        source.policy = candidate
        self.policy = candidate.multi_agent
        self.rules = rules
        self._clock = _ReplayClock()
        self._gov = Governor(source, rules, clock=self._clock)

    def run(self, sessions: Iterable[Sequence[Record]]) -> Report:
        """Every session's changes; the sessions' records each in sequence order."""
        began = time.perf_counter()
        report = Report(mode=self.policy.mode)
        for records in sessions:
            if records:
                report.add(self.session(records), len(records))
        report.elapsed_s = time.perf_counter() - began
        return report

    def session(self, records: Sequence[Record]) -> SessionChanges:
        """One session replayed under the candidate policy."""
        gov = self._gov
        gov._sessions.clear()
        gov._approvals.clear()
        sid = records[0].session_id
        state = gov._session(sid)
        out = SessionChanges(sid)
        final, reasks, answered = _steps(records)
        refused = False
        for r in records:
            self._clock.now = r.time
            if refused:
                if r.phase in STEPS:
                    out.not_reached += 1
                continue
            if r.phase == PLAN:
                refused = self._plan(state, r, out)
            elif r.phase == APPROVAL:
                aid = str(r.detail.get("approval_id", ""))
                plan = state.plan
                if r.outcome != "requested" and plan is not None and aid == plan.approval_id:
                    # the reviewer's answer to the plan, as recorded
                    self._apply(state, r, APPROVAL, r.outcome, detail=dict(r.detail))
            elif r.phase in (KILL, STOPPED):
                if r.phase == KILL or r.from_agent in state.agents:
                    self._apply(state, r, r.phase, r.outcome, detail=dict(r.detail))
            elif r.phase in STEPS and r.seq not in reasks:
                self._step(state, r, final.get(r.seq, (r.outcome, r.reason)), answered, out)
        return out

    # -- replaying records ------------------------------------------------------------------

    def _apply(
        self, state: SessionState, r: Record, phase: str, outcome: str, **fields: Any
    ) -> None:
        """Apply a record of the simulated history (never sealed: nothing stores it)."""
        record = Record(
            session_id=state.session_id,
            seq=state.seq + 1,
            time=r.time,
            phase=phase,
            outcome=outcome,
            reason=fields.pop("reason", r.reason),
            from_agent=fields.pop("from_agent", r.from_agent),
            to_agent=fields.pop("to_agent", r.to_agent),
            task=fields.pop("task", r.task),
            depth=fields.pop("depth", r.depth),
            actor=r.actor,
            mode=self.policy.mode,
            **fields,
        )
        apply(state, record, self._gov._approvals)

    def _plan(self, state: SessionState, r: Record, out: SessionChanges) -> bool:
        """The plan as the candidate would take it; True when it would refuse it."""
        declared = dict(r.detail.get("plan") or {})
        radius = dict(r.detail.get("blast_radius") or {})
        recorded_aid = str(r.detail.get("approval_id", ""))
        try:
            problems = policy_problems(Plan.model_validate(declared), self.policy)
        except ValueError as exc:
            problems = [str(exc)]
        if problems:
            self._note(out, r, "plan", (r.outcome, r.reason), (STOP, "plan_refused"))
            return True
        reasons = needs_approval(radius, self.policy.session_approval)
        aid = (recorded_aid or f"sim-{r.seq}") if reasons else ""
        detail = {**r.detail, "approval_id": aid, "needs_approval": reasons}
        outcome = "approval_required" if reasons else "declared"
        self._apply(state, r, PLAN, outcome, detail=detail)
        recorded = (APPROVAL_REQUIRED if recorded_aid else ALLOW, "")
        candidate = (APPROVAL_REQUIRED if reasons else ALLOW, "")
        self._note(out, r, "plan", recorded, candidate, reason="plan_approval_required")
        if aid:
            self._apply(
                state,
                r,
                APPROVAL,
                "requested",
                detail={
                    "approval_id": aid,
                    "kind": "plan",
                    "requester": r.actor,
                    "request": {},
                    "expires": r.time + self.policy.approval_ttl_s,
                },
            )
            if not recorded_aid:
                # newly sent to a reviewer: taken as approved, with no time limit
                self._apply(state, r, APPROVAL, "approved", detail={"approval_id": aid})
        return False

    def _step(
        self,
        state: SessionState,
        r: Record,
        recorded_final: tuple[str, str],
        answered: dict[int, str],
        out: SessionChanges,
    ) -> None:
        gov = self._gov
        d = r.detail
        if r.phase == PRE_HANDOFF:
            parent = state.agents.get(r.from_agent) if r.from_agent else None
            if r.from_agent and parent is None:
                out.not_reached += 1
                return
            # a child that named no permissions holds its parent's: judged as asked
            inherited = bool(d.get("inherited"))
            permissions = d.get("permissions")
            req = HandoffRequest(
                session_id=state.session_id,
                from_agent=r.from_agent,
                to_agent=r.to_agent,
                task=r.task,
                permissions=None if inherited else permissions,
                estimated_usd=float(d.get("estimated_usd", 0.0)),
                to_role=str(d.get("role", "")),
            )
            depth = parent.depth + 1 if parent is not None else 0
            back = gov._task_return(state, req, parent)
            verdict = gov._judge_handoff(state, req, parent, depth, r.actor, back)
            perms = permissions
            chain = (*parent.chain, r.to_agent) if parent is not None else (r.to_agent,)
            detail: dict[str, Any] = {
                "permissions": perms,
                "estimated_usd": req.estimated_usd,
                "role": req.to_role,
                "lock": self.policy.ownership_lock,
                "chain": list(chain),
            }
            gov._note(detail, verdict, back)
            target = r.to_agent
            fields: dict[str, Any] = {"depth": depth}
        elif r.phase == TOOL:
            agent = state.agents.get(r.from_agent)
            if agent is None:
                out.not_reached += 1
                return
            resources = [str(x) for x in d.get("resources") or ()]
            treq = ToolRequest(
                state.session_id,
                agent.agent_id,
                str(d.get("tool", "")),
                str(d.get("command", "")),
                resources,
            )
            assessed = self.rules.assess(treq.command, resources)
            verdict = gov._judge_tool(state, agent, treq, r.actor, assessed.rules)
            detail = {
                "tool": treq.tool,
                "command": treq.command,
                "resources": resources,
                "risk": assessed.score,
            }
            gov._note(detail, verdict)
            target = f"{treq.tool}: {treq.command}" if treq.command else treq.tool
            fields = {}
        else:
            agent = state.agents.get(r.to_agent)
            if agent is None:
                out.not_reached += 1
                return
            ureq = UsageRequest(
                state.session_id,
                agent.agent_id,
                float(d.get("usd", 0.0)),
                int(d.get("tool_calls", 0)),
                bool(d.get("finished", False)),
            )
            verdict = gov._judge_usage(state, agent, ureq)
            detail = {"usd": ureq.usd, "tool_calls": ureq.tool_calls, "finished": ureq.finished}
            gov._note(detail, verdict)
            target = "usage"
            fields = {}
        out.steps += 1
        candidate = (verdict.outcome, verdict.reason)
        outcome = verdict.outcome
        if outcome == APPROVAL_REQUIRED:
            # a reviewer's recorded answer to this step stands; none recorded: approved
            given = answered.get(r.seq)
            outcome = ALLOW if given in (None, "approved") or recorded_final[0] == ALLOW else STOP
        self._apply(state, r, r.phase, outcome, reason=verdict.reason, detail=detail, **fields)
        self._note(out, r, target, (r.outcome, r.reason), candidate)

    def _note(
        self,
        out: SessionChanges,
        r: Record,
        target: str,
        recorded: tuple[str, str],
        candidate: tuple[str, str],
        reason: str = "",
    ) -> None:
        """Count and keep one step's change, if any."""
        (rec, rec_why), (cand, cand_why) = recorded, candidate
        kinds: list[str] = []
        if cand == STOP and rec != STOP:
            out.new_stops[cand_why or reason] += 1
            kinds.append("new_stop")
        if cand == APPROVAL_REQUIRED and rec != APPROVAL_REQUIRED:
            out.new_approvals[cand_why or reason] += 1
            kinds.append("new_approval")
        if rec == STOP and cand != STOP:
            out.lifted_stops[rec_why or reason] += 1
            kinds.append("lifted_stop")
        if rec == APPROVAL_REQUIRED and cand == ALLOW:
            out.lifted_approvals[rec_why or reason] += 1
            kinds.append("lifted_approval")
        if not kinds and rec == cand and rec != ALLOW and rec_why != cand_why and rec_why:
            out.changed_reasons += 1
            kinds.append("reason")
        if kinds and len(out.changes) < MAX_CHANGES:
            out.changes.append(
                Change(
                    seq=r.seq,
                    phase=r.phase,
                    agent_id=r.step_agent,
                    target=target[:300],
                    kind="+".join(kinds),
                    recorded={"outcome": rec, "reason": rec_why},
                    candidate={"outcome": cand, "reason": cand_why},
                )
            )


def _steps(
    records: Sequence[Record],
) -> tuple[dict[int, tuple[str, str]], set[int], dict[int, str]]:
    """Each step's recorded final answer (by the seq of its first record), the seqs of
    re-asks, and the reviewer's answer (by first seq) where the step had an approval."""
    opened: dict[str, int] = {}
    final: dict[int, tuple[str, str]] = {}
    reasks: set[int] = set()
    answers: dict[str, str] = {}
    for r in records:
        if r.phase == APPROVAL and r.outcome in ("approved", "denied", "expired"):
            answers[str(r.detail.get("approval_id", ""))] = r.outcome
        elif r.phase == KILL:
            for aid in r.detail.get("cancelled_approvals") or ():
                answers.setdefault(str(aid), "cancelled")
        if r.phase not in STEPS:
            continue
        aid = str(r.detail.get("approval_id") or "")
        if aid and aid in opened:
            reasks.add(r.seq)
            final[opened[aid]] = (r.outcome, r.reason)
            continue
        final[r.seq] = (r.outcome, r.reason)
        if aid and r.outcome == APPROVAL_REQUIRED:
            opened[aid] = r.seq
    answered = {seq: answers.get(aid, "none") for aid, seq in opened.items()}
    return final, reasks, answered


def load_sessions(
    client: Client, session_id: str | None, since_s: float, limit: int
) -> list[list[Record]]:
    """The stored records of one session, or of the ``limit`` sessions most recently
    active within ``since_s`` seconds, each in sequence order."""
    if session_id:
        found = audit.session_records(client, session_id)
        return [found] if found else []
    sids = [
        row[0]
        for row in client.query(
            f"SELECT SessionId FROM {audit.DECISIONS} GROUP BY SessionId "  # noqa: S608
            "HAVING max(Time) >= now64(6) - toIntervalMillisecond({ms:UInt64}) "
            "ORDER BY max(Time) DESC LIMIT {n:UInt32}",
            parameters={"ms": int(since_s * 1000), "n": min(limit, MAX_SESSIONS)},
        ).result_rows
    ]
    out: list[list[Record]] = []
    for i in range(0, len(sids), _CHUNK):
        rows = client.query(
            f"SELECT {audit.SELECT_COLUMNS} FROM {audit.DECISIONS} "  # noqa: S608
            "WHERE SessionId IN {sids:Array(String)} ORDER BY SessionId, Seq",
            parameters={"sids": sids[i : i + _CHUNK]},
        ).result_rows
        current: list[Record] = []
        for row in rows:
            record = audit._record(row)
            if current and current[0].session_id != record.session_id:
                out.append(current)
                current = []
            current.append(record)
        if current:
            out.append(current)
    return out
