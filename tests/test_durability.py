"""Acknowledged means durable: kill -9 under load loses no acknowledged span, and
retried requests never duplicate spans (including retries of an interrupted insert)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from agentgov.collector.store import schema
from agentgov.collector.store.connection import StoreConfig
from agentgov.collector.store.writer import PENDING, SpanWriter, _varint, request_digest

from .conftest import CollectorProcess, free_port

PROTO = {"Content-Type": "application/x-protobuf"}


def make_request(session_id: str, spans: int) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="dur")))
    ss = rs.scope_spans.add()
    trace_id = os.urandom(16)
    now = time.time_ns()
    for i in range(spans):
        s = ss.spans.add()
        s.trace_id = trace_id
        s.span_id = os.urandom(8)
        s.name = "execute_tool shell"
        s.start_time_unix_nano = now + i
        s.end_time_unix_nano = now + i + 1000
        for k, v in (
            ("gen_ai.operation.name", "execute_tool"),
            ("agentgov.session.id", session_id),
            ("gen_ai.agent.id", "worker-1"),
            ("agentgov.command", f"echo {i}"),
        ):
            s.attributes.append(KeyValue(key=k, value=AnyValue(string_value=v)))
    return req.SerializeToString()


def count_in_store(data_dir: Path, session_id: str) -> tuple[int, int, int]:
    """(rows in otel_traces, distinct span ids there, Spans in agentgov_sessions), read
    in a separate process once the collector is stopped (chDB: one process per path)."""
    code = f"""
import json, clickhouse_connect
c = clickhouse_connect.get_client(dsn="chdb://{data_dir}")
p = {{"s": {session_id!r}}}
rows, uniq = c.query("SELECT count(), uniqExact(TraceId, SpanId) FROM otel_traces "
                     "WHERE SpanAttributes['agentgov.session.id'] = {{s:String}}", parameters=p).result_rows[0]
