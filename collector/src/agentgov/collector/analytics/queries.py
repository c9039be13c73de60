"""Where governance questions become SQL. Every value is a bound parameter.

:class:`Analytics` returns pandas DataFrames (the Python API); the HTTP API and the CLI
render the same frames as JSON and text.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import pandas as pd
from clickhouse_connect.driver.client import Client

from agentgov.collector.store import schema
from agentgov.instrumentation.lineage import check_id

T = TypeVar("T")


class SessionNotFound(LookupError):
    """No span of this session is stored."""


_SESSION_RISK = "toUInt8(round(100 * (1 - exp(sum(RiskLogSum)))))"

_SESSION_COLUMNS = f"""
    SessionId AS session_id,
    min(FirstSeen) AS first_seen,
    max(LastSeen) AS last_seen,
    max(Intent) AS intent,
    uniqExactMerge(Agents) AS agents,
    sum(Spans) AS spans,
    max(MaxDepth) AS max_depth,
    sum(Handoffs) AS handoffs,
    round(sum(CostUsd), 6) AS usd,
    sum(ToolCalls) AS tool_calls,
    sum(InputTokens) AS input_tokens,
    sum(OutputTokens) AS output_tokens,
    max(MaxRisk) AS max_command_risk,
    {_SESSION_RISK} AS session_risk,
    sum(Errors) AS errors,
    if(max(RootEnded) = 1, 'completed', 'running') AS status
FROM {schema.SESSIONS}
"""


@dataclass(frozen=True)
class Graph:
    """A session's delegation graph: agents as nodes, parent → child as edges."""

    nodes: pd.DataFrame
    edges: pd.DataFrame


