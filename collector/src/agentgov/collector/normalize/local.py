"""Local facts: what one span says on its own, read through the model (model.py).

:func:`local_facts` is the model's Python interpreter. The collector computes the same
facts in ClickHouse (sql.py) wherever rows are written or read in bulk; this interpreter is
the executable reference the parity tests hold the SQL to, and what reads spans that are
not in ClickHouse (a request's protobuf, in tests and tools).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from agentgov.collector.normalize.model import (
    ARG_COMMAND_KEYS,
    ARG_RESOURCE_KEYS,
    DELEGATION_TOOLS,
    RULES,
    SESSION,
    SMOLAGENTS_ARG_KEYS,
    SPAN_TYPES,
    first_py,
)

_KINDS = ("Unspecified", "Internal", "Server", "Client", "Producer", "Consumer")

#: a model or runtime tool call: (call id, tool name, arguments as JSON text)
Call = tuple[str, str, str]


@dataclass(frozen=True)
class Span:
    """A span as the ClickHouse exporter stores it (attributes rendered as text)."""

    trace_id: str
    span_id: str
    parent_id: str  # '' for a root span
    name: str
    scope: str
    start: int  # unix ns
    end: int
    attrs: dict[str, str]
    kind: str = "Internal"
    status: str = "Unset"
    links: tuple[tuple[str, str], ...] = ()  # (trace id, span id)
    events: tuple[tuple[str, int, dict[str, str]], ...] = ()  # (name, unix ns, attributes)
    service: str = ""


def render(value: AnyValue) -> str:
    """An attribute value as the exporter (and the ingest view) renders it."""
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "int_value":
        return str(value.int_value)
    if which == "double_value":
        d = value.double_value
        return str(int(d)) if d.is_integer() and abs(d) < 1e15 else repr(d)
    if which == "bool_value":
        return "true" if value.bool_value else "false"
    if which == "array_value":
        return json.dumps([render(x) for x in value.array_value.values], ensure_ascii=False)
    return ""


def spans_of_request(data: bytes) -> list[Span]:
    """The spans of one serialized ExportTraceServiceRequest."""
    request = ExportTraceServiceRequest.FromString(data)
    out = []
    for rs in request.resource_spans:
        service = next(
            (render(kv.value) for kv in rs.resource.attributes if kv.key == "service.name"), ""
        )
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    Span(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(),
                        name=s.name,
                        scope=ss.scope.name,
                        start=s.start_time_unix_nano,
                        end=s.end_time_unix_nano,
                        attrs={kv.key: render(kv.value) for kv in s.attributes},
                        kind=_KINDS[s.kind] if 0 <= s.kind < len(_KINDS) else "Unspecified",
                        status=("Unset", "Ok", "Error")[s.status.code]
                        if 0 <= s.status.code <= 2
                        else "Unset",
                        links=tuple((lk.trace_id.hex(), lk.span_id.hex()) for lk in s.links),
                        events=tuple(
                            (
                                e.name,
                                e.time_unix_nano,
                                {kv.key: render(kv.value) for kv in e.attributes},
                            )
                            for e in s.events
                        ),
                        service=service,
                    )
                )
    return out


@dataclass
class LocalFacts:
    """The facts of one span on its own (see model.RULES for where each comes from)."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    scope: str
    start: int
    end: int
    type: str
    session: str
    agent_name: str = ""
    agent_id: str = ""
    owner_id: str = ""
    owner_name: str = ""
    parent_agent: str = ""  # agentgov.agent.parent_id
    claimed_parent: str = ""
    tool_name: str = ""
    tool_args: Any = None
    tool_call_id: str = ""
    command: str = ""
    resources: list[str] = field(default_factory=list)
    handoff_from: str = ""
    handoff_to: str = ""
    delegation_kind: str = ""  # '', 'handoff', 'scoped'
    delegation_target: str = ""
    delegation_explicit: bool = False  # the target is stated, not guessed from a tool name
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    model_calls: list[Call] = field(default_factory=list)
    runtime_calls: list[Call] = field(default_factory=list)
    links: tuple[tuple[str, str], ...] = ()
    status: str = "Unset"
    service: str = ""
    duration: int = 0
    native: bool = False  # an agentgov span: carries agentgov.session.id
    chain: list[str] = field(default_factory=list)
    depth: int | None = None
    intent: str = ""
    task: str = ""
    role: str = ""
    permissions: list[str] | None = None
    risk_floor: int = 0
    token_id: str = ""
    proof: str = ""
    #: what the run, trace root or model call was asked, as recorded (JSON or text; read
    #: with :func:`input_text` when a session's intent is looked for)
    input: str = ""
    #: inter-agent messages recorded on the span: (time ns, from, to, injection, signals)
    messages: list[tuple[int, str, str, int, list[str]]] = field(default_factory=list)


# -- helpers shared with the SQL reader --------------------------------------------------------


