"""A stored session read back as alert facts, for ``agentgov alerts test``."""

from __future__ import annotations

from typing import Any

from clickhouse_connect.driver.client import Client

from agentgov.collector.alerts.facts import AGENT, MESSAGE, TOOL, SpanFact, as_int, strings
from agentgov.collector.store import schema
from agentgov.instrumentation import conventions as cv


def stored_facts(client: Client, session_id: str) -> list[SpanFact]:
    """The session's tool calls, agents (typed spans) and messages (span events)."""
    rows = client.query(
        f"""
        SELECT toUnixTimestamp64Nano(Timestamp), Duration, Operation, AgentId, AgentName,
               ParentAgentId, Chain, Depth, Role, Task, Intent, ToolName, Command, Resources,
               Permissions, RiskScore, RiskRules, CostUsd, StatusCode
        FROM {schema.SPANS} WHERE SessionId = {{s:String}}
        ORDER BY Timestamp
        """,
        parameters={"s": session_id},
    ).result_rows
    facts = []
    for (
        start,
        duration,
        op,
        agent,
        name,
        parent,
        chain,
        depth,
        role,
        task,
        intent,
        tool,
        command,
        resources,
        permissions,
        risk,
        risk_rules,
        usd,
        status,
    ) in rows:
        base: dict[str, Any] = {
            "session_id": session_id,
            "agent_id": agent,
            "agent_name": name,
            "parent_id": parent,
            "chain": tuple(chain),
            "depth": int(depth),
            "role": role,
            "task": task,
            "intent": intent,
            "permissions": tuple(permissions) or None,
            "status": "Error" if status == "Error" else "",
        }
        if op == cv.OP_EXECUTE_TOOL or command:
            facts.append(
                SpanFact(
                    kind=TOOL,
                    time=(int(start) + int(duration)) / 1e9,
                    tool=tool,
                    command=command,
                    resources=tuple(resources),
                    risk=int(risk),
                    risk_rules=tuple(risk_rules),
                    **base,
                )
            )
        elif op == cv.OP_INVOKE_AGENT:
            facts.append(SpanFact(kind=AGENT, time=int(start) / 1e9, usd=float(usd), **base))
    # messages are span events, kept in otel_traces; the session's traces bound the scan
    events = client.query(
        f"""
        SELECT SpanAttributes['{cv.AGENT_ID}'], SpanAttributes['{cv.DELEGATION_CHAIN}'],
               SpanAttributes['{cv.INTENT}'], ev.1, toUnixTimestamp64Nano(ev.2), ev.3
        FROM {schema.TRACES}
        ARRAY JOIN arrayZip(`Events.Name`, `Events.Timestamp`, `Events.Attributes`) AS ev
        WHERE TraceId IN (SELECT DISTINCT TraceId FROM {schema.SPANS} WHERE SessionId = {{s:String}})
          AND ev.1 = {{m:String}}
        """,
        parameters={"s": session_id, "m": cv.MESSAGE_EVENT},
    ).result_rows
    for agent, chain_json, intent, _, at, attrs in events:
        signals = attrs.get(cv.MESSAGE_INJECTION_SIGNALS, "")
        facts.append(
            SpanFact(
                session_id=session_id,
                kind=MESSAGE,
                time=int(at) / 1e9,
                agent_id=attrs.get(cv.MESSAGE_FROM) or agent,
                chain=strings(chain_json),
                intent=intent,
                message_to=attrs.get(cv.MESSAGE_TO, ""),
                injection=min(as_int(attrs.get(cv.MESSAGE_INJECTION, "0")), 100),
                injection_signals=strings(signals),
            )
        )
    facts.sort(key=lambda f: f.time)
    return facts
