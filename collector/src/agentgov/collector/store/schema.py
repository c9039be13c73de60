"""Where the tables are defined: ``otel_traces`` and the governance tables derived from it.

``otel_traces`` (and its trace-id lookup) use the DDL of the OpenTelemetry Collector's
ClickHouse exporter, so that exporter can write to the same table and Grafana's
ClickHouse plugin reads it as traces. Everything agentgov adds hangs off it by
materialized views, so spans analysed are the same whichever route they arrived by:

    agentgov_otlp_ingest (Null) --mv--> otel_traces --mv--> agentgov_spans --mv--> agentgov_sessions
    (raw OTLP protobuf,                 (exporter DDL)      (typed, by session)  +-mv--> agentgov_agents
     decoded by ClickHouse)                                                         (view: agentgov_edges)
                                        +--mv--> otel_traces_trace_id_ts
"""

from __future__ import annotations

from importlib import resources as importlib_resources
from pathlib import Path

from clickhouse_connect.driver.binding import format_query_value

from agentgov.collector.risk import RiskRules, sql_normalize

TRACES = "otel_traces"
INGEST = "agentgov_otlp_ingest"
SPANS = "agentgov_spans"
SESSIONS = "agentgov_sessions"
EDGES = "agentgov_edges"
AGENTS = "agentgov_agents"
RECEIPTS = "agentgov_otlp_receipts"


def ingest_proto() -> str:
    """The protobuf schema ClickHouse decodes OTLP requests with."""
    return (
        importlib_resources.files("agentgov.collector.store")
        .joinpath("otlp_ingest.proto")
        .read_text("utf-8")
    )


def ingest_settings(embedded: bool) -> dict[str, object]:
    """Insert settings for the ingest table.

    chDB reads the packaged schema file by its path. A ClickHouse server cannot see this
    machine's files, so it gets the schema's text (``format_schema_source = 'string'``,
    ClickHouse 25.x and later), which it caches in its own format-schema directory.
    """
    if embedded:
        path = (
            Path(str(importlib_resources.files("agentgov.collector.store"))) / "otlp_ingest.proto"
        )
        if path.is_file():
            return {**INGEST_SETTINGS, "format_schema": str(path)}
    return {**INGEST_SETTINGS, "format_schema_source": "string", "format_schema": ingest_proto()}


OTEL_TRACES = f"""
CREATE TABLE IF NOT EXISTS {TRACES} (
    Timestamp DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64 CODEC(T64, ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    Links Nested (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    ResourceAttributeItems Array(String) ALIAS arrayMap(kv -> concat(kv.1, '=', kv.2), CAST(ResourceAttributes, 'Array(Tuple(String, String))')),
    SpanAttributeItems Array(String) ALIAS arrayMap(kv -> concat(kv.1, '=', kv.2), CAST(SpanAttributes, 'Array(Tuple(String, String))')),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1,
    INDEX idx_lower_span_name lower(SpanName) TYPE tokenbf_v1(32768, 3, 0) GRANULARITY 8
) ENGINE = MergeTree()
PARTITION BY toDate(Timestamp)
PRIMARY KEY (ServiceName, SpanName, toDateTime(Timestamp))
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp), Timestamp)
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1
"""

TRACE_ID_TS = f"""
CREATE TABLE IF NOT EXISTS {TRACES}_trace_id_ts (
    TraceId String CODEC(ZSTD(1)),
    Start SimpleAggregateFunction(min, DateTime) CODEC(ZSTD(1)),
    End SimpleAggregateFunction(max, DateTime) CODEC(ZSTD(1))
) ENGINE = AggregatingMergeTree()
PARTITION BY toStartOfWeek(Start)
ORDER BY (TraceId)
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1
"""

TRACE_ID_TS_MV = f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS {TRACES}_trace_id_ts_mv
TO {TRACES}_trace_id_ts
AS SELECT
    TraceId,
    min(Timestamp) as Start,
    max(Timestamp) as End
