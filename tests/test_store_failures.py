"""When the store fails: nothing acknowledged lost or doubled, nothing decided left unrecorded.

Real failures only: the collector's data folder on a small tmpfs the test mounts and fills
up under OTLP load and decisions (then frees again), tables of the write chain that go
missing under a writer, a ClickHouse server address that refuses connections, a local
audit log with a torn tail or no room left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import clickhouse_connect
import grpc
import httpx
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from agentgov.collector.governor import audit
from agentgov.collector.governor.audit_log import AuditLog, AuditUnavailable
from agentgov.collector.governor.engine import Governor, HandoffRequest
from agentgov.collector.governor.policy import PolicySource
from agentgov.collector.governor.state import Record
from agentgov.collector.risk import RiskRules
from agentgov.collector.store import schema
from agentgov.collector.store.connection import StoreConfig
from agentgov.collector.store.parts import BrokenPartError, PartDoctor, broken, list_parts
from agentgov.collector.store.space import parse_size
from agentgov.collector.store.staging import Stage
from agentgov.collector.store.writer import (
    SpanWriter,
    StoreRejected,
    StoreUnavailable,
    _varint,
    classify,
)

from .conftest import CollectorProcess, free_port, wait_for

PROTO = {"Content-Type": "application/x-protobuf"}
TOKEN_HEADER = "Agentgov-Lineage-Token"
SPANS_PER_REQUEST = 40


def make_request(session_id: str, spans: int, foreign: int = 0) -> tuple[bytes, str]:
    """An OTLP request of one new trace: ``spans`` of agentgov's own tool spans and
    ``foreign`` spans of no convention (they queue their trace for the resolver)."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="full")))
    ss = rs.scope_spans.add()
    trace_id = os.urandom(16)
    now = time.time_ns()
    for i in range(spans + foreign):
        s = ss.spans.add()
        s.trace_id = trace_id
        s.span_id = os.urandom(8)
        s.name = "execute_tool shell" if i < spans else "some work"
        s.start_time_unix_nano = now + i
        s.end_time_unix_nano = now + i + 1000
        if i < spans:
            for k, v in (
                ("gen_ai.operation.name", "execute_tool"),
                ("agentgov.session.id", session_id),
                ("gen_ai.agent.id", "worker-1"),
                ("agentgov.command", f"echo {i}"),
            ):
                s.attributes.append(KeyValue(key=k, value=AnyValue(string_value=v)))
    return req.SerializeToString(), trace_id.hex()


# -- a small filesystem the test mounts -------------------------------------------------------


@pytest.fixture()
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 128 MiB tmpfs, unmounted afterwards (skips where mounting is not allowed)."""
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): these tests need root")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(fs: Path) -> Path:
    """Take every free byte of ``fs`` (then the store's writes fail for real)."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        st = os.statvfs(fs)
        try:
            os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize)
        except OSError:
            pass
        os.lseek(fd, 0, os.SEEK_END)
        chunk = bytes(4096)
        while True:
            try:
                os.write(fd, chunk)
            except OSError:
                break
    finally:
        os.close(fd)
    return filler


