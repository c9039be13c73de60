"""OTLP/gRPC trace receiver: ``opentelemetry.proto.collector.trace.v1.TraceService/Export``."""

from __future__ import annotations

from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from agentgov.collector.auth import AuthError, KeyRing
from agentgov.collector.receiver.decode import Limits, OtlpError, decode_grpc
from agentgov.collector.receiver.otlp_http import OTLP_HEADERS_HINT
from agentgov.collector.store.writer import (
    SpanWriter,
    StoreRejected,
    WriterClosed,
    WriterOverloaded,
)

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


def _identity(data: bytes) -> bytes:
    return data


class _Export:
    def __init__(self, writer: SpanWriter, limits: Limits, keys: KeyRing) -> None:
        self.writer = writer
        self.limits = limits
        self.keys = keys

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if not self.keys.enabled:
            return
        authorization = next(
            (str(v) for k, v in context.invocation_metadata() if k == "authorization"), None
        )
        try:
            self.keys.authorize(authorization, "ingest")
        except AuthError as exc:
            code = (
                grpc.StatusCode.UNAUTHENTICATED
                if exc.status == 401
                else grpc.StatusCode.PERMISSION_DENIED
            )
            context.abort(code, f"{exc} (for OTLP exporters: {OTLP_HEADERS_HINT})")

    def __call__(self, data: bytes, context: grpc.ServicerContext) -> ExportTraceServiceResponse:
        self._authorize(context)
        try:
            decoded = decode_grpc(data, self.limits)
            future = self.writer.submit(decoded.payload, decoded.spans, decoded.trace_ids)
        except OtlpError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (WriterOverloaded, WriterClosed) as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        try:
            future.result()
        except StoreRejected as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"spans not stored, retry later: {exc}")
        return ExportTraceServiceResponse()


def start_grpc_server(
    writer: SpanWriter,
    limits: Limits,
    host: str,
    port: int,
    workers: int = 8,
    keys: KeyRing | None = None,
) -> tuple[grpc.Server, int]:
    """Start the gRPC receiver; returns the server and the port it bound."""
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Export": grpc.unary_unary_rpc_method_handler(
                _Export(writer, limits, keys or KeyRing([])),
                request_deserializer=_identity,
                response_serializer=ExportTraceServiceResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agentgov-grpc"),
        options=[
            ("grpc.max_receive_message_length", limits.max_request_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for OTLP/gRPC on {host}:{port}: is the port in use?")
    server.start()
    return server, bound
