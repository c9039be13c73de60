"""The resolver: turns traces of other conventions into sessions, agents and edges.

Every insert queues the traces it added spans of other conventions to
(``agentgov_trace_queue``: spans written by the collector's receivers name their batch;
spans another pipeline wrote straight into ``otel_traces`` are picked up by time). A
trace's group (traces joined by span links) is resolved once it has been quiet for
``quiet_s`` (at most ``max_wait_s`` after it first changed): the group's spans are read
with their local facts computed by ClickHouse (normalize/sql.py), resolved
(normalize/resolve.py), and written as versioned rows (normalize/rows.py) that replace
what an earlier resolution of the group wrote; the sessions and agents those rows touch
are re-aggregated from them. A late span simply makes its group due again.

One thread, one ClickHouse client: resolutions never run concurrently, so a session
spread over several groups is re-aggregated in order.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client

from agentgov.collector.alerts.facts import SpanFact, facts_from_rows
from agentgov.collector.normalize.local import LocalFacts
from agentgov.collector.normalize.resolve import resolve
from agentgov.collector.normalize.rows import fact_row, key_row, ns_text, resolved_rows
from agentgov.collector.normalize.sql import facts_from_row, local_select
from agentgov.collector.risk import RiskRules
from agentgov.collector.store import schema
from agentgov.collector.store.connection import StoreConfig, open_client

log = logging.getLogger(__name__)

#: a group joined by links past this many traces is resolved trace by trace: one client
#: linking everything to everything must not make every resolution read the whole store
MAX_GROUP_TRACES = 2_000
#: the most spans one resolution reads
MAX_GROUP_SPANS = 100_000
#: one pass resolves at most this many due groups, of at most this many traces in all
MAX_PASS_GROUPS = 500
MAX_PASS_TRACES = 5_000
#: how long, and for how many traces, agentgov's own spans arriving after a trace's foreign
#: ones bring the trace back for resolution: an enclosing agent span ends (and is exported)
#: after everything inside it, and the foreign agent it describes too is merged only once
#: it is stored (a run longer than this keeps its foreign nodes beside agentgov's)
FOREIGN_TRACE_TTL_S = 3_600.0
MAX_FOREIGN_TRACES = 200_000

OnResolved = Callable[[list[SpanFact], float], None]


@dataclass
class ResolverStats:
    resolutions: int = 0
    spans: int = 0
    rows_written: int = 0
    failures: int = 0
    #: seconds from a group's last queued span to its rows being written, recent ones
    lags: list[float] = field(default_factory=list)
    oversized_groups: int = 0


class _Groups:
    """Union-find over trace ids (traces joined by links), with each group's members."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}
        self._members: dict[str, set[str]] = {}

    def find(self, trace: str) -> str:
        parent = self._parent
        if trace not in parent:
            parent[trace] = trace
            self._members[trace] = {trace}
            return trace
        root = trace
        while parent[root] != root:
            root = parent[root]
        while parent[trace] != root:
            parent[trace], trace = root, parent[trace]
        return root

    def union(self, a: str, b: str) -> str:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        keep, drop = sorted((ra, rb))  # the smallest trace id names the group
        self._parent[drop] = keep
        self._members[keep] |= self._members.pop(drop)
        return keep

    def members(self, trace: str) -> set[str]:
        return self._members[self.find(trace)]


