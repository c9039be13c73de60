"""A writer's stage: where a batch is written whole before any of it reaches the store.

One OTLP insert runs a chain of materialized views (``otel_traces`` and the tables derived
from it), and ClickHouse commits each table's part on its own: a failure in the middle of
the chain (a full disk, too many parts, a memory limit, a server going away) would leave
spans in some tables and not in others. So each writer thread inserts into its own copy
of the chain (same tables, same views, names prefixed with the stage's) and, once the
whole chain succeeded there, moves the parts into the real tables
(``ALTER TABLE ... MOVE PARTITION ... TO TABLE``: hard links, no rewrite, no view runs).

The batch is therefore all or nothing:

* a failure while writing the stage leaves the real tables untouched; the stage is
  emptied and the batch fails as a whole (its senders retry);
* the engine can commit a part with empty files while the disk is full and still report
  success (:mod:`.parts`): on the embedded store the stage's parts are looked at before
  the batch counts as complete, and a broken one fails the attempt like any other error;
* once the stage holds the complete batch, a marker row (:data:`schema.STAGES`) says so,
  and from then on the batch only moves forward: moves are retried until done, also by
  the next start after a crash, and its receipts are written committed.
"""

from __future__ import annotations

import logging
import time

from clickhouse_connect.driver.binding import format_query_value
from clickhouse_connect.driver.client import Client

from agentgov.collector.risk import RiskRules
from agentgov.collector.store import schema
from agentgov.collector.store.parts import BrokenPartError, broken, list_parts

log = logging.getLogger(__name__)

COMMITTED = 2


class Stage:
    """One writer thread's copy of the write chain (``prefix``: unique per thread and
    collector, e.g. ``agentgov_stage_local_0``)."""

    def __init__(
        self, prefix: str, rules: RiskRules, settings: dict[str, object], local: bool = False
    ) -> None:
        self.prefix = prefix
        #: the store's files are on this machine (embedded): its parts can be looked at
        self._local = local
        #: partitions per table of the batch just written, for its first move
        self._partitions: dict[str, list[str]] | None = None
        self._rules = rules
        self._settings = settings
        #: the stage may hold rows of a failed attempt: empty it before the next batch
        self.dirty = False
        #: the insert token of a complete batch still to move or settle
        self.holding = ""
        self._digests: list[str] = []
        #: a marker write failed: it may have landed all the same (a server's answer lost)
        self._marker_unsure = False

    def table(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    # -- life cycle ----------------------------------------------------------------------

    def recreate(self, client: Client) -> None:
        """Drop and create the stage from the schema in force (the real views may have
        changed since it was made). Call only when it holds no complete batch."""
        self.drop(client)
        for statement in schema.stage_statements(self._rules, self.prefix):
            client.command(statement)
        self.dirty = False

    def drop(self, client: Client) -> None:
        for view in schema.write_chain_views(self._rules):
            name = view.split("EXISTS", 1)[1].split()[0]
            client.command(f"DROP VIEW IF EXISTS {self.table(name)}")
        for name in (schema.INGEST, *schema.WRITE_CHAIN):
            client.command(f"DROP TABLE IF EXISTS {self.table(name)}")

    def recover(self, client: Client) -> list[str]:
        """At start: finish moving a batch a crash left complete in the stage; returns
        the digests of the requests it held (now committed)."""
        rows = client.query(
            f"SELECT argMax(InsertId, Version), argMax(Digests, Version) FROM {schema.STAGES} "
            "WHERE Stage = {s:String}",
            parameters={"s": self.prefix},
        ).result_rows
        if not rows or not rows[0][0]:
            return []
        self.holding, self._digests = str(rows[0][0]), list(rows[0][1])
        exists = client.query(
            "SELECT count() FROM system.tables WHERE database = currentDatabase() "
            "AND name = {n:String}",
            parameters={"n": self.table(schema.TRACES)},
        ).result_rows[0][0]
        if exists:
            log.warning(
                "a batch of %d OTLP requests was complete in stage %s when the collector "
                "stopped: moving it into the store",
                len(self._digests),
                self.prefix,
            )
            self.move(client)
        digests = self._digests
        self.settle(client)
        return digests

    # -- one batch -------------------------------------------------------------------------

    def clean(self, client: Client) -> None:
        """Empty the stage after a failed attempt (its rows never reached the store)."""
        if not self.dirty:
            return
        if self._marker_unsure:
            # cleared before the rows go: a start after a crash in between must never
            # take an empty stage for a complete batch (and commit requests never stored)
            self._mark(client, "", [])
            self._marker_unsure = False
        for name in schema.WRITE_CHAIN:
            client.command(f"TRUNCATE TABLE IF EXISTS {self.table(name)}")
        self.dirty = False

    def write(self, client: Client, block: bytes, insert_id: str, digests: list[str]) -> None:
        """Write a batch into the stage and mark it complete there; raises on any failure
        (the stage is then dirty: :meth:`clean` before the next batch)."""
        self.clean(client)
        self.dirty = True
        if block:
            # the views stamp every row they derive with this token (InsertId), so the
            # batch's rows can be read back at once, and only them
            settings = {**self._settings, "insert_deduplication_token": insert_id}
            client.raw_insert(
                self.table(schema.INGEST), insert_block=block, fmt="Protobuf", settings=settings
            )
        self._partitions = self.check_parts(client)
        self._marker_unsure = True
        self._mark(client, insert_id, digests)
        self._marker_unsure = False
        self.dirty = False
        self.holding, self._digests = insert_id, digests

    def move(self, client: Client) -> None:
        """Move every part of the stage into the real tables (one ALTER per table: each
        moves whole parts, so a repeat after a failure moves only what is left)."""
        # the batch's own check listed them; a repeat looks again (and only moves on: the
        # batch is complete, a part breaking now is for the part doctor)
        by_table = self._partitions
        if by_table is None:
            by_table = self.check_parts(client, verify=False)
        self._partitions = None
        for name in schema.WRITE_CHAIN:
            ids = by_table.get(self.table(name))
            if not ids:
                continue
            moves = ", ".join(
                f"MOVE PARTITION ID {format_query_value(p)} TO TABLE {name}" for p in sorted(ids)
            )
            client.command(f"ALTER TABLE {self.table(name)} {moves}")

    def check_parts(self, client: Client, verify: bool = True) -> dict[str, list[str]]:
        """The stage's partitions per table; with ``verify`` on the embedded store, raises
        :class:`BrokenPartError` if a part holds rows its files do not."""
        partitions: dict[str, set[str]] = {}
        for part in list_parts(client, [self.table(t) for t in schema.WRITE_CHAIN]):
            if verify and self._local and broken(part.path, part.rows):
                raise BrokenPartError(
                    f"the store committed part {part.name} of {part.table} with empty files "
                    "(its disk is full?): the batch is written again"
                )
            partitions.setdefault(part.table, set()).add(part.partition_id)
        return {t: sorted(p) for t, p in partitions.items()}

    def settle(self, client: Client) -> None:
        """After the moves: the batch's receipts committed, the marker cleared."""
        if self._digests:
            client.insert(
                schema.RECEIPTS,
                [[d, COMMITTED, []] for d in self._digests],
                column_names=["Digest", "State", "TraceIds"],
            )
        self._mark(client, "", [])
        self.holding, self._digests = "", []

    def _mark(self, client: Client, insert_id: str, digests: list[str]) -> None:
        client.insert(
            schema.STAGES,
            [[self.prefix, insert_id, digests, time.time_ns()]],
            column_names=["Stage", "InsertId", "Digests", "Version"],
        )