def parse_args(raw: str) -> Any:
    """Tool arguments: a JSON value (smolagents' ``{"args": [], "kwargs": {...}}`` unwrapped),
    or the bare text of a single string argument (LangChain records those unquoted)."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    if (
        isinstance(value, dict)
        and "kwargs" in value
        and set(value) <= SMOLAGENTS_ARG_KEYS
        and not value.get("args")
    ):
        return value["kwargs"]
    return value


def command_of(args: Any) -> str:
    if isinstance(args, str):
        return args
    if isinstance(args, dict):
        for key in ARG_COMMAND_KEYS:
            value = args.get(key)
            if isinstance(value, str) and value:
                return value
    return ""


def resources_of(args: Any) -> list[str]:
    out: list[str] = []
    if isinstance(args, dict):
        for key in ARG_RESOURCE_KEYS:
            value = args.get(key)
            if isinstance(value, str) and value:
                out.append(value)
            elif isinstance(value, list):
                out += [str(x) for x in value if x]
    return out


def strings(value: str) -> list[str]:
    """A JSON array attribute (as the exporter renders arrays) as strings."""
    if not value:
        return []
    try:
        parsed = json.loads(value)
    except ValueError:
        return [value]
    if isinstance(parsed, list):
        return [str(x) for x in parsed]
    return [parsed] if isinstance(parsed, str) else [value]


def as_int(value: str) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        return 0


def as_float(value: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return 0.0
    return f if f == f and abs(f) != float("inf") else 0.0


def delegation_of(tool_name: str, args: Any, handoff_to: str) -> tuple[str, str, bool]:
    """(kind, target, stated) of a tool that hands over to another agent, else ('', '', False):
    the first DELEGATION_TOOLS rule matching the name; LangGraph's stated destination
    (``handoff_to`` from metadata) overrides a target read from the name."""
    kind, target, stated = "", "", False
    for rule in DELEGATION_TOOLS:
        m = re.search(rule["tool"], tool_name)
        if not m:
            continue
        kind = rule["kind"]
        if "target_arg" in rule:
            target = str(args.get(rule["target_arg"], "")) if isinstance(args, dict) else ""
            stated = True
        else:
            target = m.group(1)
        break
    if handoff_to:
        kind, target, stated = kind or "handoff", handoff_to, True
    return kind, target.strip(" "), stated


_OI_CALL = re.compile(
    r"^llm\.output_messages\.(\d+)\.message\.tool_calls\.(\d+)\.tool_call\."
    r"(id|function\.name|function\.arguments)$"
)


def _walk_calls(value: Any, out: list[Call], depth: int = 0) -> None:
    """Every ``{id, name, arguments}`` / ``{id, function: {name, arguments}}`` in a JSON tree."""
    if depth > 32:
        return
    if isinstance(value, dict):
        fn = value.get("function") if isinstance(value.get("function"), dict) else None
        name = value.get("name") if "arguments" in value else (fn or {}).get("name")
        if isinstance(name, str) and name and ("arguments" in value or fn):
            cid = value.get("id") or value.get("call_id") or ""
            args = value.get("arguments") if "arguments" in value else (fn or {}).get("arguments")
            out.append((str(cid), name, args if isinstance(args, str) else json.dumps(args)))
        for x in value.values():
            _walk_calls(x, out, depth + 1)
    elif isinstance(value, list):
        for x in value:
            _walk_calls(x, out, depth + 1)


def model_calls(attrs: dict[str, str]) -> list[Call]:
    """The tool calls a model asked for in an LLM span's output."""
    out: list[Call] = []
    flat: dict[tuple[int, int], dict[str, str]] = defaultdict(dict)
    for key, value in attrs.items():
        m = _OI_CALL.match(key)
        if m:
            flat[(int(m.group(1)), int(m.group(2)))][m.group(3)] = value
    for position in sorted(flat):
        d = flat[position]
        if d.get("function.name"):
            out.append((d.get("id", ""), d["function.name"], d.get("function.arguments", "")))
    if out:
        return out
    for key in ("gen_ai.output.messages", "output.value"):
        raw = attrs.get(key, "")
        if raw[:1] in ("[", "{"):
            try:
                _walk_calls(json.loads(raw), out)
            except (ValueError, RecursionError):
                pass
        if out:
            return out
    return out


def runtime_calls(attrs: dict[str, str]) -> list[Call]:
    """Tool calls a runtime message carries (AutoGen's ``message`` attribute: the only place
    AutoGen records a tool's arguments)."""
    out: list[Call] = []
    raw = attrs.get("message", "")
    if raw[:1] == "{":
        try:
            _walk_calls(json.loads(raw), out)
        except (ValueError, RecursionError):
            pass
    return out


#: the longest intent kept from a foreign run's input
MAX_INPUT = 1000


#: keys a run's JSON input names its request by, when it is no chat transcript
#: (smolagents ``task``, CrewAI kickoff inputs, LangChain ``input``/``query``)
REQUEST_KEYS = ("task", "request", "input", "query", "question", "prompt")


