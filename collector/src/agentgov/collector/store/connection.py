"""Opening the ClickHouse store: chDB embedded (``chdb://``) or a server (``http(s)://``).

All access goes through ``clickhouse-connect``; the DSN alone picks the deployment.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import clickhouse_connect
from clickhouse_connect.driver.binding import format_query_value, quote_identifier
from clickhouse_connect.driver.client import Client

from agentgov.collector.risk import RiskRules
from agentgov.collector.store import schema

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = "agentgov-data"


class StoreError(RuntimeError):
    """The store cannot be opened or prepared; the message says how to fix it."""


def default_dsn(cwd: str | Path | None = None) -> str:
    """The embedded default: a chDB data folder under the working directory."""
    return f"chdb://{(Path(cwd or os.getcwd()) / DEFAULT_DATA_DIR).resolve()}"


@dataclass(frozen=True)
class StoreConfig:
    dsn: str

    @property
    def embedded(self) -> bool:
        return self.dsn.startswith("chdb:")

    @property
    def data_path(self) -> Path | None:
        """The embedded store's data folder (None for a server)."""
        return Path(_chdb_path(self.dsn)) if self.embedded else None

    def redacted(self) -> str:
        """The DSN without its password, for logs and messages."""
        parts = urlsplit(self.dsn)
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
            return urlunsplit(parts._replace(netloc=netloc))
        return self.dsn


def _chdb_path(dsn: str) -> str:
    # chdb:///abs/path -> /abs/path ; chdb://relative/path -> relative/path
    rest = dsn[len("chdb://") :]
    return rest if rest.startswith("/") else str(Path(rest).resolve())


def open_client(config: StoreConfig) -> Client:
    """A new client on the store (each thread that queries should hold its own)."""
    try:
        if config.embedded:
            path = _chdb_path(config.dsn)
            Path(path).mkdir(parents=True, exist_ok=True)
            return clickhouse_connect.get_client(dsn=f"chdb://{path}")
        return clickhouse_connect.get_client(dsn=config.dsn)
    except Exception as exc:
        raise StoreError(
            f"cannot open the ClickHouse store {config.redacted()}: {exc}. "
            "Use chdb:///path for the embedded engine or http(s)://user:password@host:8123/db "
            "for a server."
        ) from exc


def _ensure_database(config: StoreConfig) -> None:
    if config.embedded:
        return
    database = urlsplit(config.dsn).path.strip("/")
    if not database or database == "default":
        return
    parts = urlsplit(config.dsn)
    bare = StoreConfig(urlunsplit(parts._replace(path="/default")))
    client = open_client(bare)
    try:
        client.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)}")
    finally:
        client.close()


def _engine(client: Client, name: str) -> str:
    rows = client.query(
        "SELECT engine FROM system.tables WHERE database = currentDatabase() AND name = {n:String}",
        parameters={"n": name},
    ).result_rows
    return str(rows[0][0]) if rows else ""


def _comment(client: Client, name: str) -> str | None:
    rows = client.query(
        "SELECT comment FROM system.tables WHERE database = currentDatabase() AND name = {n:String}",
        parameters={"n": name},
    ).result_rows
    return str(rows[0][0]) if rows else None


def _add_missing_columns(client: Client, table: str, columns_ddl: str) -> None:
    """Columns a newer version added to a table an older one made."""
    for line in columns_ddl.strip().splitlines():
        line = line.strip().rstrip(",")
        if line and not line.startswith("--"):
            client.command(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {line}")


def _from_single_tables(client: Client) -> None:
    """Stores made before foreign traces were resolved kept agentgov's own spans and their
    aggregates in tables named like today's views: rename them to the native tables."""
    if _engine(client, schema.SPANS) in ("", "View"):
        return
    log.warning("upgrading the store: agentgov_spans, _sessions and _agents become views")
    for old in (f"{schema.SPANS}_mv", f"{schema.SESSIONS}_mv", f"{schema.AGENTS}_mv"):
        client.command(f"DROP VIEW IF EXISTS {old}")
    client.command(f"DROP VIEW IF EXISTS {schema.EDGES}")
    client.command(
        f"RENAME TABLE {schema.SPANS} TO {schema.SPANS_NATIVE}, "
        f"{schema.SESSIONS} TO {schema.SESSIONS_NATIVE}, {schema.AGENTS} TO {schema.AGENTS_NATIVE}"
    )
    _add_missing_columns(client, schema.SPANS_NATIVE, schema.SPAN_COLUMNS + ",\nInsertId String")
    _add_missing_columns(
        client,
        schema.AGENTS_NATIVE,
        "Via SimpleAggregateFunction(max, String),\nEvidence SimpleAggregateFunction(max, String)",
    )


def migrate(client: Client, rules: RiskRules) -> None:
    """Create every table and view if missing, and bring the views that type spans up to
    the model and risk rules in force.

    A view of another version is changed in place (``ALTER TABLE ... MODIFY QUERY``), an
    atomic swap: a writer inserting meanwhile (another collector, or the OpenTelemetry
    Collector's exporter writing straight into otel_traces) never finds it missing, so no
    derived row is lost or doubled. Idempotent: safe on every start.
    """
    _from_single_tables(client)
    mv = f"{schema.SPANS_NATIVE}_mv"
    version = schema.view_version(rules)
    current = _comment(client, mv)
    if current is not None and current != version:
        log.info("the model or the risk rules changed: updating %s in place", mv)
        client.command(f"ALTER TABLE {mv} MODIFY QUERY {schema.native_spans_select(rules)}")
        client.command(f"ALTER TABLE {mv} MODIFY COMMENT {format_query_value(version)}")
    for statement in schema.statements(rules):
        client.command(statement)


def prepare(config: StoreConfig, rules: RiskRules) -> Client:
    """Open the store, create its schema, and return a client for the caller's use."""
    _ensure_database(config)
    client = open_client(config)
    try:
        migrate(client, rules)
    except Exception as exc:
        client.close()
        raise StoreError(
            f"cannot create the agentgov schema in {config.redacted()}: {exc}"
        ) from exc
    return client
