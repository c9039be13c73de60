"""Bad input against a real collector process: every malformed, oversized or hostile
request is refused with a clear 4xx (or gRPC INVALID_ARGUMENT) that names the problem,
the collector stays healthy, and nothing is stored or injected.

Every refusal is checked against a snapshot taken just before it: ``spans_written`` and
``requests`` in ``/healthz`` and the full ``/api/v1/sessions`` list must be unchanged.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import pytest
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from agentgov.instrumentation.lineage import InvalidIdError
from agentgov.instrumentation.spans import Governance

try:  # tests/ on sys.path (rootdir conftest), or tests/ as a package (tests/__init__.py)
    from conftest import CollectorProcess, free_port, make_provider, wait_for
except ImportError:
    from tests.conftest import CollectorProcess, free_port, make_provider, wait_for

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
DEFAULT_MAX_REQUEST = 16 << 20  # Limits.max_request_bytes
DEFAULT_MAX_DECODED = 64 << 20  # Limits.max_decoded_bytes
DEFAULT_MAX_ATTRIBUTES = 1024
SMALL_MAX_REQUEST = 4096
SMALL_MAX_ATTRIBUTES = 8


# -- helpers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    spans_written: int
    requests: int
    sessions: list[dict[str, Any]]


def snapshot(c: CollectorProcess) -> Snapshot:
    health = c.health()
    assert health["status"] == "ok"
    resp = c.get("/api/v1/sessions", limit=10_000)
    assert resp.status_code == 200
    # sorted: sessions that end at the same instant come back in any order
    sessions = sorted(resp.json()["sessions"], key=lambda r: str(r["session_id"]))
    return Snapshot(health["spans_written"], health["requests"], sessions)


def assert_unharmed(c: CollectorProcess, before: Snapshot) -> None:
    """The collector still runs, answers /healthz with 200, and stored nothing new."""
    assert c.proc is not None and c.proc.poll() is None, c.log()
    resp = httpx.get(f"{c.url}/healthz", timeout=5)
    assert resp.status_code == 200
    assert resp.json()["status"] == "ok"
    assert snapshot(c) == before


def post(
    c: CollectorProcess, body: Any, content_type: str | None, encoding: str | None = None
) -> httpx.Response:
    headers = {}
    if content_type is not None:
        headers["content-type"] = content_type
    if encoding is not None:
        headers["content-encoding"] = encoding
    return httpx.post(f"{c.url}/v1/traces", content=body, headers=headers, timeout=60)


def assert_refused(resp: httpx.Response, status: int, *fragments: str) -> str:
    """A JSON error with this status whose message contains every fragment."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert body["code"] == status
    message = str(body["message"])
    for fragment in fragments:
        assert fragment in message, message
    return message


def grpc_export(c: CollectorProcess, data: bytes, port: int | None = None) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{port or c.grpc_port}") as channel:
        export = channel.unary_unary(
            EXPORT_METHOD, request_serializer=None, response_deserializer=None
        )
        return bytes(export(data, timeout=30))


