"""Alert latency: from an offending span's arrival to the session's stop and the Slack request.

A collector runs the shipped rules and posts to a local server speaking Slack's webhook
API. First 1,000 sessions go live (an agent and two harmless commands each), and a
background exporter keeps adding harmless spans to them through the measurement, so the
engine works on 1k live sessions. Then, one at a time, an agent of a fresh session runs a
destructive command outside its write scope (rule ``destructive_without_write``: stop +
Slack). For each we take:

- stop latency: span sent (OTLP/HTTP, acknowledged = durable) → the ``kill`` control
  event arrives on the session's event stream (what every agent process listens to);
- Slack latency: span sent → the Slack request arrives at the local Slack server.

Baseline, same run: the OTLP export round trip of that same span (sent → durable and
acknowledged), the floor any reaction to a stored span stands on.
Goal: p99 <= 1 s for both.
Usage: uv run python bench/alert_latency.py   (SESSIONS=1000 OFFENDERS=40)
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from collector_process import running_collector
from slack_fake import FakeSlack

from agentgov.instrumentation import Governance

SESSIONS = int(os.environ.get("SESSIONS", 1000))
OFFENDERS = int(os.environ.get("OFFENDERS", 40))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def live_sessions(url: str, stop: threading.Event) -> list[str]:
    """Open SESSIONS sessions, then keep adding harmless spans to them until ``stop``."""
    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(
            OTLPSpanExporter(endpoint=f"{url}/v1/traces"),
            max_export_batch_size=512,
            max_queue_size=16384,
        )
    )
    gov = Governance(provider)
    ids = [f"live-{uuid.uuid4().hex[:12]}" for _ in range(SESSIONS)]
    for sid in ids:
        with gov.session("index the documents", session_id=sid) as s:
            with s.agent("indexer", permissions=["fs.read:/data"]) as a:
                with a.tool("shell", command="ls /data", resources=["/data"]):
                    pass
                with a.tool("search.read", command="grep -r invoice /data", resources=["/data"]):
                    pass
    provider.force_flush()

    def churn() -> None:
        n = 0
        while not stop.is_set():
            sid = ids[n % len(ids)]
            with gov.session("index the documents", session_id=sid) as s:
                with s.agent("indexer", permissions=["fs.read:/data"]) as a:
                    with a.tool("shell", command=f"cat /data/doc{n}", resources=["/data"]):
                        pass
            n += 1
            time.sleep(0.005)  # ~150-200 spans/s on top of the offenders
        provider.shutdown()

    threading.Thread(target=churn, daemon=True).start()
    return ids


def watch_kill(url: str, sid: str, connected: threading.Event, out: dict[str, float]) -> None:
    with httpx.stream("GET", f"{url}/api/v1/sessions/{sid}/events", timeout=30) as resp:
        event = ""
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
                if event == "state":
                    connected.set()
            elif line.startswith("data:") and event == "kill":
                out["kill"] = time.time()
                return


def main() -> None:
    slack = FakeSlack().start()
    data = Path(tempfile.mkdtemp(prefix="agentgov-bench-alerts-"))
    stop = threading.Event()
    try:
        with running_collector(
            data / "store", env={"AGENTGOV_SLACK_WEBHOOK_URL": slack.webhook_url}
        ) as url:
            t0 = time.perf_counter()
            live_sessions(url, stop)
            print(
                f"{SESSIONS} live sessions opened in {time.perf_counter() - t0:.1f}s; "
                "background spans keep arriving"
            )
            provider = TracerProvider()
            exporter = OTLPSpanExporter(endpoint=f"{url}/v1/traces")
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            gov = Governance(provider)
            ack, to_stop, to_slack = [], [], []
            for _ in range(OFFENDERS):
                sid = f"offender-{uuid.uuid4().hex[:12]}"
                connected = threading.Event()
                seen: dict[str, float] = {}
                watcher = threading.Thread(target=watch_kill, args=(url, sid, connected, seen))
                watcher.start()
                connected.wait(10)
                with gov.session("tidy the database", session_id=sid) as s:
                    with s.agent("dba", permissions=["db.read"]) as a:
                        tool = a.tool(
                            "sql", command="DROP TABLE users", resources=["db:prod/users"]
                        )
                        tool.__enter__()
                        sent = time.time()
                        tool.__exit__(None, None, None)  # exports at once, returns on the ack
                        acked = time.time()
                watcher.join(10)
                deadline = time.monotonic() + 10
                hit = None
                while hit is None and time.monotonic() < deadline:
                    hit = next((r for r in slack.requests if sid in r.body.get("text", "")), None)
                    time.sleep(0.002)
                if "kill" not in seen or hit is None:
                    print(f"{sid}: no stop or no Slack request within 10 s", file=sys.stderr)
                    continue
                ack.append(acked - sent)
                to_stop.append(seen["kill"] - sent)
                to_slack.append(hit.at - sent)
            stop.set()
            health = httpx.get(f"{url}/healthz").json()
    finally:
        slack.stop()
        shutil.rmtree(data, ignore_errors=True)

    def row(name: str, values: list[float]) -> None:
        print(
            f"  {name:<38} p50 {1000 * statistics.median(values):7.1f} ms   "
            f"p99 {1000 * pct(values, 0.99):7.1f} ms   max {1000 * max(values):7.1f} ms"
        )

    print(f"{len(to_stop)} offending sessions measured; {health['spans_written']} spans stored")
    row("baseline: OTLP export acknowledged", ack)
    row("span sent -> kill event at the agent", to_stop)
    row("span sent -> Slack request", to_slack)
    print(
        f"  ratio p99 (stop / baseline): {pct(to_stop, 0.99) / pct(ack, 0.99):.2f}x   "
        f"(Slack / baseline): {pct(to_slack, 0.99) / pct(ack, 0.99):.2f}x"
    )
    ok = pct(to_stop, 0.99) <= 1.0 and pct(to_slack, 0.99) <= 1.0
    print(f"  goal p99 <= 1 s for both: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
