"""OTLP/gRPC trace receiver: ``opentelemetry.proto.collector.trace.v1.TraceService/Export``."""

from __future__ import annotations

from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from agentgov.collector.receiver.decode import Limits, OtlpError, decode_grpc
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
    def __init__(self, writer: SpanWriter, limits: Limits) -> None:
        self.writer = writer
        self.limits = limits

    def __call__(self, data: bytes, context: grpc.ServicerContext) -> ExportTraceServiceResponse:
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
    writer: SpanWriter, limits: Limits, host: str, port: int, workers: int = 8
) -> tuple[grpc.Server, int]:
    """Start the gRPC receiver; returns the server and the port it bound."""
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Export": grpc.unary_unary_rpc_method_handler(
                _Export(writer, limits),
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
