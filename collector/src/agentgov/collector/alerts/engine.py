"""Where alert rules are evaluated and acted on, inside the collector.

Stored spans (each batch the span writer made durable, read back by its insert token as
the facts the store derived with the normalization model; each trace group the resolver
resolved, as the facts it wrote) and governor decisions (handed over as they are made) go
into one bounded queue; one thread updates the live session aggregates and evaluates the
``span``, ``decision`` and ``session`` rules of the sessions they touched. ``sql`` rules run on a second thread with
their own ClickHouse client. A firing rule acts at once: ``stop`` is an ordinary kill with
the rule as actor (so it propagates exactly like a person's), ``approval_required`` folds
the session's pending approvals into one, ``slack`` queues a notification. Every firing,
throttled repeat and delivery is journaled in ``agentgov_alerts``.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import re2

from agentgov.collector.alerts.facts import (
    FACT_COLUMNS,
    FactView,
    SpanFact,
    decision_fields,
    facts_from_rows,
)
from agentgov.collector.alerts.journal import (
    APPROVAL_REQUESTED,
    FIRED,
    SLACK_DROPPED,
    STOPPED,
    THROTTLED,
    AlertJournal,
    last_fired,
)
from agentgov.collector.alerts.live import LiveSession
from agentgov.collector.alerts.rules import AlertRule, Condition, RuleSource
from agentgov.collector.alerts.slack import Notice, SlackNotifier
from agentgov.collector.governor.engine import Governor
from agentgov.collector.governor.state import Record
from agentgov.collector.risk import RiskRules, compile_re2
from agentgov.collector.store import schema
from agentgov.collector.store.connection import StoreConfig, open_client

log = logging.getLogger(__name__)


class Fields(Protocol):
    """What conditions read: a mapping, or a view that computes fields on demand."""

    def get(self, key: str, default: Any = None, /) -> Any: ...


@functools.lru_cache(maxsize=1024)
def _pattern(pattern: str) -> re2._Regexp:
    return compile_re2(pattern)


def holds(cond: Condition, ctx: Fields) -> bool:
    """Whether one condition holds; a field without a value never matches."""
    value = ctx.get(cond.field)
    if value is None:
        return False
    want = cond.value
    op = cond.op
    try:
        if op == "==":
            return bool(value == want)
        if op == "!=":
            return bool(value != want)
        if op == ">":
            return bool(value > want)
        if op == ">=":
            return bool(value >= want)
        if op == "<":
            return bool(value < want)
        if op == "<=":
            return bool(value <= want)
        if op == "in":
            return value in want  # type: ignore[operator]
        if op == "not_in":
            return value not in want  # type: ignore[operator]
        if op == "contains":
            return want in value
        if op == "contains_any":
            return any(w in value for w in want)  # type: ignore[union-attr]
        if op == "matches":
            # RE2, linear in the value: rule patterns run over what callers send
            return _pattern(str(want)).search(str(value)) is not None
    except TypeError:
        return False
    return False


def matches(rule: AlertRule, ctx: Fields) -> bool:
    return all(holds(c, ctx) for c in rule.when)


class _TemplateValues(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""


def _text(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "∞"
        return f"{value:.2f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, tuple)):
        return (" -> " if key == "chain" else ", ").join(str(v) for v in value) or "(none)"
    return str(value)


def render(template: str, ctx: Mapping[str, Any]) -> str:
    """A rule's message with its fields filled in (lists joined, numbers rounded)."""
    return template.format_map(_TemplateValues({k: _text(k, v) for k, v in ctx.items()}))


@dataclass
class Firing:
    """A rule that fired (or, in a dry run, would fire) on a session."""

    rule: str
    severity: str
    session_id: str
    actions: list[str]
    message: str
    values: dict[str, Any]
    alert_id: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "session_id": self.session_id,
            "actions": self.actions,
            "message": self.message,
            "values": self.values,
            "alert_id": self.alert_id or None,
        }


