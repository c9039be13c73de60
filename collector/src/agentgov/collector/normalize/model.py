"""The one model of the conventions: which attribute of which convention says what.

A span, as the OpenTelemetry Collector's ClickHouse exporter stores it (``SpanName``,
``ScopeName``, ``SpanAttributes`` as a ``Map(String, String)`` with arrays as JSON text),
yields *local facts*: its type (agent invocation, agent definition, tool, handoff, model
call, anything else), its session candidate, the agent it is or belongs to, the tool it
calls with which arguments, the handoff it makes, its usage. Each fact is an ordered list
of *sources* (an attribute, a capture of the span name, a member of a JSON attribute),
each under a condition; the first non-empty value wins, placeholder values dropped.

Every rule has two interpreters, Python (:meth:`Cond.py`, :meth:`Src.py`) and ClickHouse
SQL (:meth:`Cond.sql`, :meth:`Src.sql`), so the materialized views and the collector's
Python consumers read conventions from this one table; a parity test runs both over the
recorded fixtures. Patterns are written in the subset Python's ``re`` and RE2 share.

What one span cannot say (its session when it carries none, the agent a tool span runs
under, who delegated to whom) is resolved across the spans of a trace in resolve.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from clickhouse_connect.driver.binding import format_query_value

from agentgov.instrumentation import conventions as cv

ATTRS = "SpanAttributes"


def _q(text: str) -> str:
    return str(format_query_value(text))


class SpanLike(Protocol):
    """What the rules read of a span (see local.Span)."""

    @property
    def name(self) -> str: ...

    @property
    def scope(self) -> str: ...

    @property
    def attrs(self) -> dict[str, str]: ...


# -- conditions ------------------------------------------------------------------------------


class Cond:
    def py(self, s: SpanLike) -> bool:
        raise NotImplementedError

    def sql(self) -> str:
        raise NotImplementedError

    def __and__(self, other: Cond) -> Cond:
        return All(self, other)

    def __or__(self, other: Cond) -> Cond:
        return AnyOf(self, other)

    def __invert__(self) -> Cond:
        return Not(self)


@dataclass(frozen=True)
class Eq(Cond):
    """Attribute ``key`` equals ``value`` (``ci``: in any case)."""

    key: str
    value: str
    ci: bool = False

    def py(self, s: SpanLike) -> bool:
        v = s.attrs.get(self.key, "")
        return v.lower() == self.value.lower() if self.ci else v == self.value

    def sql(self) -> str:
        if self.ci:
            return f"lowerUTF8({ATTRS}[{_q(self.key)}]) = {_q(self.value.lower())}"
        return f"{ATTRS}[{_q(self.key)}] = {_q(self.value)}"


@dataclass(frozen=True)
class In(Cond):
    key: str
    values: tuple[str, ...]

    def py(self, s: SpanLike) -> bool:
        return s.attrs.get(self.key, "") in self.values

    def sql(self) -> str:
        return f"{ATTRS}[{_q(self.key)}] IN ({', '.join(map(_q, self.values))})"


@dataclass(frozen=True)
class Has(Cond):
    """Attribute ``key`` is present and not empty."""

    key: str

    def py(self, s: SpanLike) -> bool:
        return s.attrs.get(self.key, "") != ""

    def sql(self) -> str:
        return f"{ATTRS}[{_q(self.key)}] != ''"


@dataclass(frozen=True)
class NameRe(Cond):
    regex: str

    def py(self, s: SpanLike) -> bool:
        return re.search(self.regex, s.name) is not None

    def sql(self) -> str:
        return f"match(SpanName, {_q(self.regex)})"


@dataclass(frozen=True)
class ScopeRe(Cond):
    regex: str

    def py(self, s: SpanLike) -> bool:
        return re.search(self.regex, s.scope) is not None

    def sql(self) -> str:
        return f"match(ScopeName, {_q(self.regex)})"


@dataclass(frozen=True)
class All(Cond):
    a: Cond
    b: Cond

    def py(self, s: SpanLike) -> bool:
        return self.a.py(s) and self.b.py(s)

    def sql(self) -> str:
        return f"({self.a.sql()} AND {self.b.sql()})"


@dataclass(frozen=True)
class AnyOf(Cond):
    a: Cond
    b: Cond

    def py(self, s: SpanLike) -> bool:
        return self.a.py(s) or self.b.py(s)

    def sql(self) -> str:
        return f"({self.a.sql()} OR {self.b.sql()})"


@dataclass(frozen=True)
class Not(Cond):
    a: Cond

    def py(self, s: SpanLike) -> bool:
        return not self.a.py(s)

    def sql(self) -> str:
        return f"NOT {self.a.sql()}"


@dataclass(frozen=True)
class Always(Cond):
    def py(self, s: SpanLike) -> bool:
        return True

    def sql(self) -> str:
        return "1"


ALWAYS = Always()

# -- placeholders: values that look like identities but are instrumentation defaults ----------

#: agent NAMES that never identify an agent: wrapper spans (the OpenAI Agents SDK's
#: ``Agent workflow``), instrumentation defaults (the GenAI contrib openai-agents
#: instrumentation's ``OpenAI Agent``), LangGraph run names (``agent``, ``call_agent``),
#: OpenLLMetry's lost handoff target (``unknown``)
PLACEHOLDER_NAMES = (
    "",
    "agent",
    "agents",
    "call_agent",
    "openai agent",
    "agent workflow",
    "workflow",
    "unknown",
    "none",
    "null",
    "invoke_agent",
    "create_agent",
)
#: agent IDS that never identify an agent (the GenAI contrib openai-agents sets ``agent``)
PLACEHOLDER_IDS = ("", "agent", "default", "unknown", "none", "null", "0")

#: LangGraph nodes that are a prebuilt agent's own plumbing, not an agent of the app
LANGGRAPH_INTERNAL_NODES = (
    "agent",
    "tools",
    "model",
    "call_model",
    "should_continue",
    "pre_model_hook",
    "post_model_hook",
    "generate_structured_response",
    "__start__",
    "__end__",
)


def clean(value: str, placeholders: tuple[str, ...] | None) -> str:
    value = value.strip(" ")  # as ClickHouse's trimBoth: spaces only
    if placeholders is not None and value.lower() in placeholders:
        return ""
    return value


def _sql_clean(expr: str, placeholders: tuple[str, ...] | None) -> str:
    expr = f"trimBoth({expr})"
    if placeholders is None:
        return expr
    return f"if(lowerUTF8({expr}) IN ({', '.join(map(_q, placeholders))}), '', {expr})"


# -- sources ---------------------------------------------------------------------------------


class Src:
    """One place a fact can be read from; '' when absent or not applicable."""

    when: Cond
    placeholders: tuple[str, ...] | None

    def raw_py(self, s: SpanLike) -> str:
        raise NotImplementedError

    def raw_sql(self) -> str:
        raise NotImplementedError

    def py(self, s: SpanLike) -> str:
        return clean(self.raw_py(s), self.placeholders) if self.when.py(s) else ""

    def sql(self) -> str:
        body = _sql_clean(self.raw_sql(), self.placeholders)
        return body if isinstance(self.when, Always) else f"if({self.when.sql()}, {body}, '')"


@dataclass(frozen=True)
class Attr(Src):
    key: str
    when: Cond = ALWAYS
    placeholders: tuple[str, ...] | None = None

    def raw_py(self, s: SpanLike) -> str:
        return s.attrs.get(self.key, "")

    def raw_sql(self) -> str:
        return f"{ATTRS}[{_q(self.key)}]"


@dataclass(frozen=True)
class NameGroup(Src):
    """The first capture group of ``regex`` on the span name."""

    regex: str
    when: Cond = ALWAYS
    placeholders: tuple[str, ...] | None = None

    def raw_py(self, s: SpanLike) -> str:
        m = re.search(self.regex, s.name)
        return m.group(1) if m else ""

    def raw_sql(self) -> str:
        return f"extract(SpanName, {_q(self.regex)})"


@dataclass(frozen=True)
class JsonMember(Src):
    """A string member of a JSON object attribute (LangChain's ``metadata``)."""

    key: str
    member: str
    when: Cond = ALWAYS
    placeholders: tuple[str, ...] | None = None

    def raw_py(self, s: SpanLike) -> str:
        try:
            value = json.loads(s.attrs.get(self.key, ""))
        except ValueError:
            return ""
        member = value.get(self.member) if isinstance(value, dict) else None
        return member if isinstance(member, str) else ""

    def raw_sql(self) -> str:
        return f"JSONExtractString({ATTRS}[{_q(self.key)}], {_q(self.member)})"


@dataclass(frozen=True)
class LangGraphAgent(Src):
    """The agent a LangGraph span runs in: the last segment of
    ``metadata.langgraph_checkpoint_ns`` (``cleanup_images:<id>|image_auditor:<id>|agent:<id>``)
    that is not a prebuilt agent's plumbing node."""

    when: Cond = ALWAYS
    placeholders: tuple[str, ...] | None = PLACEHOLDER_NAMES

    def raw_py(self, s: SpanLike) -> str:
        try:
            metadata = json.loads(s.attrs.get("metadata", ""))
        except ValueError:
            return ""
        ns = metadata.get("langgraph_checkpoint_ns", "") if isinstance(metadata, dict) else ""
        if not isinstance(ns, str) or not ns:
            return ""
        segments = [p.split(":")[0] for p in ns.split("|")]
        segments = [p for p in segments if p not in LANGGRAPH_INTERNAL_NODES]
        return segments[-1] if segments else ""

    def raw_sql(self) -> str:
        internal = ", ".join(map(_q, LANGGRAPH_INTERNAL_NODES))
        return (
            f"arrayFilter(x -> x NOT IN ({internal}), arrayMap(x -> splitByChar(':', x)[1], "
            f"splitByChar('|', JSONExtractString({ATTRS}['metadata'], "
            "'langgraph_checkpoint_ns'))))[-1]"
        )


@dataclass(frozen=True)
class SpanName(Src):
    when: Cond = ALWAYS
    placeholders: tuple[str, ...] | None = None

    def raw_py(self, s: SpanLike) -> str:
        return s.name

    def raw_sql(self) -> str:
        return "SpanName"


def first_py(sources: list[Src]) -> Callable[[SpanLike], str]:
    def read(s: SpanLike) -> str:
        for source in sources:
            value = source.py(s)
            if value:
                return value
        return ""

    return read


def first_sql(sources: list[Src]) -> str:
    if not sources:
        return "''"
    parts = ", ".join(f"nullIf({source.sql()}, '')" for source in sources)
    return f"ifNull(coalesce({parts}), '')"


# -- the conventions ---------------------------------------------------------------------------

OP = "gen_ai.operation.name"
OI = "openinference.span.kind"
TL = "traceloop.span.kind"
SESSION = "agentgov.session.id"

oi_agent = Eq(OI, "AGENT", ci=True)
oi_tool = Eq(OI, "TOOL", ci=True)
tl_agent = Eq(TL, "agent")
tl_tool = Eq(TL, "tool")
is_agentish = Eq(OP, "invoke_agent") | Eq(OP, "create_agent") | oi_agent | tl_agent

#: span types, the first matching rule wins; anything else is ``chain`` (wrappers, turns,
#: steps, graph nodes, runtime messaging)
SPAN_TYPES: list[tuple[str, Cond]] = [
    # the definition of an agent (AutoGen emits them when agents are built): no invocation
    ("agent_def", Eq(OP, "create_agent")),
    # handoffs: GenAI contrib (agent_handoff), OpenLLMetry (handoff), OpenInference
    # openai-agents ('handoff to X', typed TOOL)
    (
        "handoff",
        In(OP, ("handoff", "agent_handoff"))
        | Eq(TL, "handoff")
        | (oi_tool & NameRe(r"^handoff to .+$")),
    ),
    ("agent", Eq(OP, "invoke_agent") | oi_agent | tl_agent),
    ("tool", Eq(OP, "execute_tool") | oi_tool | tl_tool),
    (
        "llm",
        In(OP, ("chat", "text_completion", "generate_content", "embeddings", "completion"))
        | Eq(OI, "LLM", ci=True)
        | Eq(OI, "EMBEDDING", ci=True)
        | In("llm.request.type", ("chat", "completion", "embedding")),
    ),
]
SPAN_TYPE_NAMES = ("agent_def", "handoff", "agent", "tool", "llm", "chain")

#: every fact, as its sources in priority order
RULES: dict[str, list[Src]] = {
    # -- session candidates (the span's own; inheritance across spans is resolve.py's) ----
    "session": [
        Attr(SESSION),
        Attr("session.id"),  # OpenInference using_session; LangChain thread_id
        Attr("gen_ai.conversation.id"),  # GenAI (Pydantic AI: one per agent run)
        Attr("traceloop.association.properties.session_id"),  # OpenLLMetry
    ],
    # -- on agent spans: who the agent is ---------------------------------------------
    "agent_name": [
        Attr("gen_ai.agent.name", is_agentish, PLACEHOLDER_NAMES),
        Attr("agent.name", oi_agent, PLACEHOLDER_NAMES),
        Attr("graph.node.id", oi_agent, PLACEHOLDER_NAMES),
        NameGroup(r"^invoke_agent (.+)$", Eq(OP, "invoke_agent"), PLACEHOLDER_NAMES),
        NameGroup(r"^create_agent (.+)$", Eq(OP, "create_agent"), PLACEHOLDER_NAMES),
        NameGroup(r"^(.+)\.agent$", tl_agent, PLACEHOLDER_NAMES),  # OpenLLMetry
        NameGroup(r"^(.+)\.run$", oi_agent, PLACEHOLDER_NAMES),  # smolagents
        LangGraphAgent(oi_agent),  # OpenInference langchain: AGENT spans are 'agent'...
        SpanName(oi_agent, PLACEHOLDER_NAMES),  # the span name, where that is all there is
    ],
    "agent_id": [Attr("gen_ai.agent.id", is_agentish, PLACEHOLDER_IDS)],
    # -- on other spans: the agent they say they belong to ----------------------------------
    "owner_id": [Attr("gen_ai.agent.id", ~is_agentish, PLACEHOLDER_IDS)],
    "owner_name": [
        Attr("gen_ai.agent.name", ~is_agentish, PLACEHOLDER_NAMES),
        Attr("tool.agent_role", ~is_agentish, PLACEHOLDER_NAMES),  # CrewAI event listener
        LangGraphAgent(~is_agentish),
    ],
    # -- delegation stated by attributes --------------------------------------------------
    # agentgov's own, set by the SDK at delegation time: on agent spans, the delegator; on
    # tool spans, the calling agent's delegator
    "parent_id": [Attr("agentgov.agent.parent_id")],
    # OpenInference's: right for openai-agents, guessed from crew order by the crewai event
    # listener; checked against the span tree before use
    "claimed_parent": [Attr("graph.node.parent_id", oi_agent, PLACEHOLDER_NAMES)],
    # -- tools ------------------------------------------------------------------------------
    "tool_name": [
        Attr("gen_ai.tool.name"),
        Attr("tool.name"),  # OpenInference (smolagents names its spans after the class)
        NameGroup(r"^execute_tool (.+)$"),
        Attr("traceloop.entity.name", tl_tool),
        NameGroup(r"^(.+)\.tool$", tl_tool),
        SpanName(Eq(OP, "execute_tool") | oi_tool | tl_tool),
    ],
    "tool_args": [
        Attr("gen_ai.tool.call.arguments"),
        Attr("input.value", oi_tool),
        Attr("traceloop.entity.input", tl_tool),
    ],
    "tool_call_id": [Attr("gen_ai.tool.call.id"), Attr("tool_call.id")],
    # -- handoffs ---------------------------------------------------------------------------
    "handoff_from": [
        Attr("gen_ai.handoff.from_agent", placeholders=PLACEHOLDER_NAMES),
        Attr("input.value", oi_tool & NameRe(r"^handoff to .+$"), PLACEHOLDER_NAMES),
        NameGroup(r"^(.+) → (?:.+)\.handoff$", Eq(TL, "handoff"), PLACEHOLDER_NAMES),
    ],
    "handoff_to": [
        Attr("gen_ai.handoff.to_agent", placeholders=PLACEHOLDER_NAMES),
        NameGroup(r"^handoff to (.+)$", oi_tool, PLACEHOLDER_NAMES),
        Attr("output.value", oi_tool & NameRe(r"^handoff to .+$"), PLACEHOLDER_NAMES),
        NameGroup(r"^(?:.+) → (.+)\.handoff$", Eq(TL, "handoff"), PLACEHOLDER_NAMES),
        # langgraph-supervisor's handoff tools state their destination in metadata
        JsonMember("metadata", "__handoff_destination", placeholders=PLACEHOLDER_NAMES),
    ],
    # -- usage (counted from model calls and agentgov's own spans, see usage_counts) -------
    "input_tokens": [
        Attr("gen_ai.usage.input_tokens"),
        Attr("llm.token_count.prompt"),
        Attr("gen_ai.usage.prompt_tokens"),
    ],
    "output_tokens": [
        Attr("gen_ai.usage.output_tokens"),
        Attr("llm.token_count.completion"),
        Attr("gen_ai.usage.completion_tokens"),
    ],
    "cost_usd": [
        Attr("agentgov.cost.usd"),
        Attr("llm.cost.total"),  # OpenInference
        Attr("gen_ai.usage.cost"),
    ],
    # -- what a run was asked (agent and root spans): a foreign session's intent ----------
    "input": [
        Attr("input.value"),  # OpenInference
        Attr("gen_ai.input.messages"),  # GenAI
        Attr("traceloop.entity.input"),  # OpenLLMetry
        # AutoGen's runtime: the delivered message ('No Message' where there is none)
        Attr("message", ScopeRe(r"^autogen"), ("no message",)),
    ],
    # -- agentgov's governance facts (only agentgov's own spans carry them) ----------------
    "command": [Attr("agentgov.command")],
    "resources": [Attr("agentgov.resources")],
    "chain": [Attr("agentgov.delegation.chain")],
    "depth": [Attr("agentgov.delegation.depth")],
    "intent": [Attr("agentgov.intent")],
    "task": [Attr("agentgov.task")],
    "role": [Attr("agentgov.agent.role")],
    "permissions": [Attr("agentgov.permissions")],
    "risk_floor": [Attr("agentgov.risk.score")],
    "token_id": [Attr("agentgov.lineage.token_id")],
    "proof": [Attr("agentgov.lineage.proof")],
}

#: tools whose name or input says they hand control to another agent. ``handoff``: the
#: target runs after, outside the tool's span (a sibling run). ``scoped``: the target runs
#: inside the tool's span; its work is attributed to it even when it emits no agent span.
DELEGATION_TOOLS: list[dict[str, str]] = [
    {"tool": r"^transfer_to_(.+)$", "kind": "handoff"},  # OpenAI Agents, AutoGen, LangGraph
    {"tool": r"^handoff_to_(.+)$", "kind": "handoff"},
    {  # CrewAI hierarchical: the target role is the 'coworker' argument
        "tool": r"^(?i:delegate[ _]work[ _]to[ _]coworker|ask[ _]question[ _]to[ _]coworker)$",
        "kind": "scoped",
        "target_arg": "coworker",
    },
]

#: the wrapper smolagents puts around a tool's keyword arguments
SMOLAGENTS_ARG_KEYS = frozenset({"args", "kwargs", "sanitize_inputs_outputs"})
#: tool arguments that hold the command text, and the resources a call touches
ARG_COMMAND_KEYS = cv.TOOL_COMMAND_ARGUMENTS
ARG_RESOURCE_KEYS = cv.TOOL_RESOURCE_ARGUMENTS

#: instrumentation scopes whose graph.node.parent_id may confirm an edge, never add one:
#: openinference-instrumentation-crewai's event listener sets it to the previous agent of
#: crew.agents, not to the delegator
UNTRUSTED_CLAIM_SCOPES = (r"^openinference\.instrumentation\.crewai",)

#: edge derivations, strongest first (an edge found several ways keeps the strongest)
VIA = ("governor", "explicit", "handoff", "tool", "nested", "link", "claimed")


def norm(name: str) -> str:
    """A name as a function-style identifier (``Cleanup Data`` is ``cleanup_data``), the way
    frameworks derive ``transfer_to_<agent>`` from an agent's name."""
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")


@dataclass(frozen=True)
class Model:
    """The model as data, for consumers that iterate it (SQL compilation, docs)."""

    span_types: list[tuple[str, Cond]] = field(default_factory=lambda: SPAN_TYPES)
    rules: dict[str, list[Src]] = field(default_factory=lambda: RULES)

    @property
    def digest(self) -> str:
        """Identifies the model; stored with the views derived from it."""
        import hashlib

        text = repr(self.span_types) + repr(self.rules) + repr(DELEGATION_TOOLS)
        text += repr((PLACEHOLDER_NAMES, PLACEHOLDER_IDS, ARG_COMMAND_KEYS, ARG_RESOURCE_KEYS))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


MODEL = Model()
