"""What the durable local audit log costs a decision: latency and throughput, same run.

Two collector processes run side by side on the same machine, with the same policy: one
writes every decision record to its local audit log before the answer (the default:
appended to a preallocated file, fdatasync'd in groups, drained into ClickHouse), the
other with ``--audit-log off`` (records wait in memory only until ClickHouse takes
them). The same client processes send governed tool-call decisions to each in turn,
A-B-B-A, so that drift over the runs (merges, caches, the machine's other load) favours
neither; only one collector is loaded at a time. Each of the ``ROUNDS`` rounds starts a
fresh pair of processes, in turn the one or the other first, since two processes of the
same program can differ by several percent; each side's figures are the medians of its
runs. ``CONTROL=1`` runs the same with neither side writing the log (an A-A control).

A second, in-process figure times a whole tool decision with and without the log, which
is free of HTTP and of client noise.

Goals: p99 with the log <= 1.2x without it; throughput with the log >= 0.9x.
Usage: uv run python bench/audit_log.py   (BENCH_SECONDS=5 PROCS=2 ROUNDS=4 CONTROL=1)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import timeit
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import decisions
from collector_process import running_collector

ROUNDS = int(os.environ.get("ROUNDS", 4))


def _median(runs: list[tuple[float, float, float]]) -> tuple[float, ...]:
    """Each figure's median over the runs (throughput, p50, p99)."""
    return tuple(statistics.median(r[k] for r in runs) for k in range(3))


def _in_process(workdir: Path) -> None:
    from agentgov.collector.governor import audit
    from agentgov.collector.governor.audit_log import AuditLog
    from agentgov.collector.governor.engine import Governor, HandoffRequest, ToolRequest
    from agentgov.collector.governor.policy import PolicySource
    from agentgov.collector.governor.tokens import LineageKeys, LineageTokens, generate_key
    from agentgov.collector.risk import RiskRules
    from agentgov.collector.store.connection import StoreConfig

    store = StoreConfig(f"chdb://{workdir / 'unused'}")  # never opened: nothing drains
    n = 20_000
    results = {}
    for name in ("memory only", "local log"):
        log = None if name == "memory only" else AuditLog(workdir / "inproc-log", 256 << 20)
        if log is not None:
            log.open()
        writer = audit.AuditWriter(store, log)
        gov = Governor(
            PolicySource(None),
            RiskRules.default(),
            encode=audit.row,
            journal=writer.journal,
            tokens=LineageTokens(LineageKeys([generate_key()], "bench")),
        )
        root = gov.handoff(HandoffRequest("s", "", "root"))
        req = ToolRequest("s", "", "shell", "ls -la /opt/app/logs", token=root.lineage_token)
        assert gov.tool(req).outcome == "allow"
        results[name] = min(timeit.repeat(partial(gov.tool, req), number=n, repeat=3)) / n
        if log is not None:
            log.close()
    base, logged = results["memory only"], results["local log"]
    print(
        f"in process: a tool decision {base * 1e6:.1f} us with records in memory only, "
        f"{logged * 1e6:.1f} us with the local audit log ({logged / base:.2f}x)"
    )


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="agentgov-audit-log-"))
    policy = workdir / "policy.yaml"
    policy.write_text(decisions.POLICY)
    # CONTROL=1: an A-A run, both sides without the log: what the bench reads for no change
    log_args = ("--audit-log", "off") if os.environ.get("CONTROL") else ()
    levels = (1, 8)
    runs: dict[int, dict[str, list[tuple[float, float, float]]]] = {
        c: {"log": [], "off": []} for c in levels
    }
    try:
        print(
            f"cores: {os.cpu_count()}, client processes: {decisions.PROCS}, "
            f"{decisions.SECONDS:.0f}s per run, {ROUNDS} rounds"
            + (" (A-A control: both sides without the log)" if log_args else "")
        )
        for n in range(ROUNDS):
            # a fresh pair of collector processes each round, started in turn first: one
            # process's luck (its memory layout, its hash seed, where the kernel put it)
            # must not be read as the log's cost
            with contextlib.ExitStack() as stack:
                args = {
                    "log": ("--policy", str(policy), *log_args),
                    "off": ("--policy", str(policy), "--audit-log", "off"),
                }
                order = ("log", "off") if n % 2 == 0 else ("off", "log")
                urls = {
                    which: stack.enter_context(
                        running_collector(workdir / f"{which}{n}", *args[which])
                    )
                    for which in order
                }
                ports = {which: int(url.rsplit(":", 1)[1]) for which, url in urls.items()}
                for conns in levels:
                    for which in ("log", "off", "off", "log"):
                        runs[conns][which].append(decisions.run(ports[which], "token", conns))
        for conns in levels:
            # the median run of each side: one run disturbed by the machine's other work
            # moves neither figure
            log_, off = _median(runs[conns]["log"]), _median(runs[conns]["off"])
            print(
                f"{decisions.PROCS * conns:3d} concurrent clients: "
                f"with the audit log {log_[0]:8,.0f}/s p50 {log_[1] * 1e3:5.2f} ms "
                f"p99 {log_[2] * 1e3:5.2f} ms | without {off[0]:8,.0f}/s "
                f"p50 {off[1] * 1e3:5.2f} ms p99 {off[2] * 1e3:5.2f} ms | "
                f"p99 ratio {log_[2] / off[2]:.2f}x (goal <= 1.2), "
                f"throughput ratio {log_[0] / off[0]:.2f}x (goal >= 0.9)"
            )
        _in_process(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