STORE_COUNTS = """
import json, sys, clickhouse_connect
data_dir, sid, decision_sessions = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
c = clickhouse_connect.get_client(dsn=f"chdb://{data_dir}")
p = {"s": sid}
one = lambda q, **kw: c.query(q, parameters={**p, **kw}).result_rows
rows, uniq = one("SELECT count(), uniqExact(TraceId, SpanId) FROM otel_traces "
                 "WHERE SpanAttributes['agentgov.session.id'] = {s:String}")[0]
per_trace = dict(one("SELECT TraceId, count() FROM otel_traces "
                     "WHERE SpanAttributes['agentgov.session.id'] = {s:String} GROUP BY TraceId"))
typed = one("SELECT count(), uniqExact(TraceId, SpanId) FROM agentgov_spans_native WHERE SessionId = {s:String}")[0]
agg = one("SELECT sum(Spans), sum(ToolCalls) FROM agentgov_sessions_native WHERE SessionId = {s:String}")[0]
agents = one("SELECT sum(ToolCalls) FROM agentgov_agents_native WHERE SessionId = {s:String}")[0][0]
lookup = one("SELECT uniqExact(TraceId) FROM otel_traces_trace_id_ts WHERE TraceId IN "
             "(SELECT DISTINCT TraceId FROM otel_traces WHERE SpanAttributes['agentgov.session.id'] = {s:String})")[0][0]
decisions = {s: list(r) for s, *r in one(
    "SELECT SessionId, count(), uniqExact(Seq), max(Seq) FROM agentgov_decisions "
    "WHERE SessionId IN {d:Array(String)} GROUP BY SessionId", d=decision_sessions)}
print(json.dumps({"rows": rows, "uniq": uniq, "per_trace": per_trace, "typed": list(typed),
                  "agg": [int(x or 0) for x in agg], "agents": int(agents or 0),
                  "lookup": lookup, "decisions": decisions}))
"""


