"""Where decisions are written: ``agentgov_decisions``, hash-chained per session.

Records are written behind the answer by a background thread, in batches. Each record
carries the hash of the previous record of its session, so a deleted or altered record
breaks the chain and :func:`verify` says where.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client

from agentgov.collector.governor.state import Record
from agentgov.collector.store.connection import StoreConfig
from agentgov.collector.store.json_rows import JsonRowWriter

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


class AuditWriter(JsonRowWriter):
    """Writes decision records behind the governor's answers."""

    def __init__(self, store: StoreConfig, interval_s: float = 0.05) -> None:
        super().__init__(store, DECISIONS, DECISIONS_TABLE, "decision records", interval_s)

    def start(self) -> AuditWriter:
        super().start()
        return self

    def __call__(self, record: Record, line: str) -> None:
        # serialized by the governor, a few microseconds per decision, rather than in
        # bursts on the writer thread, which would stall the event loop for a whole batch
        self.put(line)


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

    def as_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "records": self.records,
            "ok": self.ok,
            "problem": self.problem or None,
            "seq": self.seq,
        }


def session_records(client: Client, session_id: str) -> list[Record]:
    """A session's stored records in sequence order."""
    rows = client.query(
        f"SELECT {SELECT_COLUMNS} FROM {DECISIONS} WHERE SessionId = {{s:String}} ORDER BY Seq",
        parameters={"s": session_id},
    ).result_rows
    return [_record(row) for row in rows]


def verify(client: Client, session_id: str) -> Verification:
    """Check a session's chain: sequence without gaps, each hash right, each link right."""
    rows = session_records(client, session_id)
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
