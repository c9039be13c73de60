"""Synthetic but realistic agent spans for the benchmarks, as OTLP requests and as rows.

A session is a planner, an orchestrator and workers; every worker runs a few commands.
Spans carry the attributes the instrumentation emits (about 15 each).
"""

from __future__ import annotations

import json
import os
import random
import time

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

COMMANDS = [
    ("shell", "ls -la /opt/app/logs", ["/opt/app/logs"]),
    ("shell", "rm -rf /opt/app/data", ["/opt/app/data"]),
    ("sql", "SELECT count() FROM deployments", ["db:staging/deployments"]),
    ("http", "curl https://api.internal/health", ["api.internal"]),
    ("shell", "kubectl --context prod delete deployment old-api", ["k8s:prod"]),
]


def _kv(key: str, value: object) -> KeyValue:
    if isinstance(value, str):
        return KeyValue(key=key, value=AnyValue(string_value=value))
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    kv = KeyValue(key=key)
    for item in value:  # type: ignore[attr-defined]
        kv.value.array_value.values.add(string_value=item)
    return kv


def session_spans(
    session_no: int, workers: int, commands_per_worker: int, rng: random.Random
) -> list[dict]:
    """Span dicts of one session (attributes as Python values)."""
    sid = f"sess-bench-{session_no:07d}"
    intent = "clean up old deployments in staging and archive their data"
    trace_id = rng.randbytes(16)
    now = time.time_ns()
    planner, orch = f"planner-{session_no}", f"orchestrator-{session_no}"
    out: list[dict] = []

    def agent(aid: str, name: str, chain: list[str], task: str) -> None:
        attrs = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.id": aid,
            "gen_ai.agent.name": name,
            "agentgov.session.id": sid,
            "agentgov.delegation.chain": chain,
            "agentgov.delegation.depth": len(chain) - 1,
            "agentgov.intent": intent,
            "agentgov.agent.role": name,
            "gen_ai.usage.input_tokens": 900,
            "gen_ai.usage.output_tokens": 120,
            "agentgov.cost.usd": 0.004,
        }
        if len(chain) > 1:
            attrs["agentgov.agent.parent_id"] = chain[-2]
            attrs["agentgov.task"] = task
        out.append({"name": f"invoke_agent {name}", "trace_id": trace_id, "attrs": attrs})

    agent(planner, "planner", [planner], "")
    agent(orch, "orchestrator", [planner, orch], "plan the cleanup")
    for w in range(workers):
        wid = f"worker-{session_no}-{w}"
        chain = [planner, orch, wid]
        agent(wid, "cleanup", chain, f"cleanup shard {w}")
        for _ in range(commands_per_worker):
            tool, cmd, res = rng.choice(COMMANDS)
            out.append(
                {
                    "name": f"execute_tool {tool}",
                    "trace_id": trace_id,
                    "attrs": {
                        "gen_ai.operation.name": "execute_tool",
                        "gen_ai.tool.name": tool,
                        "gen_ai.agent.id": wid,
                        "gen_ai.agent.name": "cleanup",
                        "agentgov.session.id": sid,
                        "agentgov.agent.parent_id": orch,
                        "agentgov.delegation.chain": chain,
                        "agentgov.delegation.depth": 2,
                        "agentgov.intent": intent,
                        "agentgov.command": cmd,
                        "agentgov.resources": res,
                    },
                }
            )
    for i, span in enumerate(out):
        span["span_id"] = rng.randbytes(8)
        span["start"] = now + i * 1000
        span["end"] = now + i * 1000 + 500_000
    return out


def spans(total: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    out: list[dict] = []
    n = 0
    while len(out) < total:
        out.extend(session_spans(n, workers=4, commands_per_worker=5, rng=rng))
        n += 1
    return out[:total]


def to_request(batch: list[dict], service: str = "bench-agents") -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(_kv("service.name", service))
    ss = rs.scope_spans.add()
    ss.scope.name = "agentgov.instrumentation"
    ss.scope.version = "0.1.0"
    for s in batch:
        span = ss.spans.add()
        span.trace_id = s["trace_id"]
        span.span_id = s["span_id"]
        span.name = s["name"]
        span.kind = 1
        span.start_time_unix_nano = s["start"]
        span.end_time_unix_nano = s["end"]
        span.attributes.extend(_kv(k, v) for k, v in s["attrs"].items())
        span.status.code = 1
    return req.SerializeToString()


COLUMNS = [
    "Timestamp",
    "TraceId",
    "SpanId",
    "ParentSpanId",
    "TraceState",
    "SpanName",
    "SpanKind",
    "ServiceName",
    "ResourceAttributes",
    "ScopeName",
    "ScopeVersion",
    "SpanAttributes",
    "Duration",
    "StatusCode",
    "StatusMessage",
]


def to_columns(batch: list[dict], service: str = "bench-agents") -> list[list]:
    """The same spans as otel_traces columns (rendered as the exporter renders them)."""
    cols: list[list] = [[] for _ in COLUMNS]
    res = {"service.name": service}
    for s in batch:
        attrs = {
            k: (json.dumps(v, separators=(",", ":")) if isinstance(v, list) else str(v))
            for k, v in s["attrs"].items()
        }
        row = [
            s["start"],
            s["trace_id"].hex(),
            s["span_id"].hex(),
            "",
            "",
            s["name"],
            "Internal",
            service,
            res,
            "agentgov.instrumentation",
            "0.1.0",
            attrs,
            s["end"] - s["start"],
            "Ok",
            "",
        ]
        for c, v in zip(cols, row, strict=True):
            c.append(v)
    return cols


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))
