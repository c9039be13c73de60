"""The official OTLP exporters, and hand-made OTLP requests, deliver spans to the collector.

Counts are checked exactly, twice over: the session's ``spans`` figure from the query API
(read from ClickHouse) and the ``spans_written`` delta of ``/healthz`` (the writer's own
count). Retried request bodies must not be stored twice.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

try:  # tests/ as a plain folder (rootdir on sys.path) or as a package
    from conftest import CollectorProcess, free_port, make_provider, wait_for
except ImportError:  # pragma: no cover
    from tests.conftest import CollectorProcess, free_port, make_provider, wait_for
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def new_session(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def stored_spans(collector: CollectorProcess, session_id: str) -> int:
    """The session's ``spans`` figure from the API (0 while the session is unknown)."""
    resp = collector.get(f"/api/v1/sessions/{session_id}")
    if resp.status_code == 404:
        return 0
    assert resp.status_code == 200, resp.text
    return int(resp.json()["spans"])


def spans_written(collector: CollectorProcess) -> int:
    return int(collector.health()["spans_written"])


def requests_written(collector: CollectorProcess) -> int:
    return int(collector.health()["requests"])


# -- the official exporters ----------------------------------------------------------------


def _provider(collector: CollectorProcess, kind: str, batch: int) -> TracerProvider:
    bsp = {"max_queue_size": 8192, "max_export_batch_size": batch, "schedule_delay_millis": 60_000}
    if kind == "grpc":
        return make_provider(
            f"http://127.0.0.1:{collector.grpc_port}", "grpc", service="otlp-grpc", **bsp
        )
    if kind == "http":
        return make_provider(collector.url, "http", service="otlp-http", **bsp)
    exporter = OTLPSpanExporter(endpoint=f"{collector.url}/v1/traces", compression=Compression.Gzip)
    provider = TracerProvider(resource=Resource.create({"service.name": "otlp-http-gzip"}))
    provider.add_span_processor(BatchSpanProcessor(exporter, **bsp))
    return provider


@pytest.mark.parametrize(
    ("kind", "total", "batch"),
    [("http", 2000, 400), ("grpc", 2000, 400), ("http-gzip", 600, 150)],
)
def test_official_exporter_delivers_every_span_once(
    collector: CollectorProcess, kind: str, total: int, batch: int
) -> None:
    sid = new_session(f"bulk-{kind}")
    written0, requests0 = spans_written(collector), requests_written(collector)
    provider = _provider(collector, kind, batch)
    tracer = provider.get_tracer("bulk-test")
    try:
        root = tracer.start_span(
            "invoke_agent bulk",
            attributes={
                "agentgov.session.id": sid,
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.id": "bulk-root",
                "gen_ai.agent.name": "bulk",
                "agentgov.delegation.chain": ["bulk-root"],
                "agentgov.delegation.depth": 0,
                "agentgov.intent": f"bulk load over {kind}",
            },
        )
        ctx = trace.set_span_in_context(root)
        for i in range(total - 1):
            tracer.start_span(
                f"execute_tool echo {i % 7}",
                context=ctx,
                attributes={
                    "agentgov.session.id": sid,
                    "gen_ai.operation.name": "execute_tool",
                    "gen_ai.tool.name": "shell",
                    "gen_ai.agent.id": "bulk-root",
                    "agentgov.delegation.chain": ["bulk-root"],
                    "agentgov.command": f"echo {i}",
                },
            ).end()
        root.end()
        assert provider.force_flush(60_000), "the exporter did not flush in time"
    finally:
        provider.shutdown()

    assert wait_for(lambda: stored_spans(collector, sid) >= total) is True
    summary = collector.get(f"/api/v1/sessions/{sid}").json()
    assert summary["spans"] == total
    assert summary["tool_calls"] == total - 1
    assert summary["agents"] == 1
    assert summary["intent"] == f"bulk load over {kind}"
    assert spans_written(collector) - written0 == total
    # several batches, one request each
    assert requests_written(collector) - requests0 >= total // batch

    audit = collector.get(f"/api/v1/sessions/{sid}/audit").json()["commands"]
    assert len(audit) == total - 1
    assert len({row["span_id"] for row in audit}) == total - 1
    assert sorted(row["command"] for row in audit) == sorted(f"echo {i}" for i in range(total - 1))
    assert len({row["trace_id"] for row in audit}) == 1


# -- hand-made requests --------------------------------------------------------------------


