"""Where spans are written: group-committed, durable, deduplicated OTLP ingest.

Each accepted OTLP request is a serialized ``ExportTraceServiceRequest``. One writer
thread takes every request queued at that moment and writes them as a single insert into
the ingest table, where ClickHouse decodes the protobuf and the materialized views fan the
spans out to ``otel_traces`` and the governance tables. Under light load a request is
written at once; under heavy load blocks grow by themselves (group commit), which is what
makes ClickHouse inserts cheap per span.

Durability and retries: a request's future resolves only after its insert returned, so an
acknowledged request is on disk. Each request is identified by a digest of its bytes; a
receipt is written ``pending`` before the insert and ``committed`` after it. A retry of a
committed request is acknowledged without writing; a retry of a request whose insert was
cut off by a crash (``pending`` only) has the spans already stored removed first.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from agentgov.collector.risk import RiskRules
from agentgov.collector.store import schema
from agentgov.collector.store.connection import StoreConfig, open_client
from agentgov.collector.store.reconcile import reconcile

log = logging.getLogger(__name__)

PENDING, COMMITTED, REPAIRED = 1, 2, 3


class WriterOverloaded(RuntimeError):
    """The write queue is full; the client should retry later (HTTP 503 / gRPC UNAVAILABLE)."""


class WriterClosed(RuntimeError):
    """The writer is shutting down."""


class StoreRejected(ValueError):
    """ClickHouse refused a request's data itself: retrying the same bytes cannot succeed."""


class StoreUnavailable(RuntimeError):
    """The store failed for a reason that may pass (memory, disk, parts, network): retry."""


#: ClickHouse error codes that say "not now" rather than "not this data"
_TRANSIENT_CODES = {
    159,  # TIMEOUT_EXCEEDED
    202,  # TOO_MANY_SIMULTANEOUS_QUERIES
    209,  # SOCKET_TIMEOUT
    210,  # NETWORK_ERROR
    241,  # MEMORY_LIMIT_EXCEEDED
    242,  # TABLE_IS_READ_ONLY
    243,  # NOT_ENOUGH_SPACE
    252,  # TOO_MANY_PARTS
    425,  # SYSTEM_ERROR
}
_CODE_RE = re.compile(r"Code: (\d+)\.")


def classify(exc: BaseException) -> Exception:
    """Turn a driver error into :class:`StoreRejected` or :class:`StoreUnavailable`."""
    if isinstance(exc, DatabaseError) and not isinstance(exc, OperationalError):
        match = _CODE_RE.search(str(exc))
        if match and int(match.group(1)) not in _TRANSIENT_CODES:
            first_line = str(exc).strip().splitlines()[0][:300]
            return StoreRejected(f"ClickHouse refused these spans: {first_line}")
    return StoreUnavailable(f"the store is unavailable: {str(exc).strip()[:300]}")


