"""The local audit log: every decision record on disk before its answer, never on ClickHouse.

Decisions never wait on ClickHouse, yet every answered decision must be recorded. The
governor appends each record here before it applies it (a copy into a shared memory map
of a file whose space was reserved in advance: about a microsecond, and no system call,
so the decision path never gives up the interpreter lock to wait for the kernel), a
background thread ``fdatasync``-s the log in groups, and the audit writer drains it into
``agentgov_decisions``; what was drained is checkpointed, what was not is replayed at
start.

What that guarantees: a record is in the operating system's page cache of the log file
before its answer is sent, so a crash of the collector (``kill -9``, an out-of-memory
kill) loses nothing; a crash of the machine itself can lose the records of the last
group window (``fsync_interval_s`` plus one ``fdatasync``, milliseconds).

Layout: a fixed set of segment files, each written in full (with zeros) when the log is
made, so appends need no new blocks: the log keeps working when the store's disk is
full. Each segment starts with a header (its first sequence number) and holds frames
``length, crc32, seq, payload``; sequence numbers rise by one per record, so a torn tail
or a stale frame of a recycled segment ends the scan. A segment is reused once all its
records were drained. The checkpoint (the highest drained sequence number) is written in
place to one of two slots, alternately, so a torn write leaves the other one valid.

The log is bounded: when every segment holds records still waiting for ClickHouse, an
append raises :class:`AuditUnavailable` and the decision fails closed.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SEG_MAGIC = b"AGAUDLG1"
_CP_MAGIC = b"AGAUDCP1"
_HEADER = 32  # segment header: magic, first seq, crc, padding
_FRAME = struct.Struct("<IIQ")  # payload length, crc32(seq + payload), seq
_CP = struct.Struct("<8sQQI")  # magic, drained seq, write counter, crc32
_CP_SLOT = 32


class AuditUnavailable(RuntimeError):
    """A decision's record cannot be made durable: the decision fails closed (``stop``)
    with :attr:`reason`, and nothing about the session changes."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class _Segment:
    path: Path
    fd: int
    size: int
    #: the whole file, mapped shared: appends are copies into the page cache
    mm: mmap.mmap
    first_seq: int = 0  # 0: never used
    last_seq: int = 0
    end: int = _HEADER  # where the next frame goes


@dataclass
class LogStats:
    appended: int = 0
    fsyncs: int = 0
    fsync_failures: int = 0
    last_error: str = ""


def _seg_header(first_seq: int) -> bytes:
    body = _SEG_MAGIC + struct.pack("<Q", first_seq)
    return body + struct.pack("<I", zlib.crc32(body)) + bytes(_HEADER - len(body) - 4)


