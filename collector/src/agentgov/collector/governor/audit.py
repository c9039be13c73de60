"""Where decisions are written: ``agentgov_decisions``, hash-chained per session.

Each record is made durable before its answer, without waiting on ClickHouse: the governor
hands it to :meth:`AuditWriter.journal` before applying it, which appends it to the local
audit log (audit_log.py); a background thread drains the log into ClickHouse in batches,
retrying (never dropping) while the store fails, and a start replays what was not drained.
A record that cannot be made durable raises :class:`AuditUnavailable`: the decision fails
closed and changes nothing.

Each record carries the hash of the previous record of its session, so a deleted or
altered record breaks the chain and :func:`verify` says where, telling records that still
wait in the local log ("not yet drained") from records that are gone ("deleted").
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client

from agentgov.collector.governor.audit_log import AuditLog, AuditUnavailable
from agentgov.collector.governor.state import Record
from agentgov.collector.store.connection import StoreConfig, open_client

__all__ = ["AuditUnavailable", "AuditWriter", "load_records", "record_from_row", "row", "verify"]

log = logging.getLogger(__name__)

DECISIONS = "agentgov_decisions"

DECISIONS_TABLE = f"""
CREATE TABLE IF NOT EXISTS {DECISIONS} (
    SessionId String,
    Seq UInt64,
    Time DateTime64(6),
    Phase LowCardinality(String),
    Outcome LowCardinality(String),
    Reason LowCardinality(String),
    Owner String,
    FromAgent String,
    ToAgent String,
    Task String,
    Depth UInt16,
    Actor String,
    Mode LowCardinality(String),
    Detail String,
    PrevHash String,
    Hash String
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(Time)
ORDER BY (SessionId, Seq)
"""

COLUMNS = [
    "SessionId",
    "Seq",
    "Time",
    "Phase",
    "Outcome",
    "Reason",
    "Owner",
    "FromAgent",
    "ToAgent",
    "Task",
    "Depth",
    "Actor",
    "Mode",
    "Detail",
    "PrevHash",
    "Hash",
]


def row(r: Record) -> str:
    """One JSONEachRow line: ClickHouse parses it, which costs the governor's process far
    less than typed row encoding in Python (orjson: this runs for every decision).

    The governor calls it before it applies the record, so a record that cannot be
    stored (a number beyond 64 bits, say) is refused before it changes any state.
    """
    return orjson.dumps(
        {
            "SessionId": r.session_id,
            "Seq": r.seq,
            "Time": f"{r.time:.6f}",
            "Phase": r.phase,
            "Outcome": r.outcome,
            "Reason": r.reason,
            "Owner": r.owner,
            "FromAgent": r.from_agent,
            "ToAgent": r.to_agent,
            "Task": r.task,
            "Depth": r.depth,
            "Actor": r.actor,
            "Mode": r.mode,
            # the hash is over Record.canonical(), not this text: any faithful JSON will do
            "Detail": orjson.dumps(r.detail, option=orjson.OPT_SORT_KEYS).decode(),
            "PrevHash": r.prev_hash,
            "Hash": r.hash,
        }
    ).decode()


#: what record loads select: Time as whole microseconds, free of any timezone
SELECT_COLUMNS = ", ".join("toUnixTimestamp64Micro(Time)" if c == "Time" else c for c in COLUMNS)


def _record(row: Sequence[Any]) -> Record:
    (
        sid,
        seq,
        at,
        phase,
        outcome,
        reason,
        owner,
        frm,
        to,
        task,
        depth,
        actor,
        mode,
        detail,
        prev,
        digest,
    ) = row
    return Record(
        session_id=sid,
        seq=int(seq),
        time=int(at) / 1_000_000,
        phase=phase,
        outcome=outcome,
        reason=reason,
        owner=owner,
        from_agent=frm,
        to_agent=to,
        task=task,
        depth=int(depth),
        actor=actor,
        mode=mode,
        detail=json.loads(detail) if detail else {},
        prev_hash=prev,
        hash=digest,
    )


def record_from_row(line: str | bytes) -> Record:
    """A record back from its JSONEachRow line (as :func:`row` wrote it)."""
    d = orjson.loads(line)
    return Record(
        session_id=d["SessionId"],
        seq=int(d["Seq"]),
        time=float(d["Time"]),
        phase=d["Phase"],
        outcome=d["Outcome"],
        reason=d["Reason"],
        owner=d["Owner"],
        from_agent=d["FromAgent"],
        to_agent=d["ToAgent"],
        task=d["Task"],
        depth=int(d["Depth"]),
        actor=d["Actor"],
        mode=d["Mode"],
        detail=json.loads(d["Detail"]) if d["Detail"] else {},
        prev_hash=d["PrevHash"],
        hash=d["Hash"],
    )


@dataclass
class _Pending:
    log_seq: int
    session_id: str
    seq: int
    line: str
    at: float


@dataclass
class AuditStats:
    #: records made durable (journaled), by phase and outcome
    records: dict[tuple[str, str], int] = field(default_factory=dict)
    #: decisions refused because their record could not be made durable, by reason
    failed_closed: dict[str, int] = field(default_factory=dict)
    drained: int = 0
    drain_failures: int = 0
    #: failed drain attempts since the last successful one
    consecutive_failures: int = 0
    last_error: str = ""
    #: records found in the local log at start that ClickHouse did not have yet
    replayed: int = 0


class AuditWriter:
    """Makes every decision record durable before its answer (the local log, when given)
    and drains the records into ClickHouse behind the answers.

    Without a log (``log=None``) records wait in memory only: a crash or a long store
    outage loses them. That mode exists to measure what the log costs.
    """

    def __init__(
        self,
        store: StoreConfig,
        log: AuditLog | None = None,
        interval_s: float = 0.05,
        max_batch: int = 20_000,
        retry_backoff_s: tuple[float, float] = (0.2, 5.0),
        check_written: Callable[[], bool] | None = None,
    ) -> None:
        """``check_written``: asked after each insert; when it answers True the records
        are read back before the local log lets go of them (the embedded engine can
        report success for a part it could not write while its disk is full; see
        :mod:`agentgov.collector.store.parts`)."""
        self._store = store
        self._check_written = check_written
        self.log = log
        self._interval = interval_s
        self._max_batch = max_batch
        self._backoff = retry_backoff_s
        self._pending: deque[_Pending] = deque()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._counter = itertools.count(1)
        self._client: Client | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        #: a failed insert may have landed all the same: look before writing again
        self._in_doubt = False
        self.stats = AuditStats()

    def start(self) -> AuditWriter:
        self._client = open_client(self._store)
        self._client.command(DECISIONS_TABLE)
        if self.log is not None:
            recovered = self.log.open()
            for log_seq, payload in recovered:
                line = payload.decode()
                d = orjson.loads(line)
                self._pending.append(
                    _Pending(log_seq, d["SessionId"], int(d["Seq"]), line, time.time())
                )
            if recovered:
                # a crash may have come between an insert and its checkpoint
                self._in_doubt = True
                self.stats.replayed = len(recovered)
                log.warning(
                    "%d decision records in the local audit log were not yet in ClickHouse: "
                    "writing them now",
                    len(recovered),
                )
        self._thread = threading.Thread(target=self._run, name="agentgov-audit", daemon=True)
        self._thread.start()
        return self

    # -- the governor's side -----------------------------------------------------------------

    def journal(self, record: Record, line: str) -> None:
        """Make ``record`` durable before the governor applies it and answers; raises
        :class:`AuditUnavailable` (the decision then fails closed)."""
        key = (record.phase, record.outcome)
        if self.log is not None:
            try:
                log_seq = self.log.append(line.encode())
            except AuditUnavailable as exc:
                with self._lock:
                    failed = self.stats.failed_closed
                    failed[exc.reason] = failed.get(exc.reason, 0) + 1
                raise
        else:
            log_seq = next(self._counter)
        with self._lock:
            self._pending.append(
                _Pending(log_seq, record.session_id, record.seq, line, time.time())
            )
            records = self.stats.records
            records[key] = records.get(key, 0) + 1
            if len(self._pending) == 1:
                self._cond.notify()

    def __call__(self, record: Record, line: str) -> None:
        """The sink form of :meth:`journal` (for callers that hand records over after
        applying them)."""
        self.journal(record, line)

    # -- reading -----------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records durable here but not yet in ClickHouse."""
        return len(self._pending)

    def oldest_pending_s(self) -> float:
        with self._lock:
            return time.time() - self._pending[0].at if self._pending else 0.0

    def pending_records(self, session_id: str | None = None) -> list[Record]:
        """Records not yet drained (of one session, or all), in order."""
        with self._lock:
            lines = [p.line for p in self._pending if session_id in (None, p.session_id)]
        return [record_from_row(line) for line in lines]

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record handed over so far is in ClickHouse (False: some still
        wait, e.g. while the store fails)."""
        with self._cond:
            target = self._pending[-1].log_seq if self._pending else 0
            return self._cond.wait_for(
                lambda: not self._pending or self._pending[0].log_seq > target, timeout
            )

    def close(self) -> None:
        if self._thread is not None:
            self.flush(5.0)
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._thread.join(10)
            self._thread = None
        if self._pending:
            log.warning(
                "%d decision records are not in ClickHouse yet%s",
                len(self._pending),
                ": the next start writes them from the local audit log"
                if self.log is not None
                else " and are lost (no local audit log)",
            )
        if self.log is not None:
            self.log.close()
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- draining ----------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self._backoff[0]
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending) or self._closing)
                if self._closing:
                    return
            # a short wait gathers the records of a burst into one insert
            time.sleep(self._interval)
            with self._lock:
                batch = list(itertools.islice(self._pending, self._max_batch))
            try:
                self._write(batch)
            except Exception as exc:
                self._in_doubt = True
                with self._lock:
                    self.stats.drain_failures += 1
                    self.stats.consecutive_failures += 1
                    self.stats.last_error = str(exc).strip().splitlines()[0][:300]
                log.warning(
                    "writing %d decision records to ClickHouse failed (they wait %s, retried "
                    "in %.1f s): %s",
                    len(batch),
                    "in the local audit log" if self.log is not None else "in memory",
                    delay,
                    str(exc).strip().splitlines()[0][:300],
                )
                with self._cond:
                    self._cond.wait_for(lambda: self._closing, delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            delay = self._backoff[0]
            if self.log is not None:
                try:
                    self.log.drained(batch[-1].log_seq)
                except OSError as exc:
                    log.error("the audit log's checkpoint cannot be written: %s", exc)
            with self._cond:
                for _ in batch:
                    self._pending.popleft()
                self.stats.drained += len(batch)
                self.stats.consecutive_failures = 0
                self._cond.notify_all()

    def _write(self, batch: list[_Pending]) -> None:
        assert self._client is not None
        if self._in_doubt:
            batch = self._not_stored(batch)
        if batch:
            block = "\n".join(p.line for p in batch).encode()
            self._client.raw_insert(DECISIONS, insert_block=block, fmt="JSONEachRow")
            if self._check_written is not None and self._check_written():
                missing = self._not_stored(batch)
                if missing:
                    raise RuntimeError(
                        f"{len(missing)} of {len(batch)} decision records just written are "
                        "not in ClickHouse (a part committed without its data): written again"
                    )
        self._in_doubt = False

    def _not_stored(self, batch: list[_Pending]) -> list[_Pending]:
        """The records of ``batch`` ClickHouse does not have (a failed insert may have
        landed, and a crash may have come before the checkpoint)."""
        assert self._client is not None
        sessions = sorted({p.session_id for p in batch})
        stored = {
            (str(s), int(q))
            for s, q in self._client.query(
                f"SELECT SessionId, Seq FROM {DECISIONS} WHERE SessionId IN {{s:Array(String)}} "
                "AND Seq >= {q:UInt64}",
                parameters={"s": sessions, "q": min(p.seq for p in batch)},
            ).result_rows
        }
        return [p for p in batch if (p.session_id, p.seq) not in stored]


def replay_records(client: Client, writer: AuditWriter | None = None) -> list[Record]:
    """Every record to rebuild the governor from, in session and sequence order: the
    stored ones and those still waiting in the local audit log."""
    # the log first: a record drained meanwhile is then in ClickHouse when it is read,
    # whereas the other order could miss one that moved between the two reads
    waiting = writer.pending_records() if writer is not None else []
    merged = {(r.session_id, r.seq): r for r in load_records(client)}
    for r in waiting:
        merged.setdefault((r.session_id, r.seq), r)
    return [merged[k] for k in sorted(merged)]


def load_records(client: Client, since_days: int = 30) -> Iterator[Record]:
    """Stored records of recent sessions, in session and sequence order, for replay."""
    client.command(DECISIONS_TABLE)
    result = client.query(
        f"SELECT {SELECT_COLUMNS} FROM {DECISIONS} WHERE SessionId IN "
        f"(SELECT DISTINCT SessionId FROM {DECISIONS} "
        "WHERE Time > now() - toIntervalDay({d:UInt32})) ORDER BY SessionId, Seq",
        parameters={"d": since_days},
    )
    for row in result.result_rows:
        yield _record(row)


@dataclass
class Verification:
    session_id: str
    records: int
    ok: bool
    problem: str = ""
    seq: int | None = None
    #: records that are in the local audit log but not yet in ClickHouse
    not_yet_drained: int = 0

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "session_id": self.session_id,
            "records": self.records,
            "ok": self.ok,
            "problem": self.problem or None,
            "seq": self.seq,
        }
        if self.not_yet_drained:
            out["not_yet_drained"] = self.not_yet_drained
        return out


def session_records(client: Client, session_id: str) -> list[Record]:
    """A session's stored records in sequence order."""
    rows = client.query(
        f"SELECT {SELECT_COLUMNS} FROM {DECISIONS} WHERE SessionId = {{s:String}} ORDER BY Seq",
        parameters={"s": session_id},
    ).result_rows
    return [_record(row) for row in rows]


def verify(client: Client, session_id: str, pending: Iterable[Record] = ()) -> Verification:
    """Check a session's chain: sequence without gaps, each hash right, each link right.

    ``pending`` are the session's records still in the local audit log: the chain is
    checked through them, and a record found only there is "not yet drained", whereas a
    record neither stored nor pending is "deleted".
    """
    stored = session_records(client, session_id)
    waiting = {r.seq: r for r in pending}
    by_seq = {r.seq: r for r in stored}
    for seq, r in waiting.items():
        by_seq.setdefault(seq, r)
    rows = [by_seq[k] for k in sorted(by_seq)]
    undrained = sum(1 for seq in waiting if seq not in {r.seq for r in stored})
    result = _check_chain(session_id, rows)
    result.not_yet_drained = undrained
    if undrained and result.ok:
        result.problem = (
            f"{undrained} of {len(rows)} records are in the collector's local audit log, "
            "not yet drained into ClickHouse: the chain is intact through them"
        )
    return result


def _check_chain(session_id: str, rows: list[Record]) -> Verification:
    prev = ""
    for n, record in enumerate(rows, start=1):
        if record.seq != n:
            return Verification(
                session_id,
                len(rows),
                False,
                f"record {n} is missing (found {record.seq} next): deleted",
                n,
            )
        if record.prev_hash != prev:
            return Verification(
                session_id, len(rows), False, f"record {n} does not link to record {n - 1}", n
            )
        if hashlib.sha256(record.canonical()).hexdigest() != record.hash:
            return Verification(
                session_id, len(rows), False, f"record {n} does not match its hash: altered", n
            )
        prev = record.hash
    return Verification(session_id, len(rows), True)
