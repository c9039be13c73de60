"""Decoding and validating OTLP trace requests before they are queued for storage.

Everything a client can get wrong is caught here, with a message that names the problem,
so a bad request is refused alone and never reaches (or poisons) a storage batch.
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class OtlpError(ValueError):
    """A request the receiver refuses; ``status`` is the HTTP status to answer with."""

    status = 400


class PayloadTooLarge(OtlpError):
    status = 413


class UnsupportedMediaType(OtlpError):
    status = 415


@dataclass(frozen=True)
class Limits:
    """Receiver limits; every one is a flag of ``agentgov collector``."""

    max_request_bytes: int = 16 << 20  # as received (possibly compressed)
    max_decoded_bytes: int = 64 << 20  # after decompression
    max_spans_per_request: int = 200_000
    max_attributes: int = 1024  # per span, resource, event or link
    max_events: int = 1024  # per span
    max_links: int = 1024  # per span


@dataclass(frozen=True)
class DecodedRequest:
    payload: bytes  # a serialized ExportTraceServiceRequest
    spans: int
    #: hex trace ids of the request's spans (to repair derived tables after a crash)
    trace_ids: tuple[str, ...] = ()


def decompress(body: bytes, encoding: str, limits: Limits) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        if len(body) > limits.max_decoded_bytes:
            raise PayloadTooLarge(f"request body exceeds {limits.max_decoded_bytes} bytes")
        return body
    if encoding != "gzip":
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported: send gzip or no encoding"
        )
    # A gzip body may hold several members (RFC 1952); each is inflated in turn, and the
    # running total is capped so that a small body cannot expand without bound.
    out = bytearray()
    rest = body
    while True:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        room = limits.max_decoded_bytes - len(out)
        try:
            out += inflater.decompress(rest, room + 1)
        except zlib.error as exc:
            raise OtlpError(f"body is not valid gzip: {exc}") from exc
        if len(out) > limits.max_decoded_bytes or inflater.unconsumed_tail:
            raise PayloadTooLarge(
                f"decompressed body exceeds {limits.max_decoded_bytes} bytes; send smaller batches"
            )
        if not inflater.eof:
            raise OtlpError("body is truncated gzip")
        rest = inflater.unused_data
        if not rest:
            return bytes(out)


def parse_protobuf(data: bytes) -> ExportTraceServiceRequest:
    try:
        return ExportTraceServiceRequest.FromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise OtlpError(
            f"body is not a valid OTLP ExportTraceServiceRequest protobuf ({exc}); "
            "check Content-Type and that strings are valid UTF-8"
        ) from exc


#: the last nanosecond a DateTime64(9) can hold (2262-04-11)
_MAX_TIME = 2**63 - 1

_ID_FIELDS = {"traceId": 16, "spanId": 8, "parentSpanId": 8}


def _hex_ids_to_base64(obj: dict[str, Any], where: str) -> None:
    # OTLP/JSON writes ids as hex; the protobuf JSON mapping expects base64.
    for key, size in _ID_FIELDS.items():
        value = obj.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise OtlpError(f"{where}.{key} must be a hex string")
        try:
            raw = bytes.fromhex(value)
        except ValueError as exc:
            raise OtlpError(f"{where}.{key} is not hex: {value[:40]!r}") from exc
        if len(raw) != size:
            raise OtlpError(f"{where}.{key} must be {size * 2} hex digits, got {len(value)}")
        obj[key] = base64.b64encode(raw).decode()


def _list(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    value = obj.get(key, [])
    if not isinstance(value, list):
        raise OtlpError(f"{where}.{key} must be an array")
    return value


def parse_json(data: bytes) -> ExportTraceServiceRequest:
    try:
        doc = json.loads(data)
    except RecursionError as exc:
        raise OtlpError("body is JSON nested too deeply to be an OTLP request") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise OtlpError(f"body is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise OtlpError("body must be a JSON object with 'resourceSpans'")
    for i, rs in enumerate(_list(doc, "resourceSpans", "")):
        if not isinstance(rs, dict):
            raise OtlpError(f"resourceSpans[{i}] must be an object")
        for j, ss in enumerate(_list(rs, "scopeSpans", f"resourceSpans[{i}]")):
            if not isinstance(ss, dict):
                raise OtlpError(f"resourceSpans[{i}].scopeSpans[{j}] must be an object")
            for k, span in enumerate(_list(ss, "spans", f"resourceSpans[{i}].scopeSpans[{j}]")):
                where = f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]"
                if not isinstance(span, dict):
                    raise OtlpError(f"{where} must be an object")
                _hex_ids_to_base64(span, where)
                for n, link in enumerate(_list(span, "links", where)):
                    if isinstance(link, dict):
                        _hex_ids_to_base64(link, f"{where}.links[{n}]")
    try:
        # OTLP/JSON receivers must ignore fields they do not know (newer OTLP versions)
        return json_format.ParseDict(doc, ExportTraceServiceRequest(), ignore_unknown_fields=True)
    except RecursionError as exc:
        raise OtlpError("body is JSON nested too deeply to be an OTLP request") from exc
    except (json_format.ParseError, ValueError, TypeError) as exc:
        raise OtlpError(f"body is not a valid OTLP/JSON ExportTraceServiceRequest: {exc}") from exc


def validate(request: ExportTraceServiceRequest, limits: Limits) -> tuple[int, tuple[str, ...]]:
    """Check ids and sizes; return the number of spans and their distinct trace ids."""
    count = 0
    traces: set[bytes] = set()
    max_attrs = limits.max_attributes
    for i, rs in enumerate(request.resource_spans):
        if len(rs.resource.attributes) > max_attrs:
            raise OtlpError(
                f"resource_spans[{i}].resource has {len(rs.resource.attributes)} attributes; "
                f"the limit is {max_attrs}"
            )
        for ss in rs.scope_spans:
            for span in ss.spans:
                count += 1
                traces.add(span.trace_id)
                if len(span.trace_id) != 16 or len(span.span_id) != 8:
                    raise OtlpError(
                        f"span {span.name!r} has an invalid id: trace_id must be 16 bytes and "
                        "span_id 8 bytes (all-zero ids are invalid too)"
                    )
                if span.trace_id == bytes(16) or span.span_id == bytes(8):
                    raise OtlpError(f"span {span.name!r} has an all-zero trace_id or span_id")
                if span.parent_span_id and len(span.parent_span_id) != 8:
                    raise OtlpError(f"span {span.name!r} has a parent_span_id that is not 8 bytes")
                if len(span.attributes) > max_attrs:
                    raise OtlpError(
                        f"span {span.name!r} has {len(span.attributes)} attributes; "
                        f"the limit is {max_attrs}"
                    )
                if len(span.events) > limits.max_events or len(span.links) > limits.max_links:
                    raise OtlpError(
                        f"span {span.name!r} has too many events or links "
                        f"(limits {limits.max_events} and {limits.max_links})"
                    )
                if span.start_time_unix_nano > _MAX_TIME or span.end_time_unix_nano > _MAX_TIME:
                    raise OtlpError(
                        f"span {span.name!r} has a time past 2262-04-11, the last nanosecond "
                        "a DateTime64(9) holds: check that times are Unix nanoseconds"
                    )
                for event in span.events:
                    if len(event.attributes) > max_attrs:
                        raise OtlpError(f"an event of span {span.name!r} has too many attributes")
                    if event.time_unix_nano > _MAX_TIME:
                        raise OtlpError(f"an event of span {span.name!r} has a time past 2262")
                for link in span.links:
                    if len(link.attributes) > max_attrs:
                        raise OtlpError(f"a link of span {span.name!r} has too many attributes")
    if count > limits.max_spans_per_request:
        raise PayloadTooLarge(
            f"request has {count} spans; the limit is {limits.max_spans_per_request} per request"
        )
    return count, tuple(t.hex() for t in traces)


def decode_http(
    body: bytes, content_type: str, content_encoding: str, limits: Limits
) -> DecodedRequest:
    """Decode an OTLP/HTTP body (protobuf or JSON, optionally gzip) into a checked request."""
    media = content_type.split(";", 1)[0].strip().lower()
    data = decompress(body, content_encoding, limits)
    if media == "application/x-protobuf":
        request = parse_protobuf(data)
        payload = data
    elif media == "application/json":
        request = parse_json(data)
        payload = request.SerializeToString()
    else:
        raise UnsupportedMediaType(
            f"Content-Type {content_type or '(none)'!r} is not OTLP: "
            "use application/x-protobuf or application/json"
        )
    return DecodedRequest(payload, *validate(request, limits))


def decode_grpc(data: bytes, limits: Limits) -> DecodedRequest:
    """Decode the raw bytes of a gRPC Export call."""
    request = parse_protobuf(data)
    return DecodedRequest(data, *validate(request, limits))
