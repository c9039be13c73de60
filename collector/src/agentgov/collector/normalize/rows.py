"""A resolution as typed span rows: what the resolver writes for spans of other conventions.

Rows have the columns of agentgov's own typed spans (store/schema.py SPAN_COLUMNS), so
every reader (sessions, graphs, audits, alert facts, dashboards) reads both alike:

- one ``invoke_agent`` row per agent node, with its parent, chain, depth, the way its
  delegation was derived, and the usage of the model calls it owns (foreign agent spans
  repeat their children's usage, so only model calls are counted);
- one ``execute_tool`` row per tool call (handoffs and delegations through tools included,
  flagged ``Delegation``), owned by its agent, its command scored by the risk rules;
- one ``delegate`` row (schema.EDGE_OPERATION) per further delegation edge into an agent
  whose own row names another parent: work handed back to an agent that ran before (a
  swarm's last handoff back to its planner). A row has one parent; an agent may have more.

Agents that agentgov's own spans describe get no row here: their rows are agentgov's.
"""

from __future__ import annotations

from typing import Any

from agentgov.collector.normalize.local import LocalFacts
from agentgov.collector.normalize.resolve import Edge, Key, Node, Resolution
from agentgov.collector.risk import RiskRules
from agentgov.collector.store.schema import EDGE_OPERATION

MAX_EVIDENCE = 2000


def _chain(res: Resolution, node: Node) -> list[str]:
    return [
        res.nodes[(node.session, k)].agent_id for k in node.chain if (node.session, k) in res.nodes
    ]


def resolved_rows(
    res: Resolution, facts: dict[str, LocalFacts], rules: RiskRules
) -> list[dict[str, Any]]:
    """The rows of one resolved trace group (without Version and Deleted)."""
    rows: list[dict[str, Any]] = []
    for key, node in sorted(res.nodes.items(), key=lambda kv: (kv[1].first_seen, kv[0])):
        if node.native:
            continue
        rows.append(_node_row(res, key, node, facts))
    for edge in sorted(res.edges.values(), key=lambda e: (e.at, e.parent, e.child)):
        child = res.nodes.get((edge.session, edge.child))
        parent = res.nodes.get((edge.session, edge.parent))
        if child is None or parent is None or child.native or child.parent == edge.parent:
            continue  # the child's own row states this edge
        rows.append(_edge_row(res, edge, parent, child, facts))
    for call in res.tools:
        fact = facts.get(call.span_id)
        if fact is not None and fact.native:
            continue  # agentgov's own tool span: already a row of its own
        owner = res.nodes.get((call.session, call.owner)) if call.owner else None
        assessed = rules.assess(call.command, call.resources)
        rows.append(
            {
                **_blank(call.session, call.start, call.trace_id, call.span_id),
                "ParentSpanId": fact.parent_id if fact else "",
                "ServiceName": fact.service if fact else "",
                "SpanName": fact.name if fact else call.tool,
                "Operation": "execute_tool",
                "AgentId": owner.agent_id if owner else "",
                "AgentName": owner.name if owner else "",
                "ParentAgentId": _parent_id(res, owner),
                "Chain": _chain(res, owner) if owner else [],
                "Depth": max(len(owner.chain) - 1, 0) if owner else 0,
                "Intent": res.sessions[call.session].intent if call.session in res.sessions else "",
                "ToolName": call.tool,
                "Command": call.command,
                "Resources": list(call.resources),
                "RiskScore": assessed.score,
                "RiskRules": list(assessed.rules),
                "Duration": call.duration,
                "StatusCode": call.status,
                "Delegation": 1 if call.delegation else 0,
                "EdgeEvidence": f"owner by {call.how}" if call.how else "",
            }
        )
    return rows