def grpc_refusal(c: CollectorProcess, data: bytes, port: int | None = None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        grpc_export(c, data, port)
    return info.value


def set_attr(attrs: Any, key: str, value: Any) -> None:
    kv = attrs.add(key=key)
    if isinstance(value, str):
        kv.value.string_value = value
    elif isinstance(value, bool):
        kv.value.bool_value = value
    elif isinstance(value, int):
        kv.value.int_value = value
    elif isinstance(value, float):
        kv.value.double_value = value
    else:
        for item in value:
            kv.value.array_value.values.add(string_value=item)


def request_with_span(
    name: str = "span", attrs: dict[str, Any] | None = None, service: str = "bad-input"
) -> tuple[ExportTraceServiceRequest, Span]:
    """An ExportTraceServiceRequest with one valid span, built with the official classes."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    set_attr(rs.resource.attributes, "service.name", service)
    ss = rs.scope_spans.add()
    ss.scope.name = "tests.bad_input"
    span = ss.spans.add()
    span.trace_id = os.urandom(16)
    span.span_id = os.urandom(8)
    span.name = name
    span.start_time_unix_nano = time.time_ns()
    span.end_time_unix_nano = span.start_time_unix_nano + 1_000_000
    for key, value in (attrs or {}).items():
        set_attr(span.attributes, key, value)
    return req, span


# hand-written protobuf encoding (the protobuf library refuses to write invalid UTF-8)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        bits, n = n & 0x7F, n >> 7
        out.append(bits | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _kv(key: bytes, value: bytes) -> bytes:
    """KeyValue{key=1, value=2: AnyValue{string_value=1}}."""
    return _ld(1, key) + _ld(2, _ld(1, value))


RAW_TRACE_ID = bytes.fromhex("5b8efff798038103d269b633813fc60c")
RAW_SPAN_ID = bytes.fromhex("eee19b7ec3c1b174")


def raw_request(
    span_name: bytes = b"raw-span",
    attr_key: bytes = b"raw.key",
    attr_value: bytes = b"raw value",
    resource_value: bytes = b"raw-service",
    scope_name: bytes = b"raw-scope",
) -> bytes:
    """An ExportTraceServiceRequest with one span, encoded field by field."""
    span = (
        _ld(1, RAW_TRACE_ID)
        + _ld(2, RAW_SPAN_ID)
        + _ld(5, span_name)
        + _ld(9, _kv(attr_key, attr_value))
    )
    scope_spans = _ld(1, _ld(1, scope_name)) + _ld(2, span)
    resource = _ld(1, _kv(b"service.name", resource_value))
    return _ld(1, _ld(1, resource) + _ld(2, scope_spans))


INVALID_UTF8 = b"bad\xff\xfe\xc3("


def gzip_bomb(decompressed: int) -> bytes:
    """``decompressed`` zero bytes, gzip-compressed (about 1/1000 of the size)."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    out = bytearray()
    left = decompressed
    while left:
        n = min(left, len(block))
        out += deflater.compress(block[:n])
        left -= n
    return bytes(out + deflater.flush())


# -- fixtures ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    session_id: str
    summary: dict[str, Any]
    commands: list[str]


def session_summary(c: CollectorProcess, sid: str) -> dict[str, Any] | None:
    resp = c.get(f"/api/v1/sessions/{sid}")
    return dict(resp.json()) if resp.status_code == 200 else None


@pytest.fixture(scope="module")
def seeded(collector: CollectorProcess) -> Seed:
    """One real session sent through the official OTLP/HTTP exporter (4 spans)."""
    provider = make_provider(collector.url, service="bad-input-seed")
    gov = Governance(provider)
    with gov.session("list the build artifacts") as session:
        with session.agent("lead", role="planner") as lead:
            with lead.tool("shell", "ls /srv/artifacts"):
                pass
            with lead.delegate("helper", task="count the files") as helper:
                with helper.tool("shell", "wc -l /srv/artifacts/manifest.txt"):
                    pass
    provider.force_flush()
    provider.shutdown()
    sid = session.session_id
    summary = wait_for(lambda: (s := session_summary(collector, sid)) and s["spans"] == 4 and s)
    assert (summary["agents"], summary["tool_calls"], summary["handoffs"]) == (2, 2, 1)
    return Seed(sid, summary, ["ls /srv/artifacts", "wc -l /srv/artifacts/manifest.txt"])


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollectorProcess]:
    """A second collector with tiny limits, set through the command-line flags."""
    base = tmp_path_factory.mktemp("small-collector")
    c = CollectorProcess(base / "data", free_port(), free_port()).start(
        extra_args=(
            "--max-request-bytes",
            str(SMALL_MAX_REQUEST),
            "--max-attributes",
            str(SMALL_MAX_ATTRIBUTES),
        )
    )
    yield c
    c.stop()


# -- malformed OTLP/HTTP bodies ---------------------------------------------------------

_T = "0102030405060708090a0b0c0d0e0f10"
_S = "0102030405060708"


def _json_span(**fields: Any) -> bytes:
    span = {"traceId": _T, "spanId": _S, "name": "json-span", **fields}
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}).encode()


_truncated_proto = request_with_span("truncated")[0].SerializeToString()[:-7]