FROM {TRACES}
WHERE TraceId != ''
GROUP BY TraceId
"""

# -- raw OTLP ingest: ClickHouse decodes the protobuf and flattens it ---------------------

_SCALAR_TAGS = (
    "'none' = 0, 'string_value' = 1, 'bool_value' = 2, 'int_value' = 3, 'double_value' = 4"
)
_SCALAR = (
    f"Tuple(value Enum8({_SCALAR_TAGS}, 'array_value' = 5, 'kvlist_value' = 6, 'bytes_value' = 7),"
    " string_value String, bool_value Bool, int_value Int64, double_value Float64,"
    " array_value String, kvlist_value String, bytes_value String)"
)
_ANY = (
    f"Tuple(value Enum8({_SCALAR_TAGS}, 'array_value' = 5, 'kvlist_value' = 6, 'bytes_value' = 7),"
    " string_value String, bool_value Bool, int_value Int64, double_value Float64,"
    f" array_value Tuple(values Array({_SCALAR})), kvlist_value String, bytes_value String)"
)
_ATTRS = f"Array(Tuple(key String, value {_ANY}))"

INGEST_TABLE = f"""
CREATE TABLE IF NOT EXISTS {INGEST} (
    resource_spans Array(Tuple(
        resource Tuple(attributes {_ATTRS}),
        scope_spans Array(Tuple(
            scope Tuple(name String, version String),
            spans Array(Tuple(
                trace_id String, span_id String, trace_state String, parent_span_id String,
                name String, kind Int32, start_time_unix_nano UInt64, end_time_unix_nano UInt64,
                attributes {_ATTRS},
                events Array(Tuple(time_unix_nano UInt64, name String, attributes {_ATTRS})),
                links Array(Tuple(trace_id String, span_id String, trace_state String, attributes {_ATTRS})),
                status Tuple(message String, code Int32)
            ))
        ))
    ))
) ENGINE = Null
"""


def _scalar_sql(v: str, raw_arrays: bool) -> str:
    """An attribute value rendered as the OpenTelemetry Collector's exporter renders it.

    ``raw_arrays``: arrays at this level arrive as raw protobuf bytes (values nested in an
    array); at the top level they are decoded and rendered as JSON by :func:`_any_sql`.
    """
    raw_array = (
        f" {v}.value = 'array_value', concat('otlp:', base64Encode({v}.array_value)),"
        if raw_arrays
        else ""
    )
    return (
        f"multiIf({v}.value = 'string_value', {v}.string_value,"
        f" {v}.value = 'int_value', toString({v}.int_value),"
        f" {v}.value = 'double_value', toString({v}.double_value),"
        f" {v}.value = 'bool_value', if({v}.bool_value, 'true', 'false'),"
        f" {v}.value = 'bytes_value', base64Encode({v}.bytes_value),"
        f" {v}.value = 'kvlist_value', concat('otlp:', base64Encode({v}.kvlist_value)),"
        f"{raw_array} '')"
    )


def _any_sql(v: str) -> str:
    return (
        f"if({v}.value = 'array_value',"
        f" toJSONString(arrayMap(x -> {_scalar_sql('x', True)}, {v}.array_value.values)),"
        f" {_scalar_sql(v, False)})"
    )


def _map_sql(attrs: str) -> str:
    return f"mapFromArrays(arrayMap(kv -> kv.key, {attrs}), arrayMap(kv -> {_any_sql('kv.value')}, {attrs}))"


INGEST_MV = f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS {INGEST}_mv TO {TRACES} AS
SELECT
    fromUnixTimestamp64Nano(toInt64(s.start_time_unix_nano)) AS Timestamp,
    lower(hex(s.trace_id)) AS TraceId,
    lower(hex(s.span_id)) AS SpanId,
    lower(hex(s.parent_span_id)) AS ParentSpanId,
    s.trace_state AS TraceState,
    s.name AS SpanName,
    ['Unspecified', 'Internal', 'Server', 'Client', 'Producer', 'Consumer'][s.kind + 1] AS SpanKind,
    rattrs['service.name'] AS ServiceName,
    rattrs AS ResourceAttributes,
    scope.name AS ScopeName,
    scope.version AS ScopeVersion,
    {_map_sql("s.attributes")} AS SpanAttributes,
    if(s.end_time_unix_nano > s.start_time_unix_nano, s.end_time_unix_nano - s.start_time_unix_nano, 0) AS Duration,
    ['Unset', 'Ok', 'Error'][s.status.code + 1] AS StatusCode,
    s.status.message AS StatusMessage,
    arrayMap(e -> fromUnixTimestamp64Nano(toInt64(e.time_unix_nano)), s.events) AS `Events.Timestamp`,
    arrayMap(e -> e.name, s.events) AS `Events.Name`,
    arrayMap(e -> {_map_sql("e.attributes")}, s.events) AS `Events.Attributes`,
    arrayMap(l -> lower(hex(l.trace_id)), s.links) AS `Links.TraceId`,
    arrayMap(l -> lower(hex(l.span_id)), s.links) AS `Links.SpanId`,
    arrayMap(l -> l.trace_state, s.links) AS `Links.TraceState`,
    arrayMap(l -> {_map_sql("l.attributes")}, s.links) AS `Links.Attributes`
FROM {INGEST}
-- Unnest level by level, carrying only each level's own small parts forward: referring to
-- a whole parent tuple after the next ARRAY JOIN would copy all its spans once per span.
ARRAY JOIN tupleElement(resource_spans, 'scope_spans') AS scope_spans,
           arrayMap(r -> {_map_sql("r.resource.attributes")}, resource_spans) AS rattrs
ARRAY JOIN tupleElement(scope_spans, 'scope') AS scope, tupleElement(scope_spans, 'spans') AS spans
ARRAY JOIN spans AS s
"""

