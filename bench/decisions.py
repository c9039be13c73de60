"""Decision latency and throughput over loopback, with concurrent clients.

A collector process with a policy runs; load comes from separate client processes, each
holding keep-alive connections and sending governed tool-call decisions
(``POST /api/v1/decisions/tool``) back to back. Every request's latency is measured from
its first byte sent to its last byte received.

Baseline, same run: ``GET /healthz`` on the same server and connections, i.e. the cost of
HTTP alone; the ratio shows what deciding adds.

Goals: p50 <= 0.5 ms and p99 <= 2 ms with concurrent clients; >= 15k decisions/s at peak.
Usage: uv run python bench/decisions.py   (BENCH_SECONDS=5 PROCS=2)
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from collector_process import running_collector

SECONDS = float(os.environ.get("BENCH_SECONDS", 5))
PROCS = int(os.environ.get("PROCS", 2))

POLICY = """
multi_agent:
  max_handoffs: 1000000
  shared_max_tool_calls: 100000000
  tool_allowlist: [shell, sql, http.get]
"""


def _request(path: str, body: bytes | None) -> bytes:
    if body is None:
        return f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _conn_loop(port: int, requests: list[bytes], until: float, lat: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    try:
        while time.perf_counter() < until:
            req = requests[i % len(requests)]
            i += 1
            start = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            lat.append(time.perf_counter() - start)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{head[:60]!r} {body[:200]!r}")
    finally:
        writer.close()


def client_process(port: int, mode: str, conns: int, seconds: float, out: mp.Queue) -> None:
    if mode == "decide":
        requests = [
            _request(
                "/api/v1/decisions/tool",
                json.dumps(
                    {
                        "session_id": f"sess-bench-{os.getpid()}-{k % 64}",
                        "agent_id": f"agent-{k % 8}",
                        "tool": "shell",
                        "command": f"ls -la /opt/app/logs/{k % 16}",
                    }
                ).encode(),
            )
            for k in range(256)
        ]
    else:
        requests = [_request("/healthz", None)]

    async def main() -> list[float]:
        lat: list[float] = []
        until = time.perf_counter() + seconds
        await asyncio.gather(*(_conn_loop(port, requests, until, lat) for _ in range(conns)))
        return lat

    out.put(asyncio.run(main()))


def run(port: int, mode: str, conns: int) -> tuple[float, float, float]:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=client_process, args=(port, mode, conns, SECONDS, q))
        for _ in range(PROCS)
    ]
    for p in procs:
        p.start()
    lat: list[float] = []
    for _ in procs:
        lat.extend(q.get(timeout=SECONDS + 60))
    for p in procs:
        p.join(30)
    lat.sort()
    return len(lat) / SECONDS, lat[len(lat) // 2], lat[int(len(lat) * 0.99)]


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="agentgov-decisions-"))
    (workdir / "policy.yaml").write_text(POLICY)
    try:
        with running_collector(workdir / "data", "--policy", str(workdir / "policy.yaml")) as url:
            port = int(url.rsplit(":", 1)[1])
            print(f"cores: {os.cpu_count()}, client processes: {PROCS}, {SECONDS:.0f}s per run")
            for conns in (1, 4, 16):
                base = run(port, "health", conns)
                dec = run(port, "decide", conns)
                print(
                    f"{PROCS * conns:3d} concurrent clients: decisions {dec[0]:8,.0f}/s "
                    f"p50 {dec[1] * 1e3:5.2f} ms p99 {dec[2] * 1e3:5.2f} ms | "
                    f"GET /healthz {base[0]:8,.0f}/s p50 {base[1] * 1e3:5.2f} ms | "
                    f"throughput ratio {dec[0] / base[0]:.2f}"
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