def _kv(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def protobuf_request(session_id: str, spans: int) -> bytes:
    """A serialized ExportTraceServiceRequest of ``spans`` tool spans in one trace."""
    trace_id = os.urandom(16)
    out = []
    for i in range(spans):
        out.append(
            Span(
                trace_id=trace_id,
                span_id=os.urandom(8),
                name="execute_tool shell",
                kind=Span.SPAN_KIND_INTERNAL,
                start_time_unix_nano=1_700_000_000_000_000_000 + i,
                end_time_unix_nano=1_700_000_000_000_500_000 + i,
                attributes=[
                    _kv("agentgov.session.id", session_id),
                    _kv("gen_ai.operation.name", "execute_tool"),
                    _kv("gen_ai.agent.id", "retrier"),
                    _kv("agentgov.command", f"echo {i}"),
                ],
            )
        )
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource={"attributes": [_kv("service.name", "retry-test")]},
                scope_spans=[ScopeSpans(scope={"name": "hand-made"}, spans=out)],
            )
        ]
    )
    return request.SerializeToString()


def _post(
    collector: CollectorProcess, body: bytes, content_type: str, encoding: str | None = None
) -> httpx.Response:
    headers = {"Content-Type": content_type}
    if encoding:
        headers["Content-Encoding"] = encoding
    return httpx.post(f"{collector.url}/v1/traces", content=body, headers=headers, timeout=30)


def test_retried_request_bodies_are_not_stored_twice(collector: CollectorProcess) -> None:
    sid = new_session("retry")
    body = protobuf_request(sid, 50)
    written0 = spans_written(collector)

    first = _post(collector, body, "application/x-protobuf")
    assert first.status_code == 200, first.text
    assert ExportTraceServiceResponse.FromString(first.content) == ExportTraceServiceResponse()
    assert spans_written(collector) - written0 == 50  # acknowledged means written

    # the very same bytes again: sequentially, concurrently, gzip-encoded, and over gRPC
    again = _post(collector, body, "application/x-protobuf")
    assert again.status_code == 200, again.text
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                _post(collector, body, "application/x-protobuf").status_code
            )
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200] * 4
    zipped = _post(collector, gzip.compress(body), "application/x-protobuf", "gzip")
    assert zipped.status_code == 200, zipped.text
    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        export = channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=lambda b: b,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )
        assert export(body, timeout=30) == ExportTraceServiceResponse()

    assert stored_spans(collector, sid) == 50
    assert spans_written(collector) - written0 == 50
    audit = collector.get(f"/api/v1/sessions/{sid}/audit").json()["commands"]
    assert len(audit) == 50 and len({r["span_id"] for r in audit}) == 50

    # a request that differs by one span is a new request: its spans are all stored
    other = protobuf_request(sid, 3)
    assert _post(collector, other, "application/x-protobuf").status_code == 200
    assert stored_spans(collector, sid) == 53
    assert spans_written(collector) - written0 == 53


def test_gzip_bodies_are_decoded_and_bad_gzip_refused(collector: CollectorProcess) -> None:
    sid = new_session("gzip")
    body = protobuf_request(sid, 7)
    resp = _post(collector, gzip.compress(body), "application/x-protobuf", "gzip")
    assert resp.status_code == 200, resp.text
    assert stored_spans(collector, sid) == 7

    written0 = spans_written(collector)
    bad = _post(collector, body, "application/x-protobuf", "gzip")  # not actually gzip
    assert bad.status_code == 400
    assert "gzip" in bad.json()["message"]
    truncated = _post(
        collector, gzip.compress(protobuf_request(sid, 2))[:-12], "application/x-protobuf", "gzip"
    )
    assert truncated.status_code == 400
    assert spans_written(collector) == written0
    assert stored_spans(collector, sid) == 7


# -- OTLP/JSON, checked row by row in the store ---------------------------------------------

_DUMP = """
import json, sys
import clickhouse_connect
client = clickhouse_connect.get_client(dsn="chdb://" + sys.argv[1])
out = {}
for name, sql in json.loads(sys.argv[2]).items():
    out[name] = list(client.query(sql, parameters={"t": sys.argv[3]}).named_results())
print(json.dumps(out, default=str))
"""