def ns_text(ns: int) -> str:
    """Unix nanoseconds as JSONEachRow writes a DateTime64(9) without loss."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def key_row(session: str, start: int, span_id: str, trace_id: str) -> dict[str, Any]:
    """The columns that name a row (its sort key) and its trace."""
    return {
        "SessionId": session,
        "Timestamp": ns_text(start),
        "SpanId": span_id,
        "TraceId": trace_id,
    }


def _blank(session: str, start: int, trace_id: str, span_id: str) -> dict[str, Any]:
    return {
        **key_row(session, start, span_id, trace_id),
        "ParentSpanId": "",
        "ServiceName": "",
        "SpanName": "",
        "Operation": "",
        "AgentId": "",
        "AgentName": "",
        "ParentAgentId": "",
        "Chain": [],
        "Depth": 0,
        "Intent": "",
        "Task": "",
        "Role": "",
        "Permissions": [],
        "ToolName": "",
        "Command": "",
        "Resources": [],
        "RiskScore": 0,
        "RiskRules": [],
        "CostUsd": 0.0,
        "InputTokens": 0,
        "OutputTokens": 0,
        "Messages": 0,
        "Duration": 0,
        "StatusCode": "Unset",
        "StatusMessage": "",
        "LineageTokenId": "",
        "LineageProof": "",
        "MessageFacts": [],
        "Delegation": 0,
        "EdgeVia": "",
        "EdgeEvidence": "",
    }


def _parent_id(res: Resolution, node: Node | None) -> str:
    if node is None or not node.parent:
        return ""
    parent = res.nodes.get((node.session, node.parent))
    return parent.agent_id if parent else ""


def _node_row(
    res: Resolution, key: Key, node: Node, facts: dict[str, LocalFacts]
) -> dict[str, Any]:
    runs = [facts[s] for s in node.invocations if s in facts]
    first = runs[0] if runs else None
    # a node known only from a delegation tool's input: its row sits at that tool
    anchor = first.span_id if first else f"{key[1]}:agent"
    trace_id = first.trace_id if first else next(iter(res.sessions[node.session].traces), "")
    end = max((r.end for r in runs), default=node.first_seen)
    return {
        **_blank(node.session, node.first_seen, trace_id, anchor),
        "ServiceName": first.service if first else "",
        "SpanName": first.name if first else node.name,
        "Operation": "invoke_agent",
        "AgentId": node.agent_id,
        "AgentName": node.name,
        "ParentAgentId": _parent_id(res, node),
        "Chain": _chain(res, node),
        "Depth": max(len(node.chain) - 1, 0),
        "Intent": res.sessions[node.session].intent,
        "Task": node.task,
        "CostUsd": node.cost_usd,
        "InputTokens": node.input_tokens,
        "OutputTokens": node.output_tokens,
        "Duration": max(0, end - node.first_seen),
        "StatusCode": "Error" if any(r.status == "Error" for r in runs) else "Unset",
        "EdgeVia": node.via,
        "EdgeEvidence": "; ".join(node.evidence)[:MAX_EVIDENCE],
    }


def _edge_row(
    res: Resolution, edge: Edge, parent: Node, child: Node, facts: dict[str, LocalFacts]
) -> dict[str, Any]:
    site = facts.get(edge.site)
    return {
        # keyed by the span the edge was found at and the agent it leads to
        **_blank(edge.session, edge.at, site.trace_id if site else "", f"{edge.site}>{child.key}"),
        "ParentSpanId": edge.site,
        "ServiceName": site.service if site else "",
        "SpanName": f"delegate {child.name}",
        "Operation": EDGE_OPERATION,
        "AgentId": child.agent_id,
        "AgentName": child.name,
        "ParentAgentId": parent.agent_id,
        "Chain": [*_chain(res, parent), child.agent_id],
        "Depth": len(parent.chain),
        "Intent": res.sessions[edge.session].intent,
        "EdgeVia": edge.via,
        "EdgeEvidence": "; ".join(edge.evidence)[:MAX_EVIDENCE],
    }


def fact_row(row: dict[str, Any]) -> tuple[Any, ...]:
    """A resolved row in the column order of alerts.facts.FACT_COLUMNS."""
    seconds, _, nanos = str(row["Timestamp"]).partition(".")
    start = int(seconds) * 1_000_000_000 + int(nanos or 0)
    return (
        start,
        row["Duration"],
        row["Operation"],
        row["AgentId"],
        row["AgentName"],
        row["ParentAgentId"],
        row["Chain"],
        row["Depth"],
        row["Role"],
        row["Task"],
        row["Intent"],
        row["ToolName"],
        row["Command"],
        row["Resources"],
        row["Permissions"],
        row["RiskScore"],
        row["RiskRules"],
        row["CostUsd"],
        row["StatusCode"],
        row["SessionId"],
        row["TraceId"],
        row["SpanId"],
        row["LineageTokenId"],
        row["LineageProof"],
        row["MessageFacts"],
    )
