"""Decision latency and throughput over loopback, with concurrent clients.

A collector process with a policy runs; load comes from separate client processes, each
holding keep-alive connections and sending governed tool-call decisions
(``POST /api/v1/decisions/tool``) back to back for agents the governor started. Every
request's latency is measured from its first byte sent to its last byte received.

Three loads per concurrency, same server, same connections:
- ``GET /healthz``: the cost of HTTP alone (baseline of the throughput ratio);
- decisions with each agent's lineage token (verified identity, the default);
- the same decisions with identity from the body (checked against the governor's state
  and the caller's key), the token sent under a header the governor does not read, so
  both loads are the same bytes: what verification costs is the difference.

Goals: p50 <= 0.5 ms and p99 <= 2 ms with concurrent clients; >= 15k decisions/s at peak;
token verification <= 10 % of a decision.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from collector_process import running_collector

SECONDS = float(os.environ.get("BENCH_SECONDS", 5))
PROCS = int(os.environ.get("PROCS", 2))

POLICY = """
multi_agent:
  max_handoffs: 1000000
  shared_max_tool_calls: 100000000
  tool_allowlist: [shell, sql, http.get]
  # the tokenless load is the baseline of what verification costs
  require_verified_lineage: false
"""
TOKEN_HEADER = "Agentgov-Lineage-Token"


def _request(path: str, body: bytes | None, token: str = "", header: str = TOKEN_HEADER) -> bytes:
    if body is None:
        return f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    extra = f"{header}: {token}\r\n" if token else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _agents(port: int, tag: str) -> list[tuple[str, str, str]]:
    """64 sessions of 8 agents each, started through the governor: (session, agent, token)."""
    import httpx

    out = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        for s in range(64):
            sid = f"sess-bench-{tag}-{s}"
            root = c.post(
                "/api/v1/decisions/handoff", json={"session_id": sid, "to_agent": "root"}
            ).json()["lineage_token"]
            for a in range(8):
                answer = c.post(
                    "/api/v1/decisions/handoff",
                    json={"session_id": sid, "to_agent": f"agent-{a}"},
                    headers={TOKEN_HEADER: root},
                ).json()
                out.append((sid, f"agent-{a}", answer["lineage_token"]))
    return out


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


def client_process(
    port: int, mode: str, conns: int, seconds: float, out: mp.Queue, go: Any
) -> None:
    if mode in ("token", "tokenless"):
        agents = _agents(port, f"{mode}-{conns}-{os.getpid()}")
        requests = []
        for k in range(512):
            sid, agent, token = agents[k % len(agents)]
            body = {
                "session_id": sid,
                "agent_id": agent,
                "tool": "shell",
                "command": f"ls -la /opt/app/logs/{k % 16}",
            }
            # without verification the token still travels, under a header the governor
            # ignores: both loads put the same bytes on the wire
            header = TOKEN_HEADER if mode == "token" else "X-Bench-Unread"
            requests.append(
                _request("/api/v1/decisions/tool", json.dumps(body).encode(), token, header)
            )
    else:
        requests = [_request("/healthz", None)]

    out.put("ready")  # every process sets up before any of them measures
    go.wait()

    async def main() -> list[float]:
        lat: list[float] = []
        until = time.perf_counter() + seconds
        await asyncio.gather(*(_conn_loop(port, requests, until, lat) for _ in range(conns)))
        return lat

    out.put(asyncio.run(main()))


def run(port: int, mode: str, conns: int) -> tuple[float, float, float]:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    go = ctx.Event()
    procs = [
        ctx.Process(target=client_process, args=(port, mode, conns, SECONDS, q, go))
        for _ in range(PROCS)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        assert q.get(timeout=120) == "ready"
    go.set()
    lat: list[float] = []
    for _ in procs:
        lat.extend(q.get(timeout=SECONDS + 60))
    for p in procs:
        p.join(30)
    lat.sort()
    return len(lat) / SECONDS, lat[len(lat) // 2], lat[int(len(lat) * 0.99)]


def _mean(a: tuple[float, float, float], b: tuple[float, float, float]) -> tuple[float, ...]:
    return tuple((x + y) / 2 for x, y in zip(a, b, strict=True))


def _verification_in_process() -> None:
    """What verifying costs in the governor's process: a token seen for the first time
    (Ed25519 + claims) and one seen before (the cache every later request hits), against
    a whole in-process tool decision."""
    import timeit

    from agentgov.collector.governor.engine import Governor, HandoffRequest, ToolRequest
    from agentgov.collector.governor.policy import PolicySource
    from agentgov.collector.governor.tokens import LineageKeys, LineageTokens, generate_key
    from agentgov.collector.risk import RiskRules

    tokens = LineageTokens(LineageKeys([generate_key()], "bench"))
    issued = [
        tokens.issue("s", f"a-{i}", "root", ["root", f"a-{i}"], "", "task", ["fs.read:/x"])[0]
        for i in range(2000)
    ]
    it = iter(issued)
    miss = timeit.timeit(lambda: tokens.verify(next(it)), number=len(issued)) / len(issued)
    hit = timeit.timeit(lambda: tokens.verify(issued[0]), number=20000) / 20000
    gov = Governor(PolicySource(None), RiskRules.default(), tokens=tokens)
    root = gov.handoff(HandoffRequest("s", "", "root")).lineage_token
    req = ToolRequest("s", "", "shell", "ls -la /opt/app/logs", token=root)
    decide = timeit.timeit(lambda: gov.tool(req), number=20000) / 20000
    print(
        f"in process: first verification of a token {miss * 1e6:.1f} us, later ones "
        f"{hit * 1e6:.2f} us (cached); a whole tool decision {decide * 1e6:.1f} us: "
        f"verification is {100 * hit / decide:.1f} % of it"
    )


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="agentgov-decisions-"))
    (workdir / "policy.yaml").write_text(POLICY)
    try:
        with running_collector(workdir / "data", "--policy", str(workdir / "policy.yaml")) as url:
            port = int(url.rsplit(":", 1)[1])
            print(f"cores: {os.cpu_count()}, client processes: {PROCS}, {SECONDS:.0f}s per run")
            for conns in (1, 4, 16):
                base = run(port, "health", conns)
                # A-B-B-A, so that drift over the runs (merges, caches) favours neither
                dec1, bare1, bare2, dec2 = (
                    run(port, mode, conns) for mode in ("token", "tokenless", "tokenless", "token")
                )
                dec, bare = _mean(dec1, dec2), _mean(bare1, bare2)
                print(
                    f"{PROCS * conns:3d} concurrent clients: decisions {dec[0]:8,.0f}/s "
                    f"p50 {dec[1] * 1e3:5.2f} ms p99 {dec[2] * 1e3:5.2f} ms | "
                    f"GET /healthz {base[0]:8,.0f}/s p50 {base[1] * 1e3:5.2f} ms | "
                    f"throughput ratio {dec[0] / base[0]:.2f}"
                )
                print(
                    f"    without tokens {bare[0]:8,.0f}/s p50 {bare[1] * 1e3:5.2f} ms "
                    f"p99 {bare[2] * 1e3:5.2f} ms | token verification costs "
                    f"{100 * (1 - dec[0] / bare[0]):+.1f} % throughput, "
                    f"{100 * (dec[1] / bare[1] - 1):+.1f} % p50"
                )
            _verification_in_process()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
