"""The store's free space, watched against a floor: ingest pauses before the disk is full.

A full disk fails inserts halfway through their parts and leaves ClickHouse little room
to merge; pausing at a floor (HTTP 503 with ``Retry-After``, gRPC UNAVAILABLE, saying why)
keeps the store writable for what is already queued and for its own merges, and ingest
resumes by itself once space is freed. The embedded store's filesystem is read with
``statvfs``; a ClickHouse server reports its disks in ``system.disks``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass

from clickhouse_connect.driver.client import Client

from agentgov.collector.store.connection import StoreConfig, open_client

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"512MiB"``, ``"2G"``, ``"1048576"`` -> bytes; raises ValueError naming the form."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size: write e.g. 512MiB, 2GiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@dataclass
class SpaceReport:
    """The last reading: free bytes where the store writes (None: unknown)."""

    free_bytes: int | None = None
    total_bytes: int | None = None
    checked_at: float = 0.0
    error: str = ""


class SpaceMonitor:
    """Reads the store's free space every ``interval_s`` on its own thread; the hot path
    only reads the last verdict (:meth:`refusal`)."""

    def __init__(self, config: StoreConfig, min_free_bytes: int, interval_s: float = 0.5) -> None:
        self._config = config
        self.min_free_bytes = max(0, min_free_bytes)
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Client | None = None
        self._refusal: str | None = None
        self.report = SpaceReport()

    def start(self) -> SpaceMonitor:
        self.check()
        self._thread = threading.Thread(target=self._run, name="agentgov-space", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def refusal(self) -> str | None:
        """Why ingest must pause now, or None."""
        return self._refusal

    @property
    def below_floor(self) -> bool:
        return self._refusal is not None

    def check(self) -> SpaceReport:
        """Read the free space now and update the verdict."""
        report = SpaceReport(checked_at=time.time())
        try:
            report.free_bytes, report.total_bytes = self._read()
        except Exception as exc:
            report.error = str(exc).strip().splitlines()[0][:300] if str(exc) else repr(exc)
            if self._client is not None:
                self._client.close()
                self._client = None
        self.report = report
        free = report.free_bytes
        if free is not None and free < self.min_free_bytes:
            if self._refusal is None:
                self._merges(stop=True)
                log.error(
                    "the store has %s free, below the floor of %s: ingest answers 503 until "
                    "space is freed",
                    human(free),
                    human(self.min_free_bytes),
                )
            self._refusal = (
                f"the store's disk has {human(free)} free, below the floor of "
                f"{human(self.min_free_bytes)} (--min-free-space): spans are refused until "
                "space is freed; retry later"
            )
        elif free is not None:
            if self._refusal is not None:
                self._merges(stop=False)
                log.warning("the store has %s free again: ingest resumes", human(free))
            self._refusal = None
        return report

    def _merges(self, stop: bool) -> None:
        """Stop background merges below the floor and start them again above it: a merge
        that runs out of space on the way can leave a broken part behind (seen with the
        embedded engine on a full filesystem: a committed part with an empty marks file,
        unreadable until repaired), and merges are what writes most once ingest pauses.
        Only the embedded store's: a ClickHouse server's merges serve its other databases
        too, and stay its operator's to stop."""
        if self._config.data_path is None:
            return
        try:
            if self._client is None:
                self._client = open_client(self._config)
            self._client.command("SYSTEM STOP MERGES" if stop else "SYSTEM START MERGES")
        except Exception as exc:
            log.warning("could not %s merges: %s", "stop" if stop else "start", exc)

    def _read(self) -> tuple[int, int]:
        path = self._config.data_path
        if path is not None:
            st = os.statvfs(path)
            return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        if self._client is None:
            self._client = open_client(self._config)
        row = self._client.query("SELECT min(free_space), min(total_space) FROM system.disks")
        free, total = row.result_rows[0]
        return int(free), int(total)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.check()
