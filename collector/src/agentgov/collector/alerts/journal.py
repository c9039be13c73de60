"""Where alert events are written: ``agentgov_alerts``, one row per event.

An alert's life is several rows sharing its ``AlertId``: ``fired`` (or ``throttled`` when
the same rule already fired for the session within its throttle), then what its actions
did: ``stopped``, ``approval_requested``, ``slack_sent``, ``slack_retry`` and, once
retries are spent, ``slack_dropped``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from clickhouse_connect.driver.client import Client

from agentgov.collector.store.connection import StoreConfig
from agentgov.collector.store.json_rows import JsonRowWriter

ALERTS = "agentgov_alerts"

# the events of an alert's life, as the Event column holds them
FIRED, THROTTLED, STOPPED, APPROVAL_REQUESTED = (
    "fired",
    "throttled",
    "stopped",
    "approval_requested",
)
SLACK_SENT, SLACK_RETRY, SLACK_DROPPED = "slack_sent", "slack_retry", "slack_dropped"
#: an action that raised is journaled as ``<action>_failed``
ACTION_FAILED = ("stop_failed", "slack_failed", "approval_required_failed")
EVENTS = frozenset(
    {FIRED, THROTTLED, STOPPED, APPROVAL_REQUESTED, SLACK_SENT, SLACK_RETRY, SLACK_DROPPED}
    | set(ACTION_FAILED)
)

ALERTS_TABLE = f"""
CREATE TABLE IF NOT EXISTS {ALERTS} (
    Time DateTime64(6),
    AlertId String,
    SessionId String,
    Rule LowCardinality(String),
    Severity LowCardinality(String),
    Event LowCardinality(String),
    Actions Array(LowCardinality(String)),
    Message String,
    -- delivery attempt (1-based) and its outcome: HTTP status or error text
    Attempt UInt16,
    Status String,
    -- JSON: the values that made the rule fire, the agent chain, delivery details
    Detail String
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(Time)
ORDER BY (SessionId, Time, AlertId)
"""

COLUMNS = [
    "Time",
    "AlertId",
    "SessionId",
    "Rule",
    "Severity",
    "Event",
    "Actions",
    "Message",
    "Attempt",
    "Status",
    "Detail",
]


class AlertJournal(JsonRowWriter):
    """Writes alert events behind the engine and the Slack notifier."""

    def __init__(self, store: StoreConfig, interval_s: float = 0.05) -> None:
        super().__init__(store, ALERTS, ALERTS_TABLE, "alert events", interval_s)

    def start(self) -> AlertJournal:
        super().start()
        return self

    def event(
        self,
        alert_id: str,
        session_id: str,
        rule: str,
        severity: str,
        event: str,
        *,
        actions: Sequence[str] = (),
        message: str = "",
        attempt: int = 0,
        status: str = "",
        detail: dict[str, Any] | None = None,
        at: float | None = None,
    ) -> None:
        self.put(
            json.dumps(
                {
                    "Time": f"{time.time() if at is None else at:.6f}",
                    "AlertId": alert_id,
                    "SessionId": session_id,
                    "Rule": rule,
                    "Severity": severity,
                    "Event": event,
                    "Actions": list(actions),
                    "Message": message,
                    "Attempt": attempt,
                    "Status": status,
                    "Detail": json.dumps(detail or {}, sort_keys=True, default=str),
                },
                separators=(",", ":"),
            )
        )


def recent(
    client: Client,
    session_id: str | None = None,
    rule: str | None = None,
    event: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The newest alert events, filtered; newest first."""
    where = ["1"]
    params: dict[str, Any] = {"limit": limit}
    for column, key, value in (
        ("SessionId", "s", session_id),
        ("Rule", "r", rule),
        ("Event", "e", event),
    ):
        if value:
            where.append(f"{column} = {{{key}:String}}")
            params[key] = value
    result = client.query(
        f"SELECT toUnixTimestamp64Micro(Time) AS t, AlertId, SessionId, Rule, Severity, Event, "
        f"Actions, Message, Attempt, Status, Detail FROM {ALERTS} "
        f"WHERE {' AND '.join(where)} ORDER BY Time DESC, AlertId LIMIT {{limit:UInt32}}",
        parameters=params,
    )
    out = []
    for row in result.result_rows:
        t, aid, sid, rule_, sev, ev, actions, msg, attempt, status, detail = row
        out.append(
            {
                "time": int(t) / 1e6,
                "alert_id": aid,
                "session_id": sid,
                "rule": rule_,
                "severity": sev,
                "event": ev,
                "actions": list(actions),
                "message": msg,
                "attempt": int(attempt),
                "status": status,
                "detail": json.loads(detail) if detail else {},
            }
        )
    return out


def last_fired(client: Client, since_s: float) -> dict[tuple[str, str], float]:
    """When each (rule, session) last fired within ``since_s``: throttles survive restarts."""
    result = client.query(
        f"SELECT Rule, SessionId, toUnixTimestamp64Micro(max(Time)) FROM {ALERTS} "
        "WHERE Event = 'fired' AND Time > now64(6) - toIntervalSecond({s:UInt32}) "
        "GROUP BY Rule, SessionId",
        parameters={"s": int(since_s)},
    )
    return {(r, s): int(t) / 1e6 for r, s, t in result.result_rows}