#: settings for inserts into the ingest table (exporter-compatible JSON of arrays);
#: see :func:`ingest_settings` for the schema itself
INGEST_SETTINGS = {
    "format_schema_message_name": "ExportTraceServiceRequest",
    "input_format_protobuf_oneof_presence": 1,
    "output_format_json_escape_forward_slashes": 0,
    # a batch may hold spans of many days (backfills, clock skew): never refuse it for that
    "max_partitions_per_insert_block": 0,
}

# -- governance tables ---------------------------------------------------------------------

AGENT_SPANS = f"""
CREATE TABLE IF NOT EXISTS {SPANS} (
    SessionId String CODEC(ZSTD(1)),
    Timestamp DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    ServiceName LowCardinality(String),
    SpanName LowCardinality(String),
    Operation LowCardinality(String),
    AgentId String CODEC(ZSTD(1)),
    AgentName LowCardinality(String),
    ParentAgentId String CODEC(ZSTD(1)),
    Chain Array(String) CODEC(ZSTD(1)),
    Depth UInt16,
    Intent String CODEC(ZSTD(3)),
    Task String CODEC(ZSTD(1)),
    Role LowCardinality(String),
    Permissions Array(String) CODEC(ZSTD(1)),
    ToolName LowCardinality(String),
    Command String CODEC(ZSTD(1)),
    Resources Array(String) CODEC(ZSTD(1)),
    RiskScore UInt8,
    RiskRules Array(LowCardinality(String)),
    CostUsd Float64,
    InputTokens UInt64,
    OutputTokens UInt64,
    Messages UInt32,
    Duration UInt64 CODEC(T64, ZSTD(1)),
    StatusCode LowCardinality(String),
    StatusMessage String CODEC(ZSTD(1))
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(Timestamp)
ORDER BY (SessionId, Timestamp, SpanId)
"""


def agent_spans_mv(rules: RiskRules) -> str:
    """DDL of the view that types agent spans (see :func:`agent_spans_select`)."""
    return (
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {SPANS}_mv TO {SPANS} AS\n"
        f"{agent_spans_select(rules)}\n"
        f"COMMENT {format_query_value('risk rules ' + rules.digest)}"
    )


