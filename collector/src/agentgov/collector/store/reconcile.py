"""Repair of the governance tables after an insert was cut short.

One insert runs a chain of materialized views (``otel_traces`` -> ``agentgov_spans`` ->
sessions and agents), and a crash can stop it between two of them: spans then sit in
``otel_traces`` without their typed rows or aggregates. :func:`reconcile` brings the
derived tables back in line for the traces of such a request, idempotently:

* typed spans missing from ``agentgov_spans`` are derived again (the view's own SELECT);
* session and agent aggregates get a correction row: sum columns receive the difference
  between the full aggregate and the stored one, max/min/uniq columns the full value,
  which merging makes harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from clickhouse_connect.driver.client import Client

from agentgov.collector.risk import RiskRules
from agentgov.collector.store import schema

log = logging.getLogger(__name__)

_SESSION_SUMS = {"Spans", "ToolCalls", "Handoffs", "InputTokens", "OutputTokens", "Errors"}
_SESSION_FLOAT_SUMS = {"CostUsd", "RiskLogSum"}
_AGENT_SUMS = {"ToolCalls"}
_AGENT_FLOAT_SUMS = {"CostUsd"}


def _columns(client: Client, table: str) -> list[str]:
    rows = client.query(
        "SELECT name FROM system.columns WHERE database = currentDatabase() "
        "AND table = {t:String} ORDER BY position",
        parameters={"t": table},
    ).result_rows
    return [r[0] for r in rows]


def _correction(
    client: Client,
    table: str,
    full_select: str,
    keys: Sequence[str],
    sums: set[str],
    float_sums: set[str],
    sessions: list[str],
) -> None:
    cols = _columns(client, table)
    picks = []
    for c in cols:
        if c in sums:
            picks.append(f"if(f.{c} > c.{c}, f.{c} - c.{c}, 0) AS {c}")
        elif c in float_sums:
            picks.append(f"f.{c} - c.{c} AS {c}")
        else:
            picks.append(f"f.{c} AS {c}")
    stored = ", ".join(f"sum({c}) AS {c}" for c in sorted(sums | float_sums))
    key_list = ", ".join(keys)
    on = " AND ".join(f"f.{k} = c.{k}" for k in keys)
    client.command(
        f"INSERT INTO {table} ({', '.join(cols)}) "
        f"SELECT {', '.join(picks)} FROM ({full_select}) AS f "
        f"LEFT JOIN (SELECT {key_list}, {stored} FROM {table} "
        f"WHERE SessionId IN {{s:Array(String)}} GROUP BY {key_list}) AS c ON {on}",
        parameters={"s": sessions},
    )


def reconcile(client: Client, rules: RiskRules, trace_ids: Sequence[str]) -> list[str]:
    """Repair the derived tables for these traces; returns the sessions touched."""
    ids = sorted(set(trace_ids))
    if not ids:
        return []
    p = {"t": ids}
    spans_cols = _columns(client, schema.SPANS_NATIVE)
    missing = (
        "AND TraceId IN {t:Array(String)} AND (TraceId, SpanId) NOT IN "
        f"(SELECT TraceId, SpanId FROM {schema.SPANS_NATIVE} WHERE TraceId IN {{t:Array(String)}})"
    )
    client.command(
        f"INSERT INTO {schema.SPANS_NATIVE} ({', '.join(spans_cols)}) "
        f"SELECT {', '.join(spans_cols)} FROM ({schema.native_spans_select(rules, missing)})",
        parameters=p,
    )
    client.command(
        f"INSERT INTO {schema.TRACES}_trace_id_ts SELECT TraceId, min(Timestamp), max(Timestamp) "
        f"FROM {schema.TRACES} WHERE TraceId IN {{t:Array(String)}} GROUP BY TraceId",
        parameters=p,
    )
    sessions = [
        r[0]
        for r in client.query(
            f"SELECT DISTINCT SessionId FROM {schema.SPANS_NATIVE} "
            "WHERE TraceId IN {t:Array(String)}",
            parameters=p,
        ).result_rows
    ]
    if sessions:
        where = "WHERE SessionId IN {s:Array(String)}"
        _correction(
            client,
            schema.SESSIONS_NATIVE,
            schema.SESSIONS_SELECT.format(table=schema.SPANS_NATIVE, where=where),
            ["SessionId"],
            _SESSION_SUMS,
            _SESSION_FLOAT_SUMS,
            sessions,
        )
        _correction(
            client,
            schema.AGENTS_NATIVE,
            schema.AGENTS_SELECT.format(
                table=schema.SPANS_NATIVE, where="AND SessionId IN {s:Array(String)}"
            ),
            ["SessionId", "AgentId"],
            _AGENT_SUMS,
            _AGENT_FLOAT_SUMS,
            sessions,
        )
    log.warning("reconciled the governance tables of %d sessions", len(sessions))
    return sessions
