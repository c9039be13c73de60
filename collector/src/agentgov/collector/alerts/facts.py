"""What the alert engine sees: governance facts of stored spans and of decisions.

Span facts are read from the typed span rows the store derived with the normalization
model (normalize/): live, a batch's rows right after the batch is durable (by its insert
token) and each trace group's rows as the resolver resolves it; for ``agentgov alerts
test``, a stored session's rows. One reader (:func:`facts_from_rows`) serves all three, so
the live engine and the dry run judge the same facts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agentgov.collector.governor.state import Record
from agentgov.collector.store.schema import EDGE_OPERATION
from agentgov.instrumentation.permissions import write_granted

TOOL, AGENT, MESSAGE = "tool", "agent", "message"
#: a further delegation edge into an agent that already ran (see store/schema.py)
EDGE = "edge"


@dataclass(slots=True)
class SpanFact:
    """One tool call, agent, inter-agent message or further delegation edge of a session."""

    session_id: str
    kind: str
    time: float  # seconds since the epoch: span start (agents), end (tools), event (messages)
    agent_id: str
    agent_name: str = ""
    parent_id: str = ""
    chain: tuple[str, ...] = ()
    depth: int = 0
    role: str = ""
    task: str = ""
    intent: str = ""
    tool: str = ""
    command: str = ""
    resources: tuple[str, ...] = ()
    permissions: tuple[str, ...] | None = None
    risk: int = 0
    risk_rules: tuple[str, ...] = ()
    usd: float = 0.0
    message_to: str = ""
    injection: int = 0
    injection_signals: tuple[str, ...] = ()
    status: str = ""
    #: the span's ids (hex) and its lineage token id and proof, to tell who made it
    trace_id: str = ""
    span_id: str = ""
    token_id: str = ""
    proof: str = ""
    #: set by the engine: the span's proof shows the agent it names really made it
    verified: bool = False

    def fields(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "intent": self.intent,
            "kind": self.kind,
            "agent_id": self.agent_id,
            "agent_name": self.agent_name,
            "parent_id": self.parent_id,
            "chain": list(self.chain),
            "depth": self.depth,
            "role": self.role,
            "task": self.task,
            "tool": self.tool,
            "command": self.command,
            "resources": list(self.resources),
            "permissions": list(self.permissions or ()),
            "risk": self.risk,
            "risk_rules": list(self.risk_rules),
            "destructive": is_destructive(self.risk_rules),
            "write_granted": write_granted(self.permissions, self.resources),
            "usd": self.usd,
            "message_to": self.message_to,
            "injection": self.injection,
            "injection_signals": list(self.injection_signals),
            "status": self.status,
            "verified": self.verified,
        }


class FactView:
    """A fact as ``span`` rule conditions read it, computing derived fields on demand:
    most facts fail a rule's first condition, and never pay for the rest."""

    __slots__ = ("_fact",)

    def __init__(self, fact: SpanFact) -> None:
        self._fact = fact

    def get(self, key: str, default: Any = None, /) -> Any:
        f = self._fact
        if key == "destructive":
            return is_destructive(f.risk_rules)
        if key == "write_granted":
            return write_granted(f.permissions, f.resources)
        if key == "permissions":
            return f.permissions or ()
        return getattr(f, key, default)


def is_destructive(risk_rules: Sequence[str]) -> bool:
    """Destroys data (``rm -rf``, ``DROP TABLE``, a force push...), or writes to production;
    reading from production is not destructive."""
    return "destructive_command" in risk_rules or (
        "production_target" in risk_rules and "write_scope" in risk_rules
    )


#: the span row columns facts are made of (SELECT list over agentgov_spans and its tables)
FACT_COLUMNS = (
    "toUnixTimestamp64Nano(Timestamp), Duration, Operation, AgentId, AgentName, ParentAgentId,"
    " Chain, Depth, Role, Task, Intent, ToolName, Command, Resources, Permissions, RiskScore,"
    " RiskRules, CostUsd, StatusCode, SessionId, TraceId, SpanId, LineageTokenId, LineageProof,"
    " MessageFacts"
)


def facts_from_rows(rows: Iterable[Sequence[Any]]) -> list[SpanFact]:
    """The tool calls, agents and inter-agent messages of typed span rows (FACT_COLUMNS)."""
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
        session_id,
        trace_id,
        span_id,
        token_id,
        proof,
        messages,
    ) in rows:
        base: dict[str, Any] = {
            "session_id": session_id,
            "agent_id": agent,
            "agent_name": str(name),
            "parent_id": parent,
            "chain": tuple(chain),
            "depth": int(depth),
            "role": str(role),
            "task": task,
            "intent": intent,
            "permissions": tuple(permissions) or None,
            "status": "Error" if status == "Error" else "",
            "trace_id": trace_id,
            "span_id": span_id,
            "token_id": token_id,
            "proof": proof,
        }
        if op == "execute_tool" or command:
            facts.append(
                SpanFact(
                    kind=TOOL,
                    time=(int(start) + int(duration)) / 1e9,
                    tool=str(tool),
                    command=command,
                    resources=tuple(resources),
                    risk=int(risk),
                    risk_rules=tuple(str(r) for r in risk_rules),
                    **base,
                )
            )
        elif op == "invoke_agent":
            facts.append(SpanFact(kind=AGENT, time=int(start) / 1e9, usd=float(usd), **base))
        elif op == EDGE_OPERATION:
            facts.append(SpanFact(kind=EDGE, time=int(start) / 1e9, **base))
        for at, sender, to, injection, signals in messages:
            facts.append(
                SpanFact(
                    kind=MESSAGE,
                    time=int(at) / 1e9,
                    message_to=to,
                    injection=int(injection),
                    injection_signals=tuple(signals),
                    **{**base, "agent_id": sender or agent},
                )
            )
    return facts


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def decision_fields(record: Record, chain: Sequence[str] = ()) -> dict[str, Any]:
    """A governor decision as a ``decision`` rule sees it."""
    d = record.detail
    agent = record.to_agent or record.from_agent
    return {
        "session_id": record.session_id,
        "phase": record.phase,
        "outcome": record.outcome,
        "reason": record.reason,
        "owner": record.owner,
        "from_agent": record.from_agent,
        "to_agent": record.to_agent,
        "agent_id": agent,
        "task": record.task,
        "depth": record.depth,
        "actor": record.actor,
        "mode": record.mode,
        "tool": str(d.get("tool", "")),
        "command": str(d.get("command", "")),
        "risk": _int(d.get("risk", 0)),
        "chain": list(chain) or [a for a in (record.from_agent, record.to_agent) if a],
        "drift": [str(x) for x in d.get("drift") or ()],
    }
