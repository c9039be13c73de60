"""The model compiled to ClickHouse SQL: local facts of every span, computed where it is.

:func:`local_facts_exprs` gives each local fact as a SQL expression over the exporter's
``otel_traces`` columns, named ``f_<fact>``; the store's materialized view for agentgov's
own spans and the resolver's reads of foreign traces are both built from it, and
:func:`facts_from_row` turns a row of :func:`local_select` into the same
:class:`~agentgov.collector.normalize.local.LocalFacts` the Python interpreter makes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from clickhouse_connect.driver.binding import format_query_value

from agentgov.collector.normalize.local import (
    LocalFacts,
    model_calls,
    parse_args,
    runtime_calls,
)
from agentgov.collector.normalize.model import (
    ARG_COMMAND_KEYS,
    ARG_RESOURCE_KEYS,
    ATTRS,
    DELEGATION_TOOLS,
    RULES,
    SESSION,
    SMOLAGENTS_ARG_KEYS,
    SPAN_TYPES,
    Src,
    first_sql,
)


def _q(text: str) -> str:
    return str(format_query_value(text))


def sql_strings(expr: str) -> str:
    """SQL twin of local.strings: a JSON array attribute as Array(String)."""
    return (
        f"multiIf({expr} = '', CAST([], 'Array(String)'),"
        f" isValidJSON({expr}) AND JSONType({expr}) = 'Array', JSONExtract({expr}, 'Array(String)'),"
        f" isValidJSON({expr}) AND JSONType({expr}) = 'String', [JSONExtractString({expr})],"
        f" [{expr}])"
    )


def sql_int(expr: str) -> str:
    """SQL twin of local.as_int (whole part of a number written as text, 0 otherwise)."""
    return f"toInt64(ifNull(toFloat64OrNull({expr}), 0))"


def _span_type() -> str:
    arms = ", ".join(f"{cond.sql()}, {_q(name)}" for name, cond in SPAN_TYPES)
    return f"multiIf({arms}, 'chain')"


def _args() -> str:
    """Tool arguments normalised like local.parse_args (smolagents' kwargs unwrapped);
    ``f_args_raw`` is the raw text."""
    keys = ", ".join(map(_q, sorted(SMOLAGENTS_ARG_KEYS)))
    a = "f_args_raw"
    return (
        f"if(isValidJSON({a}) AND JSONType({a}) = 'Object' AND JSONHas({a}, 'kwargs')"
        f" AND arrayAll(k -> k IN ({keys}), JSONExtractKeys({a}))"
        f" AND JSONLength({a}, 'args') = 0, JSONExtractRaw({a}, 'kwargs'), {a})"
    )


def _command() -> str:
    """agentgov.command, else a command-like argument, else a bare single-string argument."""
    members = ", ".join(f"nullIf(JSONExtractString(f_args, {_q(k)}), '')" for k in ARG_COMMAND_KEYS)
    return (
        f"ifNull(coalesce(nullIf(f_command_attr, ''), if(f_type != 'tool', NULL,"
        " multiIf(NOT isValidJSON(f_args), nullIf(f_args, ''),"
        " JSONType(f_args) = 'String', nullIf(JSONExtractString(f_args), ''),"
        f" JSONType(f_args) = 'Object', coalesce({members}), NULL))), '')"
    )


def _resources() -> str:
    per_key = ", ".join(
        f"if(JSONType(f_args, {_q(k)}) = 'Array', JSONExtract(f_args, {_q(k)}, 'Array(String)'),"
        f" [JSONExtractString(f_args, {_q(k)})])"
        for k in ARG_RESOURCE_KEYS
    )
    own = sql_strings("f_resources_attr")
    return (
        f"if(notEmpty({own}), {own}, if(f_type = 'tool' AND isValidJSON(f_args)"
        f" AND JSONType(f_args) = 'Object', arrayFilter(x -> x != '', arrayConcat({per_key})),"
        " CAST([], 'Array(String)')))"
    )


def _multi(pairs: Sequence[tuple[str, str]], default: str) -> str:
    return "multiIf(" + ", ".join(f"{c}, {v}" for c, v in pairs) + f", {default})"


def _delegation() -> tuple[str, str, str]:
    """(kind, target, stated) as local.delegation_of."""
    conds = [f"match(f_tool_name, {_q(r['tool'])})" for r in DELEGATION_TOOLS]
    kinds = [_q(r["kind"]) for r in DELEGATION_TOOLS]
    targets = [
        f"if(isValidJSON(f_args) AND JSONType(f_args) = 'Object',"
        f" JSONExtractString(f_args, {_q(r['target_arg'])}), '')"
        if "target_arg" in r
        else f"extract(f_tool_name, {_q(r['tool'])})"
        for r in DELEGATION_TOOLS
    ]
    stated = ["1" if "target_arg" in r else "0" for r in DELEGATION_TOOLS]
    by_kind = _multi(list(zip(conds, kinds, strict=True)), "''")
    by_target = _multi(list(zip(conds, targets, strict=True)), "''")
    by_stated = _multi(list(zip(conds, stated, strict=True)), "0")
    kind = (
        f"if(f_type != 'tool', '', if(f_handoff_attr != '' AND {by_kind} = '', 'handoff',"
        f" {by_kind}))"
    )
    target = (
        f"if(f_type != 'tool', '', trimBoth(if(f_handoff_attr != '', f_handoff_attr, {by_target})))"
    )
    return kind, target, f"if(f_type != 'tool', 0, if(f_handoff_attr != '', 1, {by_stated}))"


#: the exporter's columns every layer carries along
_BASE = (
    "Timestamp",
    "TraceId",
    "SpanId",
    "ParentSpanId",
    "SpanName",
    "ScopeName",
    "ServiceName",
    "Duration",
    "StatusCode",
    "StatusMessage",
)


def _agentgov_source(source: Src) -> bool:
    """A source of agentgov's own spans: an agentgov or GenAI attribute."""
    key = getattr(source, "key", "")
    return isinstance(key, str) and key.startswith(("agentgov.", "gen_ai."))


def _layers(agentgov_only: bool = False) -> list[list[tuple[str, str]]]:
    """The local facts as layers of (alias, expression): each layer reads only the columns
    of the layers before it. ClickHouse inlines an alias at every use, so a fact used many
    times (the arguments, the type) is computed once in its layer and read as a column by
    the next, which keeps the query small enough to analyse in milliseconds on every insert.
    """
    r = {
        name: first_sql([x for x in sources if _agentgov_source(x)] if agentgov_only else sources)
        for name, sources in RULES.items()
    }
    kind, target, stated = _delegation()
    # 1: everything read from the span itself
    first = [
        ("f_type0", _span_type()),
        ("f_agent_name0", r["agent_name"]),
        ("f_agent_id0", r["agent_id"]),
        ("f_session", r["session"]),
        ("f_owner_id0", r["owner_id"]),
        ("f_owner_name0", r["owner_name"]),
        ("f_parent_agent", r["parent_id"]),
        ("f_claimed_parent0", r["claimed_parent"]),
        ("f_tool_name0", r["tool_name"]),
        ("f_args_raw0", r["tool_args"]),
        ("f_tool_call_id0", r["tool_call_id"]),
        ("f_command_attr", r["command"]),
        ("f_resources_attr", r["resources"]),
        ("f_handoff_attr", r["handoff_to"]),
        ("f_handoff_from0", r["handoff_from"]),
        ("f_input_tokens0", sql_int(r["input_tokens"])),
        ("f_output_tokens0", sql_int(r["output_tokens"])),
        ("f_cost_usd0", f"toFloat64OrZero({r['cost_usd']})"),
        ("f_native", f"{ATTRS}[{_q(SESSION)}] != ''"),
        # agentgov's own rows keep the operation and tool name their spans state
        ("f_op_attr", f"{ATTRS}['gen_ai.operation.name']"),
        ("f_tool_attr", f"{ATTRS}['gen_ai.tool.name']"),
        ("f_chain", sql_strings(r["chain"])),
        ("f_depth", f"if({r['depth']} = '', -1, {sql_int(r['depth'])})"),
        ("f_intent", r["intent"]),
        ("f_task", r["task"]),
        ("f_role", r["role"]),
        ("f_has_permissions", f"mapContains({ATTRS}, 'agentgov.permissions')"),
        ("f_permissions", sql_strings(r["permissions"])),
        ("f_risk_floor", f"toUInt8(least(100, greatest(0, {sql_int(r['risk_floor'])})))"),
        ("f_token_id", r["token_id"]),
        ("f_proof", r["proof"]),
        ("f_input0", r["input"]),
        ("f_links", "arrayZip(`Links.TraceId`, `Links.SpanId`)"),
        (
            "f_messages",
            "arrayMap(e -> (toUnixTimestamp64Nano(e.1), e.2['agentgov.message.from'],"
            " e.2['agentgov.message.to'], toUInt8(least(100, greatest(0, "
            + sql_int("e.2['agentgov.message.injection']")
            + "))), "
            + sql_strings("e.2['agentgov.message.injection.signals']")
            + "), arrayFilter(e -> e.3 = 'agentgov.message',"
            " arrayZip(`Events.Timestamp`, `Events.Attributes`, `Events.Name`)))",
        ),
        # raw attributes resolution parses itself (a model's tool calls, runtime messages)
        (
            "f_call_attrs",
            f"mapFilter((k, v) -> startsWith(k, 'llm.output_messages.') OR k IN"
            f" ('gen_ai.output.messages', 'output.value', 'message'), {ATTRS})",
        ),
    ]
    # 2: the type, and what each type keeps
    agentish = "f_type IN ('agent', 'agent_def')"
    counted = "(f_type = 'llm' OR f_native)"
    second = [
        (
            "f_type",
            "if(f_type0 = 'agent' AND f_agent_name0 = '' AND f_agent_id0 = '', 'chain', f_type0)",
        )
    ]
    third = [
        ("f_agent_name", f"if({agentish}, f_agent_name0, '')"),
        ("f_agent_id", f"if({agentish}, f_agent_id0, '')"),
        ("f_owner_id", f"if({agentish}, '', f_owner_id0)"),
        ("f_owner_name", f"if({agentish}, '', f_owner_name0)"),
        ("f_claimed_parent", "if(f_type = 'agent', f_claimed_parent0, '')"),
        ("f_tool_name", "if(f_type = 'tool', f_tool_name0, '')"),
        ("f_args_raw", "if(f_type = 'tool', f_args_raw0, '')"),
        ("f_tool_call_id", "if(f_type = 'tool', f_tool_call_id0, '')"),
        ("f_handoff_from", "if(f_type = 'handoff', f_handoff_from0, '')"),
        ("f_handoff_to", "if(f_type = 'handoff', f_handoff_attr, '')"),
        ("f_input_tokens", f"if({counted}, f_input_tokens0, 0)"),
        ("f_output_tokens", f"if({counted}, f_output_tokens0, 0)"),
        ("f_cost_usd", f"if({counted} AND isFinite(f_cost_usd0), f_cost_usd0, 0)"),
        # inputs of runs, trace roots, model calls and AutoGen's deliveries: where a
        # foreign session's intent is found (local.py keeps the same)
        (
            "f_input",
            "if(f_type IN ('agent', 'llm') OR ParentSpanId = '' OR match(ScopeName, '^autogen'),"
            " f_input0, '')",
        ),
        (
            "f_model_attrs",
            "if(f_type = 'llm', f_call_attrs, mapFilter((k, v) -> k = 'message', f_call_attrs))",
        ),
    ]
    # 3: the arguments (read many times below)
    fourth = [("f_args", _args())]
    # 4: what the arguments say
    fifth = [
        ("f_command", _command()),
        ("f_resources", _resources()),
        ("f_delegation_kind", kind),
        ("f_delegation_target", target),
        ("f_delegation_stated", stated),
    ]
    return [first, second, third, fourth, fifth]


_FACT_NAME = re.compile(r"\bf_[a-z0-9_]+\b")


def _needed(layers: list[list[tuple[str, str]]], columns: Sequence[str]) -> set[str]:
    needed = set(_FACT_NAME.findall(" ".join(columns)))
    for layer in reversed(layers):
        for alias, expr in layer:
            if alias in needed:
                needed |= set(_FACT_NAME.findall(expr))
    return needed


def agentgov_facts_with(columns: Sequence[str]) -> str:
    """A WITH clause of the facts ``columns`` name, for agentgov's own spans: read from the
    model's agentgov and GenAI sources (the attributes agentgov's spans carry). One flat
    clause rather than layers: these facts are small, and every insert analyses it."""
    layers = _layers(agentgov_only=True)
    needed = _needed(layers, columns)
    flat = [(a, e) for layer in layers for a, e in layer if a in needed]
    return "WITH\n    " + ",\n    ".join(f"{e} AS {a}" for a, e in flat)


def facts_query(table: str, where: str, columns: Sequence[str]) -> str:
    """``columns`` (exporter columns and ``f_*`` facts) of the spans of ``table`` (an
    otel_traces) that pass ``where``, as a layered query (see :func:`_layers`) holding only
    the facts ``columns`` need: every insert analyses the views' queries anew, and a fact
    nobody reads costs that analysis time all the same."""
    layers = _layers()
    needed = _needed(layers, columns)
    layers = [[(a, e) for a, e in layer if a in needed] for layer in layers]
    first = ", ".join([*_BASE, *(f"{e} AS {a}" for a, e in layers[0])])
    query = f"SELECT {first}\nFROM {table}\nWHERE {where}"
    carried = list(_BASE) + [a for a, _ in layers[0]]
    for layer in layers[1:]:
        if not layer:
            continue
        query = (
            f"SELECT {', '.join(carried)}, {', '.join(f'{e} AS {a}' for a, e in layer)}\n"
            f"FROM ({query})"
        )
        carried += [a for a, _ in layer]
    return f"SELECT {', '.join(columns)}\nFROM ({query})"


#: what the resolver reads of each span (see facts_from_row)
LOCAL_COLUMNS = (
    "TraceId",
    "SpanId",
    "ParentSpanId",
    "SpanName",
    "ScopeName",
    "toUnixTimestamp64Nano(Timestamp)",
    "Duration",
    "StatusCode",
    "ServiceName",
    "f_links",
    "f_type",
    "f_session",
    "f_agent_name",
    "f_agent_id",
    "f_owner_id",
    "f_owner_name",
    "f_parent_agent",
    "f_claimed_parent",
    "f_tool_name",
    "f_args",
    "f_tool_call_id",
    "f_command",
    "f_resources",
    "f_handoff_from",
    "f_handoff_to",
    "f_delegation_kind",
    "f_delegation_target",
    "f_delegation_stated",
    "f_input_tokens",
    "f_output_tokens",
    "f_cost_usd",
    "f_native",
    "f_chain",
    "f_depth",
    "f_intent",
    "f_task",
    "f_role",
    "f_has_permissions",
    "f_permissions",
    "f_risk_floor",
    "f_token_id",
    "f_proof",
    "f_input",
    "f_messages",
    "f_model_attrs",
)


def local_select(table: str, where: str) -> str:
    """A SELECT of every span's local facts (``where`` filters ``table``, an otel_traces)."""
    return facts_query(table, where, LOCAL_COLUMNS)


def facts_from_row(row: Sequence[Any]) -> LocalFacts:
    """A row of :func:`local_select` as local facts."""
    (
        trace_id,
        span_id,
        parent_id,
        name,
        scope,
        start,
        duration,
        status,
        service,
        links,
        kind,
        session,
        agent_name,
        agent_id,
        owner_id,
        owner_name,
        parent_agent,
        claimed_parent,
        tool_name,
        args,
        tool_call_id,
        command,
        resources,
        handoff_from,
        handoff_to,
        dkind,
        dtarget,
        dstated,
        input_tokens,
        output_tokens,
        cost_usd,
        native,
        chain,
        depth,
        intent,
        task,
        role,
        has_permissions,
        permissions,
        risk_floor,
        token_id,
        proof,
        raw_input,
        messages,
        call_attrs,
    ) = row
    attrs = dict(call_attrs)
    return LocalFacts(
        trace_id=trace_id,
        span_id=span_id,
        parent_id=parent_id,
        name=name,
        scope=scope,
        start=int(start),
        end=int(start) + int(duration),
        type=kind,
        session=session,
        agent_name=agent_name,
        agent_id=agent_id,
        owner_id=owner_id,
        owner_name=owner_name,
        parent_agent=parent_agent,
        claimed_parent=claimed_parent,
        tool_name=tool_name,
        tool_args=parse_args(args) if kind == "tool" else None,
        tool_call_id=tool_call_id,
        command=command,
        resources=list(resources),
        handoff_from=handoff_from,
        handoff_to=handoff_to,
        delegation_kind=dkind,
        delegation_target=dtarget,
        delegation_explicit=bool(dstated),
        input_tokens=int(input_tokens),
        output_tokens=int(output_tokens),
        cost_usd=float(cost_usd),
        model_calls=model_calls(attrs) if kind == "llm" else [],
        runtime_calls=runtime_calls(attrs),
        links=tuple((t, s) for t, s in links),
        status=status,
        service=service,
        duration=int(duration),
        native=bool(native),
        chain=list(chain),
        depth=None if int(depth) < 0 else int(depth),
        intent=intent,
        task=task,
        role=role,
        permissions=list(permissions) if has_permissions else None,
        risk_floor=int(risk_floor),
        token_id=token_id,
        proof=proof,
        input=raw_input,
        messages=[(int(at), f, t, int(inj), list(sig)) for at, f, t, inj, sig in messages],
    )