_QUERIES = {
    "traces": "SELECT toUnixTimestamp64Nano(Timestamp) AS StartNs, TraceId, SpanId,"
    " ParentSpanId, SpanName, SpanKind, ServiceName,"
    " ResourceAttributes, ScopeName, ScopeVersion, SpanAttributes, Duration,"
    " StatusCode, StatusMessage,"
    " arrayMap(t -> toUnixTimestamp64Nano(t), `Events.Timestamp`) AS EventNs,"
    " `Events.Name` AS EventNames, `Events.Attributes` AS EventAttributes"
    " FROM otel_traces WHERE TraceId = {t:String} ORDER BY Timestamp",
    "spans": "SELECT SessionId, SpanId, ParentSpanId, Operation, AgentId, ParentAgentId, Chain,"
    " Depth, Intent, Task, ToolName, Command, Resources, RiskScore, RiskRules, CostUsd,"
    " Messages, StatusCode, StatusMessage"
    " FROM agentgov_spans WHERE TraceId = {t:String} ORDER BY Timestamp",
}


def read_store(data_dir: Path, trace_id: str) -> dict[str, list[dict[str, Any]]]:
    """Rows of one trace, read from a stopped collector's chDB folder in a fresh process
    (chDB hosts one data path per process, and the collector owns its store while up)."""
    proc = subprocess.run(
        [sys.executable, "-c", _DUMP, str(data_dir), json.dumps(_QUERIES), trace_id],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(json.loads(proc.stdout))


def _attr(key: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"key": key, "value": value}


def test_otlp_json_span_is_stored_as_sent(tmp_path: Path) -> None:
    # A private collector: the rows are read from its store once it has stopped.
    collector = CollectorProcess(tmp_path / "data", free_port(), free_port()).start()
    sid = new_session("json")
    trace_id = uuid.uuid4().hex
    span_id, child_id, parent_id = uuid.uuid4().hex[:16], uuid.uuid4().hex[:16], "0a1b2c3d4e5f6071"
    start = 1_760_000_000_123_456_789
    digest = "sha256:" + "ab" * 32
    doc = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [
                        _attr("service.name", {"stringValue": "json-agent"}),
                        _attr("host.name", {"stringValue": "worker-3"}),
                    ]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "hand-written", "version": "2.1"},
                        "spans": [
                            {
                                "traceId": trace_id,
                                "spanId": span_id,
                                "parentSpanId": parent_id,
                                "name": "execute_tool shell",
                                "kind": 3,
                                "startTimeUnixNano": str(start),
                                "endTimeUnixNano": str(start + 1_234_567_891),
                                "attributes": [
                                    _attr("agentgov.session.id", {"stringValue": sid}),
                                    _attr("gen_ai.operation.name", {"stringValue": "execute_tool"}),
                                    _attr("gen_ai.tool.name", {"stringValue": "shell"}),
                                    _attr("gen_ai.agent.id", {"stringValue": "worker-7"}),
                                    _attr("agentgov.agent.parent_id", {"stringValue": "planner-1"}),
                                    _attr(
                                        "agentgov.delegation.chain",
                                        {
                                            "arrayValue": {
                                                "values": [
                                                    {"stringValue": "planner-1"},
                                                    {"stringValue": "worker-7"},
                                                ]
                                            }
                                        },
                                    ),
                                    _attr("agentgov.delegation.depth", {"intValue": "1"}),
                                    _attr(
                                        "agentgov.intent", {"stringValue": "tidy the data volume"}
                                    ),
                                    _attr(
                                        "agentgov.command", {"stringValue": "rm -rf /opt/app/data"}
                                    ),
                                    _attr(
                                        "agentgov.resources",
                                        {
                                            "arrayValue": {
                                                "values": [{"stringValue": "/opt/app/data"}]
                                            }
                                        },
                                    ),
                                    _attr("agentgov.cost.usd", {"doubleValue": 0.125}),
                                    _attr("retry.ok", {"boolValue": True}),
                                ],
                                "events": [
                                    {
                                        "timeUnixNano": str(start + 1000),
                                        "name": "agentgov.message",
                                        "attributes": [
                                            _attr(
                                                "agentgov.message.from", {"stringValue": "worker-7"}
                                            ),
                                            _attr(
                                                "agentgov.message.to", {"stringValue": "planner-1"}
                                            ),
                                            _attr(
                                                "agentgov.message.digest", {"stringValue": digest}
                                            ),
                                            _attr("agentgov.message.size", {"intValue": "2048"}),
                                        ],
                                    }
                                ],
                                "status": {"code": 2, "message": "exit status 1"},
                            },
                            {  # ids in upper case: OTLP/JSON hex ids are case-insensitive
                                "traceId": trace_id.upper(),
                                "spanId": child_id.upper(),
                                "parentSpanId": span_id.upper(),
                                "name": "child",
                                "kind": 1,
                                "startTimeUnixNano": str(start + 10),
                                "endTimeUnixNano": str(start + 20),
                                "attributes": [_attr("agentgov.session.id", {"stringValue": sid})],
                                "status": {"code": 1},
                            },
                        ],
                    }
                ],
            }
        ]
    }
    body = json.dumps(doc).encode()
    try:
        for _ in range(2):  # the second post is a retry of the same bytes
            resp = _post(collector, body, "application/json")
            assert resp.status_code == 200, resp.text
            assert resp.headers["content-type"].startswith("application/json")
            assert resp.json() == {}
        assert spans_written(collector) == 2
        summary = collector.get(f"/api/v1/sessions/{sid}").json()
        assert (summary["spans"], summary["tool_calls"], summary["errors"]) == (2, 1, 1)
        assert summary["usd"] == pytest.approx(0.125)
        (row,) = collector.get(f"/api/v1/sessions/{sid}/audit").json()["commands"]
        assert (row["trace_id"], row["span_id"]) == (trace_id, span_id)
        assert (row["agent_id"], row["parent_id"], row["chain"], row["depth"]) == (
            "worker-7",
            "planner-1",
            ["planner-1", "worker-7"],
            1,
        )
        assert (row["command"], row["resources"], row["risk"], row["status"]) == (
            "rm -rf /opt/app/data",
            ["/opt/app/data"],
            80,
            "Error",
        )
    finally:
        collector.stop()

    rows = read_store(tmp_path / "data", trace_id)
    first, second = rows["traces"]
    assert first["StartNs"] == start
    assert (first["TraceId"], first["SpanId"], first["ParentSpanId"]) == (
        trace_id,
        span_id,
        parent_id,
    )
    assert (first["SpanName"], first["SpanKind"], first["ServiceName"]) == (
        "execute_tool shell",
        "Client",
        "json-agent",
    )
    assert first["ResourceAttributes"] == {"service.name": "json-agent", "host.name": "worker-3"}
    assert (first["ScopeName"], first["ScopeVersion"]) == ("hand-written", "2.1")
    assert first["SpanAttributes"] == {
        "agentgov.session.id": sid,
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "shell",
        "gen_ai.agent.id": "worker-7",
        "agentgov.agent.parent_id": "planner-1",
        "agentgov.delegation.chain": '["planner-1","worker-7"]',
        "agentgov.delegation.depth": "1",
        "agentgov.intent": "tidy the data volume",
        "agentgov.command": "rm -rf /opt/app/data",
        "agentgov.resources": '["/opt/app/data"]',
        "agentgov.cost.usd": "0.125",
        "retry.ok": "true",
    }
    assert first["Duration"] == 1_234_567_891
    assert (first["StatusCode"], first["StatusMessage"]) == ("Error", "exit status 1")
    assert first["EventNames"] == ["agentgov.message"]
    assert first["EventNs"] == [start + 1000]
    assert first["EventAttributes"] == [
        {
            "agentgov.message.from": "worker-7",
            "agentgov.message.to": "planner-1",
            "agentgov.message.digest": digest,
            "agentgov.message.size": "2048",
        }
    ]
    assert (second["TraceId"], second["SpanId"], second["ParentSpanId"]) == (
        trace_id,
        child_id,
        span_id,
    )
    assert (second["StatusCode"], second["SpanKind"]) == ("Ok", "Internal")

    gov_first, gov_second = rows["spans"]
    assert gov_first == {
        "SessionId": sid,
        "SpanId": span_id,
        "ParentSpanId": parent_id,
        "Operation": "execute_tool",
        "AgentId": "worker-7",
        "ParentAgentId": "planner-1",
        "Chain": ["planner-1", "worker-7"],
        "Depth": 1,
        "Intent": "tidy the data volume",
        "Task": "",
        "ToolName": "shell",
        "Command": "rm -rf /opt/app/data",
        "Resources": ["/opt/app/data"],
        "RiskScore": 80,
        "RiskRules": ["destructive_command", "write_scope"],
        "CostUsd": 0.125,
        "Messages": 1,
        "StatusCode": "Error",
        "StatusMessage": "exit status 1",
    }
    assert (gov_second["SpanId"], gov_second["Operation"], gov_second["Messages"]) == (
        child_id,
        "",
        0,
    )