def input_text(raw: str) -> str:
    """The text a run was asked: a plain string; in a JSON chat transcript the first user
    message's content (role or, AutoGen, source ``user``; else the first content there is);
    in other JSON the first request-like value (:data:`REQUEST_KEYS`)."""
    if not raw:
        return ""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return raw[:MAX_INPUT]
    found: list[str] = []
    requests: list[str] = []

    def walk(v: Any, depth: int) -> None:
        if depth > 16 or len(found) > 1:
            return
        if isinstance(v, dict):
            content = v.get("content")
            if isinstance(content, str) and content and "user" in (v.get("role"), v.get("source")):
                found.insert(0, content)
                return
            if isinstance(content, str) and content and not found:
                found.append(content)
            if not requests:
                requests.extend(
                    x for k in REQUEST_KEYS if isinstance(x := v.get(k), str) and x.strip()
                )
            for x in v.values():
                walk(x, depth + 1)
        elif isinstance(v, list):
            for x in v:
                walk(x, depth + 1)

    if isinstance(value, str):
        return value[:MAX_INPUT]
    walk(value, 0)
    text = found[0] if found else requests[0] if requests else ""
    return text[:MAX_INPUT]


def message_events(
    events: tuple[tuple[str, int, dict[str, str]], ...],
) -> list[tuple[int, str, str, int, list[str]]]:
    """agentgov.message events as (time, from, to, injection score, signals)."""
    out = []
    for name, at, attrs in events:
        if name == "agentgov.message":
            out.append(
                (
                    at,
                    attrs.get("agentgov.message.from", ""),
                    attrs.get("agentgov.message.to", ""),
                    max(0, min(100, as_int(attrs.get("agentgov.message.injection", "0")))),
                    strings(attrs.get("agentgov.message.injection.signals", "")),
                )
            )
    return out


# -- the interpreter -------------------------------------------------------------------------

_READ = {name: first_py(sources) for name, sources in RULES.items()}


def span_type(s: Span) -> str:
    for name, cond in SPAN_TYPES:
        if cond.py(s):
            return name
    return "chain"


def local_facts(s: Span) -> LocalFacts:
    """Everything one span says on its own."""
    g = {name: read(s) for name, read in _READ.items()}
    kind = span_type(s)
    if kind == "agent" and not (g["agent_name"] or g["agent_id"]):
        kind = "chain"  # an agent span naming no agent is a wrapper ('Agent workflow')
    agentish = kind in ("agent", "agent_def")
    tool = kind == "tool"
    args = parse_args(g["tool_args"]) if tool else None
    handoff_to = g["handoff_to"]
    dkind, dtarget, stated = (
        delegation_of(g["tool_name"], args, handoff_to) if tool else ("", "", False)
    )
    resources = strings(g["resources"]) or (resources_of(args) if tool else [])
    native = s.attrs.get(SESSION, "") != ""
    # usage: model calls, and agentgov's own spans (self figures); foreign agent and chain
    # spans repeat their children's usage (aggregates, copies) and are not counted
    counted = kind == "llm" or native
    return LocalFacts(
        trace_id=s.trace_id,
        span_id=s.span_id,
        parent_id=s.parent_id,
        name=s.name,
        scope=s.scope,
        start=s.start,
        end=s.end,
        type=kind,
        session=g["session"],
        agent_name=g["agent_name"] if agentish else "",
        agent_id=g["agent_id"] if agentish else "",
        owner_id=g["owner_id"] if not agentish else "",
        owner_name=g["owner_name"] if not agentish else "",
        parent_agent=g["parent_id"],
        claimed_parent=g["claimed_parent"] if kind == "agent" else "",
        tool_name=g["tool_name"] if tool else "",
        tool_args=args,
        tool_call_id=g["tool_call_id"] if tool else "",
        command=g["command"] or (command_of(args) if tool else ""),
        resources=resources,
        handoff_from=g["handoff_from"] if kind == "handoff" else "",
        handoff_to=handoff_to if kind == "handoff" else "",
        delegation_kind=dkind,
        delegation_target=dtarget,
        delegation_explicit=stated,
        input_tokens=as_int(g["input_tokens"]) if counted else 0,
        output_tokens=as_int(g["output_tokens"]) if counted else 0,
        cost_usd=as_float(g["cost_usd"]) if counted else 0.0,
        model_calls=model_calls(s.attrs) if kind == "llm" else [],
        runtime_calls=runtime_calls(s.attrs),
        links=s.links,
        status=s.status,
        service=s.service,
        duration=max(0, s.end - s.start),
        native=native,
        chain=strings(g["chain"]),
        depth=as_int(g["depth"]) if g["depth"] else None,
        intent=g["intent"],
        task=g["task"],
        role=g["role"],
        permissions=strings(g["permissions"]) if "agentgov.permissions" in s.attrs else None,
        risk_floor=max(0, min(100, as_int(g["risk_floor"]))),
        token_id=g["token_id"],
        proof=g["proof"],
        # the spans sql.py keeps inputs of, alike
        input=g["input"]
        if kind in ("agent", "llm") or not s.parent_id or s.scope.startswith("autogen")
        else "",
        messages=message_events(s.events),
    )
