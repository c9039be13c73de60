"""What the alert engine sees: governance facts of stored spans and of decisions.

Facts are read from the parsed OTLP request once it is stored (live), or from the
governance tables (``agentgov alerts test``), so both paths judge the same data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from agentgov.collector.governor.state import Record
from agentgov.collector.risk import RiskRules
from agentgov.instrumentation import conventions as cv
from agentgov.instrumentation.permissions import write_granted

TOOL, AGENT, MESSAGE = "tool", "agent", "message"

# the session-id and operation attributes the typed-spans view accepts, in its order
_SESSION_KEYS = (
    cv.SESSION_ID,
    "session.id",
    "gen_ai.conversation.id",
    "traceloop.association.properties.session_id",
)


_WANTED = frozenset(
    {
        *_SESSION_KEYS,
        cv.OPERATION_NAME,
        cv.AGENT_ID,
        cv.AGENT_NAME,
        cv.PARENT_AGENT_ID,
        cv.DELEGATION_CHAIN,
        cv.DELEGATION_DEPTH,
        cv.AGENT_ROLE,
        cv.TASK,
        cv.INTENT,
        cv.PERMISSIONS,
        cv.COMMAND,
        cv.RESOURCES,
        cv.TOOL_NAME,
        cv.RISK_SCORE,
        cv.COST_USD,
        cv.LINEAGE_TOKEN_ID,
        cv.LINEAGE_PROOF,
    }
)


@dataclass(slots=True)
class SpanFact:
    """One tool call, agent or inter-agent message of a session."""

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


def _value(v: AnyValue) -> Any:
    s = v.string_value
    if s:  # most attributes are strings: one field read instead of WhichOneof
        return s
    which = v.WhichOneof("value")
    if which == "string_value":
        return v.string_value
    if which == "int_value":
        return v.int_value
    if which == "double_value":
        return v.double_value
    if which == "bool_value":
        return v.bool_value
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return None


def strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(str(x) for x in value)
    if isinstance(value, str) and value.startswith("["):
        try:  # a JSON array, as other emitters and ClickHouse's map columns carry it
            return tuple(str(x) for x in json.loads(value))
        except ValueError:
            return (value,)
    return () if value in (None, "") else (str(value),)


def as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def span_facts(request: ExportTraceServiceRequest, rules: RiskRules) -> Iterator[SpanFact]:
    """The facts of a stored OTLP request's governed spans (those with a session id)."""
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                # only the attributes facts are made of (hosts add their own by the dozen)
                attrs = {kv.key: _value(kv.value) for kv in span.attributes if kv.key in _WANTED}
                sid = next((str(attrs[k]) for k in _SESSION_KEYS if attrs.get(k)), "")
                if not sid:
                    continue
                op = attrs.get(cv.OPERATION_NAME, "")
                agent_id = str(attrs.get(cv.AGENT_ID) or attrs.get(cv.AGENT_NAME) or "")
                chain = strings(attrs.get(cv.DELEGATION_CHAIN)) or ((agent_id,) if agent_id else ())
                base: dict[str, Any] = {
                    "session_id": sid,
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "token_id": str(attrs.get(cv.LINEAGE_TOKEN_ID, "")),
                    "proof": str(attrs.get(cv.LINEAGE_PROOF, "")),
                    "agent_id": agent_id,
                    "agent_name": str(attrs.get(cv.AGENT_NAME, "")),
                    "parent_id": str(attrs.get(cv.PARENT_AGENT_ID, "")),
                    "chain": chain,
                    "depth": as_int(attrs.get(cv.DELEGATION_DEPTH, max(len(chain) - 1, 0))),
                    "role": str(attrs.get(cv.AGENT_ROLE, "")),
                    "task": str(attrs.get(cv.TASK, "")),
                    "intent": str(attrs.get(cv.INTENT, "")),
                }
                permissions = strings(attrs[cv.PERMISSIONS]) if cv.PERMISSIONS in attrs else None
                status = "Error" if span.status.code == 2 else ""
                command = str(attrs.get(cv.COMMAND, ""))
                if op == cv.OP_EXECUTE_TOOL or command:
                    resources = strings(attrs.get(cv.RESOURCES))
                    assessed = rules.assess(command, resources)
                    yield SpanFact(
                        kind=TOOL,
                        time=span.end_time_unix_nano / 1e9,
                        tool=str(attrs.get(cv.TOOL_NAME, "")),
                        command=command,
                        resources=resources,
                        permissions=permissions,
                        # the emitter's own score is a floor, as in the stored spans
                        risk=max(min(as_int(attrs.get(cv.RISK_SCORE)), 100), assessed.score),
                        risk_rules=assessed.rules,
                        status=status,
                        **base,
                    )
                elif op == cv.OP_INVOKE_AGENT:
                    yield SpanFact(
                        kind=AGENT,
                        time=span.start_time_unix_nano / 1e9,
                        permissions=permissions,
                        usd=_float(attrs.get(cv.COST_USD)),
                        status=status,
                        **base,
                    )
                for event in span.events:
                    if event.name != cv.MESSAGE_EVENT:
                        continue
                    ev = {kv.key: _value(kv.value) for kv in event.attributes}
                    yield SpanFact(
                        kind=MESSAGE,
                        time=event.time_unix_nano / 1e9,
                        message_to=str(ev.get(cv.MESSAGE_TO, "")),
                        injection=min(as_int(ev.get(cv.MESSAGE_INJECTION)), 100),
                        injection_signals=strings(ev.get(cv.MESSAGE_INJECTION_SIGNALS)),
                        **{**base, "agent_id": str(ev.get(cv.MESSAGE_FROM) or agent_id)},
                    )


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
        "risk": as_int(d.get("risk", 0)),
        "chain": list(chain) or [a for a in (record.from_agent, record.to_agent) if a],
    }