def canonical(payload: bytes) -> bytes:
    """The request re-encoded without the fields this OTLP version does not know.

    Used only after ClickHouse refused the original bytes: the check costs as much as a
    parse, so it stays off the hot path.
    """
    request = ExportTraceServiceRequest.FromString(payload)
    request.DiscardUnknownFields()
    return request.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        bits = n & 0x7F
        n >>= 7
        if n:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def request_digest(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


@dataclass
class _Item:
    digest: str
    payload: bytes
    spans: int
    trace_ids: tuple[str, ...] = ()
    received: float = 0.0
    future: Future[int] = field(default_factory=Future)
    size: int = 0
    #: the insert token of the batch that stored it (rows derived from it carry it)
    insert_id: str = ""

    def __post_init__(self) -> None:
        self.size = len(self.payload)


@dataclass
class WriterStats:
    requests: int = 0
    spans: int = 0
    duplicates: int = 0
    batches: int = 0
    failed_requests: int = 0
    #: wall time spent in inserts, summed over writer threads
    insert_seconds: float = 0.0


class SpanWriter:
    """Group-commit writer of OTLP requests into the store.

    ``threads`` writer threads (each with its own client) take batches from one queue:
    ClickHouse runs one insert on one core, so two inserts at once use both of a small
    machine's cores while Python decodes the next requests.
    """

    def __init__(
        self,
        config: StoreConfig,
        rules: RiskRules | None = None,
        threads: int = 2,
        max_batch_bytes: int = 16 << 20,
        linger_s: float = 0.02,
        min_batch_spans: int = 16_384,
        max_queue_bytes: int = 512 << 20,
        remembered_requests: int = 500_000,
        receipt_window_s: int = 6 * 3600,
        on_stored: Callable[[str, float], None] | None = None,
    ) -> None:
        """``on_stored(insert_id, received_at)`` runs once per stored batch (never for a
        duplicate), after its senders were answered, with the batch's insert token (the
        ``InsertId`` of every row derived from it) and when its first request arrived; it
        must not block."""
        self._config = config
        self._on_stored = on_stored
        self._rules = rules or RiskRules.default()
        self._max_batch_bytes = max_batch_bytes
        self._linger_s = linger_s
        self._min_batch_spans = min_batch_spans
        self._max_queue_bytes = max_queue_bytes
        self._remembered = remembered_requests
        self._receipt_window_s = receipt_window_s
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._inflight: dict[str, _Item] = {}
        self._committed: OrderedDict[str, None] = OrderedDict()
        self._in_doubt: set[str] = set()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._thread_count = max(1, threads)
        self._clients: list[Client] = []
        self._settings = schema.ingest_settings(config.embedded)
        self.stats = WriterStats()

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> SpanWriter:
        self._clients = [open_client(self._config) for _ in range(self._thread_count)]
        self._load_receipts(self._clients[0])
        for n, client in enumerate(self._clients):
            thread = threading.Thread(
                target=self._run, args=(client,), name=f"agentgov-span-writer-{n}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for client in self._clients:
            client.close()

    def _load_receipts(self, client: Client) -> None:
        rows = client.query(
            f"SELECT Digest, max(State), groupArrayArray(TraceIds) FROM {schema.RECEIPTS} "
            "WHERE At > now() - toIntervalSecond({w:UInt32}) GROUP BY Digest",
            parameters={"w": self._receipt_window_s},
        ).result_rows
        interrupted: list[tuple[str, list[str]]] = []
        for digest, state, trace_ids in rows:
            if state == COMMITTED:
                self._remember(digest)
                continue
            self._in_doubt.add(digest)
            if state == PENDING:
                interrupted.append((digest, list(trace_ids)))
        if interrupted:
            log.warning(
                "%d OTLP requests were being written when the collector stopped: repairing "
                "the governance tables; their retries will be checked span by span",
                len(interrupted),
            )
            reconcile(client, self._rules, [t for _, ids in interrupted for t in ids])
            client.insert(
                schema.RECEIPTS,
                [[d, REPAIRED, []] for d, _ in interrupted],
                column_names=["Digest", "State", "TraceIds"],
            )

    def _remember(self, digest: str) -> None:
        self._committed[digest] = None
        while len(self._committed) > self._remembered:
            self._committed.popitem(last=False)

    # -- submission ----------------------------------------------------------------------

    def submit(
        self,
        payload: bytes,
        spans: int,
        trace_ids: tuple[str, ...] = (),
    ) -> Future[int]:
        """Queue one validated request; the future gives the spans written (0: duplicate)."""
        received = time.time()
        digest = request_digest(payload)
        with self._lock:
            if self._closed:
                raise WriterClosed("the collector is shutting down; retry against another one")
            if digest in self._committed:
                self.stats.duplicates += 1
                done: Future[int] = Future()
                done.set_result(0)
                return done
            existing = self._inflight.get(digest)
            if existing is not None:
                self.stats.duplicates += 1
                return existing.future
            if self._queued_bytes + len(payload) > self._max_queue_bytes:
                raise WriterOverloaded(
                    "the write queue is full; retry with backoff (OTLP exporters do this)"
                )
            item = _Item(digest, payload, spans, trace_ids, received)
            self._inflight[digest] = item
            self._queued_bytes += len(payload)
        self._queue.put(item)
        return item.future

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything submitted so far is written."""
        with self._lock:
            pending = [i.future for i in self._inflight.values()]
        deadline = time.monotonic() + timeout
        for fut in pending:
            try:
                fut.result(max(0.0, deadline - time.monotonic()))
            except Exception:
                pass

    # -- the writer thread ---------------------------------------------------------------

    def _run(self, client: Client) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            size = len(item.payload)
            spans = item.spans
            # Every insert pays a fixed cost (query analysis of the views, one part per
            # table), so a small batch waits a moment for company; the wait ends as soon
            # as the batch is worth an insert.
            deadline = time.monotonic() + self._linger_s
            while size < self._max_batch_bytes:
                wait = deadline - time.monotonic() if spans < self._min_batch_spans else 0.0
                try:
                    nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
                size += len(nxt.payload)
                spans += nxt.spans
            self._write_batch(client, batch)

    def _write_batch(self, client: Client, batch: list[_Item]) -> None:
        for item in batch:
            if item.digest in self._in_doubt:
                self._drop_stored_spans(client, item)
        try:
            self._insert(client, batch)
        except Exception as exc:
            if len(batch) > 1:
                # One bad request must not fail its neighbours: write them one by one.
                log.warning(
                    "batch insert failed (%s); writing its %d requests one by one", exc, len(batch)
                )
            for item in batch:
                self._finish(
                    [item], self._insert_alone(client, item, exc if len(batch) == 1 else None)
                )
            return
        self._finish(batch, None)

    def _insert_alone(
        self, client: Client, item: _Item, failed: BaseException | None
    ) -> Exception | None:
        """Write one request after a failure; returns the error to report, if any."""
        # whatever a failed insert left behind is checked span by span on the next try
        with self._lock:
            self._in_doubt.add(item.digest)
        if failed is None:
            try:
                self._insert(client, [item])
                return None
            except Exception as exc:
                failed = exc
        error = classify(failed)
        if isinstance(error, StoreRejected) and item.payload:
            try:
                fixed = canonical(item.payload)
            except Exception:
                return error
            if fixed != item.payload:
                item.payload = fixed
                try:
                    self._repair(client, item)
                    self._insert(client, [item])
                    return None
                except Exception as exc:
                    return classify(exc)
        log.warning("request not stored: %s", error)
        return error

    def _insert(self, client: Client, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            self._insert_timed(client, batch)
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self.stats.insert_seconds += elapsed

    def _insert_timed(self, client: Client, batch: list[_Item]) -> None:
        pending = [[i.digest, PENDING, list(i.trace_ids)] for i in batch]
        client.insert(schema.RECEIPTS, pending, column_names=["Digest", "State", "TraceIds"])
        block = b"".join(_varint(len(i.payload)) + i.payload for i in batch if i.payload)
        insert_id = secrets.token_hex(12)
        if block:
            # the views stamp every row they derive with this token (InsertId), so the
            # batch's rows can be read back at once, and only them
            settings = {**self._settings, "insert_deduplication_token": insert_id}
            client.raw_insert(schema.INGEST, insert_block=block, fmt="Protobuf", settings=settings)
        for i in batch:
            i.insert_id = insert_id
        client.insert(
            schema.RECEIPTS,
            [[i.digest, COMMITTED, []] for i in batch],
            column_names=["Digest", "State", "TraceIds"],
        )

    def _finish(self, batch: list[_Item], exc: BaseException | None) -> None:
        written = 0
        with self._lock:
            for item in batch:
                self._inflight.pop(item.digest, None)
                self._queued_bytes -= item.size
                if exc is None:
                    self._remember(item.digest)
                    self._in_doubt.discard(item.digest)
                    written += item.spans
            if exc is None:
                self.stats.requests += len(batch)
                self.stats.spans += written
                self.stats.batches += 1
            else:
                self.stats.failed_requests += len(batch)
        for item in batch:
            if exc is None:
                item.future.set_result(item.spans)
            else:
                item.future.set_exception(exc)
        if exc is None and self._on_stored is not None:
            stored = [i for i in batch if i.payload and i.insert_id]
            for insert_id in dict.fromkeys(i.insert_id for i in stored):
                try:
                    received = min(i.received for i in stored if i.insert_id == insert_id)
                    self._on_stored(insert_id, received)
                except Exception:
                    log.exception("a stored-spans observer failed")

    def _repair(self, client: Client, item: _Item) -> None:
        """After a failed insert: fix derived tables, then keep only spans not yet stored."""
        reconcile(client, self._rules, item.trace_ids)
        self._drop_stored_spans(client, item)

    def _drop_stored_spans(self, client: Client, item: _Item) -> None:
        """Remove from ``item`` the spans a crashed earlier attempt already stored."""
        request = ExportTraceServiceRequest.FromString(item.payload)
        trace_ids = sorted(
            {
                s.trace_id.hex()
                for rs in request.resource_spans
                for ss in rs.scope_spans
                for s in ss.spans
            }
        )
        if not trace_ids:
            return
        stored = {
            (t, s)
            for t, s in client.query(
                f"SELECT TraceId, SpanId FROM {schema.TRACES} WHERE TraceId IN {{ids:Array(String)}}",
                parameters={"ids": trace_ids},
            ).result_rows
        }
        kept = 0
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                keep = [s for s in ss.spans if (s.trace_id.hex(), s.span_id.hex()) not in stored]
                del ss.spans[:]
                ss.spans.extend(keep)
                kept += len(keep)
        log.warning(
            "retry of an interrupted request: %d of %d spans were not yet stored", kept, item.spans
        )
        item.payload = request.SerializeToString() if kept else b""
        item.spans = kept
