"""Where the tables are defined: ``otel_traces`` and the governance tables derived from it.

``otel_traces`` (and its trace-id lookup) use the DDL of the OpenTelemetry Collector's
ClickHouse exporter, so that exporter can write to the same table and Grafana's
ClickHouse plugin reads it as traces. Everything agentgov adds hangs off it, so spans
analysed are the same whichever route they arrived by:

    agentgov_otlp_ingest (Null) --mv--> otel_traces --mv--> agentgov_spans_native --mv--> *_sessions_native
    (raw OTLP protobuf,                 (exporter DDL)   (agentgov's own spans)     +-mv--> *_agents_native
     decoded by ClickHouse)                  |
                                             +--mv--> agentgov_trace_queue --> resolver (normalize/)
                                             |        (other conventions)        --> agentgov_spans_resolved,
                                             |                                       *_sessions_resolved,
                                             +--mv--> otel_traces_trace_id_ts         *_agents_resolved

Readers query the views agentgov_spans, agentgov_sessions, agentgov_agents and
agentgov_edges, which read native and resolved rows alike.
"""

from __future__ import annotations

import re
from importlib import resources as importlib_resources
from pathlib import Path

from clickhouse_connect.driver.binding import format_query_value

from agentgov.collector.risk import RiskRules, sql_normalize

TRACES = "otel_traces"
INGEST = "agentgov_otlp_ingest"
#: views readers query: agentgov's own spans and the resolved foreign ones alike
SPANS = "agentgov_spans"
SESSIONS = "agentgov_sessions"
AGENTS = "agentgov_agents"
EDGES = "agentgov_edges"
#: the tables behind them
SPANS_NATIVE = "agentgov_spans_native"
SPANS_RESOLVED = "agentgov_spans_resolved"
SESSIONS_NATIVE = "agentgov_sessions_native"
SESSIONS_RESOLVED = "agentgov_sessions_resolved"
AGENTS_NATIVE = "agentgov_agents_native"
AGENTS_RESOLVED = "agentgov_agents_resolved"
TRACE_QUEUE = "agentgov_trace_queue"
RECEIPTS = "agentgov_otlp_receipts"
#: which writer stage holds a complete batch not yet moved into the store (see staging.py)
STAGES = "agentgov_otlp_stages"

#: the Operation of a resolved row that is only a delegation edge: a further parent of an
#: agent whose own row names its first (a handoff back to an agent that ran before)
EDGE_OPERATION = "delegate"


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
#
# agentgov's own spans (they carry agentgov.session.id and say everything about themselves)
# are typed at insert time by a materialized view into agentgov_spans_native, which feeds
# the session and agent aggregates. Spans of other conventions need their whole trace to
# be understood: their traces are queued (agentgov_trace_queue) and the resolver
# (normalize/service.py) writes what it resolved into the *_resolved tables, as versioned
# rows a later resolution replaces. The views agentgov_spans, agentgov_sessions and
# agentgov_agents read both, so every reader sees one model.

#: the columns of a typed span row, native and resolved alike
SPAN_COLUMNS = """
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
    StatusMessage String CODEC(ZSTD(1)),
    LineageTokenId String CODEC(ZSTD(1)),
    LineageProof String CODEC(ZSTD(1)),
    MessageFacts Array(Tuple(Int64, String, String, UInt8, Array(String))) CODEC(ZSTD(1)),
    Delegation UInt8,
    EdgeVia LowCardinality(String),
    EdgeEvidence String CODEC(ZSTD(1))
"""

#: the view-visible columns of a typed span row, in table order
SPAN_COLUMN_NAMES = [line.split()[0] for line in SPAN_COLUMNS.strip().splitlines()]

