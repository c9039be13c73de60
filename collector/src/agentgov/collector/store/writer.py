"""Where spans are written: group-committed, durable, deduplicated OTLP ingest.

Each accepted OTLP request is a serialized ``ExportTraceServiceRequest``. One writer
thread takes every request queued at that moment and writes them as a single insert into
the ingest table, where ClickHouse decodes the protobuf and the materialized views fan the
spans out to ``otel_traces`` and the governance tables. Under light load a request is
written at once; under heavy load blocks grow by themselves (group commit), which is what
makes ClickHouse inserts cheap per span.

Durability and retries: a request's future resolves only after its whole batch is in the
store, ``otel_traces`` and every derived table alike, so an acknowledged request is on
disk, complete. Each batch is written into the writer thread's stage first and moved into
the store by whole parts (see staging.py): a failure anywhere in the chain of views leaves
the store as if the batch had never been written, and a batch complete in its stage is
only ever moved forward, also after a crash. Every failed attempt goes through that one
path: the stage is emptied and the batch (or, when ClickHouse refused the data itself,
each of its requests alone) is written again from the start.

Each request is identified by a digest of its bytes, and its receipt is written
``committed`` once it is in the store: a retry of a committed request is acknowledged
without writing. Receipts left ``pending`` by versions that wrote the store directly are
repaired at start, and their retries checked span by span.

Errors are classified for the sender: storage trouble that may pass (no space, a
read-only filesystem, too many parts, memory limits, a server that is down) is
:class:`StoreUnavailable` (HTTP 503 / gRPC UNAVAILABLE, retry), never a refusal of the
data; :class:`StoreRejected` is kept for ClickHouse refusing the data itself.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import queue
import re
import secrets
import socket
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
from agentgov.collector.store.staging import Stage

log = logging.getLogger(__name__)

PENDING, COMMITTED, REPAIRED = 1, 2, 3


class WriterOverloaded(RuntimeError):
    """The write queue is full; the client should retry later (HTTP 503 / gRPC UNAVAILABLE)."""

    retry_after_s = 1


class StoreFull(WriterOverloaded):
    """The store's free space is below the configured floor: ingest pauses until space is
    freed (HTTP 503 / gRPC UNAVAILABLE), before the disk is full for real."""

    retry_after_s = 5


class WriterClosed(RuntimeError):
    """The writer is shutting down."""


class StoreRejected(ValueError):
    """ClickHouse refused a request's data itself: retrying the same bytes cannot succeed."""


class StoreUnavailable(RuntimeError):
    """The store failed for a reason that may pass (memory, disk, parts, network): retry."""


#: ClickHouse error codes that say "not now" rather than "not this data"
_TRANSIENT_CODES = {
    3,  # UNEXPECTED_END_OF_FILE (a connection cut)
    32,  # ATTEMPT_TO_READ_AFTER_EOF
    60,  # UNKNOWN_TABLE (a table of the store went missing: the store's trouble)
    74,  # CANNOT_READ_FROM_FILE_DESCRIPTOR
    75,  # CANNOT_WRITE_TO_FILE_DESCRIPTOR
    76,  # CANNOT_OPEN_FILE
    77,  # CANNOT_CLOSE_FILE
    159,  # TIMEOUT_EXCEEDED
    164,  # READONLY (a server started read-only, e.g. its disk went bad)
    202,  # TOO_MANY_SIMULTANEOUS_QUERIES
    209,  # SOCKET_TIMEOUT
    210,  # NETWORK_ERROR
    236,  # ABORTED
    241,  # MEMORY_LIMIT_EXCEEDED
    242,  # TABLE_IS_READ_ONLY
    243,  # NOT_ENOUGH_SPACE
    252,  # TOO_MANY_PARTS
    319,  # UNKNOWN_STATUS_OF_INSERT
    394,  # QUERY_WAS_CANCELLED
    425,  # SYSTEM_ERROR
    439,  # CANNOT_SCHEDULE_TASK
    999,  # KEEPER_EXCEPTION
    1000,  # POCO_EXCEPTION (network)
}
_CODE_RE = re.compile(r"Code: (\d+)\.")
#: what the operating system says when storage fails, whatever code ClickHouse wraps it in
_STORAGE_TROUBLE = re.compile(
    r"No space left on device|Read-only file system|Disk quota exceeded|Input/output error"
    r"|Too many open files|Cannot allocate memory|Not enough space|Cannot reserve"
    r"|Memory limit|Too many parts|Connection refused|Connection reset|Broken pipe"
    # a part committed without its data on a full disk: repaired by store/parts.py
    r"|Empty marks file"
    r"|errno: (?:5|12|23|24|28|30|32|104|111|122)\b",
    re.IGNORECASE,
)
_TRANSIENT_ERRNOS = {
    errno.ENOSPC,
    errno.EROFS,
    errno.EDQUOT,
    errno.EIO,
    errno.ENOMEM,
    errno.EMFILE,
    errno.ENFILE,
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.EPIPE,
}