class AuditLog:
    """An append-only, preallocated, group-fsync'd log of audit records in ``directory``.

    ``capacity_bytes`` is split into ``segments`` files; ``fsync_interval_s`` is the
    longest a written record waits for its ``fdatasync`` (the group's window).
    """

    def __init__(
        self,
        directory: str | Path,
        capacity_bytes: int = 64 << 20,
        segments: int = 8,
        fsync_interval_s: float = 0.005,
    ) -> None:
        self.directory = Path(directory)
        self._segments_wanted = max(2, segments)
        self._segment_bytes = max(64 << 10, capacity_bytes // self._segments_wanted)
        self._interval = fsync_interval_s
        self._lock = threading.Lock()
        self._cp_lock = threading.Lock()
        self._segs: list[_Segment] = []
        self._active = 0
        self._next_seq = 1
        self._drained = 0
        self._cp_fd = -1
        self._cp_counter = 0
        self._dirty: set[int] = set()
        self._synced = 0
        self._failed = ""
        self._wake = threading.Event()
        self._synced_cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = LogStats()

    # -- opening and recovery ------------------------------------------------------------

    def open(self) -> list[tuple[int, bytes]]:
        """Open (or make) the log; returns the records not yet drained, in order."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._open_checkpoint()
            existing = sorted(self.directory.glob("segment-*.log"))
            count = max(len(existing), self._segments_wanted)
            for n in range(count):
                self._segs.append(self._open_segment(self.directory / f"segment-{n:03d}.log"))
        except OSError as exc:
            raise OSError(
                f"cannot open the audit log in {self.directory}: {exc}. It needs "
                f"{self._segment_bytes * self._segments_wanted} bytes of space there "
                "(--audit-log-size) and write access."
            ) from exc
        records: list[tuple[int, bytes]] = []
        for seg in self._segs:
            records.extend(self._scan(seg))
        records.sort()
        undrained = [(seq, payload) for seq, payload in records if seq > self._drained]
        used = [s for s in self._segs if s.first_seq]
        last = max([s.last_seq for s in used] + [self._drained])
        self._next_seq = last + 1
        if used:
            self._active = self._segs.index(max(used, key=lambda s: s.first_seq))
        else:
            self._recycle(0)
        self._synced = last
        self._thread = threading.Thread(target=self._run, name="agentgov-audit-fsync", daemon=True)
        self._thread.start()
        return undrained

    def _open_checkpoint(self) -> None:
        path = self.directory / "checkpoint"
        self._cp_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._cp_fd).st_size < 2 * _CP_SLOT:
            os.posix_fallocate(self._cp_fd, 0, 2 * _CP_SLOT)
            os.fsync(self._cp_fd)
        best = (0, 0)
        for slot in range(2):
            raw = os.pread(self._cp_fd, _CP.size, slot * _CP_SLOT)
            magic, drained, counter, crc = _CP.unpack(raw)
            if magic == _CP_MAGIC and zlib.crc32(raw[: _CP.size - 4]) == crc:
                best = max(best, (counter, drained))
        self._cp_counter, self._drained = best

    def _open_segment(self, path: Path) -> _Segment:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        size = os.fstat(fd).st_size
        if size < self._segment_bytes and size < _HEADER:
            # reserved now, so that appends never need a block the store may have taken;
            # written with zeros rather than only allocated, so that the blocks hold data:
            # an fdatasync of a record then writes the record alone, where an allocated
            # block never written would also need a journal commit to mark it written
            zeros = bytes(1 << 20)
            for offset in range(0, self._segment_bytes, len(zeros)):
                os.pwrite(fd, zeros[: self._segment_bytes - offset], offset)
            os.fsync(fd)
            size = self._segment_bytes
        # every block is written (above, or by an earlier run): writes through the map
        # never need space the store may have taken meanwhile
        return _Segment(path, fd, size, mmap.mmap(fd, size, mmap.MAP_SHARED))

    def _scan(self, seg: _Segment) -> list[tuple[int, bytes]]:
        head = os.pread(seg.fd, _HEADER, 0)
        body = head[:16]
        if head[:8] != _SEG_MAGIC or struct.unpack("<I", head[16:20])[0] != zlib.crc32(body):
            return []
        seg.first_seq = struct.unpack("<Q", head[8:16])[0]
        expected, offset = seg.first_seq, _HEADER
        out: list[tuple[int, bytes]] = []
        while offset + _FRAME.size <= seg.size:
            length, crc, seq = _FRAME.unpack(os.pread(seg.fd, _FRAME.size, offset))
            if length == 0 or seq != expected or offset + _FRAME.size + length > seg.size:
                break
            payload = os.pread(seg.fd, length, offset + _FRAME.size)
            if zlib.crc32(struct.pack("<Q", seq) + payload) != crc:
                break  # a torn write: the tail ends here
            out.append((seq, payload))
            expected += 1
            offset += _FRAME.size + length
        seg.last_seq = expected - 1
        seg.end = offset
        return out

    def _recycle(self, index: int) -> None:
        """Start segment ``index`` afresh at the next sequence number (header and an empty
        first frame in one write: stale frames behind it carry older numbers)."""
        seg = self._segs[index]
        head = _seg_header(self._next_seq) + bytes(_FRAME.size)
        seg.mm[: len(head)] = head
        seg.first_seq, seg.last_seq, seg.end = self._next_seq, self._next_seq - 1, _HEADER
        self._active = index
        self._dirty.add(index)

    # -- appending -------------------------------------------------------------------------

    def append(self, payload: bytes) -> int:
        """Write one record; returns its sequence number. Raises :class:`AuditUnavailable`
        when the log is full of records not yet drained, or cannot be written."""
        size = _FRAME.size + len(payload)
        with self._lock:
            if self._failed:
                raise AuditUnavailable(
                    "audit_log_failed",
                    f"the local audit log cannot be written ({self._failed}); "
                    "decisions are refused until it can: check the disk, then restart",
                )
            if size > self._segment_bytes - _HEADER:
                raise AuditUnavailable(
                    "audit_record_too_large",
                    f"a decision record of {len(payload)} bytes exceeds a log segment; "
                    "raise --audit-log-size",
                )
            seg = self._segs[self._active]
            try:
                if seg.end + size > seg.size:
                    nxt = (self._active + 1) % len(self._segs)
                    target = self._segs[nxt]
                    if target.first_seq and target.last_seq > self._drained:
                        raise AuditUnavailable(
                            "audit_log_full",
                            f"{self._next_seq - 1 - self._drained} decision records wait to be "
                            f"written to ClickHouse and the local audit log "
                            f"({self._segment_bytes * len(self._segs)} bytes, --audit-log-size) "
                            "is full: decisions are refused until the store takes them",
                        )
                    self._recycle(nxt)
                    seg = target
                seq = self._next_seq
                header = _FRAME.pack(
                    len(payload), zlib.crc32(struct.pack("<Q", seq) + payload), seq
                )
                # no system call here (see the module's docstring): the kernel writes the
                # page back, and the group thread's fdatasync makes it durable
                seg.mm[seg.end : seg.end + size] = header + payload
            except (OSError, ValueError) as exc:
                self._failed = str(exc)
                self.stats.last_error = str(exc)
                log.error("the local audit log cannot be written: %s", exc)
                raise AuditUnavailable(
                    "audit_log_failed", f"the local audit log cannot be written: {exc}"
                ) from exc
            seg.end += size
            seg.last_seq = seq
            self._next_seq = seq + 1
            # only the first record since the sync thread last looked wakes it: the others
            # of its group ride along, and the decision path skips a condition variable
            wake = not self._wake.is_set()
            self._dirty.add(self._active)
            self.stats.appended += 1
        if wake:
            self._wake.set()
        return seq

    # -- durability --------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    @property
    def synced_seq(self) -> int:
        """Every record up to this one is on disk (fdatasync returned)."""
        return self._synced

    def wait_synced(self, seq: int, timeout: float = 5.0) -> bool:
        with self._synced_cond:
            return self._synced_cond.wait_for(lambda: self._synced >= seq, timeout)

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            self.sync()
            # records that arrive meanwhile share the next fdatasync
            time.sleep(self._interval)

    def sync(self) -> None:
        with self._lock:
            dirty = [self._segs[i].fd for i in self._dirty]
            self._dirty.clear()
            upto = self._next_seq - 1
        try:
            for fd in dirty:
                os.fdatasync(fd)
        except OSError as exc:
            with self._lock:
                self._failed = f"fdatasync: {exc}"
            self.stats.fsync_failures += 1
            self.stats.last_error = str(exc)
            log.error("the local audit log could not be synced to disk: %s", exc)
            return
        self.stats.fsyncs += 1
        with self._synced_cond:
            self._synced = max(self._synced, upto)
            self._synced_cond.notify_all()

    # -- draining ----------------------------------------------------------------------------

    def drained(self, seq: int) -> None:
        """Every record up to ``seq`` is in ClickHouse: checkpoint it (durably, before its
        segments may be reused)."""
        with self._cp_lock:
            if seq <= self._drained:
                return
            self._cp_counter += 1
            body = struct.pack("<8sQQ", _CP_MAGIC, seq, self._cp_counter)
            raw = body + struct.pack("<I", zlib.crc32(body))
            os.pwrite(self._cp_fd, raw, (self._cp_counter % 2) * _CP_SLOT)
            os.fdatasync(self._cp_fd)
            with self._lock:
                self._drained = seq

    @property
    def drained_seq(self) -> int:
        return self._drained

    @property
    def capacity_bytes(self) -> int:
        return self._segment_bytes * len(self._segs)

    @property
    def used_bytes(self) -> int:
        """Bytes held by records not yet drained (whole segments' share, roughly)."""
        with self._lock:
            used = 0
            for seg in self._segs:
                if seg.first_seq and seg.last_seq > self._drained:
                    used += seg.end - _HEADER
            return used

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.sync()
        for seg in self._segs:
            seg.mm.close()
            os.close(seg.fd)
        self._segs = []
        if self._cp_fd >= 0:
            os.close(self._cp_fd)
            self._cp_fd = -1