def store_counts(data_dir: Path, session_id: str, decision_sessions: list[str]) -> dict[str, Any]:
    """Read the store in a process of its own once the collector stopped (chDB: one
    process per data folder)."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            STORE_COUNTS,
            str(data_dir),
            session_id,
            json.dumps(decision_sessions),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


class Decider(threading.Thread):
    """An agent asking the governor before every tool call, counting answered decisions."""

    def __init__(self, url: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = stop
        self.session_id = f"sess-decide-{uuid.uuid4().hex[:8]}"
        #: answered decisions whose record the governor kept (root start included)
        self.recorded = 0
        self.failed_closed: list[str] = []
        self.answers_while_full = 0
        self.full = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            r = http.post(
                "/api/v1/decisions/handoff",
                json={"session_id": self.session_id, "from_agent": "", "to_agent": "agent-1"},
            )
            assert r.status_code == 200 and r.json()["outcome"] == "allow", r.text
            self.recorded += 1
            token = r.json()["lineage_token"]
            n = 0
            while not self.stop.is_set():
                n += 1
                try:
                    r = http.post(
                        "/api/v1/decisions/tool",
                        json={
                            "session_id": self.session_id,
                            "agent_id": "agent-1",
                            "tool": "shell",
                            "command": f"ls /tmp/{n}",
                        },
                        headers={TOKEN_HEADER: token},
                    )
                except httpx.HTTPError as exc:
                    self.errors.append(str(exc))
                    continue
                body = r.json()
                if r.status_code != 200:
                    self.errors.append(r.text)
                elif str(body.get("reason") or "").startswith("audit_"):
                    self.failed_closed.append(body["reason"])
                else:
                    assert body["outcome"] == "allow", body
                    self.recorded += 1
                    token = body.get("lineage_token") or token
                    if self.full.is_set():
                        self.answers_while_full += 1
                time.sleep(0.004)


# The embedded engine may commit parts without their data while the disk is full: the
# stage check, the part doctor and the audit read-back (store/parts.py) are what this test
# holds to account as much as the floor and the local audit log.
def test_full_disk_under_load_loses_and_doubles_nothing_and_records_every_decision(
    small_fs: Path,
) -> None:
    data = small_fs / "data"
    c = CollectorProcess(data, free_port(), free_port())
    args = ("--min-free-space", "3MiB", "--audit-log-size", "4MiB")
    c.start(extra_args=args)
    session_id = f"sess-full-{uuid.uuid4().hex[:8]}"
    requests = [make_request(session_id, SPANS_PER_REQUEST) for _ in range(240)]
    acked: set[int] = set()
    statuses: dict[int, int] = {}
    refusals: list[tuple[int, str, str | None]] = []
    lock = threading.Lock()
    cursor = iter(range(len(requests)))
    # generous: on a busy machine the full period alone can take a minute
    give_up = time.monotonic() + 180

    def load() -> None:
        # an exporter: each request is sent until it is acknowledged
        with httpx.Client(timeout=30) as http:
            while True:
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                while time.monotonic() < give_up:
                    try:
                        r = http.post(f"{c.url}/v1/traces", content=requests[i][0], headers=PROTO)
                    except httpx.HTTPError:
                        time.sleep(0.1)
                        continue
                    with lock:
                        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        with lock:
                            acked.add(i)
                        break
                    with lock:
                        refusals.append((r.status_code, r.text, r.headers.get("retry-after")))
                    if r.status_code != 503:
                        return  # a refusal of the data: an exporter drops it for good
                    time.sleep(0.2)
                time.sleep(0.01)

    stop = threading.Event()
    deciders = [Decider(c.url, stop) for _ in range(2)]
    loaders = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    filler: Path | None = None
    try:
        for t in [*deciders, *loaders]:
            t.start()
        wait_for(lambda: len(acked) >= 40, timeout=30)

        # the disk fills up while spans and decisions keep coming
        filler = fill(small_fs)
        for d in deciders:
            d.full.set()
        # writes may fail (and health turn degraded) a moment before the space monitor's
        # next reading: wait for the floor itself
        degraded = wait_for(
            lambda: (
                (r := httpx.get(f"{c.url}/healthz", timeout=10)).status_code == 503
                and r.json()["store"]["below_floor"]
                and r.json()
            ),
            timeout=20,
        )
        assert degraded["status"] == "degraded" and degraded["problems"]
        assert any("below the floor" in p for p in degraded["problems"])
        # decisions go on, their records wait in the local audit log
        wait_for(lambda: all(d.answers_while_full >= 20 for d in deciders), timeout=20)
        waiting = wait_for(
            lambda: (h := c.health())["audit"]["pending_records"] > 0 and h, timeout=20
        )
        assert waiting["audit"]["local_log"]["used_bytes"] > 0
        sid = deciders[0].session_id
        unavailable: list[httpx.Response] = []

        def verified() -> Any:
            # a read of a full store may fail too: then a 503 to retry, never a 500
            r = httpx.get(f"{c.url}/api/v1/sessions/{sid}/decisions/verify", timeout=30)
            if r.status_code != 200:
                unavailable.append(r)
            return r.status_code == 200 and r.json()

        try:
            check = wait_for(verified, timeout=20, interval=0.5)
        except AssertionError:
            raise AssertionError(
                [(r.status_code, r.text[:500]) for r in unavailable[-3:]]
            ) from None
        assert all(r.status_code == 503 and r.headers["retry-after"] for r in unavailable), [
            (r.status_code, r.text) for r in unavailable
        ]
        assert check["ok"] is True and check.get("not_yet_drained", 0) > 0, check
        assert "not yet drained" in check["problem"]
        # a new request is told why, and when to come back, on both receivers
        r = httpx.post(f"{c.url}/v1/traces", content=make_request(session_id, 1)[0], headers=PROTO)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "below the floor" in r.text and "--min-free-space" in r.text
        with grpc.insecure_channel(f"127.0.0.1:{c.grpc_port}") as channel:
            export = channel.unary_unary(
                "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            with pytest.raises(grpc.RpcError) as err:
                export(make_request(session_id, 1)[0], timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        metrics = httpx.get(f"{c.url}/metrics", timeout=10).text
        assert "agentgov_store_below_floor 1.0" in metrics
        assert "agentgov_audit_records_pending" in metrics

        # space is freed: ingest resumes without a restart
        os.unlink(filler)
        filler = None
        for t in loaders:
            t.join(max(1.0, give_up - time.monotonic()))
        assert acked == set(range(len(requests))), (statuses, refusals[-3:])
        assert not [x for x in refusals if x[0] != 503], refusals
        healthy = wait_for(
            lambda: (
                (r := httpx.get(f"{c.url}/healthz", timeout=10)).status_code == 200 and r.json()
            ),
            timeout=30,
        )
        assert healthy["status"] == "ok" and healthy["store"]["below_floor"] is False
        stop.set()
        for d in deciders:
            d.join(30)
        for d in deciders:
            assert not d.errors and not d.failed_closed, (d.errors[:3], d.failed_closed[:3])
        wait_for(lambda: c.health()["audit"]["pending_records"] == 0, timeout=30)
        health = c.health()
        # storage trouble was met for real, and never answered as the data's fault
        assert health["refused_requests"] > 0
        # whatever the engine broke on the way was repaired
        parts = health["store"]["broken_parts"]
        assert parts["awaiting_repair"] == [], parts
        print("broken parts:", json.dumps(parts))

        # after a restart: every answered decision is in the audit, and the chain holds
        c.stop()
        c.start(extra_args=args)
        for d in deciders:
            result = httpx.get(
                f"{c.url}/api/v1/sessions/{d.session_id}/decisions/verify", timeout=30
            ).json()
            assert result == {
                "session_id": d.session_id,
                "records": d.recorded,
                "ok": True,
                "problem": None,
                "seq": None,
            }
    finally:
        stop.set()
        if filler is not None and filler.exists():
            os.unlink(filler)
        c.stop()

    counts = store_counts(data, session_id, [d.session_id for d in deciders])
    expected = len(requests) * SPANS_PER_REQUEST
    # no acknowledged span lost, none doubled
    assert (counts["rows"], counts["uniq"]) == (expected, expected)
    assert counts["per_trace"] == {trace: SPANS_PER_REQUEST for _, trace in requests}
    # the derived tables equal otel_traces
    assert counts["typed"] == [expected, expected]
    assert counts["agg"] == [expected, expected]
    assert counts["agents"] == expected
    assert counts["lookup"] == len(requests)
    for d in deciders:
        assert counts["decisions"][d.session_id] == [d.recorded, d.recorded, d.recorded]


# -- a failure at each step of the view chain -----------------------------------------------


@pytest.fixture()
def writer_store(store_client) -> StoreConfig:  # type: ignore[no-untyped-def]
    return StoreConfig(f"chdb://{store_client.path}")


def _chain_counts(client, session_id: str, trace_id: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    t = {"t": trace_id, "s": session_id}

    def one(q: str) -> int:
        return int(client.query(q, parameters=t).result_rows[0][0] or 0)

    return {
        schema.TRACES: one("SELECT count() FROM otel_traces WHERE TraceId = {t:String}"),
        f"{schema.TRACES}_trace_id_ts": one(
            "SELECT count() FROM otel_traces_trace_id_ts WHERE TraceId = {t:String}"
        ),
        schema.SPANS_NATIVE: one(
            "SELECT count() FROM agentgov_spans_native WHERE TraceId = {t:String}"
        ),
        schema.SESSIONS_NATIVE: one(
            "SELECT sum(Spans) FROM agentgov_sessions_native WHERE SessionId = {s:String}"
        ),
        schema.AGENTS_NATIVE: one(
            "SELECT sum(ToolCalls) FROM agentgov_agents_native WHERE SessionId = {s:String}"
        ),
        schema.TRACE_QUEUE: one(
            "SELECT count() FROM agentgov_trace_queue WHERE TraceId = {t:String}"
        ),
    }


#: what one request of 12 own spans and 3 foreign ones leaves in each table of the chain
COMPLETE = {
    schema.TRACES: 15,
    f"{schema.TRACES}_trace_id_ts": 1,
    schema.SPANS_NATIVE: 12,
    schema.SESSIONS_NATIVE: 12,
    schema.AGENTS_NATIVE: 12,
    schema.TRACE_QUEUE: 1,
}
NOTHING = dict.fromkeys(COMPLETE, 0)


@pytest.mark.parametrize("step", schema.WRITE_CHAIN)
def test_failure_at_each_step_of_the_view_chain_leaves_no_partial_request(
    store_client,  # type: ignore[no-untyped-def]
    writer_store: StoreConfig,
    step: str,
) -> None:
    instance = f"t{uuid.uuid4().hex[:6]}"
    stage = f"agentgov_stage_{instance}_0"
    writer = SpanWriter(writer_store, threads=1, instance=instance, retry_backoff_s=(0.05, 0.2))
    writer.start()
    detached: list[str] = []

    def detach(table: str) -> None:
        store_client.command(f"DETACH TABLE {table}")
        detached.append(table)

    def attach(table: str) -> None:
        store_client.command(f"ATTACH TABLE {table}")
        detached.remove(table)

    try:
        # 1. the step's view fails while the batch is written: nothing reaches the store
        session_id = f"sess-chain-{uuid.uuid4().hex[:8]}"
        payload, trace = make_request(session_id, 12, foreign=3)
        detach(f"{stage}_{step}")
        with pytest.raises(StoreUnavailable):
            writer.submit(payload, 15).result(30)
        assert _chain_counts(store_client, session_id, trace) == NOTHING
        assert writer.stats.consecutive_failures > 0
        attach(f"{stage}_{step}")
        assert writer.submit(payload, 15).result(30) == 15  # the sender's retry
        assert _chain_counts(store_client, session_id, trace) == COMPLETE
        assert writer.submit(payload, 15).result(30) == 0  # and once more: a duplicate

        # 2. the step's table fails while the complete batch moves into the store: the
        #    request is not acknowledged until it is all there, then it is, once
        session_id = f"sess-chain-{uuid.uuid4().hex[:8]}"
        payload, trace = make_request(session_id, 12, foreign=3)
        detach(step)
        future: Future[int] = writer.submit(payload, 15)
        wait_for(lambda: writer.stats.move_retries >= 2, timeout=20)
        assert not future.done()
        attach(step)
        assert future.result(30) == 15
        assert _chain_counts(store_client, session_id, trace) == COMPLETE
        assert writer.submit(payload, 15).result(30) == 0
    finally:
        for table in list(detached):
            attach(table)
        writer.close()


def test_a_crash_with_a_complete_batch_in_the_stage_is_finished_at_start(
    store_client,  # type: ignore[no-untyped-def]
    writer_store: StoreConfig,
) -> None:
    instance = f"t{uuid.uuid4().hex[:6]}"
    session_id = f"sess-crash-{uuid.uuid4().hex[:8]}"
    payload, trace = make_request(session_id, 12, foreign=3)
    writer = SpanWriter(writer_store, threads=1, instance=instance, retry_backoff_s=(0.05, 0.2))
    writer.start()
    store_client.command(f"DETACH TABLE {schema.SESSIONS_NATIVE}")
    try:
        future = writer.submit(payload, 15)
        wait_for(lambda: writer.stats.move_retries >= 1, timeout=20)
        writer.close(timeout=5)  # stops mid-move, as a crash would
        # the sender is told to retry (never that its spans are stored, nor refused)
        with pytest.raises(StoreUnavailable):
            future.result(5)
    finally:
        store_client.command(f"ATTACH TABLE {schema.SESSIONS_NATIVE}")
    partial = _chain_counts(store_client, session_id, trace)
    assert partial[schema.TRACES] == 15 and partial[schema.SESSIONS_NATIVE] == 0
    again = SpanWriter(writer_store, threads=1, instance=instance).start()  # the restart
    try:
        assert _chain_counts(store_client, session_id, trace) == COMPLETE
        assert again.submit(payload, 15).result(30) == 0  # the sender's retry: stored once
    finally:
        again.close()
    assert _chain_counts(store_client, session_id, trace) == COMPLETE


# -- storage errors, classified for the sender ------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        "Code: 243. DB::Exception: Cannot reserve 1.00 MiB, not enough space. (NOT_ENOUGH_SPACE)",
        "Code: 1001. DB::Exception: std::__1::__fs::filesystem::filesystem_error: filesystem "
        "error: in create_directories: No space left on device (STD_EXCEPTION)",
        "Code: 75. DB::ErrnoException: Cannot write to file /d/x.bin, errno: 28, strerror: No "
        "space left on device. (CANNOT_WRITE_TO_FILE_DESCRIPTOR)",
        "Code: 1001. DB::Exception: filesystem error: Read-only file system (STD_EXCEPTION)",
        "Code: 252. DB::Exception: Too many parts (300). (TOO_MANY_PARTS)",
        "Code: 241. DB::Exception: Memory limit (total) exceeded. (MEMORY_LIMIT_EXCEEDED)",
        "Code: 242. DB::Exception: Table is in readonly mode. (TABLE_IS_READ_ONLY)",
        "Code: 60. DB::Exception: Table default.otel_traces does not exist. (UNKNOWN_TABLE)",
    ],
)
def test_storage_errors_are_unavailable_never_refusals(message: str) -> None:
    assert isinstance(classify(DatabaseError(message)), StoreUnavailable)


def test_data_errors_stay_refusals_and_os_errors_are_unavailable() -> None:
    bad = DatabaseError("Code: 27. DB::Exception: Cannot parse input. (CANNOT_PARSE_INPUT)")
    assert isinstance(classify(bad), StoreRejected)
    for code in (28, 30, 122, 5):
        assert isinstance(classify(OSError(code, os.strerror(code))), StoreUnavailable)


def test_a_server_that_refuses_connections_is_unavailable() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(Exception) as err:
        clickhouse_connect.get_client(host="127.0.0.1", port=port, connect_timeout=2)
    assert isinstance(classify(err.value), StoreUnavailable)


def test_sizes_parse() -> None:
    assert parse_size("256MiB") == 256 << 20
    assert parse_size("2G") == 2 << 30
    assert parse_size("0") == 0
    with pytest.raises(ValueError, match="512MiB"):
        parse_size("lots")


# -- the local audit log --------------------------------------------------------------------


def test_audit_log_survives_a_torn_tail_and_replays_what_was_not_drained(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit", capacity_bytes=256 << 10, segments=4)
    assert log.open() == []
    seqs = [log.append(f"record {n}".encode()) for n in range(1, 301)]
    assert seqs == list(range(1, 301))
    log.drained(120)
    log.close()
    # a write torn by a crash: the last frame's bytes half there
    seg = max((tmp_path / "audit").glob("segment-*.log"), key=lambda p: p.stat().st_mtime)
    with open(seg, "r+b") as f:
        data = f.read()
        end = data.index(b"record 300") + len(b"record 300")
        f.seek(end - 4)
        f.write(b"\xff\xff")
    again = AuditLog(tmp_path / "audit", capacity_bytes=256 << 10, segments=4)
    replayed = again.open()
    assert [s for s, _ in replayed] == list(range(121, 300))
    assert replayed[0][1] == b"record 121"
    assert again.append(b"after") == 300  # the torn record's number is taken again
    again.close()


def test_a_full_audit_log_fails_decisions_closed_and_changes_nothing(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit", capacity_bytes=128 << 10, segments=2)
    log.open()
    # a writer that never reaches ClickHouse: records only pile up in the log
    writer = audit.AuditWriter(StoreConfig(f"chdb://{tmp_path / 'unused'}"), log)
    gov = Governor(
        PolicySource(None), RiskRules.default(), encode=audit.row, journal=writer.journal
    )
    answered = 0
    with pytest.raises(AuditUnavailable) as err:
        for n in range(10_000):
            gov.handoff(HandoffRequest(f"sess-{n}", "", "root"))
            answered += 1
    assert err.value.reason == "audit_log_full"
    assert answered > 50 and writer.pending == answered
    assert not gov.governs(f"sess-{answered}")  # the refused start left no agent behind
    assert writer.stats.failed_closed == {"audit_log_full": 1}
    log.drained(log.last_seq)  # the store took them: room again
    assert gov.handoff(HandoffRequest(f"sess-{answered}", "", "root")).outcome == "allow"
    assert gov.governs(f"sess-{answered}")
    log.close()


def _chain(session_id: str, n: int) -> list[Record]:
    out: list[Record] = []
    prev = ""
    for seq in range(1, n + 1):
        r = Record(
            session_id=session_id,
            seq=seq,
            time=round(time.time(), 6) + seq,
            phase="tool",
            outcome="allow",
        )
        r = r.seal(prev)
        prev = r.hash
        out.append(r)
    return out


def test_verify_tells_not_yet_drained_from_deleted(store_client) -> None:  # type: ignore[no-untyped-def]
    store_client.command(audit.DECISIONS_TABLE)
    sid = f"sess-verify-{uuid.uuid4().hex[:8]}"
    records = _chain(sid, 4)
    lines = [audit.row(r) for r in records]
    assert [audit.record_from_row(x) for x in lines] == records
    store_client.raw_insert(
        audit.DECISIONS, insert_block="\n".join(lines[:2]).encode(), fmt="JSONEachRow"
    )
    waiting = audit.verify(store_client, sid, records[2:])
    assert (waiting.ok, waiting.records, waiting.not_yet_drained) == (True, 4, 2)
    assert "not yet drained" in waiting.problem
    store_client.raw_insert(audit.DECISIONS, insert_block=lines[3].encode(), fmt="JSONEachRow")
    gone = audit.verify(store_client, sid)
    assert (gone.ok, gone.seq) == (False, 3) and "deleted" in gone.problem


# -- parts the engine committed broken ----------------------------------------------------


def _empty_files(path: str) -> None:
    """What the embedded engine leaves when a part is written onto a full disk: every file
    of the part present, and empty."""
    for f in Path(path).iterdir():
        os.truncate(f, 0)


def test_a_broken_merged_part_is_replaced_by_the_parts_it_was_merged_from(
    store_client,  # type: ignore[no-untyped-def]
) -> None:
    table = f"parts_merge_{uuid.uuid4().hex[:8]}"
    store_client.command(f"CREATE TABLE {table} (k UInt64, s String) ENGINE = MergeTree ORDER BY k")
    try:
        for n in range(5):
            store_client.insert(table, [[n * 100 + i, "x" * i] for i in range(100)], ["k", "s"])
        store_client.command(f"OPTIMIZE TABLE {table} FINAL")
        (merged,) = list_parts(store_client, [table])
        assert merged.level > 0 and merged.rows == 500
        _empty_files(merged.path)
        assert broken(merged.path, merged.rows)
        with pytest.raises(DatabaseError, match="246"):
            store_client.query(f"SELECT sum(length(s)) FROM {table}")

        doctor = PartDoctor()
        (repair,) = [r for r in doctor.scan(store_client) if r.table == table]
        assert repair.done and repair.part == merged.name and repair.lost_rows == 0
        assert len(repair.restored) == 5 and repair.restored_rows == 500
        rows = store_client.query(f"SELECT count(), uniqExact(k), sum(length(s)) FROM {table}")
        assert rows.result_rows[0] == (500, 500, 5 * sum(range(100)))
        assert doctor.stats.repaired == 1 and doctor.stats.lost_rows == 0
        assert not doctor.stats.awaiting
        # nothing broken is left, and a second look finds nothing to do
        assert not [p for p in list_parts(store_client, [table]) if broken(p.path, p.rows)]
        assert doctor.scan(store_client) == []
    finally:
        store_client.command(f"DROP TABLE IF EXISTS {table}")


def test_a_broken_inserted_part_is_detached_and_its_rows_reported_lost(
    store_client,  # type: ignore[no-untyped-def]
) -> None:
    table = f"parts_insert_{uuid.uuid4().hex[:8]}"
    store_client.command(
        f"CREATE TABLE {table} (k UInt64) ENGINE = MergeTree ORDER BY k "
        "SETTINGS old_parts_lifetime = 600"
    )
    try:
        store_client.command(f"SYSTEM STOP MERGES {table}")
        store_client.insert(table, [[i] for i in range(10)], ["k"])
        store_client.insert(table, [[i] for i in range(10, 30)], ["k"])
        second = max(list_parts(store_client, [table]), key=lambda p: p.min_block)
        _empty_files(second.path)
        doctor = PartDoctor()
        repairs = [r for r in doctor.scan(store_client) if r.table == table]
        assert [(r.part, r.restored, r.lost_rows) for r in repairs] == [(second.name, [], 20)]
        assert doctor.stats.lost_parts == 1 and doctor.stats.lost_rows == 20
        # the table reads again: what could be kept is there
        assert store_client.query(f"SELECT count(), sum(k) FROM {table}").result_rows[0] == (
            10,
            sum(range(10)),
        )
    finally:
        store_client.command(f"DROP TABLE IF EXISTS {table}")


def test_a_stage_part_committed_without_its_data_fails_the_attempt(
    store_client,  # type: ignore[no-untyped-def]
) -> None:
    prefix = f"agentgov_stage_t{uuid.uuid4().hex[:6]}"
    stage = Stage(prefix, RiskRules.default(), schema.ingest_settings(True), local=True)
    stage.recreate(store_client)
    try:
        session_id = f"sess-stage-{uuid.uuid4().hex[:8]}"
        payload, _ = make_request(session_id, 5)
        block = _varint(len(payload)) + payload
        # a part of the stage committed empty (what the engine does on a full disk)
        store_client.raw_insert(
            stage.table(schema.INGEST),
            insert_block=block,
            fmt="Protobuf",
            settings={**schema.ingest_settings(True), "insert_deduplication_token": "x1"},
        )
        (traces,) = list_parts(store_client, [stage.table(schema.TRACES)])
        _empty_files(traces.path)
        with pytest.raises(BrokenPartError, match="empty files") as err:
            stage.write(store_client, block, "x2", ["d2"])
        # the writer tells the sender to retry, and empties the stage before the next try
        assert isinstance(classify(err.value), StoreUnavailable)
        assert stage.dirty and not stage.holding
        stage.clean(store_client)
        stage.write(store_client, block, "x3", ["d3"])
        assert stage.holding == "x3"
        # only the last attempt's spans are in the stage, readable
        rows = store_client.query(
            f"SELECT count(), uniqExact(SpanId) FROM {stage.table(schema.TRACES)}"
        ).result_rows[0]
        assert rows == (5, 5)
    finally:
        stage.drop(store_client)


FULL_DISK_REPAIR = """
import json, os, sys, clickhouse_connect
from agentgov.collector.store.parts import PartDoctor, broken, list_parts
from agentgov.collector.store.space import Reserve
mnt = sys.argv[1]
c = clickhouse_connect.get_client(dsn=f"chdb://{mnt}/data")
c.command("CREATE TABLE t (k UInt64, s String) ENGINE = MergeTree ORDER BY k")
for n in range(5):
    c.insert("t", [[n * 1000 + i, "x" * 100] for i in range(1000)], ["k", "s"])
