"""A background writer of JSONEachRow lines into one table (audit records, alert events).

Rows are serialized by the caller, a few microseconds each, and inserted behind its back
in batches on this writer's own thread and client: ClickHouse parses JSONEachRow itself,
which costs the collector's process far less than typed row encoding in Python.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from clickhouse_connect.driver.client import Client

from agentgov.collector.store.connection import StoreConfig, open_client

log = logging.getLogger(__name__)


class JsonRowWriter:
    """Batches JSON lines into ``table`` (created with ``ddl`` on start)."""

    def __init__(
        self, store: StoreConfig, table: str, ddl: str, what: str, interval_s: float = 0.05
    ) -> None:
        self._store = store
        self._table = table
        self._ddl = ddl
        self._what = what
        self._interval = interval_s
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._client: Client | None = None
        self._cond = threading.Condition()
        self._pending = 0
        self.written = 0
        self.failures = 0

    def start(self) -> JsonRowWriter:
        self._client = open_client(self._store)
        self._client.command(self._ddl)
        self._thread = threading.Thread(
            target=self._run, name=f"agentgov-{self._table}", daemon=True
        )
        self._thread.start()
        return self

    def put(self, line: str) -> None:
        """Queue one JSONEachRow line."""
        with self._cond:
            self._pending += 1
        self._queue.put(line)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every line handed over so far is written."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        if self._thread is not None:
            self.flush()
            self._queue.put(None)
            self._thread.join(10)
            self._thread = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            # a short wait gathers the rows of a burst into one insert
            time.sleep(self._interval)
            batch = [item]
            stop = False
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._write(batch)
            with self._cond:
                self._pending -= len(batch)
                self._cond.notify_all()
            if stop:
                return

    def _write(self, batch: list[str]) -> None:
        assert self._client is not None
        block = "\n".join(batch).encode()
        for attempt in range(5):
            try:
                self._client.raw_insert(self._table, insert_block=block, fmt="JSONEachRow")
                self.written += len(batch)
                return
            except Exception:
                self.failures += 1
                log.exception("writing %d %s failed (try %d)", len(batch), self._what, attempt + 1)
                time.sleep(0.2 * (attempt + 1))
        log.error("dropped %d %s after 5 tries", len(batch), self._what)