def agent_spans_select(rules: RiskRules, where: str = "") -> str:
    """The view that types agent spans and scores their commands with ``rules``.

    Foreign conventions map onto the same columns: OpenInference and OpenLLMetry span
    kinds and session ids, GenAI conversation ids. An emitter's own risk score is a
    floor, never a ceiling: an agent cannot talk its command's risk down.
    """
    a = "SpanAttributes"
    json_arr = "JSONExtract({}, 'Array(String)')"
    return f"""
WITH
    coalesce(nullIf({a}['agentgov.session.id'], ''), nullIf({a}['session.id'], ''),
             nullIf({a}['gen_ai.conversation.id'], ''),
             nullIf({a}['traceloop.association.properties.session_id'], ''), '') AS sid,
    multiIf({a}['gen_ai.operation.name'] != '', {a}['gen_ai.operation.name'],
            upper({a}['openinference.span.kind']) = 'AGENT', 'invoke_agent',
            upper({a}['openinference.span.kind']) = 'TOOL', 'execute_tool',
            {a}['traceloop.span.kind'] = 'agent', 'invoke_agent',
            {a}['traceloop.span.kind'] = 'tool', 'execute_tool', '') AS op,
    if({a}['gen_ai.agent.id'] != '', {a}['gen_ai.agent.id'], {a}['gen_ai.agent.name']) AS aid,
    {json_arr.format(f"{a}['agentgov.delegation.chain']")} AS chain0,
    if(empty(chain0) AND aid != '', [aid], chain0) AS chain,
    {a}['agentgov.command'] AS cmd,
    {json_arr.format(f"{a}['agentgov.resources']")} AS res,
    op = 'execute_tool' OR cmd != '' AS scored,
    -- each rule's patterns run once per span; score and rule names both read these hits
    if(scored, {rules.sql_hits(sql_normalize("cmd"), f"arrayMap(x -> {sql_normalize('x')}, res)")}, []) AS hits
SELECT
    sid AS SessionId,
    Timestamp, TraceId, SpanId, ParentSpanId, ServiceName, SpanName,
    op AS Operation,
    aid AS AgentId,
    {a}['gen_ai.agent.name'] AS AgentName,
    {a}['agentgov.agent.parent_id'] AS ParentAgentId,
    chain AS Chain,
    if({a}['agentgov.delegation.depth'] != '', toUInt16OrZero({a}['agentgov.delegation.depth']),
       toUInt16(greatest(length(chain), 1) - 1)) AS Depth,
    {a}['agentgov.intent'] AS Intent,
    {a}['agentgov.task'] AS Task,
    {a}['agentgov.agent.role'] AS Role,
    {json_arr.format(f"{a}['agentgov.permissions']")} AS Permissions,
    {a}['gen_ai.tool.name'] AS ToolName,
    cmd AS Command,
    res AS Resources,
    if(scored,
       greatest(toUInt8(least(100, toUInt32OrZero({a}['agentgov.risk.score']))), {rules.sql_score("hits")}),
       toUInt8(0)) AS RiskScore,
    if(scored, {rules.sql_rule_names("hits")}, []) AS RiskRules,
    toFloat64OrZero({a}['agentgov.cost.usd']) AS CostUsd,
    toUInt64OrZero({a}['gen_ai.usage.input_tokens']) AS InputTokens,
    toUInt64OrZero({a}['gen_ai.usage.output_tokens']) AS OutputTokens,
    toUInt32(countEqual(`Events.Name`, 'agentgov.message')) AS Messages,
    Duration, StatusCode, StatusMessage
FROM {TRACES}
WHERE sid != '' {where}
"""


SESSIONS_TABLE = f"""
CREATE TABLE IF NOT EXISTS {SESSIONS} (
    SessionId String,
    FirstSeen SimpleAggregateFunction(min, DateTime64(9)),
    LastSeen SimpleAggregateFunction(max, DateTime64(9)),
    -- every span of a session carries the same intent; max() keeps it over foreign spans' ''
    Intent SimpleAggregateFunction(max, String),
    Services SimpleAggregateFunction(groupUniqArrayArray, Array(String)),
    Agents AggregateFunction(uniqExact, String),
    Spans SimpleAggregateFunction(sum, UInt64),
    ToolCalls SimpleAggregateFunction(sum, UInt64),
    Handoffs SimpleAggregateFunction(sum, UInt64),
    MaxDepth SimpleAggregateFunction(max, UInt16),
    CostUsd SimpleAggregateFunction(sum, Float64),
    InputTokens SimpleAggregateFunction(sum, UInt64),
    OutputTokens SimpleAggregateFunction(sum, UInt64),
    MaxRisk SimpleAggregateFunction(max, UInt8),
    -- session risk = 100 * (1 - exp(RiskLogSum)): noisy-OR of command risks
    RiskLogSum SimpleAggregateFunction(sum, Float64),
    Errors SimpleAggregateFunction(sum, UInt64),
    RootEnded SimpleAggregateFunction(max, UInt8)
) ENGINE = AggregatingMergeTree()
ORDER BY SessionId
"""

SESSIONS_SELECT = f"""
SELECT
    SessionId,
    min(Timestamp) AS FirstSeen,
    max(Timestamp + toIntervalNanosecond(Duration)) AS LastSeen,
    max(Intent) AS Intent,
    groupUniqArray(toString(ServiceName)) AS Services,
    uniqExactStateIf(AgentId, AgentId != '') AS Agents,
    count() AS Spans,
    countIf(Operation = 'execute_tool') AS ToolCalls,
    countIf(Operation = 'invoke_agent' AND ParentAgentId != '') AS Handoffs,
    max(Depth) AS MaxDepth,
    sum(CostUsd) AS CostUsd,
    sum(InputTokens) AS InputTokens,
    sum(OutputTokens) AS OutputTokens,
    max(RiskScore) AS MaxRisk,
    sum(log1p(-least(RiskScore, 99.5) / 100)) AS RiskLogSum,
    countIf(StatusCode = 'Error') AS Errors,
    toUInt8(max(Operation = 'invoke_agent' AND Depth = 0 AND ParentAgentId = '')) AS RootEnded
FROM {SPANS}
{{where}}
GROUP BY SessionId
"""