c.command("OPTIMIZE TABLE t FINAL")
reserve = Reserve(f"{mnt}/data", 4 << 20)
reserve.make()
held = reserve.held
(merged,) = list_parts(c, ["t"])
print(json.dumps({"merged": merged.path, "held": held}), flush=True)
sys.stdin.readline()  # the test fills the disk and breaks the part meanwhile
free = os.statvfs(mnt).f_bavail
doctor = PartDoctor(reserve.release)
repairs = [(r.part, len(r.restored), r.lost_rows) for r in doctor.scan(c)]
rows = c.query("SELECT count(), uniqExact(k), sum(length(s)) FROM t").result_rows[0]
print(json.dumps({"free": free, "repairs": repairs, "rows": rows, "held": reserve.held}))
"""


def test_a_broken_part_is_repaired_on_a_full_disk_with_the_reserve(small_fs: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", FULL_DISK_REPAIR, str(small_fs)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    first = json.loads(proc.stdout.readline() or "{}")
    assert first.get("held") is True, proc.stderr.read() if proc.stderr else first
    filler = fill(small_fs)
    try:
        _empty_files(first["merged"])
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        os.unlink(filler)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["free"] < 1 << 20  # full while the repair ran
    (name, restored, lost) = result["repairs"][0]
    assert len(result["repairs"]) == 1 and restored == 5 and lost == 0
    assert result["rows"] == [5000, 5000, 500_000]
    assert result["held"] is False  # the reserve paid for it