class Analytics:
    """Governance queries on one ClickHouse client (calls are serialized on it)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._client.close()

    def _df(self, sql: str, parameters: dict[str, Any]) -> pd.DataFrame:
        # Plain columns into a frame: for the small results these queries return this is
        # several times cheaper than the driver's numpy-based DataFrame path.
        with self._lock:
            result = self._client.query(sql, parameters=parameters)
        return pd.DataFrame(
            dict(zip(result.column_names, result.result_columns, strict=True)),
            columns=list(result.column_names),
        )

    def sessions(
        self, limit: int = 50, order: Literal["recent", "risk"] = "recent"
    ) -> pd.DataFrame:
        """Recent sessions (or the riskiest), one row each with their governance figures."""
        if order == "risk":
            pick = f"{_SESSION_RISK} DESC, max(LastSeen) DESC"
            order_by = "session_risk DESC, last_seen DESC"
        else:
            pick, order_by = "max(LastSeen) DESC", "last_seen DESC"
        # Two phases: rank sessions on two light aggregates, then read every figure of the
        # chosen few only (merging all states of all sessions costs several times more).
        return self._df(
            f"SELECT {_SESSION_COLUMNS} WHERE SessionId IN ("
            f"SELECT SessionId FROM {schema.SESSIONS} GROUP BY SessionId "
            f"ORDER BY {pick} LIMIT {{limit:UInt32}}) "
            f"GROUP BY SessionId ORDER BY {order_by}",
            {"limit": max(1, min(int(limit), 10_000))},
        )

    def session(self, session_id: str) -> dict[str, Any]:
        """One session's summary; raises :class:`SessionNotFound`."""
        check_id(session_id, "session id")
        df = self._df(
            f"SELECT {_SESSION_COLUMNS} WHERE SessionId = {{sid:String}} GROUP BY SessionId",
            {"sid": session_id},
        )
        if df.empty:
            raise SessionNotFound(session_id)
        return dict(df.iloc[0].to_dict())

    def graph(self, session_id: str) -> Graph:
        """Agents of a session with role, depth, risk; its delegation edges (parent → child)."""
        check_id(session_id, "session id")
        nodes = self._df(
            f"""
            SELECT AgentId AS id, max(Name) AS name, max(Role) AS role, min(Depth) AS depth,
                   max(Risk) AS risk, sum(ToolCalls) AS tool_calls,
                   round(sum(CostUsd), 6) AS usd, max(ParentId) AS parent_id,
                   max(Task) AS task, max(Errors) AS error, max(Via) AS via,
                   max(Evidence) AS evidence
            FROM {schema.AGENTS}
            WHERE SessionId = {{sid:String}}
            GROUP BY AgentId
            ORDER BY depth, id
            """,
            {"sid": session_id},
        )
        if nodes.empty:
            raise SessionNotFound(session_id)
        # an agent may have more than one delegator (work handed back to it): edges are
        # read from the edges view, not from each agent's one parent
        edges = self._df(
            f"""
            SELECT ParentAgentId AS source, AgentId AS target, Task AS task, Via AS via
            FROM {schema.EDGES}
            WHERE SessionId = {{sid:String}}
            ORDER BY Timestamp, source, target
            """,
            {"sid": session_id},
        )
        return Graph(nodes, edges)

    def audit(self, session_id: str) -> pd.DataFrame:
        """Every command of a session with who ran it, on whose behalf, and its risk."""
        check_id(session_id, "session id")
        df = self._df(
            f"""
            SELECT Timestamp AS time, AgentId AS agent_id, AgentName AS agent_name,
                   ParentAgentId AS parent_id, Chain AS chain, Depth AS depth, Intent AS intent,
                   ToolName AS tool, Command AS command, Resources AS resources,
                   RiskScore AS risk, RiskRules AS risk_rules, StatusCode AS status,
                   toBool(Delegation) AS delegation, TraceId AS trace_id, SpanId AS span_id,
                   LineageTokenId AS token_id, LineageProof AS proof
            FROM {schema.SPANS}
            WHERE SessionId = {{sid:String}} AND Operation = 'execute_tool'
            ORDER BY Timestamp, SpanId
            """,
            {"sid": session_id},
        )
        if df.empty:
            self.session(session_id)  # 404 if the session does not exist at all
        return df

    def messages(self, session_id: str) -> pd.DataFrame:
        """The session's inter-agent messages: sender, recipient, digest, size and
        injection score (the text itself never leaves the agent's process)."""
        check_id(session_id, "session id")
        # the typed spans say which spans carry messages (ordered by session, cheap); their
        # events, digests included, are read from those spans' otel_traces rows only
        carriers = self._df(
            f"SELECT DISTINCT TraceId AS trace_id, SpanId AS span_id FROM {schema.SPANS} "
            "WHERE SessionId = {sid:String} AND Messages > 0",
            {"sid": session_id},
        )
        columns = ["time", "from_agent", "to_agent", "digest", "size", "injection", "signals"]
        if carriers.empty:
            return pd.DataFrame(columns=columns)
        return self._df(
            f"""
            SELECT e.1 AS time,
                   e.3['agentgov.message.from'] AS from_agent,
                   e.3['agentgov.message.to'] AS to_agent,
                   e.3['agentgov.message.digest'] AS digest,
                   toUInt64OrZero(e.3['agentgov.message.size']) AS size,
                   toUInt8OrZero(e.3['agentgov.message.injection']) AS injection,
                   e.3['agentgov.message.injection.signals'] AS signals
            FROM {schema.TRACES}
            ARRAY JOIN arrayZip(`Events.Timestamp`, `Events.Name`, `Events.Attributes`) AS e
            WHERE TraceId IN {{traces:Array(String)}}
              AND (TraceId, SpanId) IN {{spans:Array(Tuple(String, String))}}
              AND e.2 = 'agentgov.message'
            ORDER BY time
            """,
            {
                "traces": sorted(set(carriers["trace_id"])),
                "spans": list(zip(carriers["trace_id"], carriers["span_id"], strict=True)),
            },
        )

    def decisions(self, session_id: str) -> pd.DataFrame:
        """The governor's audit records of a session, in order."""
        from agentgov.collector.governor import audit

        check_id(session_id, "session id")
        df = self._df(
            f"SELECT Seq AS seq, Time AS time, Phase AS phase, Outcome AS outcome, "
            f"Reason AS reason, Owner AS owner, FromAgent AS from_agent, ToAgent AS to_agent, "
            f"Task AS task, Depth AS depth, Actor AS actor, Mode AS mode, Detail AS detail, "
            f"PrevHash AS prev_hash, Hash AS hash FROM {audit.DECISIONS} "
            "WHERE SessionId = {sid:String} ORDER BY Seq",
            {"sid": session_id},
        )
        if df.empty:
            raise SessionNotFound(session_id)
        return df

    def verify_decisions(self, session_id: str, pending: Sequence[Any] = ()) -> dict[str, Any]:
        """Check the hash chain of a session's audit records (``pending``: its records
        still in the collector's local audit log, not yet in ClickHouse)."""
        from agentgov.collector.governor import audit

        check_id(session_id, "session id")
        with self._lock:
            result = audit.verify(self._client, session_id, pending)
        if result.records == 0:
            raise SessionNotFound(session_id)
        return result.as_json()

    def recorded_sessions(
        self,
        load: Callable[[Client, str | None, float, int], T],
        session_id: str | None,
        since_s: float,
        limit: int,
    ) -> T:
        """Stored decision records of sessions, read by ``load`` (policy simulation's
        loader) on this reader's connection."""
        if session_id is not None:
            check_id(session_id, "session id")
        with self._lock:
            return load(self._client, session_id, since_s, limit)

    def fanout(self, session_id: str | None = None, limit: int = 100) -> pd.DataFrame:
        """Per delegating agent: how many children it started and how many distinct tasks."""
        where = ""
        params: dict[str, Any] = {"limit": max(1, min(int(limit), 10_000))}
        if session_id is not None:
            check_id(session_id, "session id")
            where = "WHERE SessionId = {sid:String}"
            params["sid"] = session_id
        return self._df(
            f"""
            SELECT SessionId AS session_id, ParentAgentId AS agent_id,
                   count() AS children, uniqExact(Task) AS distinct_tasks,
                   groupUniqArray(Task) AS tasks, max(Depth) - 1 AS depth
            FROM {schema.EDGES}
            {where}
            GROUP BY SessionId, ParentAgentId
            ORDER BY children DESC, session_id, agent_id
            LIMIT {{limit:UInt32}}
            """,
            params,
        )
