"""What the collector says about itself: ``/healthz`` for probes, ``/metrics`` for Prometheus.

Both read the same counters, at request time only (nothing on the ingest or decision
path). Health is ``degraded`` (HTTP 503, so orchestrators' probes see it) when writes to
the store fail, its free space is below the floor, the store cannot be reached, or
decision records wait to be written to ClickHouse; the body says which, with the counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as PromCollector

from agentgov.collector.governor.audit import AuditWriter
from agentgov.collector.governor.engine import Governor
from agentgov.collector.normalize.service import TraceResolver
from agentgov.collector.store.space import SpaceMonitor, human
from agentgov.collector.store.writer import SpanWriter

#: records older than this waiting for ClickHouse make health degraded even while no
#: drain attempt has failed yet (a store that hangs rather than fails)
AUDIT_LAG_S = 10.0


@dataclass
class Sources:
    writer: SpanWriter
    space: SpaceMonitor
    audit: AuditWriter
    resolver: TraceResolver
    governor: Governor


def health(src: Sources) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of ``/healthz``."""
    w = src.writer.stats
    space = src.space.report
    audit = src.audit.stats
    problems: list[str] = []
    if w.consecutive_failures:
        problems.append(
            f"writes to the store fail ({w.consecutive_failures} in a row): {w.last_error}"
        )
    if src.space.below_floor:
        problems.append(src.space.refusal() or "free space below the floor")
    if space.error:
        problems.append(f"the store's free space cannot be read: {space.error}")
    doctor = src.space.parts
    if doctor is not None and doctor.stats.awaiting:
        problems.append(
            f"{len(doctor.stats.awaiting)} parts the store committed without their data wait "
            f"for repair ({', '.join(doctor.stats.awaiting[:3])}): "
            f"{doctor.stats.last_error or 'reads of their tables fail until then'}"
        )
    pending = src.audit.pending
    lag = src.audit.oldest_pending_s()
    if audit.consecutive_failures or (pending and lag > AUDIT_LAG_S):
        problems.append(
            f"{pending} decision records wait to be written to ClickHouse "
            f"(oldest {lag:.1f} s; they are safe in the local audit log)"
            if src.audit.log is not None
            else f"{pending} decision records wait to be written to ClickHouse, in memory only"
        )
    log = src.audit.log
    if log is not None and log.stats.last_error:
        problems.append(f"the local audit log failed: {log.stats.last_error}")
    body: dict[str, Any] = {
        "status": "degraded" if problems else "ok",
        "problems": problems,
        "spans_written": w.spans,
        "requests": w.requests,
        "batches": w.batches,
        "duplicate_requests": w.duplicates,
        "failed_requests": w.failed_requests,
        "refused_requests": w.refused_requests,
        "insert_seconds": round(w.insert_seconds, 3),
        "store": {
            "write_failures": w.write_failures,
            "consecutive_failures": w.consecutive_failures,
            "last_error": w.last_error or None,
            "last_error_at": w.last_error_at or None,
            "queued_bytes": src.writer.queued_bytes,
            "inflight_requests": src.writer.inflight,
            "free_bytes": space.free_bytes,
            "min_free_bytes": src.space.min_free_bytes,
            "below_floor": src.space.below_floor,
            "broken_parts": None
            if doctor is None
            else {
                "found": doctor.stats.broken_found,
                "repaired": doctor.stats.repaired,
                "awaiting_repair": doctor.stats.awaiting,
                "lost_parts": doctor.stats.lost_parts,
                "lost_rows": doctor.stats.lost_rows,
            },
        },
        "audit": {
            "pending_records": pending,
            "oldest_pending_s": round(lag, 3),
            "drained_records": audit.drained,
            "drain_failures": audit.drain_failures,
            "last_error": audit.last_error or None,
            "failed_closed": dict(audit.failed_closed),
            "local_log": None
            if log is None
            else {
                "used_bytes": log.used_bytes,
                "capacity_bytes": log.capacity_bytes,
                "capacity": human(log.capacity_bytes),
                "fsync_failures": log.stats.fsync_failures,
            },
        },
        "resolver": {
            "resolutions": src.resolver.stats.resolutions,
            "spans": src.resolver.stats.spans,
            "failures": src.resolver.stats.failures,
            "pending_groups": src.resolver.pending,
        },
    }
    return (503 if problems else 200), body


