"""Reading span facts out of stored OTLP requests, in a process of its own.

Reading a span's attributes from protobuf costs Python ~15 µs (each field access builds
an object); at ingest rates that is most of a core, and on the collector's own GIL it
would slow the receivers and the governor. A worker process takes the raw request bytes
(the writer has them anyway) and sends back compact facts, so the collector's
interpreter only unpickles them.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from agentgov.collector.alerts.facts import SpanFact, span_facts
from agentgov.collector.risk import RiskRule, RiskRules

log = logging.getLogger(__name__)

_RULES: RiskRules | None = None


def _start_worker(rules: list[RiskRule]) -> None:
    global _RULES  # the worker process's own copy, set once when it starts
    _RULES = RiskRules(rules)


_FIELDS = SpanFact.__slots__


def extract(payload: bytes) -> list[tuple[object, ...]]:
    """The facts of one serialized ExportTraceServiceRequest, as plain tuples (runs in the
    worker; tuples unpickle at a third of the cost of objects on the collector's side)."""
    assert _RULES is not None
    request = ExportTraceServiceRequest()
    request.ParseFromString(payload)
    return [tuple(getattr(f, n) for n in _FIELDS) for f in span_facts(request, _RULES)]


def facts_of(rows: list[tuple[object, ...]]) -> list[SpanFact]:
    """The worker's tuples as facts again."""
    return [SpanFact(*row) for row in rows]  # type: ignore[arg-type]


class FactExtractor:
    """One worker process, started on first use and again if it dies."""

    def __init__(self, rules: RiskRules) -> None:
        self._rules = list(rules.rules)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn, never fork: the collector runs ClickHouse's threads in-process
                self._pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_worker,
                    initargs=(self._rules,),
                )
            return self._pool

    def submit(self, payload: bytes) -> Future[list[tuple[object, ...]]]:
        pool = self._ensure()
        try:
            return pool.submit(extract, payload)
        except BrokenProcessPool:
            log.error("the span-fact worker died; starting a new one")
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            return self._ensure().submit(extract, payload)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
