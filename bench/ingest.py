"""Ingest throughput: OTLP/HTTP end to end into ClickHouse vs a raw clickhouse-connect insert.

Both sides write the same spans into the same schema (``otel_traces`` with the governance
views attached) on embedded chDB, each in a fresh process and data folder, in the same run:

* raw: a ``clickhouse-connect`` insert of prepared rows into ``otel_traces``, in blocks
  (rows built before the clock starts: the floor cost of storing these spans);
* end to end: OTLP/HTTP protobuf requests (built before the clock starts, as an SDK's
  exporter would send them) posted by concurrent clients to a collector process; each
  request counts when the collector acknowledged it, i.e. once its spans are durable.

Goal: >= 100k spans/s end to end, and >= 40% of the raw rate.
Usage: uv run python bench/ingest.py   (SPANS=200000 BATCH=2048 CLIENTS=8 to change)
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
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from collector_process import running_collector
from workload import COLUMNS, env_int, spans, to_columns, to_request

TOTAL = env_int("SPANS", 200_000)
BATCH = env_int("BATCH", 2048)
CLIENTS = env_int("CLIENTS", 32)
RAW_BLOCK = env_int("RAW_BLOCK", 20_000)


def raw_child(path: str) -> None:
    """Runs in a fresh process: insert prepared rows with clickhouse-connect."""
    from agentgov.collector.risk import RiskRules
    from agentgov.collector.store.connection import StoreConfig, prepare

    client = prepare(StoreConfig(f"chdb://{path}"), RiskRules.default())
    data = spans(TOTAL)
    blocks = [to_columns(data[i : i + RAW_BLOCK]) for i in range(0, TOTAL, RAW_BLOCK)]
    # warm-up block (first insert pays one-off engine costs), not counted
    client.insert(
        "otel_traces", to_columns(spans(2000, seed=99)), column_names=COLUMNS, column_oriented=True
    )
    start = time.perf_counter()
    for cols in blocks:
        client.insert("otel_traces", cols, column_names=COLUMNS, column_oriented=True)
    elapsed = time.perf_counter() - start
    stored = client.query("SELECT count() FROM agentgov_spans").result_rows[0][0]
    print(json.dumps({"seconds": elapsed, "stored": stored}))


def run_raw(workdir: Path) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--raw-child", str(workdir / "raw")],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["stored"] == TOTAL + 2000, result
    return TOTAL / result["seconds"]


def run_e2e(workdir: Path) -> tuple[float, dict]:
    with running_collector(workdir / "e2e") as url:
        data = spans(TOTAL)
        bodies = [to_request(data[i : i + BATCH]) for i in range(0, TOTAL, BATCH)]
        headers = {"Content-Type": "application/x-protobuf"}
        with httpx.Client(timeout=60) as warm:
            r = warm.post(
                f"{url}/v1/traces", content=to_request(spans(2000, seed=99)), headers=headers
            )
            r.raise_for_status()
        next_body = iter(range(len(bodies)))
        lock = threading.Lock()
        errors: list[str] = []

        def client_loop() -> None:
            with httpx.Client(timeout=120) as http:
                while True:
                    with lock:
                        i = next(next_body, None)
                    if i is None:
                        return
                    resp = http.post(f"{url}/v1/traces", content=bodies[i], headers=headers)
                    if resp.status_code != 200:
                        errors.append(f"{resp.status_code} {resp.text[:200]}")

        threads = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        assert not errors, errors[:3]
        health = httpx.get(f"{url}/healthz").json()
        assert health["spans_written"] == TOTAL + 2000, health
        return TOTAL / elapsed, health


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="agentgov-bench-"))
    try:
        raw = run_raw(workdir)
        e2e, health = run_e2e(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratio = e2e / raw
    print(
        f"spans: {TOTAL}, request size: {BATCH} spans, clients: {CLIENTS}, cores: {os.cpu_count()}"
    )
    print(f"raw clickhouse-connect insert : {raw:>10,.0f} spans/s (blocks of {RAW_BLOCK})")
    print(f"OTLP/HTTP end to end          : {e2e:>10,.0f} spans/s (acknowledged = durable)")
    print(f"ratio end-to-end / raw        : {ratio:>10.2f}   (goal >= 0.40)")
    print(f"goal >= 100,000 spans/s       : {'met' if e2e >= 100_000 else 'NOT met'}")
    print(f"ratio goal                    : {'met' if ratio >= 0.4 else 'NOT met'}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--raw-child":
        raw_child(sys.argv[2])
    else:
        main()
