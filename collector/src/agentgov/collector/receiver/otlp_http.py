"""OTLP/HTTP trace receiver: ``POST /v1/traces`` (protobuf or JSON, optionally gzip)."""

from __future__ import annotations

import asyncio

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from agentgov.collector.auth import AuthError, KeyRing
from agentgov.collector.receiver.decode import Limits, OtlpError, PayloadTooLarge, decode_http
from agentgov.collector.store.writer import (
    SpanWriter,
    StoreRejected,
    WriterClosed,
    WriterOverloaded,
)

OTLP_HEADERS_HINT = "set OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer%20<agent key>"

# Decoding a small body inline is cheaper than a hop to a worker thread.
_INLINE_DECODE_BYTES = 256 << 10
_EMPTY_PROTO = ExportTraceServiceResponse().SerializeToString()


def _error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse({"code": status, "message": message}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise OtlpError("Content-Length is not a number")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes; send smaller batches")
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes; send smaller batches")
    return bytes(chunks)


class OtlpHttpReceiver:
    """The ``/v1/traces`` endpoint, bound to a writer."""

    def __init__(self, writer: SpanWriter, limits: Limits, keys: KeyRing | None = None) -> None:
        self.writer = writer
        self.limits = limits
        self.keys = keys or KeyRing([])

    async def handle(self, request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        encoding = request.headers.get("content-encoding", "")
        try:
            # before the body is read: an unauthenticated sender costs no decoding
            self.keys.authorize(request.headers.get("authorization"), "ingest")
        except AuthError as exc:
            return _error(exc.status, f"{exc} (for OTLP exporters: {OTLP_HEADERS_HINT})")
        try:
            body = await _read_body(request, self.limits.max_request_bytes)
            if len(body) <= _INLINE_DECODE_BYTES:
                decoded = decode_http(body, content_type, encoding, self.limits)
            else:
                decoded = await run_in_threadpool(
                    decode_http, body, content_type, encoding, self.limits
                )
            future = self.writer.submit(decoded.payload, decoded.spans, decoded.trace_ids)
        except OtlpError as exc:
            return _error(exc.status, str(exc))
        except WriterOverloaded as exc:  # a full queue, or the store below its free-space floor
            return _error(503, str(exc), retry_after=exc.retry_after_s)
        except WriterClosed as exc:
            return _error(503, str(exc), retry_after=5)
        try:
            await asyncio.wrap_future(future)
        except StoreRejected as exc:  # the data itself: a retry cannot succeed
            return _error(400, str(exc))
        except Exception as exc:
            return _error(503, f"spans not stored, retry later: {exc}", retry_after=1)
        if content_type.split(";", 1)[0].strip().lower() == "application/json":
            return Response(b"{}", media_type="application/json")
        return Response(_EMPTY_PROTO, media_type="application/x-protobuf")
