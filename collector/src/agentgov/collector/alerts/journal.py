"""Where alert events are written: ``agentgov_alerts``, one row per event.

An alert's life is several rows sharing its ``AlertId``: ``fired`` (or ``throttled`` when
the same rule already fired for the session within its throttle), then what its actions
did: ``stopped``, ``approval_requested``, ``slack_sent``, ``slack_retry`` and, once
retries are spent, ``slack_dropped``.
"""

from __future__ import annotations

ALERTS = "agentgov_alerts"

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