def classify(exc: BaseException) -> Exception:
    """Turn a driver error into :class:`StoreRejected` or :class:`StoreUnavailable`.

    Only an error ClickHouse raises about the data itself is a refusal: anything storage
    says (a full or read-only disk, too many parts, memory, a server down) may pass, and
    an OTLP sender drops a refused request for good but retries an unavailable store.
    """
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return StoreUnavailable(f"the store is unavailable: {text[:300]}")
    if isinstance(exc, DatabaseError) and not isinstance(exc, OperationalError):
        match = _CODE_RE.search(text)
        if (
            match
            and int(match.group(1)) not in _TRANSIENT_CODES
            and not _STORAGE_TROUBLE.search(text)
        ):
            first_line = text.splitlines()[0][:300]
            return StoreRejected(f"ClickHouse refused these spans: {first_line}")
    return StoreUnavailable(f"the store is unavailable, retry later: {text[:300]}")


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
    #: requests answered 503 before they were queued (free-space floor, full queue)
    refused_requests: int = 0
    #: attempts that failed for a reason that may pass (the store, not the data)
    write_failures: int = 0
    #: such failures since the last successful write (0: writes succeed)
    consecutive_failures: int = 0
    last_error: str = ""
    last_error_at: float = 0.0
    #: stages emptied after a failed attempt, and moves into the store that had to be retried
    stage_cleanups: int = 0
    move_retries: int = 0


def default_instance(config: StoreConfig) -> str:
    """What tells this collector's stages from another's in a shared ClickHouse server:
    the host name (a chDB data folder has one owner, so its stages need no name)."""
    if config.embedded:
        return "local"
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