SESSIONS_MV = (
    f"CREATE MATERIALIZED VIEW IF NOT EXISTS {SESSIONS}_mv TO {SESSIONS} AS\n"
    + SESSIONS_SELECT.format(where="")
)

AGENTS_TABLE = f"""
CREATE TABLE IF NOT EXISTS {AGENTS} (
    SessionId String,
    AgentId String,
    -- every span of an agent names it alike; max() keeps values over foreign spans' ''
    Name SimpleAggregateFunction(max, String),
    Role SimpleAggregateFunction(max, String),
    ParentId SimpleAggregateFunction(max, String),
    Task SimpleAggregateFunction(max, String),
    Depth SimpleAggregateFunction(min, UInt16),
    Risk SimpleAggregateFunction(max, UInt8),
    ToolCalls SimpleAggregateFunction(sum, UInt64),
    CostUsd SimpleAggregateFunction(sum, Float64),
    Errors SimpleAggregateFunction(max, UInt8),
    FirstSeen SimpleAggregateFunction(min, DateTime64(9)),
    LastSeen SimpleAggregateFunction(max, DateTime64(9))
) ENGINE = AggregatingMergeTree()
ORDER BY (SessionId, AgentId)
"""

AGENTS_SELECT = f"""
SELECT
    SessionId, AgentId,
    max(toString(AgentName)) AS Name,
    max(toString(Role)) AS Role,
    max(ParentAgentId) AS ParentId,
    max(Task) AS Task,
    min(Depth) AS Depth,
    max(RiskScore) AS Risk,
    countIf(Operation = 'execute_tool') AS ToolCalls,
    sum(CostUsd) AS CostUsd,
    toUInt8(max(StatusCode = 'Error')) AS Errors,
    min(Timestamp) AS FirstSeen,
    max(Timestamp + toIntervalNanosecond(Duration)) AS LastSeen
FROM {SPANS}
WHERE AgentId != '' {{where}}
GROUP BY SessionId, AgentId
"""

AGENTS_MV = (
    f"CREATE MATERIALIZED VIEW IF NOT EXISTS {AGENTS}_mv TO {AGENTS} AS\n"
    + AGENTS_SELECT.format(where="")
)

# Delegation edges are the agents that have a parent: a plain view over agentgov_agents
# rather than a table of their own, since each table a view writes costs every insert a
# part write.
EDGES_VIEW = f"""
CREATE VIEW IF NOT EXISTS {EDGES} AS
SELECT SessionId, max(ParentId) AS ParentAgentId, AgentId, max(Name) AS AgentName,
       max(Role) AS Role, max(Task) AS Task, min(Depth) AS Depth, min(FirstSeen) AS Timestamp
FROM {AGENTS}
GROUP BY SessionId, AgentId
HAVING ParentAgentId != ''
"""

RECEIPTS_TABLE = f"""
CREATE TABLE IF NOT EXISTS {RECEIPTS} (
    Digest String,
    -- 1 = pending (insert under way), 2 = committed (durable, acknowledged),
    -- 3 = repaired (was pending at a crash; derived tables reconciled)
    State UInt8,
    TraceIds Array(String),  -- on pending receipts: what to reconcile after a crash
    At DateTime DEFAULT now()
) ENGINE = ReplacingMergeTree(State)
ORDER BY Digest
TTL At + INTERVAL 1 DAY
"""


def statements(rules: RiskRules) -> list[str]:
    """All DDL, in dependency order (targets before the views that feed them)."""
    return [
        OTEL_TRACES,
        TRACE_ID_TS,
        TRACE_ID_TS_MV,
        AGENT_SPANS,
        SESSIONS_TABLE,
        AGENTS_TABLE,
        SESSIONS_MV,
        AGENTS_MV,
        EDGES_VIEW,
        agent_spans_mv(rules),
        INGEST_TABLE,
        INGEST_MV,
        RECEIPTS_TABLE,
    ]