@dataclass
class EngineStats:
    events: int = 0
    facts: int = 0
    #: span facts of governed sessions whose proof did not show the agent made them
    unverified_facts: int = 0
    fired: int = 0
    throttled: int = 0
    stops: int = 0
    #: observations dropped because the engine's queue was full (SQL rules still see them)
    overflow: int = 0
    sql_runs: int = 0
    #: stored requests whose facts could not be read (the extractor failed)
    lost_requests: int = 0
    sql_errors: dict[str, str] = field(default_factory=dict)


_Item = tuple[str, Any, float]  # ("spans" | "resolved" | "record", payload, received at)

#: decision fields a Record holds as attributes (the others are derived from it)
_RECORD_FIELDS = frozenset(
    {
        "phase",
        "outcome",
        "reason",
        "owner",
        "from_agent",
        "to_agent",
        "task",
        "depth",
        "actor",
        "mode",
    }
)


class AlertEngine:
    """Live evaluation of alert rules; see the module docstring."""

    def __init__(
        self,
        rules: RuleSource,
        risk: RiskRules,
        governor: Governor,
        journal: AlertJournal | None = None,
        notifier: SlackNotifier | None = None,
        store: StoreConfig | None = None,
        queue_size: int = 100_000,
        idle_s: float = 6 * 3600,
        session_interval_s: float = 0.25,
        gather_s: float = 0.01,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = rules
        self._risk = risk
        self._governor = governor
        self._journal = journal
        self._notifier = notifier
        self._store = store
        self._clock = clock
        self._idle_s = idle_s
        # SimpleQueue: a put costs well under a microsecond, and observe_record runs inside
        # the governor's lock; the bound is checked against its size
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._queue_size = queue_size
        self._offered = 0
        self._evaluated = 0
        self._sessions: dict[str, LiveSession] = {}
        # session rules run on a session at most every session_interval_s: the first
        # change is judged at once, a burst after it once when the interval is up
        self._interval = session_interval_s
        self._gather_s = gather_s
        self._dirty: dict[str, float] = {}  # session -> earliest unjudged arrival
        # sessions marked by decisions, from any thread (dict writes are atomic)
        self._touched: dict[str, float] = {}
        self._prefilter: tuple[object, list[list[Condition]]] = (None, [])
        self._judged_at: dict[str, float] = {}  # session -> monotonic time of last judging
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}
        self._fire_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.stats = EngineStats()
        #: resolved facts by (trace, span, kind, time): the session they count in, and the
        #: fact (a later resolution replaces it, in its session or another)
        self._resolved: dict[tuple[str, str, str, float], tuple[str, SpanFact]] = {}
        self._reader: Any = None  # the engine thread's client, for a batch's rows

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> AlertEngine:
        if self._store is not None:
            client = open_client(self._store)
            try:
                longest = max((r.throttle_s for r in self.source.ruleset.rules), default=0.0)
                if longest > 0:
                    self._last.update(last_fired(client, longest))
            finally:
                client.close()
        self._threads = [threading.Thread(target=self._run, name="agentgov-alerts", daemon=True)]
        if self._store is not None:
            self._threads.append(
                threading.Thread(target=self._run_sql, name="agentgov-alerts-sql", daemon=True)
            )
        for thread in self._threads:
            thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        for thread in self._threads:
            thread.join(10)
        self._threads = []
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until everything observed so far is evaluated (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while self._evaluated < self._offered or self._dirty or self._touched:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    # -- inputs (never block) ------------------------------------------------------------

    def _offer(self, item: _Item) -> None:
        if self._queue.qsize() >= self._queue_size:
            self.stats.overflow += 1
            return
        self._offered += 1
        self._queue.put(item)

    def _needs_spans(self) -> bool:
        ruleset = self.source.ruleset
        return bool(ruleset.by_source("span") or ruleset.by_source("session"))

    def observe_spans(self, insert_id: str, received_at: float) -> None:
        """The span writer's ``on_stored`` hook: a batch is durable. Its rows are read back
        by its insert token on the engine's thread; nothing is read when no rule needs spans."""
        if self._needs_spans():
            self._offer(("spans", insert_id, received_at))

    def observe_resolved(self, facts: list[SpanFact], received_at: float) -> None:
        """The resolver's hook: the facts of a trace group as now resolved. A fact seen
        before is replaced (a later resolution may move it to another session)."""
        if self._needs_spans():
            self._offer(("resolved", facts, received_at))

    def observe_record(self, record: Record) -> None:
        """A governor decision was just made (called under the governor's lock).

        Every decision marks its session for the session rules, which read the governor's
        state for it; only the records the engine needs one by one are queued: handoffs
        (fan-out), kills, and those a ``decision`` rule may match. Tool calls, usage and
        approvals are most of the traffic and cost one dictionary write here.
        """
        now = self._clock()
        self._touched.setdefault(record.session_id, now)
        if record.phase in ("pre_handoff", "kill") or self._may_match(record):
            self._offer(("record", record, now))

    def _may_match(self, record: Record) -> bool:
        """Whether some ``decision`` rule can match, judging only the record's own fields
        (the rest is checked on the engine's thread)."""
        ruleset = self.source.ruleset
        if self._prefilter[0] is not ruleset:  # first use, or the rules were reloaded
            self._prefilter = (
                ruleset,
                [
                    [c for c in rule.when if c.field in _RECORD_FIELDS]
                    for rule in ruleset.by_source("decision")
                ],
            )
        for conditions in self._prefilter[1]:
            if all(holds(c, {c.field: getattr(record, c.field)}) for c in conditions):
                return True
        return False

    # -- live evaluation -----------------------------------------------------------------

    def _run(self) -> None:
        last_sweep = time.monotonic()
        while True:
            try:
                # decisions only mark sessions (no queue item): look at least this often
                item = self._queue.get(timeout=self._interval)
            except queue.Empty:
                item = ("idle", None, 0.0)
            if item is None:
                return
            batch = [item]
            # This thread shares the GIL with the event loop that answers decisions: each
            # wake-up takes the GIL from it, so gather what arrives over a few milliseconds
            # and judge it in one go (at most ~100 wake-ups a second under load).
            if item[0] != "idle":
                time.sleep(self._gather_s)
            while len(batch) < 10_000:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._stop.set()
                    break
                batch.append(nxt)
            try:
                self._evaluate(batch)
            except Exception:
                log.exception("alert evaluation failed")
            finally:
                self._evaluated += sum(1 for entry in batch if entry[0] != "idle")
            try:
                self._judge_sessions()
            except Exception:
                log.exception("alert evaluation failed")
            if self._stop.is_set() and self._queue.empty():
                return
            if time.monotonic() - last_sweep > 60:
                last_sweep = time.monotonic()
                self._sweep()

    def _session(self, session_id: str) -> LiveSession:
        live = self._sessions.get(session_id)
        if live is None:
            live = self._sessions[session_id] = LiveSession(session_id)
        return live

    def _evaluate(self, batch: list[_Item]) -> None:
        ruleset = self.source.ruleset
        span_rules = ruleset.by_source("span")
        decision_rules = ruleset.by_source("decision")
        session_rules = ruleset.by_source("session")
        touched: dict[str, float] = {}
        for kind, payload, received in batch:
            if kind == "resolved":
                self.stats.events += 1
                for fact in payload:
                    self._upsert(fact, received, span_rules, touched)
            elif kind == "spans":
                self.stats.events += 1
                try:
                    facts = self._batch_facts(str(payload))
                except Exception:
                    self.stats.lost_requests += 1
                    log.exception("span facts of a stored batch could not be read")
                    continue
                for fact in facts:
                    self.stats.facts += 1
                    fact.verified = self._proven(fact)
                    live = self._session(fact.session_id)
                    # in a governed session, spans no lineage token vouches for are not
                    # evidence: anyone with an ingest key could have sent them in an
                    # agent's name; only rules that opt in look at them
                    trusted = fact.verified or not self._governor.governs(fact.session_id)
                    if trusted:
                        live.add_span(fact)
                        touched.setdefault(fact.session_id, received)
                    else:
                        self.stats.unverified_facts += 1
                    if span_rules and self._before_any_kill(live, fact.time):
                        view = FactView(fact)
                        for rule in span_rules:
                            if (trusted or rule.unverified) and matches(rule, view):
                                self._fire(rule, fact.session_id, fact.fields(), received)
            elif kind == "record":
                assert isinstance(payload, Record)
                self.stats.events += 1
                record = payload
                live = self._session(record.session_id)
                if record.phase == "kill" and live.killed_at is None:
                    live.killed_at = record.time
                if record.phase == "pre_handoff" and record.outcome == "allow":
                    live.spawn(record.from_agent, record.to_agent, record.time)
                touched.setdefault(record.session_id, received)
                if decision_rules:
                    chain = live.chain_of(record.to_agent or record.from_agent)
                    ctx = decision_fields(record, chain)
                    for rule in decision_rules:
                        if matches(rule, ctx):
                            self._fire(rule, record.session_id, ctx, received)
        if session_rules:
            for session_id, received in touched.items():
                self._dirty.setdefault(session_id, received)

    def _judge_sessions(self) -> None:
        """Run session rules on changed sessions not judged within the interval."""
        for session_id in list(self._touched):
            at = self._touched.pop(session_id, None)
            if at is not None:
                self._dirty.setdefault(session_id, at)
        if not self._dirty:
            return
        rules = self.source.ruleset.by_source("session")
        now = time.monotonic()
        for session_id, received in list(self._dirty.items()):
            if now - self._judged_at.get(session_id, -math.inf) < self._interval:
                continue
            del self._dirty[session_id]
            self._judged_at[session_id] = now
            if rules and not self._governor.is_killed(session_id):
                self._evaluate_session(rules, self._session(session_id), received)

    def _before_any_kill(self, live: LiveSession, at: float) -> bool:
        """Whether a span that happened at ``at`` is still judged: spans usually reach the
        collector when they end, after a kill that stopped their session; what happened
        before the kill is judged, what ran on after it is the kill's business."""
        if not self._governor.is_killed(live.session_id):
            return True
        return live.killed_at is not None and at <= live.killed_at

    def _batch_facts(self, insert_id: str) -> list[SpanFact]:
        """The facts of the rows one batch derived (agentgov's own spans: foreign ones come
        resolved, through observe_resolved)."""
        if self._store is None:
            return []
        if self._reader is None:
            self._reader = open_client(self._store)
        rows = self._reader.query(
            # table and columns are this package's constants; the token is bound
            f"SELECT {FACT_COLUMNS} FROM {schema.SPANS_NATIVE} WHERE InsertId = {{i:String}}",  # noqa: S608
            parameters={"i": insert_id},
        ).result_rows
        return facts_from_rows(rows)

    def _upsert(
        self,
        fact: SpanFact,
        received: float,
        span_rules: list[AlertRule],
        touched: dict[str, float],
    ) -> None:
        """A resolved fact: new, unchanged (nothing to do), or replacing an earlier one."""
        self.stats.facts += 1
        fact.verified = self._proven(fact)
        key = (fact.trace_id, fact.span_id, fact.kind, fact.time)
        before = self._resolved.get(key)
        if before is not None:
            old_session, old = before
            if old_session == fact.session_id and old == fact:
                return
            self._session(old_session).remove_span(old)
            touched.setdefault(old_session, received)
        self._resolved[key] = (fact.session_id, fact)
        live = self._session(fact.session_id)
        trusted = fact.verified or not self._governor.governs(fact.session_id)
        if trusted:
            live.add_span(fact)
            touched.setdefault(fact.session_id, received)
        if span_rules and self._before_any_kill(live, fact.time):
            view = FactView(fact)
            for rule in span_rules:
                if (trusted or rule.unverified) and matches(rule, view):
                    self._fire(rule, fact.session_id, fact.fields(), received)

    def _proven(self, fact: SpanFact) -> bool:
        """Whether the span's proof shows that the agent it names made it."""
        tokens = self._governor.tokens
        if tokens is None or not fact.token_id or not fact.proof:
            return False
        return tokens.proves(
            fact.token_id, fact.session_id, fact.agent_id, fact.trace_id, fact.span_id, fact.proof
        )

    def live_context(self, session_id: str) -> dict[str, Any] | None:
        """A session's ``session`` rule fields as the engine holds them now; None for a
        session it has seen nothing of (inspection, tests)."""
        live = self._sessions.get(session_id)
        return self.session_context(live) if live is not None else None

    def session_context(self, live: LiveSession) -> dict[str, Any]:
        """A session's rule fields: live aggregates merged with the governor's state."""
        gov = self._governor
        p = gov.policy
        pending = gov.pending_approvals(live.session_id)
        pending_risks = [
            self._risk.assess(
                str(a.request.get("command", "")), [str(r) for r in a.request.get("resources", ())]
            ).score
            for a in pending
            if a.kind == "tool"
        ]
        limits: dict[str, float | None] = {
            "shared_max_usd": p.shared_max_usd,
            "shared_max_tool_calls": p.shared_max_tool_calls,
            "max_delegation_depth": p.max_delegation_depth,
            "max_handoffs": p.max_handoffs,
        }
        return live.context(gov.session(live.session_id), limits, pending_risks, len(pending))

    def _evaluate_session(
        self, rules: Iterable[AlertRule], live: LiveSession, received: float, dry: bool = False
    ) -> list[Firing]:
        base = self.session_context(live)
        fanouts: dict[float, tuple[int, str]] = {}
        out = []
        for rule in rules:
            if rule.window_s not in fanouts:
                fanouts[rule.window_s] = live.fanout(rule.window_s)
            count, agent = fanouts[rule.window_s]
            ctx = {**base, "fanout": count, "fanout_agent": agent}
            if agent:
                ctx["chain"] = list(live.chain_of(agent)) or ctx["chain"]
            if matches(rule, ctx):
                firing = self._fire(rule, live.session_id, ctx, received, dry=dry)
                if firing is not None:
                    out.append(firing)
        return out

    # -- firing --------------------------------------------------------------------------

    def _fire(
        self,
        rule: AlertRule,
        session_id: str,
        ctx: Mapping[str, Any],
        received: float,
        dry: bool = False,
    ) -> Firing | None:
        values = {
            **{c.field: ctx.get(c.field) for c in rule.when},
            "chain": list(ctx.get("chain") or []),
        }
        full = {
            **ctx,
            "rule": rule.name,
            "severity": rule.severity,
            "session_id": session_id,
            "window_s": round(rule.window_s),
        }
        message = render(rule.message, full)
        if dry:
            return Firing(rule.name, rule.severity, session_id, list(rule.actions), message, values)
        now = self._clock()
        key = (rule.name, session_id)
        with self._fire_lock:
            last = self._last.get(key)
            if last is not None and now - last < rule.throttle_s:
                self.stats.throttled += 1
                n = self._suppressed[key] = self._suppressed.get(key, 0) + 1
                if n == 1 and self._journal is not None:  # once per throttle window
                    self._journal.event(
                        "",
                        session_id,
                        rule.name,
                        rule.severity,
                        THROTTLED,
                        message=message,
                        detail={"values": values, "last_fired": last},
                    )
                return None
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        self.stats.fired += 1
        alert_id = f"alr-{secrets.token_hex(8)}"
        firing = Firing(
            rule.name, rule.severity, session_id, list(rule.actions), message, values, alert_id
        )
        journal = self._journal
        if journal is not None:
            journal.event(
                alert_id,
                session_id,
                rule.name,
                rule.severity,
                FIRED,
                actions=rule.actions,
                message=message,
                detail={
                    "values": values,
                    "received_at": received,
                    "fired_at": now,
                    "suppressed_before": suppressed,
                },
            )
        for action in rule.actions:
            try:
                self._act(action, rule, firing, journal)
            except Exception as exc:
                log.exception("alert %s: action %s failed", rule.name, action)
                if journal is not None:
                    journal.event(
                        alert_id,
                        session_id,
                        rule.name,
                        rule.severity,
                        f"{action}_failed",
                        status=str(exc),
                    )
        return firing

    def _act(
        self, action: str, rule: AlertRule, firing: Firing, journal: AlertJournal | None
    ) -> None:
        sid = firing.session_id
        actor = f"alert:{rule.name}"
        if action == "stop":
            if self._governor.is_killed(sid):
                status = "already killed"
            elif rule.source == "sql" and not rule.unverified and self._governor.governs(sid):
                # a query over stored spans cannot tell who sent them: it may not stop a
                # governed session unless the rule says so (unverified: true)
                status = "withheld: sql evidence is unverified (set unverified: true to stop)"
            else:
                # sessions known only from their spans are killed too (unseen by the governor)
                self._governor.kill(sid, actor=actor, reason=rule.name, unseen=True)
                self.stats.stops += 1
                status = "killed"
            if journal is not None:
                journal.event(
                    firing.alert_id, sid, rule.name, rule.severity, STOPPED, status=status
                )
        elif action == "approval_required":
            approval_id = self._governor.escalate(sid, actor=actor, reason=rule.name)
            if approval_id:
                # the rule's Slack message (a later action) carries Approve and Deny for it
                firing.values["approval_id"] = approval_id
            if journal is not None:
                journal.event(
                    firing.alert_id,
                    sid,
                    rule.name,
                    rule.severity,
                    APPROVAL_REQUESTED,
                    status=approval_id or "nothing pending",
                    detail={"approval_id": approval_id},
                )
        elif action == "slack":
            notice = Notice(
                alert_id=firing.alert_id,
                session_id=sid,
                rule=rule.name,
                severity=rule.severity,
                text=firing.message,
                reason=str(firing.values.get("reason") or rule.description or rule.name),
                chain=tuple(str(a) for a in firing.values.get("chain", ())),
                actions=tuple(rule.actions),
                approval_id=str(firing.values.get("approval_id") or ""),
            )
            if self._notifier is not None:
                self._notifier.notify(notice)
            elif journal is not None:
                journal.event(
                    firing.alert_id,
                    sid,
                    rule.name,
                    rule.severity,
                    SLACK_DROPPED,
                    status="Slack not configured (set AGENTGOV_SLACK_WEBHOOK_URL)",
                )

    def _sweep(self) -> None:
        """Forget sessions idle past ``idle_s`` and throttles past their window."""
        now = self._clock()
        idle = {s for s, live in self._sessions.items() if now - live.last_seen > self._idle_s}
        for sid in idle:
            del self._sessions[sid]
            self._judged_at.pop(sid, None)
        for gone in [k for k, (sid, _) in self._resolved.items() if sid in idle]:
            del self._resolved[gone]
        longest = max((r.throttle_s for r in self.source.ruleset.rules), default=0.0)
        with self._fire_lock:
            for key in [k for k, t in self._last.items() if now - t > longest]:
                del self._last[key]
                self._suppressed.pop(key, None)

    # -- SQL rules -----------------------------------------------------------------------

    def _run_sql(self) -> None:
        assert self._store is not None
        client = open_client(self._store)
        due: dict[str, float] = {}
        try:
            while not self._stop.wait(0.2):
                now = time.monotonic()
                for rule in self.source.ruleset.by_source("sql"):
                    if now < due.get(rule.name, 0.0):
                        continue
                    due[rule.name] = now + rule.interval_s
                    try:
                        rows = self._query(client, rule)
                    except Exception as exc:
                        error = str(exc).splitlines()[0][:500] if str(exc) else repr(exc)
                        if self.stats.sql_errors.get(rule.name) != error:
                            # once per new error, not every interval: the person reading
                            # the log learns the rule is broken, and why
                            log.warning(
                                "alert rule %s: its sql failed and the rule does not fire "
                                "until it is fixed: %s",
                                rule.name,
                                error,
                            )
                        self.stats.sql_errors[rule.name] = error
                        continue
                    self.stats.sql_runs += 1
                    self.stats.sql_errors.pop(rule.name, None)
                    received = self._clock()
                    for row in rows:
                        if not self._governor.is_killed(str(row["session_id"])):
                            self._fire(rule, str(row["session_id"]), row, received)
        finally:
            client.close()

    @staticmethod
    def _query(client: Any, rule: AlertRule, session_id: str | None = None) -> list[dict[str, Any]]:
        assert rule.sql is not None
        sql = rule.sql.strip().rstrip(";")
        params: dict[str, Any] = {"window_s": int(rule.window_s)}
        if session_id is not None:
            # the rule file's own SQL (an admin's), narrowed to one bound session
            sql = f"SELECT * FROM ({sql}) WHERE session_id = {{agentgov_session:String}}"  # noqa: S608
            params["agentgov_session"] = session_id
        result = client.query(sql, parameters=params, settings={"max_execution_time": 10})
        # an empty result may come without column names (chDB): nothing to check then
        if result.result_rows and "session_id" not in result.column_names:
            raise ValueError(f"rule {rule.name}: the query must return a session_id column")
        names = result.column_names
        return [dict(zip(names, row, strict=True)) for row in result.result_rows]

    # -- dry runs ------------------------------------------------------------------------

    def dry_run(
        self,
        session_id: str,
        facts: Iterable[SpanFact],
        records: Iterable[Record],
        client: Any = None,
    ) -> list[Firing]:
        """Which rules would fire on a stored session, replayed in time order; acts on
        nothing and journals nothing. Each rule is reported once, at its first firing."""
        ruleset = self.source.ruleset
        live = LiveSession(session_id)
        events: list[tuple[float, Any]] = [(f.time, f) for f in facts]
        events += [(r.time, r) for r in records]
        events.sort(key=lambda e: e[0])
        found: dict[str, Firing] = {}

        def keep(firing: Firing | None) -> None:
            if firing is not None and firing.rule not in found:
                found[firing.rule] = firing

        session_rules = ruleset.by_source("session")
        for _, event in events:
            if isinstance(event, SpanFact):
                live.add_span(event)
                ctx = event.fields()
                for rule in ruleset.by_source("span"):
                    if matches(rule, ctx):
                        keep(self._fire(rule, session_id, ctx, 0.0, dry=True))
            else:
                if event.phase == "pre_handoff" and event.outcome == "allow":
                    live.spawn(event.from_agent, event.to_agent, event.time)
                ctx = decision_fields(event, live.chain_of(event.to_agent or event.from_agent))
                for rule in ruleset.by_source("decision"):
                    if matches(rule, ctx):
                        keep(self._fire(rule, session_id, ctx, 0.0, dry=True))
            for firing in self._evaluate_session(session_rules, live, 0.0, dry=True):
                keep(firing)
        if client is not None:
            for rule in ruleset.by_source("sql"):
                for row in self._query(client, rule, session_id):
                    keep(self._fire(rule, session_id, row, 0.0, dry=True))
        return list(found.values())