class SpanWriter:
    """Group-commit writer of OTLP requests into the store.

    ``threads`` writer threads (each with its own client and stage) take batches from one
    queue: ClickHouse runs one insert on one core, so two inserts at once use both of a
    small machine's cores while Python decodes the next requests.
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
        space_check: Callable[[], str | None] | None = None,
        instance: str | None = None,
        retry_backoff_s: tuple[float, float] = (0.2, 5.0),
    ) -> None:
        """``on_stored(insert_id, received_at)`` runs once per stored batch (never for a
        duplicate), after its senders were answered, with the batch's insert token (the
        ``InsertId`` of every row derived from it) and when its first request arrived; it
        must not block.

        ``space_check()`` says why ingest must pause now (the store's free space is below
        its floor), or None; it is called for every request, so it must be cheap.
        ``instance`` names this collector's stages in a shared server (default: from the
        host name); ``retry_backoff_s`` bounds the waits between moves retried into a
        failing store."""
        self._config = config
        self._on_stored = on_stored
        self._space_check = space_check
        self._rules = rules or RiskRules.default()
        self._max_batch_bytes = max_batch_bytes
        self._linger_s = linger_s
        self._min_batch_spans = min_batch_spans
        self._max_queue_bytes = max_queue_bytes
        self._remembered = remembered_requests
        self._receipt_window_s = receipt_window_s
        self._backoff = retry_backoff_s
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
        name = instance if instance is not None else default_instance(config)
        self._stages = [
            Stage(
                f"agentgov_stage_{name}_{n}",
                self._rules,
                self._settings,
                local=config.embedded,
            )
            for n in range(self._thread_count)
        ]
        self.stats = WriterStats()

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> SpanWriter:
        self._clients = [open_client(self._config) for _ in range(self._thread_count)]
        setup = self._clients[0]
        for stage in self._stages:
            for digest in stage.recover(setup):
                self._remember(digest)
            stage.recreate(setup)
        self._load_receipts(setup)
        for n, (client, stage) in enumerate(zip(self._clients, self._stages, strict=True)):
            thread = threading.Thread(
                target=self._run,
                args=(client, stage),
                name=f"agentgov-span-writer-{n}",
                daemon=True,
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
            # only versions that wrote the store directly left these
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
        """Queue one validated request; the future gives the spans written (0: duplicate).

        Raises :class:`StoreFull` below the free-space floor, :class:`WriterOverloaded`
        when the queue is full and :class:`WriterClosed` while shutting down."""
        received = time.time()
        digest = request_digest(payload)
        refusal = self._space_check() if self._space_check is not None else None
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
            if refusal is not None:
                self.stats.refused_requests += 1
                raise StoreFull(refusal)
            if self._queued_bytes + len(payload) > self._max_queue_bytes:
                self.stats.refused_requests += 1
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

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # -- the writer thread ---------------------------------------------------------------

    def _run(self, client: Client, stage: Stage) -> None:
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
            self._write_batch(client, stage, batch)

    def _write_batch(self, client: Client, stage: Stage, batch: list[_Item]) -> None:
        """Write a batch all or nothing; answer its senders."""
        for item in batch:
            if item.digest in self._in_doubt:
                try:
                    self._drop_stored_spans(client, item)
                except Exception as exc:
                    self._failed(exc)
                    self._finish(batch, classify(exc))
                    return
        error = self._attempt(client, stage, batch)
        if isinstance(error, StoreRejected) and len(batch) > 1:
            # One bad request must not fail its neighbours: nothing of the batch reached
            # the store, so each request goes the same way again, alone.
            log.warning(
                "batch insert refused (%s); writing its %d requests one by one", error, len(batch)
            )
            for item in batch:
                self._write_batch(client, stage, [item])
            return
        if isinstance(error, StoreRejected) and batch[0].payload:
            # fields of a newer OTLP version ClickHouse's schema does not know: without them
            item = batch[0]
            try:
                fixed = canonical(item.payload)
            except Exception:
                fixed = item.payload
            if fixed != item.payload:
                item.payload = fixed
                error = self._attempt(client, stage, batch)
        if error is not None:
            log.warning("%d requests not stored: %s", len(batch), error)
        self._finish(batch, error)
        if error is None:
            self._settle(client, stage)

    def _attempt(self, client: Client, stage: Stage, batch: list[_Item]) -> Exception | None:
        """One try at a batch: into the stage, then (complete there) into the store.
        Returns the classified error of a try that left the store untouched."""
        if stage.holding:
            # a complete batch the writer could not finish moving (it is stopping): writing
            # another over it would lose that batch's receipts, so the next start moves it
            return StoreUnavailable(
                "the collector is stopping with a batch still to move; retry later"
            )
        block = b"".join(_varint(len(i.payload)) + i.payload for i in batch if i.payload)
        insert_id = secrets.token_hex(12)
        started = time.perf_counter()
        try:
            stage.write(client, block, insert_id, [i.digest for i in batch])
        except Exception as exc:
            self._failed(exc)
            self._clean(client, stage)
            return classify(exc)
        finally:
            self._timed(started)
        # complete in the stage: from here the batch only moves forward
        try:
            self._move(client, stage)
        except Exception as exc:
            # only when stopping mid-move: the next start finishes the move and commits
            # the receipts, so the senders' retries are then answered as duplicates
            return StoreUnavailable(f"the collector stopped while storing these spans: {exc}")
        for i in batch:
            i.insert_id = insert_id
        return None

    def _move(self, client: Client, stage: Stage) -> None:
        """Move the stage's batch into the store, retrying until it is there (a crash
        meanwhile leaves it to the next start, which finishes the move)."""
        delay = self._backoff[0]
        while True:
            started = time.perf_counter()
            try:
                stage.move(client)
                break
            except Exception as exc:
                self._failed(exc)
                with self._lock:
                    self.stats.move_retries += 1
                    closing = self._closed
                if closing:
                    log.error(
                        "stopping with a batch left in stage %s: the next start moves it",
                        stage.prefix,
                    )
                    raise
                log.warning("moving a complete batch into the store failed, retrying: %s", exc)
                time.sleep(delay)
                delay = min(delay * 2, self._backoff[1])
            finally:
                self._timed(started)

    def _settle(self, client: Client, stage: Stage) -> None:
        """Receipts of the moved batch, and the stage marked free. The senders were
        answered already: until this succeeds, the marker keeps the batch's receipts due
        (a restart writes them), and the writer tries again before its next batch."""
        delay = self._backoff[0]
        while stage.holding:
            try:
                stage.settle(client)
            except Exception as exc:
                self._failed(exc)
                if self._closed:
                    log.error(
                        "stopping with receipts due in stage %s: the next start writes them",
                        stage.prefix,
                    )
                    return
                log.warning("writing receipts of a stored batch failed, retrying: %s", exc)
                time.sleep(delay)
                delay = min(delay * 2, self._backoff[1])

    def _clean(self, client: Client, stage: Stage) -> None:
        """Empty the stage after a failed try; if that fails too, the next try does it."""
        with self._lock:
            self.stats.stage_cleanups += 1
        try:
            stage.clean(client)
        except Exception as exc:
            log.warning(
                "emptying stage %s failed (tried again before the next batch): %s",
                stage.prefix,
                exc,
            )

    def _timed(self, started: float) -> None:
        elapsed = time.perf_counter() - started
        with self._lock:
            self.stats.insert_seconds += elapsed

    def _failed(self, exc: BaseException) -> None:
        if isinstance(classify(exc), StoreRejected):
            return  # the data's fault, not the store's
        with self._lock:
            self.stats.write_failures += 1
            self.stats.consecutive_failures += 1
            self.stats.last_error = (
                str(exc).strip().splitlines()[0][:300] if str(exc) else repr(exc)
            )
            self.stats.last_error_at = time.time()

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
                self.stats.consecutive_failures = 0
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
