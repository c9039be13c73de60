"""One-call set-up of an OpenTelemetry tracer provider that exports to the collector.

The OpenTelemetry SDK is imported when :func:`configure` is called, never at import time:
agents that are configured by ``opentelemetry-instrument`` (or bring their own provider)
load only the OpenTelemetry API.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from opentelemetry import trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider


def configure(
    service_name: str | None = None,
    endpoint: str | None = None,
    set_global: bool = True,
    api_key: str | None = None,
) -> TracerProvider:
    """Create a tracer provider that batches spans to the OTLP/HTTP exporter.

    Standard ``OTEL_*`` variables apply (``OTEL_EXPORTER_OTLP_ENDPOINT``,
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, headers, timeouts, ``OTEL_SERVICE_NAME``,
    ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*``); ``endpoint`` overrides the base URL,
    for example ``http://127.0.0.1:4318``. Call ``provider.shutdown()`` before exit so
    buffered spans are flushed.

    A collector with API keys accepts spans only with a key: unless the ``OTEL_*`` headers
    variables set one, spans are sent with ``api_key`` or ``AGENTGOV_API_KEY`` (the key
    agents already hold for the governor).
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attrs = {}
    if service_name or not os.environ.get("OTEL_SERVICE_NAME"):
        attrs[SERVICE_NAME] = service_name or "agentgov-agent"
    provider = TracerProvider(resource=Resource.create(attrs))
    traces_endpoint = f"{endpoint.rstrip('/')}/v1/traces" if endpoint else None
    headers = None
    key = api_key or os.environ.get("AGENTGOV_API_KEY")
    if key and not (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
        or os.environ.get("OTEL_EXPORTER_OTLP_HEADERS")
    ):
        headers = {"Authorization": f"Bearer {key}"}
    exporter = OTLPSpanExporter(endpoint=traces_endpoint, headers=headers)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    if set_global:
        trace.set_tracer_provider(provider)
    return provider
