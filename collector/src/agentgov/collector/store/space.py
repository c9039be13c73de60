"""The store's free space, watched against a floor: ingest pauses before the disk is full.

A full disk fails inserts halfway through their parts and leaves ClickHouse little room
to merge; pausing at a floor (HTTP 503 with ``Retry-After``, gRPC UNAVAILABLE, saying why)
keeps the store writable for what is already queued and for its own merges, and ingest
resumes by itself once space is freed. The embedded store's filesystem is read with
``statvfs``; a ClickHouse server reports its disks in ``system.disks``.

The same thread looks after the embedded store's parts (:mod:`.parts`): every few seconds,
when space comes back and before the store closes, it repairs the parts the engine
committed broken while the disk was full.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import threading
import time
from dataclasses import dataclass

from clickhouse_connect.driver.client import Client

from agentgov.collector.store.connection import StoreConfig, open_client
from agentgov.collector.store.parts import PartDoctor

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


class Reserve:
    """A file of ``size`` bytes the collector keeps in the embedded store's data folder and
    frees when a repair needs room on a full disk (ClickHouse asks for 1 MiB to detach a
    broken part, however full the disk); made again once space is back above the floor."""

    NAME = "agentgov-reserve"

    def __init__(self, folder: os.PathLike[str] | str, size: int) -> None:
        self.path = os.path.join(folder, self.NAME)
        self.size = size
        #: set when this filesystem cannot hold one (no ``fallocate``, no permission)
        self.disabled = False

    @property
    def held(self) -> bool:
        try:
            return os.path.getsize(self.path) >= self.size
        except OSError:
            return False

    @property
    def owed(self) -> int:
        """Bytes the reserve still has to take back (0 while held, or if it cannot be
        made on this filesystem at all): free space below that is not the store's."""
        return 0 if self.disabled or self.held else self.size

    def make(self) -> None:
        """Take the reserve's space (never raises: without it repairs may wait for space)."""
        if self.disabled or self.held:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                # e.g. a filesystem without fallocate: repairs then wait for space instead
                self.disabled = True
                log.warning("the store's repair reserve cannot be made here: %s", exc)

    def release(self) -> bool:
        """Free the reserve's space; True if it held any."""
        try:
            os.unlink(self.path)
        except OSError:
            return False
        log.warning("the store's reserve of %s was freed to repair a part", human(self.size))
        return True


class SpaceMonitor:
    """Reads the store's free space every ``interval_s`` on its own thread; the hot path
    only reads the last verdict (:meth:`refusal`)."""

    #: how long after the floor was last crossed writes are still checked more closely
    RISK_WINDOW_S = 60.0
    #: the embedded store's reserve file (see :class:`Reserve`)
    RESERVE_BYTES = 4 << 20

    def __init__(
        self,
        config: StoreConfig,
        min_free_bytes: int,
        interval_s: float = 0.5,
        parts_interval_s: float = 5.0,
    ) -> None:
        self._config = config
        self.min_free_bytes = max(0, min_free_bytes)
        self._interval = interval_s
        self._parts_interval = parts_interval_s
        path = config.data_path
        self.reserve = Reserve(path, self.RESERVE_BYTES) if path is not None else None
        #: the embedded store's broken-part repairs (None for a server)
        self.parts: PartDoctor | None = (
            PartDoctor(self.reserve.release) if self.reserve is not None else None
        )
        self._trouble_at = 0.0
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
        # once more before the store closes: a clean shutdown deletes the parts a broken
        # merge could be rebuilt from
        self.repair_parts()
        if self._client is not None:
            self._client.close()
            self._client = None

    def refusal(self) -> str | None:
        """Why ingest must pause now, or None."""
        return self._refusal

    @property
    def below_floor(self) -> bool:
        return self._refusal is not None

    def writes_at_risk(self) -> bool:
        """Whether a write that just reported success may still have been committed
        without its data (:mod:`.parts`): the embedded store's disk is below the floor now,
        was so lately, or a broken part waits for repair. Cheap (one ``statvfs``)."""
        path = self._config.data_path
        if path is None:
            return False
        if self._refusal is not None or (self.parts is not None and self.parts.stats.awaiting):
            return True
        if time.monotonic() - self._trouble_at < self.RISK_WINDOW_S:
            return True
        try:
            st = os.statvfs(path)
        except OSError:
            return True
        return st.f_bavail * st.f_frsize < self.min_free_bytes

    def repair_parts(self) -> None:
        """Look for broken parts of the embedded store and repair them (never raises)."""
        if self.parts is None:
            return
        try:
            if self._client is None:
                self._client = open_client(self._config)
            self.parts.scan(self._client)
        except Exception as exc:
            text = str(exc).strip()
            self.parts.stats.last_error = text.splitlines()[0][:300] if text else repr(exc)
            log.warning("looking for broken parts failed: %s", self.parts.stats.last_error)

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
        owed = self.reserve.owed if self.reserve is not None else 0
        if free is not None and free - owed < self.min_free_bytes:
            self._trouble_at = time.monotonic()
            if self._refusal is None:
                self._merges(stop=True)
                log.error(
                    "the store has %s free, below the floor of %s: ingest answers 503 until "
                    "space is freed",
                    human(free),
                    human(self.min_free_bytes),
                )
            self._refusal = (
                f"the store's disk has {human(free)} free"
                + (f" ({human(owed)} of it owed to the repair reserve)" if owed else "")
                + ", below the floor of "
                f"{human(self.min_free_bytes)} (--min-free-space): spans are refused until "
                "space is freed; retry later"
            )
        elif free is not None:
            if owed and self.reserve is not None:
                self.reserve.make()
            if self._refusal is not None:
                # repaired before merges start again (they would fail on a broken part)
                self.repair_parts()
                self._merges(stop=False)
                log.warning("the store has %s free again: ingest resumes", human(free))
            self._refusal = None
        return report

    def _merges(self, stop: bool) -> None:
        """Stop background merges below the floor and start them again above it: a merge
        that runs out of space on the way can leave a broken part behind (seen with the
        embedded engine on a full filesystem: a committed part with empty files, which
        :mod:`.parts` then has to repair), and merges are what writes most once ingest
        pauses.
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
        next_parts = time.monotonic() + self._parts_interval
        while not self._stop.wait(self._interval):
            self.check()
            if time.monotonic() >= next_parts:
                self.repair_parts()
                # looked at every second while the disk is in trouble: a broken part
                # blocks reads of its table (the audit writer's included) until repaired
                troubled = time.monotonic() - self._trouble_at < self.RISK_WINDOW_S
                next_parts = time.monotonic() + (1.0 if troubled else self._parts_interval)