BAD_BODIES = [
    # (id, body, content type, content encoding, status, message fragments)
    (
        "protobuf-garbage",
        b"\xff\xfe\xfd not protobuf \x00\x01\x02",
        "application/x-protobuf",
        None,
        400,
        ["not a valid OTLP ExportTraceServiceRequest protobuf"],
    ),
    (
        "protobuf-truncated",
        _truncated_proto,
        "application/x-protobuf",
        None,
        400,
        ["not a valid OTLP ExportTraceServiceRequest protobuf"],
    ),
    (
        "json-garbage",
        b"{resourceSpans: oops",
        "application/json",
        None,
        400,
        ["body is not valid UTF-8 JSON"],
    ),
    (
        "json-invalid-utf8",
        b'{"resourceSpans": "\xff\xfe"}',
        "application/json",
        None,
        400,
        ["body is not valid UTF-8 JSON"],
    ),
    (
        "json-array",
        b"[]",
        "application/json",
        None,
        400,
        ["body must be a JSON object with 'resourceSpans'"],
    ),
    (
        "json-string",
        b'"resourceSpans"',
        "application/json",
        None,
        400,
        ["body must be a JSON object"],
    ),
    ("json-null", b"null", "application/json", None, 400, ["body must be a JSON object"]),
    (
        "json-resourceSpans-object",
        b'{"resourceSpans": {}}',
        "application/json",
        None,
        400,
        ["resourceSpans must be an array"],
    ),
    (
        "json-scopeSpans-string",
        b'{"resourceSpans": [{"scopeSpans": "x"}]}',
        "application/json",
        None,
        400,
        ["resourceSpans[0].scopeSpans must be an array"],
    ),
    (
        "json-resourceSpan-number",
        b'{"resourceSpans": [7]}',
        "application/json",
        None,
        400,
        ["resourceSpans[0] must be an object"],
    ),
    (
        "json-span-number",
        b'{"resourceSpans": [{"scopeSpans": [{"spans": [5]}]}]}',
        "application/json",
        None,
        400,
        ["resourceSpans[0].scopeSpans[0].spans[0] must be an object"],
    ),
    (
        "json-traceId-number",
        _json_span(traceId=5),
        "application/json",
        None,
        400,
        ["spans[0].traceId must be a hex string"],
    ),
    (
        "json-traceId-not-hex",
        _json_span(traceId="zz" * 16),
        "application/json",
        None,
        400,
        ["spans[0].traceId is not hex"],
    ),
    (
        "json-traceId-short",
        _json_span(traceId="0102030405060708"),
        "application/json",
        None,
        400,
        ["spans[0].traceId must be 32 hex digits, got 16"],
    ),
    (
        "json-spanId-long",
        _json_span(spanId=_T),
        "application/json",
        None,
        400,
        ["spans[0].spanId must be 16 hex digits, got 32"],
    ),
    (
        "json-parentSpanId-short",
        _json_span(parentSpanId="0102"),
        "application/json",
        None,
        400,
        ["spans[0].parentSpanId must be 16 hex digits, got 4"],
    ),
    (
        "json-zero-traceId",
        _json_span(traceId="0" * 32),
        "application/json",
        None,
        400,
        ["'json-span' has an all-zero trace_id or span_id"],
    ),
    (
        "json-name-number",
        _json_span(name=5),
        "application/json",
        None,
        400,
        ["not a valid OTLP/JSON ExportTraceServiceRequest", "name"],
    ),
    (
        "json-time-not-number",
        _json_span(startTimeUnixNano="yesterday"),
        "application/json",
        None,
        400,
        ["not a valid OTLP/JSON ExportTraceServiceRequest", "startTimeUnixNano"],
    ),
    (
        "json-attributes-object",
        _json_span(attributes={"k": "v"}),
        "application/json",
        None,
        400,
        ["not a valid OTLP/JSON ExportTraceServiceRequest", "attributes"],
    ),
    (
        "json-lone-surrogate",
        _json_span(name="\ud800"),
        "application/json",
        None,
        400,
        ["not a valid OTLP/JSON ExportTraceServiceRequest", "surrogate"],
    ),
    (
        "text-plain",
        b"hello collector",
        "text/plain",
        None,
        415,
        ["Content-Type 'text/plain' is not OTLP", "use application/x-protobuf or application/json"],
    ),
    ("form", b"a=1", "application/x-www-form-urlencoded", None, 415, ["is not OTLP"]),
    (
        "no-content-type",
        request_with_span()[0].SerializeToString(),
        None,
        None,
        415,
        ["Content-Type '(none)' is not OTLP"],
    ),
    (
        "encoding-br",
        gzip.compress(b"x"),
        "application/x-protobuf",
        "br",
        415,
        ["Content-Encoding 'br' is not supported", "send gzip or no encoding"],
    ),
    (
        "encoding-deflate",
        zlib.compress(b"x"),
        "application/x-protobuf",
        "deflate",
        415,
        ["Content-Encoding 'deflate' is not supported"],
    ),
    (
        "gzip-invalid",
        b"this is not gzip at all",
        "application/x-protobuf",
        "gzip",
        400,
        ["body is not valid gzip"],
    ),
    (
        "gzip-truncated",
        gzip.compress(request_with_span()[0].SerializeToString())[:-12],
        "application/x-protobuf",
        "gzip",
        400,
        ["body is truncated gzip"],
    ),
    (
        "gzip-of-garbage",
        gzip.compress(b"\xff\xfe\xfd garbage"),
        "application/x-protobuf",
        "gzip",
        400,
        ["not a valid OTLP ExportTraceServiceRequest protobuf"],
    ),
]


@pytest.mark.parametrize(
    ("body", "content_type", "encoding", "status", "fragments"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_BODIES],
)
def test_malformed_http_body_is_refused(
    collector: CollectorProcess,
    body: bytes,
    content_type: str | None,
    encoding: str | None,
    status: int,
    fragments: list[str],
) -> None:
    before = snapshot(collector)
    assert_refused(post(collector, body, content_type, encoding), status, *fragments)
    assert_unharmed(collector, before)


# -- sizes ------------------------------------------------------------------------------


