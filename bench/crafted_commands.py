"""Decision time for 64 KiB commands crafted against the risk rules, against ordinary
64 KiB commands of the same length, same run.

Every command a governed tool call names is scored by the risk rules before the answer.
With backtracking regular expressions one crafted command (``delete from x`` + 63,000
spaces + ``y``) took seconds on the event loop; RE2 makes the work linear in the length
whatever the text. Measured twice: the governor's own decision in process (what holds
the event loop), and the whole HTTP round trip against a collector process.

Goal: worst case under 5 ms per decision.
Usage: uv run python bench/crafted_commands.py   (ROUNDS=20)
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from collector_process import running_collector

from agentgov.collector.governor.engine import Governor, HandoffRequest, ToolRequest
from agentgov.collector.governor.policy import PolicySource
from agentgov.collector.governor.tokens import LineageKeys, LineageTokens, generate_key
from agentgov.collector.risk import RiskRules

ROUNDS = int(os.environ.get("ROUNDS", 20))
SIZE = 63_000
TOKEN_HEADER = "Agentgov-Lineage-Token"

#: each aims at one rule's pattern: long runs where a backtracking engine retries
CRAFTED = {
    "delete-from-spaces": "delete from x" + " " * SIZE + "y",
    "git-push-words": "git push " + "a " * (SIZE // 2),
    "rm-dashes": "rm " + "-" * SIZE,
    "drop-whitespace": "drop" + " \t" * (SIZE // 4) + "tablex",
    "sudo-semicolons": ";sudo" * (SIZE // 5),
    "prod-letters": "prod" * (SIZE // 4),
}
ORDINARY = {"ls-long-path": "ls " + "/opt/app/logs" * (SIZE // 13)}


def in_process() -> dict[str, list[float]]:
    tokens = LineageTokens(LineageKeys([generate_key()], "bench"))
    gov = Governor(PolicySource(None), RiskRules.default(), tokens=tokens)
    root = gov.handoff(HandoffRequest("s", "", "root")).lineage_token
    out: dict[str, list[float]] = {}
    for name, command in {**ORDINARY, **CRAFTED}.items():
        times = []
        for n in range(ROUNDS):
            # a new command each time: the scorer's cache must not answer for it
            req = ToolRequest("s", "", "sql", f"{n} {command}", token=root)
            t = time.perf_counter()
            gov.tool(req)
            times.append(time.perf_counter() - t)
        out[name] = times
    return out


def over_http(url: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with httpx.Client(base_url=url, timeout=30) as c:
        root = c.post(
            "/api/v1/decisions/handoff", json={"session_id": "crafted", "to_agent": "root"}
        ).json()["lineage_token"]
        headers = {TOKEN_HEADER: root}
        for name, command in {**ORDINARY, **CRAFTED}.items():
            times = []
            for n in range(ROUNDS):
                body = {"session_id": "crafted", "tool": "sql", "command": f"{n} {command}"}
                t = time.perf_counter()
                r = c.post("/api/v1/decisions/tool", json=body, headers=headers)
                times.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
            out[name] = times
    return out


def report(title: str, results: dict[str, list[float]]) -> None:
    base = statistics.median(results["ls-long-path"])
    print(title)
    worst = 0.0
    for name, times in results.items():
        worst = max(worst, max(times)) if name in CRAFTED else worst
        print(
            f"  {name:<20} median {statistics.median(times) * 1e3:6.2f} ms  "
            f"max {max(times) * 1e3:6.2f} ms  ({statistics.median(times) / base:.2f}x ordinary)"
        )
    print(f"  worst crafted decision: {worst * 1e3:.2f} ms (goal < 5 ms)")


def main() -> None:
    print(f"cores: {os.cpu_count()}, {ROUNDS} rounds of each ~64 KiB command")
    report("in process (the governor's decision, on the event loop):", in_process())
    workdir = Path(tempfile.mkdtemp(prefix="agentgov-crafted-"))
    try:
        with running_collector(workdir / "data") as url:
            report("over HTTP (the whole round trip, 64 KiB body):", over_http(url))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