agg = c.query("SELECT sum(Spans) FROM agentgov_sessions WHERE SessionId = {{s:String}}", parameters=p).result_rows[0][0]
print(json.dumps([rows, uniq, agg]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rows, uniq, agg = json.loads(out.stdout.strip().splitlines()[-1])
    return int(rows), int(uniq), int(agg)


def test_kill9_under_load_loses_no_acknowledged_span_and_retries_do_not_duplicate(
    tmp_path: Path,
) -> None:
    session_id = f"sess-kill9-{uuid.uuid4().hex[:8]}"
    spans_per_request = 200
    bodies = [make_request(session_id, spans_per_request) for _ in range(160)]
    acked: set[int] = set()
    lock = threading.Lock()
    c = CollectorProcess(tmp_path / "data", free_port(), free_port()).start()
    stop = threading.Event()
    cursor = iter(range(len(bodies)))

    def load() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                try:
                    r = http.post(f"{c.url}/v1/traces", content=bodies[i], headers=PROTO)
                except httpx.HTTPError:
                    continue  # connection cut by the kill: not acknowledged
                if r.status_code == 200:
                    with lock:
                        acked.add(i)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    # kill while requests are being written, once some have been acknowledged
    deadline = time.monotonic() + 30
    while len(acked) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    c.kill9()
    stop.set()
    for t in threads:
        t.join()
    acked_before_kill = set(acked)
    assert 20 <= len(acked_before_kill) < len(bodies), "the kill must land mid-load"

    # restart on the same data; every acknowledged span must be there already
    c.start()
    try:
        health = c.health()
        assert health["status"] == "ok"
        stored = c.get(f"/api/v1/sessions/{session_id}").json()["spans"]
        assert stored >= len(acked_before_kill) * spans_per_request

        # clients retry what was not acknowledged, and (lost acks) some of what was
        resend = [i for i in range(len(bodies)) if i not in acked_before_kill]
        resend += sorted(acked_before_kill)[:10]
        statuses: list[int] = []

        def retry(chunk: list[int]) -> None:
            with httpx.Client(timeout=60) as http:
                for i in chunk:
                    r = http.post(f"{c.url}/v1/traces", content=bodies[i], headers=PROTO)
                    statuses.append(r.status_code)

        retriers = [threading.Thread(target=retry, args=(resend[k::6],)) for k in range(6)]
        for t in retriers:
            t.start()
        for t in retriers:
            t.join()
        assert statuses == [200] * len(resend)
        expected = len(bodies) * spans_per_request
        assert c.get(f"/api/v1/sessions/{session_id}").json()["spans"] == expected
    finally:
        c.stop()
    rows, unique, aggregated = count_in_store(tmp_path / "data", session_id)
    assert (rows, unique, aggregated) == (expected, expected, expected)


@pytest.fixture()
def writer_store(store_client):  # type: ignore[no-untyped-def]
    """The shared in-process store (see conftest) as a StoreConfig for writers."""
    return StoreConfig(f"chdb://{store_client.path}")


def _session_rows(client, session_id: str) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    return tuple(
        client.query(  # type: ignore[return-value]
            "SELECT count(), uniqExact(TraceId, SpanId) FROM otel_traces "
            "WHERE SpanAttributes['agentgov.session.id'] = {s:String}",
            parameters={"s": session_id},
        ).result_rows[0]
    )


def test_retry_after_crash_between_insert_and_commit_is_not_duplicated(
    store_client,
    writer_store: StoreConfig,  # type: ignore[no-untyped-def]
) -> None:
    session_id = f"sess-doubt-{uuid.uuid4().hex[:8]}"
    payload = make_request(session_id, 50)
    # what a collector that died mid-write leaves: a pending receipt and the stored spans
    store_client.insert(
        schema.RECEIPTS, [[request_digest(payload), PENDING]], column_names=["Digest", "State"]
    )
    store_client.raw_insert(
        schema.INGEST,
        insert_block=_varint(len(payload)) + payload,
        fmt="Protobuf",
        settings=schema.ingest_settings(embedded=True),
    )
    assert _session_rows(store_client, session_id) == (50, 50)
    writer = SpanWriter(writer_store, threads=1).start()
    try:
        assert writer.submit(payload, 50).result(30) == 0  # retried: nothing left to write
        assert writer.submit(payload, 50).result(30) == 0  # and now remembered as committed
    finally:
        writer.close()
    assert _session_rows(store_client, session_id) == (50, 50)


def test_retry_after_crash_before_insert_writes_everything(
    store_client,
    writer_store: StoreConfig,  # type: ignore[no-untyped-def]
) -> None:
    session_id = f"sess-doubt-{uuid.uuid4().hex[:8]}"
    payload = make_request(session_id, 40)
    store_client.insert(
        schema.RECEIPTS, [[request_digest(payload), PENDING]], column_names=["Digest", "State"]
    )
    writer = SpanWriter(writer_store, threads=1).start()
    try:
        assert writer.submit(payload, 40).result(30) == 40
    finally:
        writer.close()
    assert _session_rows(store_client, session_id) == (40, 40)


def test_concurrent_duplicates_share_one_write(
    store_client,
    writer_store: StoreConfig,  # type: ignore[no-untyped-def]
) -> None:
    session_id = f"sess-dup-{uuid.uuid4().hex[:8]}"
    payload = make_request(session_id, 30)
    writer = SpanWriter(writer_store, threads=2).start()
    try:
        futures = [writer.submit(payload, 30) for _ in range(5)]
        assert [f.result(30) for f in futures] == [30] * 5
        assert writer.stats.duplicates == 4
        later = SpanWriter(writer_store, threads=1).start()  # a restarted collector
        try:
            assert later.submit(payload, 30).result(30) == 0
        finally:
            later.close()
    finally:
        writer.close()
    assert _session_rows(store_client, session_id) == (30, 30)


def test_crash_inside_the_view_chain_is_repaired_at_start(
    store_client,
    writer_store: StoreConfig,  # type: ignore[no-untyped-def]
) -> None:
    """Spans that reached otel_traces while the views behind it never ran (a crash between
    two views) get their typed rows and aggregates at the next start, exactly once."""
    session_id = f"sess-chain-{uuid.uuid4().hex[:8]}"
    payload = make_request(session_id, 25)
    request = ExportTraceServiceRequest.FromString(payload)
    trace_id = request.resource_spans[0].scope_spans[0].spans[0].trace_id.hex()
    staging = f"staging_{uuid.uuid4().hex[:8]}"
    # rows converted exactly as the ingest view converts them, into a staging table
    store_client.command(f"CREATE TABLE {staging}_in AS {schema.INGEST}")
    store_client.command(f"CREATE TABLE {staging} AS {schema.TRACES}")
    store_client.command(
        schema.INGEST_MV.replace(
            f"{schema.INGEST}_mv TO {schema.TRACES}", f"{staging}_mv TO {staging}"
        ).replace(f"FROM {schema.INGEST}\n", f"FROM {staging}_in\n")
    )
    try:
        store_client.raw_insert(
            f"{staging}_in",
            insert_block=_varint(len(payload)) + payload,
            fmt="Protobuf",
            settings=schema.ingest_settings(embedded=True),
        )
        partition = store_client.query(
            "SELECT DISTINCT partition_id FROM system.parts WHERE table = {t:String} AND active",
            parameters={"t": staging},
        ).result_rows[0][0]
        # attaching a part runs no view: otel_traces has the spans, the derived tables do not
        store_client.command(
            f"ALTER TABLE {schema.TRACES} ATTACH PARTITION ID '{partition}' FROM {staging}"
        )
    finally:
        store_client.command(f"DROP VIEW IF EXISTS {staging}_mv")
        store_client.command(f"DROP TABLE IF EXISTS {staging}")
        store_client.command(f"DROP TABLE IF EXISTS {staging}_in")
    store_client.insert(
        schema.RECEIPTS,
        [[request_digest(payload), PENDING, [trace_id]]],
        column_names=["Digest", "State", "TraceIds"],
    )

    def derived() -> tuple[int, int, int]:
        p = {"s": session_id}
        spans = store_client.query(
            "SELECT count() FROM agentgov_spans WHERE SessionId = {s:String}", parameters=p
        ).result_rows[0][0]
        agg = store_client.query(
            "SELECT sum(Spans), sum(ToolCalls) FROM agentgov_sessions WHERE SessionId = {s:String}",
            parameters=p,
        ).result_rows[0]
        return int(spans), int(agg[0] or 0), int(agg[1] or 0)

    assert _session_rows(store_client, session_id) == (25, 25)
    assert derived() == (0, 0, 0)
    writer = SpanWriter(writer_store, threads=1).start()  # the restart: repairs first
    try:
        assert derived() == (25, 25, 25)
        assert writer.submit(payload, 25).result(30) == 0  # the client's retry adds nothing
    finally:
        writer.close()
    assert _session_rows(store_client, session_id) == (25, 25)
    assert derived() == (25, 25, 25)
    agents = store_client.query(
        "SELECT AgentId, sum(ToolCalls) FROM agentgov_agents WHERE SessionId = {s:String} "
        "GROUP BY AgentId",
        parameters={"s": session_id},
    ).result_rows
    assert agents == [("worker-1", 25)]
    # a second restart finds the receipt repaired and changes nothing
    again = SpanWriter(writer_store, threads=1).start()
    again.close()
    assert derived() == (25, 25, 25)