def _declared_oversize(c: CollectorProcess, size: int) -> tuple[int, dict[str, Any], float]:
    """Declare ``size`` bytes in Content-Length but send no body; return the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", c.http_port, timeout=10)
    try:
        conn.putrequest("POST", "/v1/traces")
        conn.putheader("Content-Type", "application/x-protobuf")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        start = time.monotonic()
        resp = conn.getresponse()
        body = json.loads(resp.read())
        return resp.status, body, time.monotonic() - start
    finally:
        conn.close()


def test_declared_oversize_body_is_refused_before_it_is_sent(collector: CollectorProcess) -> None:
    """The collector answers from the Content-Length header alone (a 10 s socket timeout
    would trip if it waited for the 16 MiB that never come)."""
    before = snapshot(collector)
    status, body, _ = _declared_oversize(collector, DEFAULT_MAX_REQUEST + 1)
    assert 400 <= status < 500
    assert body["code"] == status
    assert_unharmed(collector, before)


def test_declared_oversize_body_is_413(collector: CollectorProcess) -> None:
    status, body, _ = _declared_oversize(collector, DEFAULT_MAX_REQUEST + 1)
    assert status == 413
    assert f"exceeds {DEFAULT_MAX_REQUEST} bytes" in body["message"]


def _chunks(total: int, size: int = 1 << 20) -> Iterator[bytes]:
    block = b"\x0a" * size
    while total > 0:
        yield block[: min(size, total)]
        total -= size


def test_chunked_body_over_the_limit_is_413(collector: CollectorProcess) -> None:
    before = snapshot(collector)
    with httpx.Client(timeout=60) as client:
        req = client.build_request(
            "POST",
            f"{collector.url}/v1/traces",
            content=_chunks(DEFAULT_MAX_REQUEST + 1024),
            headers={"content-type": "application/x-protobuf"},
        )
        assert "content-length" not in req.headers
        assert req.headers["transfer-encoding"] == "chunked"
        resp = client.send(req)
    assert_refused(resp, 413, f"request body exceeds {DEFAULT_MAX_REQUEST} bytes")
    assert_unharmed(collector, before)


def test_gzip_bomb_is_413(collector: CollectorProcess) -> None:
    bomb = gzip_bomb(DEFAULT_MAX_DECODED + 1)
    assert len(bomb) < DEFAULT_MAX_REQUEST // 100  # small on the wire, huge inflated
    before = snapshot(collector)
    resp = post(collector, bomb, "application/x-protobuf", "gzip")
    assert_refused(resp, 413, f"decompressed body exceeds {DEFAULT_MAX_DECODED} bytes")
    assert_unharmed(collector, before)


def test_small_limits_from_the_command_line(small: CollectorProcess) -> None:
    """--max-request-bytes and --max-attributes take effect, over HTTP and gRPC."""
    before = snapshot(small)
    with httpx.Client(timeout=30) as client:
        resp = client.post(
            f"{small.url}/v1/traces",
            content=_chunks(SMALL_MAX_REQUEST + 1, 1024),
            headers={"content-type": "application/x-protobuf"},
        )
    assert_refused(resp, 413, f"request body exceeds {SMALL_MAX_REQUEST} bytes")

    over, _ = request_with_span("nine", {f"k{i}": "v" for i in range(SMALL_MAX_ATTRIBUTES + 1)})
    resp = post(small, over.SerializeToString(), "application/x-protobuf")
    assert_refused(resp, 400, "'nine' has 9 attributes; the limit is 8")

    big, _ = request_with_span("big", {"blob": "x" * (SMALL_MAX_REQUEST + 100)})
    err = grpc_refusal(small, big.SerializeToString(), small.grpc_port)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_unharmed(small, before)

    # exactly at the limit is accepted: the limits are not off by one
    at_limit, _ = request_with_span("eight", {f"k{i}": "v" for i in range(SMALL_MAX_ATTRIBUTES)})
    assert post(small, at_limit.SerializeToString(), "application/x-protobuf").status_code == 200
    assert small.health()["spans_written"] == before.spans_written + 1


# -- invalid UTF-8 in protobuf strings --------------------------------------------------


def test_hand_encoded_request_is_valid_otlp(collector: CollectorProcess) -> None:
    """Control: the hand encoder writes what the official classes write, and the collector
    stores it, so the refusals below are due to the invalid UTF-8 alone."""
    expected = ExportTraceServiceRequest()
    rs = expected.resource_spans.add()
    set_attr(rs.resource.attributes, "service.name", "raw-service")
    ss = rs.scope_spans.add()
    ss.scope.name = "raw-scope"
    span = ss.spans.add(trace_id=RAW_TRACE_ID, span_id=RAW_SPAN_ID, name="raw-span")
    set_attr(span.attributes, "raw.key", "raw value")
    assert ExportTraceServiceRequest.FromString(raw_request()) == expected
    assert raw_request() == expected.SerializeToString()

    before = snapshot(collector)
    assert post(collector, raw_request(), "application/x-protobuf").status_code == 200
    assert collector.health()["spans_written"] == before.spans_written + 1


@pytest.mark.parametrize(
    "where", ["span_name", "attr_key", "attr_value", "resource_value", "scope_name"]
)
def test_invalid_utf8_in_protobuf_string_is_400(collector: CollectorProcess, where: str) -> None:
    body = raw_request(**{where: INVALID_UTF8})
    with pytest.raises(DecodeError):  # really invalid: the official parser refuses it too
        ExportTraceServiceRequest.FromString(body)
    before = snapshot(collector)
    resp = post(collector, body, "application/x-protobuf")
    assert_refused(
        resp, 400, "not a valid OTLP ExportTraceServiceRequest protobuf", "strings are valid UTF-8"
    )
    resp = post(collector, gzip.compress(body), "application/x-protobuf", "gzip")
    assert_refused(resp, 400, "strings are valid UTF-8")
    assert_unharmed(collector, before)


# -- ids and attribute limits -----------------------------------------------------------


def _with_span(**fields: bytes | int) -> bytes:
    req, span = request_with_span("bad-ids")
    for name, value in fields.items():
        setattr(span, name, value)
    return req.SerializeToString()


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        pytest.param(
            {"trace_id": os.urandom(8)},
            "invalid id: trace_id must be 16 bytes",
            id="trace-id-8-bytes",
        ),
        pytest.param({"trace_id": os.urandom(32)}, "invalid id", id="trace-id-32-bytes"),
        pytest.param({"trace_id": b""}, "invalid id", id="trace-id-missing"),
        pytest.param({"span_id": os.urandom(4)}, "span_id 8 bytes", id="span-id-4-bytes"),
        pytest.param({"span_id": b""}, "invalid id", id="span-id-missing"),
        pytest.param({"trace_id": bytes(16)}, "all-zero trace_id or span_id", id="zero-trace-id"),
        pytest.param({"span_id": bytes(8)}, "all-zero trace_id or span_id", id="zero-span-id"),
        pytest.param(
            {"parent_span_id": os.urandom(3)},
            "parent_span_id that is not 8 bytes",
            id="parent-span-id-3-bytes",
        ),
    ],
)
def test_invalid_ids_are_400(
    collector: CollectorProcess, fields: dict[str, bytes], fragment: str
) -> None:
    before = snapshot(collector)
    resp = post(collector, _with_span(**fields), "application/x-protobuf")
    assert_refused(resp, 400, "span 'bad-ids'", fragment)
    assert_unharmed(collector, before)


def _too_many(kind: str, n: int) -> bytes:
    req, span = request_with_span("crowded")
    if kind == "span":
        for i in range(n):
            set_attr(span.attributes, f"attr.{i}", f"value {i}")
    elif kind == "resource":
        for i in range(n - 1):  # service.name is already there
            set_attr(req.resource_spans[0].resource.attributes, f"res.{i}", "v")
    elif kind == "event":
        event = span.events.add(name="e", time_unix_nano=span.start_time_unix_nano)
        for i in range(n):
            set_attr(event.attributes, f"ev.{i}", "v")
    elif kind == "events":
        for i in range(n):
            span.events.add(name=f"e{i}", time_unix_nano=span.start_time_unix_nano)
    elif kind == "links":
        for _ in range(n):
            span.links.add(trace_id=os.urandom(16), span_id=os.urandom(8))
    return req.SerializeToString()


@pytest.mark.parametrize(
    ("kind", "n", "fragment"),
    [
        pytest.param(
            "span",
            DEFAULT_MAX_ATTRIBUTES + 1,
            "span 'crowded' has 1025 attributes; the limit is 1024",
            id="span-1025",
        ),
        pytest.param(
            "span",
            50_000,
            "span 'crowded' has 50000 attributes; the limit is 1024",
            id="span-50000",
        ),
        pytest.param(
            "resource",
            DEFAULT_MAX_ATTRIBUTES + 1,
            "resource_spans[0].resource has 1025 attributes; the limit is 1024",
            id="resource-1025",
        ),
        pytest.param(
            "event",
            DEFAULT_MAX_ATTRIBUTES + 1,
            "an event of span 'crowded' has too many attributes",
            id="event-1025",
        ),
        pytest.param(
            "events", 1025, "span 'crowded' has too many events or links", id="events-1025"
        ),
        pytest.param("links", 1025, "span 'crowded' has too many events or links", id="links-1025"),
    ],
)
def test_too_many_attributes_events_or_links_is_400(
    collector: CollectorProcess, kind: str, n: int, fragment: str
) -> None:
    before = snapshot(collector)
    assert_refused(post(collector, _too_many(kind, n), "application/x-protobuf"), 400, fragment)
    assert_unharmed(collector, before)


def test_too_many_link_attributes_is_400(collector: CollectorProcess) -> None:
    req, span = request_with_span("crowded-link")
    link = span.links.add(trace_id=os.urandom(16), span_id=os.urandom(8))
    for i in range(DEFAULT_MAX_ATTRIBUTES + 1):
        set_attr(link.attributes, f"l.{i}", "v")
    resp = post(collector, req.SerializeToString(), "application/x-protobuf")
    assert_refused(resp, 400, "attributes")


# -- requests that are refused wrongly (product bugs) -----------------------------------


DEEP_JSON = b"[" * 100_000


def test_deeply_nested_json_leaves_the_collector_healthy(collector: CollectorProcess) -> None:
    before = snapshot(collector)
    assert post(collector, DEEP_JSON, "application/json").status_code >= 400
    assert_unharmed(collector, before)


def test_deeply_nested_json_is_400(collector: CollectorProcess) -> None:
    assert_refused(post(collector, DEEP_JSON, "application/json"), 400, "JSON")


def test_json_with_unknown_field_is_accepted(collector: CollectorProcess) -> None:
    body = _json_span(
        traceId=os.urandom(16).hex(), spanId=os.urandom(8).hex(), fieldFromAFutureOtlp=1
    )
    assert post(collector, body, "application/json").status_code == 200


def test_multi_member_gzip_is_not_silently_truncated(collector: CollectorProcess) -> None:
    sid = "bad-input-gzip-members"
    first, _ = request_with_span("member-1", {"agentgov.session.id": sid})
    second, _ = request_with_span("member-2", {"agentgov.session.id": sid})
    body = gzip.compress(first.SerializeToString()) + gzip.compress(second.SerializeToString())
    assert gzip.decompress(body) == first.SerializeToString() + second.SerializeToString()
    before = snapshot(collector)
    resp = post(collector, body, "application/x-protobuf", "gzip")
    if resp.status_code == 200:  # accepted: then both members must be stored
        assert collector.health()["spans_written"] == before.spans_written + 2
    else:
        assert_refused(resp, 400, "gzip")


def test_wrong_wire_type_is_not_answered_retry_later(collector: CollectorProcess) -> None:
    body = _varint(1 << 3 | 0) + _varint(1)  # field 1 (resource_spans) as a varint
    ExportTraceServiceRequest.FromString(body)  # the Python parser keeps it as unknown
    before = snapshot(collector)
    resp = post(collector, body, "application/x-protobuf")
    # ClickHouse refuses the unknown encoding; the collector re-encodes the request without
    # it (an empty request) and acknowledges it instead of asking for endless retries
    assert resp.status_code == 200, resp.text
    assert snapshot(collector).sessions == before.sessions


def test_times_past_datetime64_range_are_400(collector: CollectorProcess) -> None:
    assert_refused(
        post(
            collector,
            _with_span(start_time_unix_nano=2**63 + 5, end_time_unix_nano=5),
            "application/x-protobuf",
        ),
        400,
        "past 2262-04-11",
    )


# -- gRPC -------------------------------------------------------------------------------


def _zero_ids() -> bytes:
    return _with_span(trace_id=bytes(16))


GRPC_BAD = [
    pytest.param(
        lambda: b"\xff\xfe\xfd not protobuf \x00\x01",
        "not a valid OTLP ExportTraceServiceRequest protobuf",
        id="garbage",
    ),
    pytest.param(
        lambda: raw_request(span_name=INVALID_UTF8), "strings are valid UTF-8", id="invalid-utf8"
    ),
    pytest.param(_zero_ids, "all-zero trace_id or span_id", id="zero-ids"),
    pytest.param(
        lambda: _too_many("span", DEFAULT_MAX_ATTRIBUTES + 1),
        "has 1025 attributes; the limit is 1024",
        id="too-many-attributes",
    ),
]


@pytest.mark.parametrize(("make_body", "fragment"), GRPC_BAD)
def test_grpc_bad_request_is_invalid_argument(
    collector: CollectorProcess, make_body: Any, fragment: str
) -> None:
    before = snapshot(collector)
    err = grpc_refusal(collector, make_body())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (err.details() or "")
    assert_unharmed(collector, before)
    # the gRPC receiver still serves: a valid (empty) export succeeds
    assert grpc_export(collector, ExportTraceServiceRequest().SerializeToString()) == b""


# -- the query API: ids that look like SQL ----------------------------------------------

SQL_IDS = [
    "x' OR 1=1 --",
    "'; DROP TABLE otel_traces; --",
    "s1'); DROP TABLE agentgov_spans; --",
    "sess 1",
    "sess\tTAB",
    '" OR ""="',
    "{sid:String}",
    "a" * 201,
    "x" * 129,
    "sess#frag",
    "sess?limit=1",
    "caf\u00e9",
]


@pytest.mark.parametrize("sid", SQL_IDS, ids=lambda s: repr(s)[:24])
def test_sql_looking_session_id_is_400(collector: CollectorProcess, seeded: Seed, sid: str) -> None:
    before = snapshot(collector)
    path = quote(sid, safe="")
    for url in (
        f"/api/v1/sessions/{path}",
        f"/api/v1/sessions/{path}/graph",
        f"/api/v1/sessions/{path}/audit",
    ):
        resp = collector.get(url)
        assert resp.status_code == 400, (url, resp.text)
        assert resp.json()["error"].startswith(f"invalid session id {sid!r}: use 1-128 characters")
    resp = collector.get("/api/v1/fanout", session=sid)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"].startswith(f"invalid session id {sid!r}")
    assert_unharmed(collector, before)
    # the data behind the tables is intact and still queryable
    assert session_summary(collector, seeded.session_id) == seeded.summary


def test_store_still_works_after_injection_attempts(
    collector: CollectorProcess, seeded: Seed
) -> None:
    """After every hostile id above, otel_traces and the views still take and serve spans."""
    for sid in SQL_IDS:
        assert collector.get(f"/api/v1/sessions/{quote(sid, safe='')}").status_code == 400
    audit = collector.get(f"/api/v1/sessions/{seeded.session_id}/audit").json()["commands"]
    assert [c["command"] for c in audit] == seeded.commands
    provider = make_provider(collector.url, service="bad-input-after")
    gov = Governance(provider)
    with gov.session("still alive") as session, session.agent("probe") as probe:
        with probe.tool("shell", "true"):
            pass
    provider.force_flush()
    provider.shutdown()
    fresh = wait_for(lambda: session_summary(collector, session.session_id))
    assert (fresh["spans"], fresh["tool_calls"], fresh["status"]) == (2, 1, "completed")
    assert session_summary(collector, seeded.session_id) == seeded.summary


def test_session_ids_cannot_hold_a_slash(collector: CollectorProcess) -> None:
    # ids are URL path segments: a slash is refused where the id is made, with the fix named
    gov = Governance(make_provider(collector.url, service="bad-input-slash"))
    with pytest.raises(InvalidIdError, match=r"letters, digits and \. _ : @ -"):
        gov.session("ids may not contain slashes", session_id="team/alpha")
    resp = collector.get(f"/api/v1/sessions/{quote('team/alpha', safe='')}")
    assert resp.status_code in (400, 404)


def test_unknown_session_is_404(collector: CollectorProcess, seeded: Seed) -> None:
    sid = "sess-00000000000000000000000000000000"
    for url in (
        f"/api/v1/sessions/{sid}",
        f"/api/v1/sessions/{sid}/graph",
        f"/api/v1/sessions/{sid}/audit",
    ):
        resp = collector.get(url)
        assert resp.status_code == 404, (url, resp.text)
        assert resp.json()["error"] == f"unknown session {sid!r}: see GET /api/v1/sessions"
    resp = collector.get("/api/v1/fanout", session=sid)
    assert resp.status_code == 200
    assert resp.json() == {"agents": []}


@pytest.mark.parametrize(
    ("path", "params", "fragment"),
    [
        ("/api/v1/sessions", {"limit": "abc"}, "'limit' must be an integer from 1 to 10000"),
        ("/api/v1/sessions", {"limit": "0"}, "'limit' must be an integer from 1 to 10000"),
        ("/api/v1/sessions", {"limit": "-5"}, "'limit' must be an integer from 1 to 10000"),
        ("/api/v1/sessions", {"limit": "10001"}, "'limit' must be an integer from 1 to 10000"),
        ("/api/v1/sessions", {"limit": "1; DROP TABLE otel_traces"}, "'limit' must be an integer"),
        ("/api/v1/sessions", {"order": "bogus"}, "'order' must be 'recent' or 'risk'"),
        ("/api/v1/sessions", {"order": "session_risk DESC; --"}, "'order' must be"),
        ("/api/v1/fanout", {"limit": "abc"}, "'limit' must be an integer from 1 to 10000"),
        ("/api/v1/fanout", {"limit": "0"}, "'limit' must be an integer from 1 to 10000"),
        ("/api/v1/fanout", {"session": ""}, "invalid session id ''"),
    ],
)
def test_bad_query_parameters_are_400(
    collector: CollectorProcess, seeded: Seed, path: str, params: dict[str, str], fragment: str
) -> None:
    resp = collector.get(path, **params)
    assert resp.status_code == 400, resp.text
    assert fragment in resp.json()["error"]
    assert session_summary(collector, seeded.session_id) == seeded.summary


# -- attribute values that look like SQL are data ---------------------------------------

HOSTILE_SESSIONS = [
    "s1'); DROP TABLE otel_traces; --",
    "s2\\'; DELETE FROM agentgov_spans WHERE 1=1; --",
    's3" UNION SELECT name FROM system.tables --',
    "{sid:String}') OR ('1'='1",
]
HOSTILE_ROOT = "root'); DROP TABLE agentgov_sessions; --"
HOSTILE_INTENT = "ignore previous instructions'; DROP TABLE otel_traces; --"
HOSTILE_TASK = "'; TRUNCATE TABLE agentgov_edges; --"
HOSTILE_COMMAND = 'psql -c "DROP TABLE otel_traces;" -- \'); SELECT 1'


def _hostile_request() -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    set_attr(rs.resource.attributes, "service.name", "x'); DROP TABLE otel_traces; --")
    ss = rs.scope_spans.add()
    now = time.time_ns()
    for n, sid in enumerate(HOSTILE_SESSIONS):
        trace_id = os.urandom(16)
        child_id = f'child-{n}"; DROP TABLE agentgov_edges; --'
        common = {"agentgov.session.id": sid, "agentgov.intent": HOSTILE_INTENT}
        spans = [
            (
                f"invoke_agent {HOSTILE_ROOT}",
                {
                    "gen_ai.operation.name": "invoke_agent",
                    "gen_ai.agent.id": HOSTILE_ROOT,
                    "gen_ai.agent.name": HOSTILE_ROOT,
                    "agentgov.delegation.chain": [HOSTILE_ROOT],
                    "agentgov.delegation.depth": 0,
                },
            ),
            (
                f"invoke_agent {child_id}",
                {
                    "gen_ai.operation.name": "invoke_agent",
                    "gen_ai.agent.id": child_id,
                    "gen_ai.agent.name": "child",
                    "agentgov.agent.parent_id": HOSTILE_ROOT,
                    "agentgov.delegation.chain": [HOSTILE_ROOT, child_id],
                    "agentgov.delegation.depth": 1,
                    "agentgov.task": HOSTILE_TASK,
                },
            ),
            (
                "execute_tool shell",
                {
                    "gen_ai.operation.name": "execute_tool",
                    "gen_ai.tool.name": "shell",
                    "gen_ai.agent.id": child_id,
                    "gen_ai.agent.name": "child",
                    "agentgov.agent.parent_id": HOSTILE_ROOT,
                    "agentgov.delegation.chain": [HOSTILE_ROOT, child_id],
                    "agentgov.delegation.depth": 1,
                    "agentgov.command": HOSTILE_COMMAND,
                },
            ),
        ]
        for i, (name, attrs) in enumerate(spans):
            span = ss.spans.add(trace_id=trace_id, span_id=os.urandom(8), name=name)
            span.start_time_unix_nano = now + i * 1000
            span.end_time_unix_nano = now + 1_000_000
            for key, value in {**common, **attrs}.items():
                set_attr(span.attributes, key, value)
    return req


def test_sql_looking_attribute_values_are_stored_verbatim(
    collector: CollectorProcess, seeded: Seed
) -> None:
    before = snapshot(collector)
    resp = post(collector, _hostile_request().SerializeToString(), "application/x-protobuf")
    assert resp.status_code == 200, resp.text
    assert collector.health()["spans_written"] == before.spans_written + 3 * len(HOSTILE_SESSIONS)

    def hostile_rows() -> dict[str, dict[str, Any]] | None:
        rows = collector.get("/api/v1/sessions", limit=10_000).json()["sessions"]
        found = {r["session_id"]: r for r in rows if r["session_id"] in HOSTILE_SESSIONS}
        return found if len(found) == len(HOSTILE_SESSIONS) else None

    rows = wait_for(hostile_rows)
    for sid in HOSTILE_SESSIONS:
        row = rows[sid]
        assert row["intent"] == HOSTILE_INTENT
        assert (row["spans"], row["agents"], row["handoffs"], row["tool_calls"]) == (3, 2, 1, 1)
        assert row["max_depth"] == 1
        # the SQL text is scored as a command (drop table: destructive + write scope)
        assert row["max_command_risk"] == 80
        assert row["status"] == "completed"
        # not a valid id, so not addressable by path; refused, never interpolated
        assert collector.get(f"/api/v1/sessions/{quote(sid, safe='')}").status_code == 400

    fanout = collector.get("/api/v1/fanout", limit=10_000).json()["agents"]
    edges = {r["session_id"]: r for r in fanout if r["session_id"] in HOSTILE_SESSIONS}
    assert set(edges) == set(HOSTILE_SESSIONS)
    for row in edges.values():
        assert row["agent_id"] == HOSTILE_ROOT
        assert (row["children"], row["distinct_tasks"], row["tasks"]) == (1, 1, [HOSTILE_TASK])

    # nothing else changed: the other sessions are exactly as before, tables intact
    others = [r for r in snapshot(collector).sessions if r["session_id"] not in HOSTILE_SESSIONS]
    assert others == before.sessions
    assert session_summary(collector, seeded.session_id) == seeded.summary
    resp = collector.get(f"/api/v1/sessions/{seeded.session_id}/graph")
    assert len(resp.json()["nodes"]) == 2
