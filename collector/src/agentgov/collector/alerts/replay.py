"""A stored session read back as alert facts, for ``agentgov alerts test``."""

from __future__ import annotations

from clickhouse_connect.driver.client import Client

from agentgov.collector.alerts.facts import FACT_COLUMNS, SpanFact, facts_from_rows
from agentgov.collector.store import schema


def stored_facts(client: Client, session_id: str) -> list[SpanFact]:
    """The session's tool calls, agents and messages, as the live engine reads them."""
    rows = client.query(
        f"SELECT {FACT_COLUMNS} FROM {schema.SPANS} WHERE SessionId = {{s:String}} "
        "ORDER BY Timestamp, SpanId",
        parameters={"s": session_id},
    ).result_rows
    facts = facts_from_rows(rows)
    facts.sort(key=lambda f: f.time)
    return facts
