"""Normalization benchmarks: foreign traces against agentgov's own, in the same run.

* ``ingest`` — the recorded foreign fixtures (tests/fixtures/foreign), copied with fresh ids
  until SPANS spans and re-batched into requests of BATCH spans, against the same number
  of agentgov spans (bench/workload.py), posted by SENDERS concurrent clients to one
  collector with the shipped alert rules, in the order native, foreign, foreign, native.
  Two rates each: acknowledged (durable) and derived (typed rows for agentgov's spans,
  which the store derives at insert; resolved rows for foreign ones, once the resolver has
  nothing pending). Goal: foreign >= 0.8x native.
* ``convergence`` — fixture copies sent whole, in order, by SENDERS clients until TRACES
  traces are in flight; for each copy, the time from its last request acknowledged to its
  session in the API showing the run's agents, edges and tool calls (every copy's full
  graph is then checked against the recorded truth). Baseline: agentgov sessions measured
  the same way.
* ``e2e`` — SPANS agentgov spans as SENDERS concurrent senders of BATCH-span requests to a
  collector with the shipped alert rules, against a raw clickhouse-connect insert of the
  same rows by as many threads into the exporter's bare ``otel_traces`` (no views).
  Goal: >= 0.5x.

Usage: uv run python bench/normalize.py [ingest|convergence|e2e]
       (SPANS=40000 TRACES=1000 SENDERS=16 BATCH=512)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collector_process import running_collector
from workload import COLUMNS, env_int, spans, to_columns, to_request

from tests.foreign_fixtures import Replay, fixtures, truth_shape

ROOT = Path(__file__).resolve().parents[1]

SPANS = env_int("SPANS", 40_000)
TRACES = env_int("TRACES", 1000)
SENDERS = env_int("SENDERS", 16)
BATCH = env_int("BATCH", 512)
HEADERS = {"Content-Type": "application/x-protobuf"}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def post_all(url: str, bodies: list[bytes], senders: int = SENDERS) -> float:
    """Post every body from ``senders`` clients; seconds until the last acknowledgement."""
    todo = iter(range(len(bodies)))
    lock = threading.Lock()
    errors: list[str] = []

    def loop() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                r = http.post("/v1/traces", content=bodies[i], headers=HEADERS)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=loop) for _ in range(senders)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    return time.perf_counter() - start


def health(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/healthz", timeout=30).json())


def wait_resolved(url: str) -> None:
    """Until the resolver has no trace group pending, twice in a row."""
    quiet = 0
    while quiet < 2:
        quiet = quiet + 1 if health(url)["resolver"]["pending_groups"] == 0 else 0
        time.sleep(0.05)


# -- workloads ------------------------------------------------------------------------------


def foreign_copies(until: Callable[[list[Replay]], bool], order: str = "in-order") -> list[Replay]:
    """Copies of the fixtures, in turn, until ``until`` holds."""
    out: list[Replay] = []
    recorded = fixtures()
    while not until(out):
        out.append(Replay(recorded[len(out) % len(recorded)], order))
    return out


def rebatch(bodies: Iterator[bytes], size: int) -> list[bytes]:
    """Requests merged into requests of about ``size`` spans (resources and scopes kept)."""
    out, current, n = [], ExportTraceServiceRequest(), 0
    for body in bodies:
        request = ExportTraceServiceRequest.FromString(body)
        current.resource_spans.extend(request.resource_spans)
        n += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        if n >= size:
            out.append(current.SerializeToString())
            current, n = ExportTraceServiceRequest(), 0
    if n:
        out.append(current.SerializeToString())
    return out


def native_bodies(total: int, seed: int) -> list[bytes]:
    data = spans(total, seed=seed)
    return [to_request(data[i : i + BATCH]) for i in range(0, total, BATCH)]


def foreign_bodies(total: int) -> list[bytes]:
    copies = foreign_copies(lambda cs: sum(c.fixture.spans for c in cs) >= total)
    return rebatch((b for c in copies for b in c.requests), BATCH)


# -- 1: ingest ------------------------------------------------------------------------------


def bench_ingest(workdir: Path) -> None:
    rates: dict[str, list[tuple[float, float]]] = {"native": [], "foreign": []}
    with running_collector(workdir / "ingest") as url:
        post_all(url, native_bodies(2000, seed=99))  # warm-up, not counted
        post_all(url, foreign_bodies(2000))
        wait_resolved(url)
        for round_no, kind in enumerate(("native", "foreign", "foreign", "native")):
            bodies = native_bodies(SPANS, seed=round_no) if kind == "native" else None
            bodies = bodies or foreign_bodies(SPANS)
            total = sum(
                len(ss.spans)
                for b in bodies
                for rs in ExportTraceServiceRequest.FromString(b).resource_spans
                for ss in rs.scope_spans
            )
            start = time.perf_counter()
            acked = post_all(url, bodies)
            if kind == "foreign":
                wait_resolved(url)
            derived = time.perf_counter() - start
            rates[kind].append((total / acked, total / derived))
        failures = health(url)["resolver"]["failures"]
    native_ack = sum(r[0] for r in rates["native"]) / 2
    native_derived = sum(r[1] for r in rates["native"]) / 2
    foreign_ack = sum(r[0] for r in rates["foreign"]) / 2
    foreign_derived = sum(r[1] for r in rates["foreign"]) / 2
    print(f"ingest: {SPANS} spans per round, {SENDERS} senders, {BATCH}-span requests, "
          f"{os.cpu_count()} cores, rounds native/foreign/foreign/native")  # fmt: skip
    print(f"  native  acknowledged {native_ack:>9,.0f} spans/s  derived {native_derived:>9,.0f}")
    print(f"  foreign acknowledged {foreign_ack:>9,.0f} spans/s  derived {foreign_derived:>9,.0f}")
    ack_ratio, derived_ratio = foreign_ack / native_ack, foreign_derived / native_derived
    print(f"  ratio foreign/native acknowledged {ack_ratio:.2f}, derived {derived_ratio:.2f} "
          f"(goal >= 0.8: {'met' if derived_ratio >= 0.8 else 'NOT met'}); "
          f"resolver failures {failures}")  # fmt: skip


# -- 2: convergence -------------------------------------------------------------------------


def _sessions(url: str) -> dict[str, dict[str, Any]]:
    r = httpx.get(f"{url}/api/v1/sessions", params={"limit": 10_000}, timeout=60)
    return {s["session_id"]: s for s in r.json()["sessions"]}


def _expect(copy: Replay) -> tuple[int, int, int]:
    truth = copy.fixture.truth
    return len(truth["agents"]), len(truth["edges"]), sum(t["calls"] for t in truth["tools"])


def _measure(url: str, groups: list[tuple[set[str], tuple[int, int, int]]], bodies: list[list[bytes]]) -> list[float]:  # fmt: skip
    """Send each group's bodies in order (SENDERS groups at a time); per group, seconds
    from its last acknowledgement to a session among its candidates showing the expected
    agents, handoffs and tool calls."""
    acked: dict[int, float] = {}
    done: dict[int, float] = {}

    def send(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            for body in bodies[i]:
                assert http.post("/v1/traces", content=body, headers=HEADERS).status_code == 200
        acked[i] = time.monotonic()

    def watch() -> None:
        deadline = time.monotonic() + 600
        while len(done) < len(groups) and time.monotonic() < deadline:
            seen = _sessions(url)
            now = time.monotonic()
            for i, (candidates, want) in enumerate(groups):
                if i in done or i not in acked:
                    continue
                for sid in candidates & seen.keys():
                    s = seen[sid]
                    if (s["agents"], s["handoffs"], s["tool_calls"]) == want:
                        done[i] = now
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(SENDERS) as pool:
        list(pool.map(send, range(len(groups))))
    watcher.join()
    missing = len(groups) - len(done)
    assert not missing, f"{missing} sessions did not converge within 10 minutes"
    return [done[i] - acked[i] for i in range(len(groups))]


def bench_convergence(workdir: Path) -> None:
    copies = foreign_copies(lambda cs: sum(len(c.trace_ids) for c in cs) >= TRACES)
    with running_collector(workdir / "convergence") as url:
        post_all(url, foreign_bodies(2000))  # warm-up
        wait_resolved(url)
        foreign = _measure(
            url, [(c.candidates, _expect(c)) for c in copies], [c.requests for c in copies]
        )
        # the graphs, checked in full against each run's truth
        wrong = 0
        for c in copies:
            (sid,) = [s for s in c.candidates if s in _sessions(url)] or [""]
            graph = httpx.get(f"{url}/api/v1/sessions/{sid}/graph", timeout=60).json()
            names = {n["id"]: n["name"] for n in graph["nodes"]}
            edges = sorted((names[e["source"]], names[e["target"]]) for e in graph["edges"])
            wrong += edges != truth_shape(c.fixture.truth)["edges"]
        # baseline: agentgov sessions of the same sizes, sent and watched the same way
        data = spans(sum(c.fixture.spans for c in copies), seed=5)
        by_session: dict[str, list[dict[str, Any]]] = {}
        for s in data:
            by_session.setdefault(s["attrs"]["agentgov.session.id"], []).append(s)
        sessions = list(by_session.items())[: len(copies)]
        native = _measure(
            url,
            [
                (
                    {sid},
                    (
                        len({s["attrs"].get("gen_ai.agent.id") for s in rows}),
                        sum(1 for s in rows if s["attrs"].get("agentgov.agent.parent_id")
                            and s["attrs"]["gen_ai.operation.name"] == "invoke_agent"),
                        sum(1 for s in rows if s["attrs"]["gen_ai.operation.name"] == "execute_tool"),
                    ),
                )
                for sid, rows in sessions
            ],
            [[to_request(rows)] for _, rows in sessions],
        )  # fmt: skip
    traces = sum(len(c.trace_ids) for c in copies)
    print(f"convergence: {len(copies)} fixture copies ({traces} traces, "
          f"{sum(c.fixture.spans for c in copies)} spans) in flight from {SENDERS} senders")  # fmt: skip
    print(f"  foreign: last span acknowledged -> graph in the API  p50 {pct(foreign, .5):.2f} s"
          f"  p99 {pct(foreign, .99):.2f} s  max {max(foreign):.2f} s")  # fmt: skip
    print(f"  native (same watch, {len(native)} sessions)          p50 {pct(native, .5):.2f} s"
          f"  p99 {pct(native, .99):.2f} s")  # fmt: skip
    print(f"  graphs different from the recorded truth: {wrong} of {len(copies)}")


# -- 3: end to end vs raw -----------------------------------------------------------------------


def raw_child(path: str) -> None:
    """In a fresh process: the exporter's bare otel_traces, rows inserted by SENDERS threads."""
    import clickhouse_connect

    from agentgov.collector.store import schema

    setup = clickhouse_connect.get_client(dsn=f"chdb://{path}")
    setup.command(schema.OTEL_TRACES)
    data = spans(SPANS)
    blocks = [to_columns(data[i : i + BATCH]) for i in range(0, SPANS, BATCH)]
    setup.insert("otel_traces", to_columns(spans(2000, seed=99)), column_names=COLUMNS,
                 column_oriented=True)  # fmt: skip
    todo = iter(blocks)
    lock = threading.Lock()

    def loop() -> None:
        client = clickhouse_connect.get_client(dsn=f"chdb://{path}")
        while True:
            with lock:
                cols = next(todo, None)
            if cols is None:
                return
            client.insert("otel_traces", cols, column_names=COLUMNS, column_oriented=True)

    threads = [threading.Thread(target=loop) for _ in range(SENDERS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    stored = setup.query("SELECT count() FROM otel_traces").result_rows[0][0]
    print(json.dumps({"seconds": elapsed, "stored": stored}))


def bench_e2e(workdir: Path) -> None:
    out = subprocess.run(
        [sys.executable, __file__, "--raw-child", str(workdir / "raw")],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["stored"] == SPANS + 2000, result
    raw = SPANS / result["seconds"]
    with running_collector(workdir / "e2e") as url:
        post_all(url, native_bodies(2000, seed=99))
        e2e = SPANS / post_all(url, native_bodies(SPANS, seed=7))
        h = health(url)
        assert h["spans_written"] == SPANS + 2000, h
    ratio = e2e / raw
    print(f"e2e: {SPANS} spans, {SENDERS} senders of {BATCH}-span requests, shipped alert rules")
    print(f"  raw insert into bare otel_traces : {raw:>9,.0f} spans/s")
    print(f"  OTLP/HTTP end to end             : {e2e:>9,.0f} spans/s (acknowledged = durable)")
    print(f"  ratio {ratio:.2f} (goal >= 0.5: {'met' if ratio >= 0.5 else 'NOT met'})")


def main() -> None:
    which = sys.argv[1:] or ["ingest", "convergence", "e2e"]
    workdir = Path(tempfile.mkdtemp(prefix="agentgov-bench-"))
    try:
        for name in which:
            {"ingest": bench_ingest, "convergence": bench_convergence, "e2e": bench_e2e}[name](
                workdir
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--raw-child":
        raw_child(sys.argv[2])
    else:
        main()
