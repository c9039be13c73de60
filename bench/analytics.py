"""Analytics latency at 1M stored spans: one session's delegation graph, and the top-100
sessions by risk, through the Python API (clickhouse-connect to chDB, pandas frames).

Baselines, same run and store: the same answers computed without the governance tables
(the graph from ``otel_traces`` attributes; the top 100 from every typed span), showing
what the materialized views buy.

Goals: graph <= 10 ms, top-100 by risk <= 50 ms.
Usage: uv run python bench/analytics.py   (SPANS=1000000 REPEAT=30)
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from workload import env_int, spans, to_request

from agentgov.collector.analytics import Analytics
from agentgov.collector.risk import RiskRules
from agentgov.collector.store import schema
from agentgov.collector.store.connection import StoreConfig, prepare
from agentgov.collector.store.writer import _varint

TOTAL = env_int("SPANS", 1_000_000)
REPEAT = env_int("REPEAT", 30)

GRAPH_FROM_RAW = """
SELECT SpanAttributes['gen_ai.agent.id'] AS id, any(SpanAttributes['gen_ai.agent.name']) AS name,
       any(SpanAttributes['agentgov.agent.role']) AS role,
       min(toUInt16OrZero(SpanAttributes['agentgov.delegation.depth'])) AS depth,
       any(SpanAttributes['agentgov.agent.parent_id']) AS parent_id
FROM otel_traces WHERE SpanAttributes['agentgov.session.id'] = {sid:String}
GROUP BY id ORDER BY depth, id
"""

TOP_FROM_SPANS = """
SELECT SessionId, max(Timestamp) AS last_seen, uniqExact(AgentId) AS agents, count() AS spans,
       toUInt8(round(100 * (1 - exp(sum(log1p(-least(RiskScore, 99.5) / 100)))))) AS session_risk
FROM agentgov_spans GROUP BY SessionId ORDER BY session_risk DESC, last_seen DESC LIMIT 100
"""


def timed(fn, repeat: int = REPEAT) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    fn()  # warm
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    runs.sort()
    return statistics.median(runs), runs[int(len(runs) * 0.95) - 1]


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="agentgov-analytics-"))
    try:
        client = prepare(StoreConfig(f"chdb://{workdir / 'data'}"), RiskRules.default())
        settings = schema.ingest_settings(embedded=True)
        start = time.perf_counter()
        step = 50_000
        for offset in range(0, TOTAL, step):
            data = spans(min(step, TOTAL - offset), seed=offset)
            # distinct sessions per chunk
            for s in data:
                s["attrs"]["agentgov.session.id"] += f"-{offset}"
            bodies = [to_request(data[i : i + 2048]) for i in range(0, len(data), 2048)]
            block = b"".join(_varint(len(b)) + b for b in bodies)
            client.raw_insert(schema.INGEST, insert_block=block, fmt="Protobuf", settings=settings)
        load_s = time.perf_counter() - start
        stored = client.query("SELECT count() FROM otel_traces").result_rows[0][0]
        sessions = client.query("SELECT uniqExact(SessionId) FROM agentgov_sessions").result_rows[
            0
        ][0]
        sid = client.query(
            "SELECT SessionId FROM agentgov_sessions ORDER BY SessionId LIMIT 1 OFFSET {o:UInt32}",
            parameters={"o": sessions // 2},
        ).result_rows[0][0]
        analytics = Analytics(client)
        g = analytics.graph(sid)
        top = analytics.sessions(100, "risk")
        assert len(g.nodes) == 6 and len(g.edges) == 5, (len(g.nodes), len(g.edges))
        assert len(top) == 100

        print(f"stored spans: {stored:,} in {sessions:,} sessions (loaded in {load_s:.1f}s)")
        raw_graph_med, _ = timed(
            lambda: client.query_df(GRAPH_FROM_RAW, parameters={"sid": sid}), 5
        )
        raw_top_med, _ = timed(lambda: client.query_df(TOP_FROM_SPANS), 5)
        for state in ("right after loading", "after merges"):
            if state == "after merges":
                # what background merges reach on a live store; done at once here
                for table in (schema.AGENTS, schema.SESSIONS, schema.SPANS):
                    client.command(f"OPTIMIZE TABLE {table} FINAL")
            parts = client.query(
                "SELECT sum(active) FROM system.parts WHERE database = currentDatabase() "
                "AND table IN ('agentgov_agents', 'agentgov_sessions')"
            ).result_rows[0][0]
            graph_med, graph_p95 = timed(lambda: analytics.graph(sid))
            top_med, top_p95 = timed(lambda: analytics.sessions(100, "risk"))
            print(f"{state} ({parts} parts in the agents and sessions tables):")
            print(
                f"  one session's graph     : median {graph_med * 1e3:6.2f} ms, p95 "
                f"{graph_p95 * 1e3:6.2f} ms (goal <= 10 ms: "
                f"{'met' if graph_med <= 0.010 else 'NOT met'}); "
                f"{raw_graph_med / graph_med:4.1f}x faster than from otel_traces"
            )
            print(
                f"  top-100 sessions by risk: median {top_med * 1e3:6.2f} ms, p95 "
                f"{top_p95 * 1e3:6.2f} ms (goal <= 50 ms: "
                f"{'met' if top_med <= 0.050 else 'NOT met'}); "
                f"{raw_top_med / top_med:4.1f}x faster than from all spans"
            )
        client.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
