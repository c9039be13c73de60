"""The README's first command: the demo runs end to end, under a minute, and leaves
nothing running."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path


def _processes_in(folder: Path) -> set[int]:
    """Processes whose working directory is ``folder``: the demo runs there, and every
    process it starts (agents, workers) inherits it, even once orphaned."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) == folder:
                out.add(int(entry.name))
        except OSError:
            continue
    return out


def test_demo_traces_the_rm_rf_back_to_the_human_instruction(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentgov.collector.cli",
            "demo",
            "--store",
            f"chdb://{tmp_path / 'data'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "NO_COLOR": "1"},
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert elapsed < 60, f"the demo took {elapsed:.1f}s"

    # the delegation tree, read back from ClickHouse
    assert "Delegation tree (read back from ClickHouse):" in out
    tree = out.split("Delegation tree")[1].split("Session:")[0]
    assert re.search(r"^planner \(planner-[0-9a-f]{12}\) \[planner\]  depth 0", tree, re.M)
    assert re.search(
        r"└── orchestrator \(orchestrator-[0-9a-f]{12}\) \[orchestrator\]  depth 1", tree
    )
    for worker in ("cleanup-data", "cleanup-images", "cleanup-logs"):
        assert re.search(rf"── {worker} \({worker}-[0-9a-f]{{12}}\) \[cleanup\]  depth 2", tree)
    # the governor stopped the fourth handoff: no cleanup-db agent ever ran
    assert "cleanup-db" not in tree

    # agents in at least two other OS processes
    pids = re.search(r"Agents ran in processes ([\d, ]+);", out)
    assert pids is not None
    assert len(set(pids.group(1).split(", "))) == 3

    # session figures and risk
    assert "5 agents, 12 spans, depth 2, 4 handoffs, 7 commands" in out
    assert "riskiest command 80 HIGH, session risk 90 HIGH" in out
    # DROP TABLE never ran: the orchestrator only read the old tables itself
    assert "DROP TABLE" not in out.split("Commands with their risk:")[1].split("Who asked")[0]

    # the causal chain of rm -rf, back to the instruction
    chain = out.split("Who asked for 'rm -rf /opt/app/data'? (nothing was deleted)")[1]
    lines = [line.strip() for line in chain.strip().splitlines()[:5]]
    assert lines[0].startswith(
        "command   'rm -rf /opt/app/data'  (risk 80 HIGH: destructive_command, write_scope)"
    )
    assert re.match(
        r"← run by cleanup-data \(cleanup-data-[0-9a-f]{12}\) "
        r"for task 'remove stale deployment data'",
        lines[1],
    )
    assert re.match(
        r"← delegated by orchestrator \(orchestrator-[0-9a-f]{12}\) "
        r"for task 'plan and run the cleanup'",
        lines[2],
    )
    assert re.match(r"← delegated by planner \(planner-[0-9a-f]{12}\)$", lines[3])
    assert lines[4] == "← on the human instruction 'clean up old deployments'"

    # the governor: a handoff over budget, the fallback, one kill for every process
    governor = out.split("The governor decided every step:")[1]
    assert re.search(r"8 pre_handoff\s+stop\s+handoff_budget_exceeded\s+orchestrator-", governor)
    assert "fell back to single-agent mode" in governor
    assert re.search(r"kill → cleanup-data stopped in process \d+ [\d.]+ ms later", governor)
    assert "the orchestrator stopped at its next step: yes" in governor
    assert "a new agent was refused at start: session_killed" in governor
    assert re.search(r"session status killed; audit chain of \d+ decision records intact", governor)

    # the shipped alert rules saw the stopped handoff and the handoff budget running out
    alerts = out.split("Alert rules that fired on the live data (alerts/):")[1]
    assert re.search(
        r"delegation_stopped \(warning\): 🛑 Multi-Agent run sess-\w+ stopped: "
        r"handoff_budget_exceeded, handoff=orchestrator-\w+ -> cleanup-db-\w+",
        alerts,
    )
    assert "handoffs_near_limit (warning)" in alerts

    # nothing left running: no process the demo started is still alive
    assert _processes_in(tmp_path) == set()


def test_the_framework_demo_governs_real_openai_agents(tmp_path: Path) -> None:
    """``agentgov demo --framework openai-agents``: real SDK agents with a scripted model,
    traced and governed by the instrumentor alone; a tool off the allowlist is refused and
    the model told why; the operator's kill ends the run at its next step."""
    proc = subprocess.run(
        [sys.executable, "-m", "agentgov.collector.cli", "demo", "--framework",
         "openai-agents", "--store", f"chdb://{tmp_path / 'data'}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    tree = out.split("Delegation tree (read back from ClickHouse):")[1].split("Commands")[0]
    assert re.search(r"^planner \(planner-[0-9a-f]{12}\)  depth 0", tree, re.M), tree
    assert re.search(r"└── cleanup_coordinator \(cleanup_coordinator-[0-9a-f]{12}\)  depth 1", tree)
    for worker in ("cleanup_data", "cleanup_images"):
        assert re.search(rf"── {worker} \({worker}-[0-9a-f]{{12}}\)  depth 2", tree), tree
    assert re.search(r"cleanup_data-[0-9a-f]{12} .* 80  rm -rf /opt/app/data", out)
    assert "tool_not_allowed" in out
    assert "was told: [agentgov] tool call stopped by the governor: tool_not_allowed" in out
    assert "session_killed" in out
    assert "the run ended at its next step: SessionKilledByGovernor: session_killed" in out
    assert re.search(r"audit chain of \d+ decision records intact", out)
    assert not _processes_in(tmp_path), "the demo left processes running"