class TraceResolver:
    """Resolves trace groups in the background; see the module docstring."""

    def __init__(
        self,
        store: StoreConfig,
        rules: RiskRules,
        on_resolved: OnResolved | None = None,
        quiet_s: float = 0.25,
        max_wait_s: float = 2.0,
        poll_s: float = 1.0,
    ) -> None:
        self._store = store
        self._rules = rules
        self._on_resolved = on_resolved
        self._quiet_s = quiet_s
        self._max_wait_s = max_wait_s
        self._poll_s = poll_s
        self._inbox: queue.SimpleQueue[tuple[str, float] | None] = queue.SimpleQueue()
        self._groups = _Groups()
        #: group -> (first change, last change, earliest arrival) not resolved yet
        self._dirty: dict[str, tuple[float, float, float]] = {}
        self._polled: set[tuple[str, int]] = set()
        #: traces with foreign spans -> when they last had some (insertion-ordered)
        self._foreign: dict[str, float] = {}
        self._watermark = 0
        self._version = 0
        self._client: Client | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._idle = threading.Event()
        self.stats = ResolverStats()

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> TraceResolver:
        self._client = open_client(self._store)
        # groups of the queued traces of the last day (a group joins across restarts)
        rows = self._client.query(
            f"SELECT TraceId, Linked FROM {schema.TRACE_QUEUE} WHERE notEmpty(Linked)"
        ).result_rows
        for trace, linked in rows:
            for other in linked:
                self._groups.union(trace, other)
        self._watermark = int(time.time() * 1000) - 5_000
        self._thread = threading.Thread(target=self._run, name="agentgov-resolver", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def pending(self) -> int:
        """Trace groups waiting to be resolved."""
        return len(self._dirty)

    def observe_batch(self, insert_id: str, received_at: float) -> None:
        """The span writer's hook: a batch is durable (never blocks)."""
        self._idle.clear()
        self._inbox.put((insert_id, received_at))

    def flush(self, timeout: float = 30.0) -> bool:
        """Resolve everything queued so far now, without waiting for quiet (tests,
        benchmarks, shutdown). True when nothing is left."""
        self._inbox.put(("", -1.0))  # a marker: resolve every dirty group at once
        return self._idle.wait(timeout)

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        next_poll = time.monotonic() + self._poll_s
        while not self._stop.is_set():
            urgent = False
            try:
                item = self._inbox.get(timeout=0.05)
                while True:
                    if item is None:
                        return
                    insert_id, received = item
                    if received < 0:
                        urgent = True
                        next_poll = 0.0  # a flush also takes in direct writes now
                    else:
                        self._mark_batch(insert_id, received)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            except Exception:
                self.stats.failures += 1
                log.exception("reading the queued foreign traces failed")
            try:
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self._poll_s
                    self._poll_direct_writes()
                self._resolve_due(everything=urgent)
            except Exception:
                self.stats.failures += 1
                log.exception("resolving foreign traces failed; they are tried again")
                time.sleep(0.5)
            if not self._dirty and self._inbox.empty():
                self._idle.set()

    def _mark(self, trace: str, linked: list[str], received: float, foreign: bool = True) -> None:
        for other in linked:
            self._groups.union(trace, other)
        group = self._groups.find(trace)
        now = time.monotonic()
        first, _, arrived = self._dirty.get(group, (now, now, received))
        self._dirty[group] = (first, now, min(arrived, received))
        if foreign:
            self._foreign.pop(trace, None)
            self._foreign[trace] = now
            while len(self._foreign) > MAX_FOREIGN_TRACES:
                del self._foreign[next(iter(self._foreign))]

    def _mark_native(self, insert_id: str, received: float) -> None:
        """Traces with foreign spans that this batch adds agentgov spans to: resolved again,
        so that an agent told by both is one node (no query while no trace has foreign
        spans: agentgov's own spans alone never need resolving)."""
        assert self._client is not None
        horizon = time.monotonic() - FOREIGN_TRACE_TTL_S
        while self._foreign and next(iter(self._foreign.values())) < horizon:
            del self._foreign[next(iter(self._foreign))]
        if not self._foreign:
            return
        rows = self._client.query(
            f"SELECT DISTINCT TraceId FROM {schema.SPANS_NATIVE} WHERE InsertId = {{i:String}}",
            parameters={"i": insert_id},
        ).result_rows
        for (trace,) in rows:
            if trace in self._foreign:
                self._mark(trace, [], received, foreign=False)

    def _mark_batch(self, insert_id: str, received: float) -> None:
        assert self._client is not None
        rows = self._client.query(
            f"SELECT TraceId, Linked FROM {schema.TRACE_QUEUE} WHERE InsertId = {{i:String}}",
            parameters={"i": insert_id},
        ).result_rows
        for trace, linked in rows:
            self._mark(trace, list(linked), received)
        self._mark_native(insert_id, received)
        self._merge_dirty()

    def _poll_direct_writes(self) -> None:
        """Traces another pipeline wrote straight into otel_traces (no batch names them)."""
        assert self._client is not None
        rows = self._client.query(
            f"SELECT TraceId, Linked, toUnixTimestamp64Milli(At) FROM {schema.TRACE_QUEUE} "
            "WHERE InsertId = '' AND At >= fromUnixTimestamp64Milli({w:Int64})",
            parameters={"w": self._watermark - 5_000},
        ).result_rows
        newest = self._watermark
        for trace, linked, at in rows:
            if (trace, at) in self._polled:
                continue
            self._polled.add((trace, at))
            self._mark(trace, list(linked), time.time())
            newest = max(newest, int(at))
        self._watermark = newest
        self._polled = {p for p in self._polled if p[1] >= self._watermark - 10_000}
        self._merge_dirty()

    def _merge_dirty(self) -> None:
        """Dirty marks of groups that links have since merged count for the merged group."""
        merged: dict[str, tuple[float, float, float]] = {}
        for group, (first, last, arrived) in self._dirty.items():
            root = self._groups.find(group)
            if root in merged:
                f0, l0, a0 = merged[root]
                merged[root] = (min(first, f0), max(last, l0), min(arrived, a0))
            else:
                merged[root] = (first, last, arrived)
        self._dirty = merged

    def _resolve_due(self, everything: bool = False) -> None:
        now = time.monotonic()
        due = [
            g
            for g, (first, last, _) in sorted(self._dirty.items())
            if everything or now - last >= self._quiet_s or now - first >= self._max_wait_s
        ]
        # due groups are resolved together, a pass at a time: one read, one write and one
        # re-aggregation per pass instead of per group (a busy store has many due at once)
        while due:
            batch: list[str] = []
            traces = 0
            while due and (not batch or len(batch) < MAX_PASS_GROUPS):
                group = due.pop(0)
                size = len(self._groups.members(group))
                if batch and traces + size > MAX_PASS_TRACES:
                    due.insert(0, group)
                    break
                batch.append(group)
                traces += size
            arrived = [self._dirty.pop(g)[2] for g in batch]
            self.resolve_groups(batch)
            finished = time.time()
            self.stats.lags.extend(finished - a for a in arrived)
            del self.stats.lags[:-1000]

    # -- groups ----------------------------------------------------------------------------

    def _read(self, traces: set[str]) -> dict[str, LocalFacts]:
        assert self._client is not None
        rows = self._client.query(
            local_select(schema.TRACES, "TraceId IN {t:Array(String)}")
            + f" LIMIT {MAX_GROUP_SPANS}",
            parameters={"t": sorted(traces)},
        ).result_rows
        facts: dict[str, LocalFacts] = {}
        for row in rows:
            fact = facts_from_row(row)
            facts.setdefault(fact.span_id, fact)  # a span stored twice counts once
        return facts

    def resolve_group(self, group: str) -> None:
        """Resolve one trace group and write its rows (replacing the earlier ones)."""
        self.resolve_groups([group])

    def resolve_groups(self, groups: list[str]) -> None:
        """Resolve trace groups and write their rows (replacing the earlier ones)."""
        members: dict[str, set[str]] = {}
        for group in groups:
            traces = set(self._groups.members(group))
            if len(traces) > MAX_GROUP_TRACES:
                self.stats.oversized_groups += 1
                log.warning(
                    "a group of %d traces joined by links: resolving them one by one",
                    len(traces),
                )
                for trace in sorted(traces):
                    self._write([({trace}, self._read({trace}))])
                continue
            members[self._groups.find(group)] = traces
        if not members:
            return
        known = set().union(*members.values())
        facts = self._read(known)
        if len(facts) >= MAX_GROUP_SPANS and len(members) > 1:
            for group in members:  # too many spans for one pass: a group at a time
                self.resolve_groups([group])
            return
        # links found in the spans themselves (a queue row may have expired): join them
        for _ in range(3):
            linked = {(f.trace_id, t) for f in facts.values() for t, _ in f.links if t}
            if all(t in known for _, t in linked):
                break
            for trace, other in linked:
                self._groups.union(trace, other)
            members = {}
            for trace in known:
                root = self._groups.find(trace)
                if root not in members:
                    members[root] = set(self._groups.members(root))
            grown = set().union(*members.values())
            facts.update(self._read(grown - known))
            known = grown
        by_trace: dict[str, dict[str, LocalFacts]] = {}
        for span_id, fact in facts.items():
            by_trace.setdefault(fact.trace_id, {})[span_id] = fact
        self._write(
            [
                (traces, {k: v for t in traces for k, v in by_trace.get(t, {}).items()})
                for traces in members.values()
            ]
        )

    def _write(self, groups: list[tuple[set[str], dict[str, LocalFacts]]]) -> None:
        """Resolve each group and write all their rows at once, with deletion marks for
        what earlier resolutions of these traces wrote and this one does not."""
        assert self._client is not None
        rows: list[dict[str, Any]] = []
        traces: set[str] = set()
        for group_traces, facts in groups:
            self.stats.resolutions += 1
            self.stats.spans += len(facts)
            rows += resolved_rows(resolve(facts.values()), facts, self._rules)
            traces |= group_traces
        self._version = max(self._version + 1, time.time_ns())
        version = self._version
        previous = self._client.query(
            f"SELECT SessionId, toUnixTimestamp64Nano(Timestamp), SpanId, TraceId "
            f"FROM {schema.SPANS_RESOLVED} FINAL WHERE TraceId IN {{t:Array(String)}}",
            parameters={"t": sorted(traces)},
        ).result_rows
        keep = {(r["SessionId"], r["Timestamp"], r["SpanId"]) for r in rows}
        gone = [
            {**key_row(s, int(ts), sp, tr), "Version": version, "Deleted": 1}
            for s, ts, sp, tr in previous
            if (s, ns_text(int(ts)), sp) not in keep
        ]
        lines = [orjson.dumps({**r, "Version": version, "Deleted": 0}) for r in rows]
        lines += [orjson.dumps(g) for g in gone]
        if lines:
            self._client.raw_insert(
                schema.SPANS_RESOLVED, insert_block=b"\n".join(lines), fmt="JSONEachRow"
            )
            self.stats.rows_written += len(lines)
        touched = {r["SessionId"] for r in rows} | {g["SessionId"] for g in gone}
        if touched:
            self._aggregate(sorted(touched), version)
        if self._on_resolved is not None and rows:
            try:
                self._on_resolved(facts_from_rows(fact_row(r) for r in rows), time.time())
            except Exception:
                log.exception("an observer of resolved facts failed")

    def _aggregate(self, sessions: list[str], version: int) -> None:
        """Agents and sessions of the touched sessions, from their resolved rows (agents
        first: a reader that finds a session finds its agents)."""
        assert self._client is not None
        params: dict[str, Any] = {"s": sessions, "v": version}
        source = f"{schema.SPANS_RESOLVED} FINAL"
        where = "WHERE SessionId IN {s:Array(String)}"
        for table, select, keys, columns in (
            (
                schema.AGENTS_RESOLVED,
                schema.AGENTS_SELECT.format(
                    table=source, where="AND SessionId IN {s:Array(String)}"
                ),
                ["SessionId", "AgentId"],
                schema.AGENT_COLUMN_NAMES,
            ),
            (
                schema.SESSIONS_RESOLVED,
                schema.SESSIONS_SELECT.format(table=source, where=where),
                ["SessionId"],
                schema.SESSION_COLUMN_NAMES,
            ),
        ):
            cols = ", ".join(columns)
            self._client.command(
                f"INSERT INTO {table} ({cols}, Version, Deleted) "
                f"SELECT {cols}, {{v:UInt64}}, 0 FROM ({select})",
                parameters=params,
            )
            key = ", ".join(keys)
            # what an earlier resolution aggregated and this one no longer has
            self._client.command(
                f"INSERT INTO {table} ({key}, Version, Deleted) "
                f"SELECT {key}, {{v:UInt64}}, 1 FROM {table} FINAL "
                f"WHERE SessionId IN {{s:Array(String)}} AND ({key}) NOT IN "
                f"(SELECT {key} FROM ({select}))",
                parameters=params,
            )