class _Metrics(PromCollector):
    """Collects at scrape time from the collector's own counters."""

    def __init__(self, src: Sources) -> None:
        self.src = src

    def collect(self) -> Iterator[Metric]:
        src = self.src
        w = src.writer.stats
        a = src.audit.stats

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"agentgov_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"agentgov_{name}", doc, value=value)

        yield counter("ingest_requests", "OTLP requests stored", w.requests)
        yield counter("ingest_spans", "Spans stored", w.spans)
        yield counter("ingest_duplicate_requests", "Retried requests already stored", w.duplicates)
        yield counter(
            "ingest_failed_requests", "Requests answered with an error", w.failed_requests
        )
        yield counter(
            "ingest_refused_requests",
            "Requests answered 503 before queueing (free-space floor, full queue)",
            w.refused_requests,
        )
        yield counter("ingest_batches", "Batches written", w.batches)
        yield counter(
            "store_write_failures", "Failed write attempts (store, not data)", w.write_failures
        )
        yield counter("store_move_retries", "Retried moves of complete batches", w.move_retries)
        yield gauge(
            "store_writes_failing",
            "1 while the last write attempt failed",
            float(bool(w.consecutive_failures)),
        )
        yield gauge(
            "ingest_queue_bytes", "Bytes of requests waiting to be written", src.writer.queued_bytes
        )
        yield gauge(
            "ingest_inflight_requests", "Requests queued or being written", src.writer.inflight
        )
        free = src.space.report.free_bytes
        if free is not None:
            yield gauge("store_free_bytes", "Free bytes where the store writes", free)
        yield gauge("store_min_free_bytes", "The free-space floor", src.space.min_free_bytes)
        yield gauge(
            "store_below_floor",
            "1 while ingest pauses for free space",
            float(src.space.below_floor),
        )
        doctor = src.space.parts
        if doctor is not None:
            yield counter(
                "store_broken_parts",
                "Parts the embedded store committed without their data",
                doctor.stats.broken_found,
            )
            yield counter(
                "store_repaired_parts", "Such parts repaired or detached", doctor.stats.repaired
            )
            yield counter(
                "store_lost_rows",
                "Rows of such parts that could not be restored",
                doctor.stats.lost_rows,
            )
            yield gauge(
                "store_parts_awaiting_repair",
                "Such parts not yet repaired",
                len(doctor.stats.awaiting),
            )
        records = CounterMetricFamily(
            "agentgov_decision_records",
            "Decision records made durable",
            labels=["phase", "outcome"],
        )
        for (phase, outcome), n in sorted(a.records.items()):
            records.add_metric([phase, outcome], n)
        yield records
        failed = CounterMetricFamily(
            "agentgov_decisions_failed_closed",
            "Decisions refused because their record could not be made durable",
            labels=["reason"],
        )
        for reason, n in sorted(a.failed_closed.items()):
            failed.add_metric([reason], n)
        yield failed
        refused = CounterMetricFamily(
            "agentgov_decisions_refused", "Requests no agent could be held to", labels=["reason"]
        )
        for reason, n in sorted(dict(src.governor.refused).items()):
            refused.add_metric([reason], n)
        yield refused
        yield gauge(
            "audit_records_pending", "Decision records not yet in ClickHouse", src.audit.pending
        )
        yield gauge(
            "audit_oldest_pending_seconds",
            "Age of the oldest such record",
            src.audit.oldest_pending_s(),
        )
        yield counter("audit_records_drained", "Decision records written to ClickHouse", a.drained)
        yield counter("audit_drain_failures", "Failed writes of decision records", a.drain_failures)
        log = src.audit.log
        if log is not None:
            yield gauge(
                "audit_log_used_bytes", "Local audit log bytes awaiting drain", log.used_bytes
            )
            yield gauge("audit_log_capacity_bytes", "Local audit log size", log.capacity_bytes)
            yield counter(
                "audit_log_fsyncs", "Group fsyncs of the local audit log", log.stats.fsyncs
            )
        yield gauge(
            "resolver_pending_groups", "Trace groups waiting for resolution", src.resolver.pending
        )


class Metrics:
    """A registry of this collector's metrics (no process-global state)."""

    def __init__(self, src: Sources) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Metrics(src))

    def render(self) -> bytes:
        return generate_latest(self.registry)
