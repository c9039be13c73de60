"""Parts the embedded engine committed broken: found, and repaired where the data still is.

Seen with the embedded engine (chDB) on a filesystem that fills up while it writes: a part
is committed although none of its files could be written (every file, ``checksums.txt``
included, is empty), and the insert or merge that made it reports success. Every later
read of that table fails (ClickHouse error 246, "Empty marks file") until the part is gone;
a restart detaches it, and for a merged part brings back the parts it was merged from, but
only if they are still on disk (ClickHouse deletes replaced parts after
``old_parts_lifetime``, and at a clean shutdown). So the collector does not wait for a
restart:

* a writer's stage is checked before its batch counts as complete (:func:`broken`, called
  by :mod:`.staging`): a broken part there fails the attempt, and the batch is written again;
* the space monitor looks at new parts every few seconds and once more before the store
  closes (:class:`PartDoctor`); on a full disk it frees its small reserve file for the
  repair (:class:`agentgov.collector.store.space.Reserve`). A broken part made by a merge is replaced by the parts it
  was merged from: hard links to them are made at once (so ClickHouse's clean-up cannot
  take them), then the broken part is detached and the links attached. A broken part of
  an insert has nothing to come back from: it is detached, so the table reads again, and
  its rows are reported lost (the stage check above keeps spans out of this case, and the
  audit writer reads back what it drained while the disk is short of space).

Only for the embedded store: a ClickHouse server's files are not the collector's to read.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from clickhouse_connect.driver.binding import format_query_value
from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

#: files every committed part with rows has, none of them empty; marks files by suffix
_REQUIRED = ("checksums.txt", "columns.txt", "count.txt")
_MARKS = re.compile(r"\.c?mrk\d?$")
#: a part name as ClickHouse makes them (partition ids have no underscore)
_PART_NAME = re.compile(r"^[0-9A-Za-z-]+_\d+_\d+_\d+(?:_\d+)?$")
_NO_ROOM = re.compile(r"NOT_ENOUGH_SPACE|Cannot reserve|No space left", re.IGNORECASE)
#: tables a writer's stage owns: checked by the writer itself, emptied after a failure
STAGE_PREFIX = "agentgov_stage_"


class BrokenPartError(RuntimeError):
    """A part just written holds rows its files do not (the write is to be done again)."""


def broken(path: str | os.PathLike[str], rows: int) -> bool:
    """Whether the part at ``path`` (holding ``rows`` rows) was committed without its
    data: a required file missing or empty, or an empty marks file."""
    if rows == 0:
        return False  # an empty part may legitimately have empty marks
    base = Path(path)
    try:
        for name in _REQUIRED:
            if (base / name).stat().st_size == 0:
                return True
        with os.scandir(base) as entries:
            for entry in entries:
                if _MARKS.search(entry.name) and entry.stat().st_size == 0:
                    return True
    except FileNotFoundError:
        # gone since ClickHouse listed it (moved or removed): not ours to judge
        return False
    return False


@dataclass(frozen=True)
class Part:
    """One row of ``system.parts``."""

    table: str
    name: str
    partition_id: str
    min_block: int
    max_block: int
    level: int
    active: bool
    path: str
    rows: int

    @property
    def made_by_merge(self) -> bool:
        """A merge (level > 0) or a mutation (a fifth number) rewrote older parts. (A
        mutation's part is replaced by its pre-mutation part, which undoes the mutation
        for those rows; agentgov's tables are never mutated.)"""
        return self.level > 0 or self.name.count("_") >= 4

    def covers(self, other: Part) -> bool:
        return (
            other.partition_id == self.partition_id
            and self.min_block <= other.min_block
            and other.max_block <= self.max_block
            and other.name != self.name
        )


@dataclass
class Repair:
    """What was done about one broken part."""

    table: str
    part: str
    rows: int
    #: the parts it was merged from, attached in its place
    restored: list[str] = field(default_factory=list)
    restored_rows: int = 0
    #: how many of ``restored`` are attached already
    attached: int = 0
    done: bool = False

    @property
    def lost_rows(self) -> int:
        return max(0, self.rows - self.restored_rows) if self.done else 0


@dataclass
class PartStats:
    broken_found: int = 0
    repaired: int = 0
    lost_parts: int = 0
    lost_rows: int = 0
    #: broken parts found and not yet repaired (e.g. no room to attach yet)
    awaiting: list[str] = field(default_factory=list)
    last_error: str = ""
    last_scan_at: float = 0.0


_PARTS_SQL = (
    "SELECT table, name, partition_id, min_block_number, max_block_number, level, active, "
    "path, rows FROM system.parts WHERE database = currentDatabase()"
)


def list_parts(client: Client, tables: list[str] | None = None, active: bool = True) -> list[Part]:
    """Parts of this database (only ``tables`` if given; active ones, or all)."""
    sql = _PARTS_SQL + (" AND active" if active else "")
    parameters: dict[str, object] = {}
    if tables is not None:
        sql += " AND table IN {t:Array(String)}"
        parameters["t"] = tables
    return [
        Part(str(t), str(n), str(p), int(lo), int(hi), int(lvl), bool(a), str(path), int(r))
        for t, n, p, lo, hi, lvl, a, path, r in client.query(sql, parameters=parameters).result_rows
    ]


def _quote(table: str) -> str:
    return "`" + table.replace("\\", "\\\\").replace("`", "\\`") + "`"


class PartDoctor:
    """Finds the embedded store's broken parts and repairs them (see the module's text).
    Parts are immutable: one found whole is not looked at again."""

    def __init__(self, make_room: Callable[[], bool] | None = None) -> None:
        """``make_room``: frees a little space when a repair is refused for the lack of it
        (detaching a part asks ClickHouse for 1 MiB, even on a full disk); True if it
        freed any."""
        self._make_room = make_room
        self._whole: set[tuple[str, str]] = set()
        #: broken part -> its repair so far (links made, maybe not yet attached)
        self._open: dict[tuple[str, str], Repair] = {}
        self.stats = PartStats()

    def scan(self, client: Client) -> list[Repair]:
        """Look at the parts committed since the last scan, repair what is broken (and
        retry repairs left unfinished); returns the repairs finished now."""
        parts = [p for p in list_parts(client) if not p.table.startswith(STAGE_PREFIX)]
        current = {(p.table, p.name) for p in parts}
        self._whole &= current
        found: list[Part] = []
        for p in parts:
            key = (p.table, p.name)
            if key in self._whole:
                continue
            if key in self._open or broken(p.path, p.rows):
                found.append(p)
            else:
                self._whole.add(key)
        finished: list[Repair] = []
        if found:
            everything = list_parts(client, sorted({p.table for p in found}), active=False)
            for p in found:
                repair = self._repair(client, p, everything)
                if repair.done:
                    finished.append(repair)
        # links made for parts that are no longer active (detached, attach pending)
        for key, repair in list(self._open.items()):
            if key not in current and not repair.done:
                self._attach(client, repair)
                if repair.done:
                    finished.append(repair)
        for repair in finished:
            self._open.pop((repair.table, repair.part), None)
        self.stats.awaiting = [f"{t}/{n}" for t, n in self._open]
        self.stats.last_scan_at = time.time()
        return finished

    def _repair(self, client: Client, part: Part, everything: list[Part]) -> Repair:
        key = (part.table, part.name)
        repair = self._open.get(key)
        if repair is None:
            self.stats.broken_found += 1
            repair = Repair(part.table, part.name, part.rows)
            self._open[key] = repair
            sources = self._sources(part, everything) if part.made_by_merge else []
            repair.restored = [s.name for s in sources]
            repair.restored_rows = sum(s.rows for s in sources)
            log.error(
                "part %s of %s was committed with empty files (the disk was full while it was "
                "written): %s",
                part.name,
                part.table,
                f"replacing it with the {len(sources)} parts it was merged from"
                if sources
                else f"detaching it; its {part.rows} rows cannot be recovered",
            )
            try:
                self._link(part, sources)
            except OSError as exc:
                self.stats.last_error = f"linking the parts under {part.name}: {exc}"
                log.warning("%s (tried again)", self.stats.last_error)
                self._open.pop(key)
                self.stats.broken_found -= 1
                return repair
        detach = f"ALTER TABLE {_quote(part.table)} DETACH PART {format_query_value(part.name)}"
        try:
            try:
                client.command(detach)
            except Exception as exc:
                if not (_NO_ROOM.search(str(exc)) and self._make_room and self._make_room()):
                    raise
                client.command(detach)
        except Exception as exc:
            self.stats.last_error = f"detaching {part.table}/{part.name}: {_first_line(exc)}"
            log.warning("%s (tried again at the next scan)", self.stats.last_error)
            return repair
        self._attach(client, repair)
        return repair

    @staticmethod
    def _sources(part: Part, everything: list[Part]) -> list[Part]:
        """The largest whole, non-overlapping replaced parts under ``part``."""
        candidates = sorted(
            (
                p
                for p in everything
                if p.table == part.table
                and not p.active
                and part.covers(p)
                and os.path.isdir(p.path)
                and not broken(p.path, p.rows)
            ),
            key=lambda p: (p.min_block, -p.max_block),
        )
        chosen: list[Part] = []
        next_block = part.min_block
        for p in candidates:
            if p.min_block >= next_block:
                chosen.append(p)
                next_block = p.max_block + 1
        return chosen

    @staticmethod
    def _link(part: Part, sources: list[Part]) -> None:
        """Hard links to the source parts in the table's ``detached`` folder (no data
        copied; ClickHouse's removal of the originals then leaves them)."""
        detached = Path(part.path.rstrip("/")).parent / "detached"
        for source in sources:
            if not _PART_NAME.match(source.name):
                raise OSError(f"unexpected part name {source.name!r}")
            target = detached / source.name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(source.path, target, copy_function=os.link)

    def _attach(self, client: Client, repair: Repair) -> None:
        while repair.attached < len(repair.restored):
            name = repair.restored[repair.attached]
            try:
                client.command(
                    f"ALTER TABLE {_quote(repair.table)} ATTACH PART {format_query_value(name)}"
                )
            except Exception as exc:
                self.stats.last_error = f"attaching {repair.table}/{name}: {_first_line(exc)}"
                log.warning("%s (tried again at the next scan)", self.stats.last_error)
                return
            repair.attached += 1
        repair.done = True
        self.stats.repaired += 1
        if repair.lost_rows:
            self.stats.lost_parts += 1
            self.stats.lost_rows += repair.lost_rows
        log.warning(
            "part %s of %s repaired: %d of its %d rows restored from %s",
            repair.part,
            repair.table,
            repair.restored_rows,
            repair.rows,
            ", ".join(repair.restored) or "nothing (none of it is left)",
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else repr(exc)