SPANS_NATIVE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {SPANS_NATIVE} ({SPAN_COLUMNS},
    -- the batch that wrote the row (the writer's insert token): alert facts are read back
    -- by it, right after the batch is durable
    InsertId String CODEC(ZSTD(1)),
    INDEX idx_trace TraceId TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_insert InsertId TYPE bloom_filter(0.01) GRANULARITY 1
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(Timestamp)
ORDER BY (SessionId, Timestamp, SpanId)
"""

SPANS_RESOLVED_TABLE = f"""
CREATE TABLE IF NOT EXISTS {SPANS_RESOLVED} ({SPAN_COLUMNS},
    -- a resolution writes every row of its trace group anew; the latest version wins, and
    -- a row a newer resolution no longer has is written once more as Deleted
    Version UInt64,
    Deleted UInt8,
    INDEX idx_trace TraceId TYPE bloom_filter(0.01) GRANULARITY 1
) ENGINE = ReplacingMergeTree(Version, Deleted)
PARTITION BY toYYYYMM(Timestamp)
ORDER BY (SessionId, Timestamp, SpanId)
"""

SPANS_VIEW = f"""
CREATE OR REPLACE VIEW {SPANS} AS
SELECT {", ".join(SPAN_COLUMN_NAMES)} FROM {SPANS_NATIVE}
UNION ALL
SELECT {", ".join(SPAN_COLUMN_NAMES)} FROM {SPANS_RESOLVED} FINAL
"""


#: the local facts the typed row of one of agentgov's own spans is made of
_NATIVE_FACTS = (
    "f_type",
    "f_session",
    "f_agent_name",
    "f_agent_id",
    "f_owner_id",
    "f_owner_name",
    "f_parent_agent",
    "f_chain",
    "f_depth",
    "f_intent",
    "f_task",
    "f_role",
    "f_permissions",
    "f_command_attr",
    "f_resources_attr",
    "f_risk_floor",
    "f_cost_usd",
    "f_input_tokens",
    "f_output_tokens",
    "f_token_id",
    "f_proof",
    "f_messages",
    "f_op_attr",
    "f_tool_attr",
)


def native_spans_select(rules: RiskRules, where: str = "") -> str:
    """The typed row of each of agentgov's own spans, from the model's local facts (see
    normalize/sql.py), with its command scored by ``rules``. An emitter's own risk score is
    a floor, never a ceiling: an agent cannot talk its command's risk down."""
    from agentgov.collector.normalize.sql import agentgov_facts_with, sql_strings

    return f"""
{agentgov_facts_with(_NATIVE_FACTS)},
    -- agentgov's own spans state their command and resources; arguments are for others
    f_command_attr AS f_command,
    {sql_strings("f_resources_attr")} AS f_resources,
    if(f_type IN ('agent', 'agent_def'), f_agent_id, f_owner_id) AS aid,
    if(empty(f_chain) AND aid != '', [aid], f_chain) AS chain,
    multiIf(f_op_attr != '', f_op_attr, f_type = 'agent', 'invoke_agent',
            f_type IN ('tool', 'handoff'), 'execute_tool', '') AS op,
    op = 'execute_tool' OR f_command != '' AS scored,
    -- each rule's patterns run once per span; score and rule names both read these hits
    if(scored, {
        rules.sql_hits(
            sql_normalize("f_command"), f"arrayMap(x -> {sql_normalize('x')}, f_resources)"
        )
    }, []) AS hits
SELECT
    f_session AS SessionId,
    Timestamp, TraceId, SpanId, ParentSpanId, ServiceName, SpanName,
    op AS Operation,
    aid AS AgentId,
    if(f_type IN ('agent', 'agent_def'), f_agent_name, f_owner_name) AS AgentName,
    f_parent_agent AS ParentAgentId,
    chain AS Chain,
    if(f_depth >= 0, toUInt16(least(f_depth, 65535)), toUInt16(greatest(length(chain), 1) - 1))
        AS Depth,
    f_intent AS Intent,
    f_task AS Task,
    f_role AS Role,
    f_permissions AS Permissions,
    f_tool_attr AS ToolName,
    f_command AS Command,
    f_resources AS Resources,
    if(scored, greatest(f_risk_floor, {rules.sql_score("hits")}), toUInt8(0)) AS RiskScore,
    if(scored, {rules.sql_rule_names("hits")}, []) AS RiskRules,
    f_cost_usd AS CostUsd,
    toUInt64(greatest(f_input_tokens, 0)) AS InputTokens,
    toUInt64(greatest(f_output_tokens, 0)) AS OutputTokens,
    toUInt32(length(f_messages)) AS Messages,
    Duration, StatusCode, StatusMessage,
    f_token_id AS LineageTokenId,
    f_proof AS LineageProof,
    f_messages AS MessageFacts,
    toUInt8(0) AS Delegation,
    if(f_parent_agent != '', 'explicit', '') AS EdgeVia,
    '' AS EdgeEvidence,
    getSetting('insert_deduplication_token') AS InsertId
FROM {TRACES}
WHERE SpanAttributes['agentgov.session.id'] != '' {where}
"""


def native_spans_mv(rules: RiskRules) -> str:
    return (
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {SPANS_NATIVE}_mv TO {SPANS_NATIVE} AS\n"
        f"{native_spans_select(rules)}\n"
        f"COMMENT {format_query_value(view_version(rules))}"
    )


def view_version(rules: RiskRules) -> str:
    """What the views that type spans are derived from: the model and the risk rules. A
    view of another version is brought up to date in place (ALTER ... MODIFY QUERY), so
    no insert by any writer ever finds it missing."""
    from agentgov.collector.normalize.model import MODEL

    return f"model {MODEL.digest} risk rules {rules.digest}"


#: foreign traces, per batch, for the resolver: each insert adds one row per trace with
#: spans that are not agentgov's own, and the traces they link to
TRACE_QUEUE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {TRACE_QUEUE} (
    InsertId String,
    TraceId String,
    Linked Array(String),
    At DateTime64(3) DEFAULT now64(3)
) ENGINE = MergeTree()
ORDER BY (InsertId, TraceId)
TTL toDateTime(At) + INTERVAL 1 DAY
"""

TRACE_QUEUE_MV = f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS {TRACE_QUEUE}_mv TO {TRACE_QUEUE} AS
SELECT getSetting('insert_deduplication_token') AS InsertId, TraceId,
       arrayFilter(t -> t != TraceId, groupUniqArrayArray(`Links.TraceId`)) AS Linked,
       now64(3) AS At
FROM {TRACES}
WHERE SpanAttributes['agentgov.session.id'] = ''
GROUP BY TraceId
"""

_SESSION_AGGREGATES = """
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
"""
SESSION_COLUMN_NAMES = ["SessionId"] + [
    line.split()[0]
    for line in _SESSION_AGGREGATES.strip().splitlines()
    if not line.startswith("--") and line.strip() and not line.strip().startswith("--")
]

SESSIONS_NATIVE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {SESSIONS_NATIVE} (
    SessionId String,{_SESSION_AGGREGATES}
) ENGINE = AggregatingMergeTree()
ORDER BY SessionId
"""

SESSIONS_RESOLVED_TABLE = f"""
CREATE TABLE IF NOT EXISTS {SESSIONS_RESOLVED} (
    SessionId String,{_SESSION_AGGREGATES},
    Version UInt64,
    Deleted UInt8
) ENGINE = ReplacingMergeTree(Version, Deleted)
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
    countIf(Operation != '{EDGE_OPERATION}') AS Spans,
    countIf(Operation = 'execute_tool') AS ToolCalls,
    countIf(
        Operation = 'invoke_agent' AND ParentAgentId != '' OR Operation = '{EDGE_OPERATION}'
    ) AS Handoffs,
    maxIf(Depth, Operation != '{EDGE_OPERATION}') AS MaxDepth,
    sum(CostUsd) AS CostUsd,
    sum(InputTokens) AS InputTokens,
    sum(OutputTokens) AS OutputTokens,
    max(RiskScore) AS MaxRisk,
    sum(log1p(-least(RiskScore, 99.5) / 100)) AS RiskLogSum,
    countIf(StatusCode = 'Error') AS Errors,
    toUInt8(max(Operation = 'invoke_agent' AND Depth = 0 AND ParentAgentId = '')) AS RootEnded
FROM {{table}}
{{where}}
GROUP BY SessionId
"""

SESSIONS_MV = (
    f"CREATE MATERIALIZED VIEW IF NOT EXISTS {SESSIONS_NATIVE}_mv TO {SESSIONS_NATIVE} AS\n"
    + SESSIONS_SELECT.format(table=SPANS_NATIVE, where="")
)

SESSIONS_VIEW = f"""
CREATE OR REPLACE VIEW {SESSIONS} AS
SELECT {", ".join(SESSION_COLUMN_NAMES)} FROM {SESSIONS_NATIVE}
UNION ALL
SELECT {", ".join(SESSION_COLUMN_NAMES)} FROM {SESSIONS_RESOLVED} FINAL
"""

_AGENT_AGGREGATES = """
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
    LastSeen SimpleAggregateFunction(max, DateTime64(9)),
    -- how its delegation was derived (explicit for agentgov's own; see normalize/model.py)
    Via SimpleAggregateFunction(max, String),
    Evidence SimpleAggregateFunction(max, String)
"""
AGENT_COLUMN_NAMES = ["SessionId", "AgentId"] + [
    line.split()[0]
    for line in _AGENT_AGGREGATES.strip().splitlines()
    if line.strip() and not line.strip().startswith("--")
]

AGENTS_NATIVE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {AGENTS_NATIVE} (
    SessionId String,
    AgentId String,{_AGENT_AGGREGATES}
) ENGINE = AggregatingMergeTree()
ORDER BY (SessionId, AgentId)
"""

AGENTS_RESOLVED_TABLE = f"""
CREATE TABLE IF NOT EXISTS {AGENTS_RESOLVED} (
    SessionId String,
    AgentId String,{_AGENT_AGGREGATES},
    Version UInt64,
    Deleted UInt8
) ENGINE = ReplacingMergeTree(Version, Deleted)
ORDER BY (SessionId, AgentId)
"""

# an agent's parent, task, depth and derivation are its own rows', not its further edges'
AGENTS_SELECT = f"""
SELECT
    SessionId, AgentId,
    max(toString(AgentName)) AS Name,
    max(toString(Role)) AS Role,
    maxIf(ParentAgentId, Operation != '{EDGE_OPERATION}') AS ParentId,
    maxIf(Task, Operation != '{EDGE_OPERATION}') AS Task,
    minIf(Depth, Operation != '{EDGE_OPERATION}') AS Depth,
    max(RiskScore) AS Risk,
    countIf(Operation = 'execute_tool') AS ToolCalls,
    sum(CostUsd) AS CostUsd,
    toUInt8(max(StatusCode = 'Error')) AS Errors,
    min(Timestamp) AS FirstSeen,
    max(Timestamp + toIntervalNanosecond(Duration)) AS LastSeen,
    maxIf(toString(EdgeVia), Operation != '{EDGE_OPERATION}') AS Via,
    maxIf(EdgeEvidence, Operation != '{EDGE_OPERATION}') AS Evidence
FROM {{table}}
WHERE AgentId != '' {{where}}
GROUP BY SessionId, AgentId
"""

AGENTS_MV = (
    f"CREATE MATERIALIZED VIEW IF NOT EXISTS {AGENTS_NATIVE}_mv TO {AGENTS_NATIVE} AS\n"
    + AGENTS_SELECT.format(table=SPANS_NATIVE, where="")
)

AGENTS_VIEW = f"""
CREATE OR REPLACE VIEW {AGENTS} AS
SELECT {", ".join(AGENT_COLUMN_NAMES)} FROM {AGENTS_NATIVE}
UNION ALL
SELECT {", ".join(AGENT_COLUMN_NAMES)} FROM {AGENTS_RESOLVED} FINAL
"""

# Delegation edges: the agents that have a parent, and the further edges the resolver
# found (an agent handed work again by another agent than the one that started it)
EDGES_VIEW = f"""
CREATE OR REPLACE VIEW {EDGES} AS
SELECT SessionId, max(ParentId) AS ParentAgentId, AgentId, max(Name) AS AgentName,
       max(Role) AS Role, max(Task) AS Task, min(Depth) AS Depth, min(FirstSeen) AS Timestamp,
       max(Via) AS Via
FROM {AGENTS}
GROUP BY SessionId, AgentId
HAVING ParentAgentId != ''
UNION ALL
SELECT SessionId, ParentAgentId, AgentId, toString(AgentName) AS AgentName,
       toString(Role) AS Role, Task, Depth, Timestamp, toString(EdgeVia) AS Via
FROM {SPANS_RESOLVED} FINAL
WHERE Operation = '{EDGE_OPERATION}'
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


STAGES_TABLE = f"""
CREATE TABLE IF NOT EXISTS {STAGES} (
    Stage String,
    -- the batch's insert token while the stage holds it complete, '' once it was moved
    InsertId String,
    Digests Array(String),
    Version UInt64
) ENGINE = ReplacingMergeTree(Version)
ORDER BY Stage
"""

#: the tables one OTLP insert fills through its materialized views, sources before targets
WRITE_CHAIN = (
    TRACES,
    f"{TRACES}_trace_id_ts",
    SPANS_NATIVE,
    SESSIONS_NATIVE,
    AGENTS_NATIVE,
    TRACE_QUEUE,
)

_CHAIN_NAME = re.compile(
    r"\b(?:" + "|".join(sorted((INGEST, *WRITE_CHAIN), key=len, reverse=True)) + r")(?:_mv)?\b"
)


def write_chain_views(rules: RiskRules) -> list[str]:
    """The materialized views an OTLP insert runs, in dependency order."""
    return [
        TRACE_ID_TS_MV,
        SESSIONS_MV,
        AGENTS_MV,
        native_spans_mv(rules),
        TRACE_QUEUE_MV,
        INGEST_MV,
    ]


def stage_statements(rules: RiskRules, stage: str) -> list[str]:
    """DDL of a writer's stage: the write chain's tables (same structure, so their parts
    can move into the real ones) and the same views between them, every name prefixed
    with ``stage``. A batch written there reaches the store only by whole parts."""
    tables = [f"CREATE TABLE IF NOT EXISTS {stage}_{t} AS {t}" for t in (INGEST, *WRITE_CHAIN)]
    views = [
        _CHAIN_NAME.sub(lambda m: f"{stage}_{m.group(0)}", view)
        for view in write_chain_views(rules)
    ]
    return tables + views


def statements(rules: RiskRules) -> list[str]:
    """All DDL, in dependency order (targets before the views that feed them)."""
    return [
        OTEL_TRACES,
        TRACE_ID_TS,
        TRACE_ID_TS_MV,
        SPANS_NATIVE_TABLE,
        SPANS_RESOLVED_TABLE,
        SESSIONS_NATIVE_TABLE,
        SESSIONS_RESOLVED_TABLE,
        AGENTS_NATIVE_TABLE,
        AGENTS_RESOLVED_TABLE,
        SESSIONS_MV,
        AGENTS_MV,
        SPANS_VIEW,
        SESSIONS_VIEW,
        AGENTS_VIEW,
        EDGES_VIEW,
        native_spans_mv(rules),
        TRACE_QUEUE_TABLE,
        TRACE_QUEUE_MV,
        INGEST_TABLE,
        INGEST_MV,
        RECEIPTS_TABLE,
        STAGES_TABLE,
    ]
