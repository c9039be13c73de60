"""Instrumentation overhead: one governed agent span vs a bare OpenTelemetry SDK span.

All variants run on the same SDK tracer provider (BatchSpanProcessor, discarding exporter),
interleaved in one process, best of several rounds:

* bare span:          ``with tracer.start_as_current_span(name)`` and nothing else;
* bare + attributes:  the same span with the governance attributes set by hand;
* bare + attrs + baggage: and the lineage put into W3C baggage by hand (equal work);
* governed agent:     ``parent.delegate(...)``: lineage in context, chain, depth, intent,
                      task, role and permissions as attributes, the current span set;
* governed tool:      ``agent.tool(...)``, a command span with its audit attributes;
* handoff carrier:    ``agent.handoff(...).env()``: W3C traceparent + baggage for a process.

Goal: governed agent span <= 1.3x the bare span. Both ratios are printed: against the empty
bare span (most of the difference is the SDK validating eleven attributes) and against a
bare span doing the same work by hand (what agentgov itself adds).
Usage: uv run python bench/instrumentation_overhead.py   (N=20000 ROUNDS=7)
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from agentgov.instrumentation import Governance

N = int(os.environ.get("N", 20_000))
ROUNDS = int(os.environ.get("ROUNDS", 7))


class Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def per_op(fn: Callable[[], None]) -> float:
    gc.collect()
    start = time.perf_counter()
    for _ in range(N):
        fn()
    return (time.perf_counter() - start) / N


def main() -> None:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard(), max_queue_size=1 << 16))
    tracer = provider.get_tracer("bench")
    gov = Governance(provider)
    session = gov.session("clean up old deployments", session_id="sess-bench")
    session.__enter__()
    parent = session.agent("orchestrator", role="orchestrator").start()
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.id": "cleanup-1f2e3d4c",
        "gen_ai.agent.name": "cleanup",
        "agentgov.session.id": "sess-bench",
        "agentgov.delegation.chain": ("orchestrator-1", "cleanup-1f2e3d4c"),
        "agentgov.delegation.depth": 1,
        "agentgov.intent": "clean up old deployments",
        "agentgov.agent.parent_id": "orchestrator-1",
        "agentgov.task": "cleanup",
        "agentgov.agent.role": "cleanup",
        "agentgov.permissions": ("fs.write:/opt/app",),
    }

    def bare() -> None:
        with tracer.start_as_current_span("invoke_agent cleanup"):
            pass

    def bare_attrs() -> None:
        with tracer.start_as_current_span("invoke_agent cleanup", attributes=attrs):
            pass

    from opentelemetry import baggage
    from opentelemetry import context as otel_context

    def bare_attrs_baggage() -> None:
        # what a user would write by hand to carry the same lineage in-process
        ctx = baggage.set_baggage("agentgov.session.id", "sess-bench")
        ctx = baggage.set_baggage(
            "agentgov.delegation.chain", "orchestrator-1,cleanup-1f2e3d4c", ctx
        )
        ctx = baggage.set_baggage("agentgov.intent", "clean up old deployments", ctx)
        token = otel_context.attach(ctx)
        try:
            with tracer.start_as_current_span("invoke_agent cleanup", attributes=attrs):
                pass
        finally:
            otel_context.detach(token)

    def governed() -> None:
        with parent.delegate(
            "cleanup", task="cleanup", role="cleanup", permissions=["fs.write:/opt/app"]
        ):
            pass

    def tool() -> None:
        with parent.tool("shell", command="rm -rf /opt/app/data", resources=["/opt/app/data"]):
            pass

    def handoff() -> None:
        parent.handoff("cleanup", task="cleanup", permissions=["fs.write:/opt/app"]).env()

    variants = {
        "bare span": bare,
        "bare + attributes": bare_attrs,
        "bare + attrs + baggage": bare_attrs_baggage,
        "governed agent": governed,
        "governed tool": tool,
        "handoff carrier": handoff,
    }
    best = {k: float("inf") for k in variants}
    for _ in range(ROUNDS):
        for name, fn in variants.items():
            best[name] = min(best[name], per_op(fn))
            provider.force_flush()
    base = best["bare span"]
    print(f"operations: {N} x {ROUNDS} rounds (best round), Python {sys.version.split()[0]}")
    for name, t in best.items():
        print(f"{name:<20} {t * 1e6:7.2f} us   {t / base:5.2f}x bare span")
    ratio = best["governed agent"] / base
    print(
        f"governed agent / bare span = {ratio:.2f}x (goal <= 1.30): {'met' if ratio <= 1.3 else 'NOT met'}"
    )
    same = best["governed agent"] / best["bare + attrs + baggage"]
    print(
        f"governed agent / bare span with the same attributes and baggage = {same:.2f}x "
        f"(goal <= 1.30): {'met' if same <= 1.3 else 'NOT met'}"
    )
    provider.shutdown()


if __name__ == "__main__":
    main()
