"""Runs the demo scenario against an embedded collector and prints what it shows."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from agentgov.collector import render
from agentgov.collector.auth import KeyRing
from agentgov.collector.client import CollectorClient
from agentgov.collector.service import Collector, CollectorConfig
from agentgov.instrumentation import Governance, GovernorClient, SessionKilled, Stopped, configure

INTENT = "clean up old deployments"

POLICY = """\
multi_agent:
  mode: enforce
  max_handoffs: 4            # planner -> orchestrator, then three cleanup agents at most
  max_delegation_depth: 3
  shared_max_usd: 5
  ownership_lock: true
  permissions:               # least privilege for the cleanup role
    cleanup: [fs.read:/opt/app, fs.write:/opt/app/logs, fs.write:/opt/app/data, docker.prune, db.read]
"""

# (tool, command, resources) per cleanup agent; nothing is executed.
LOGS = [
    ("shell", "ls -la /opt/app/logs", ["/opt/app/logs"]),
    ("shell", "find /opt/app/logs -name '*.log' -mtime +30 -delete", ["/opt/app/logs"]),
]
IMAGES = [("shell", "docker image prune --filter until=720h", ["docker:local"])]
DATA = [
    ("shell", "du -sh /opt/app/data", ["/opt/app/data"]),
    ("shell", "rm -rf /opt/app/data", ["/opt/app/data"]),
]
# what the orchestrator does itself once it may not delegate any more: read only
DB_CONSTRAINED = [
    (
        "sql",
        "SELECT name FROM system.tables WHERE name LIKE 'deployments_2023%'",
        ["db:prod/deployments_2023"],
    )
]


def _spawn(
    plan: dict[str, Any], env: dict[str, str], endpoint: str, key: str
) -> subprocess.Popen[str]:
    child_env = {
        **os.environ,
        **env,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "AGENTGOV_URL": endpoint,
        "AGENTGOV_API_KEY": key,
    }
    child_env.pop("OTEL_SERVICE_NAME", None)
    return subprocess.Popen(
        [sys.executable, "-m", "agentgov.collector.demo.worker", json.dumps(plan)],
        env=child_env,
        stdout=subprocess.PIPE,
        text=True,
    )


def run_agents(endpoint: str, agent_key: str, admin: CollectorClient) -> dict[str, Any]:
    """The multi-agent run: planner -> orchestrator -> cleanup agents in two processes."""
    provider = configure(service_name="demo-planner", endpoint=endpoint, api_key=agent_key)
    fallbacks: list[str] = []
    gov = Governance(
        provider,
        governor=GovernorClient(endpoint, api_key=agent_key),
        on_stop=lambda agent, stop: fallbacks.append(f"{agent.name}: {stop.reason}"),
    )
    out: dict[str, Any] = {"pids": [os.getpid()], "fallbacks": fallbacks}
    with gov.session(INTENT) as session:
        out["session_id"] = session.session_id
        with session.agent("planner", role="planner") as planner:
            planner.usage(input_tokens=1200, output_tokens=300, usd=0.012)
            with planner.delegate(
                "orchestrator",
                task="plan and run the cleanup",
                role="orchestrator",
                permissions=["fs.read:/opt/app", "fs.write:/opt/app", "docker.prune", "db.read"],
            ) as orch:
                with orch.tool(
                    "inventory", command="kubectl get deployments -A", resources=["k8s:staging"]
                ):
                    pass
                h_logs = orch.handoff(
                    "cleanup-logs",
                    task="delete logs older than 30 days",
                    role="cleanup",
                    permissions=["fs.write:/opt/app/logs"],
                )
                h_images = orch.handoff(
                    "cleanup-images",
                    task="prune old images",
                    role="cleanup",
                    permissions=["docker.prune"],
                )
                h_data = orch.handoff(
                    "cleanup-data",
                    task="remove stale deployment data",
                    role="cleanup",
                    permissions=["fs.write:/opt/app/data"],
                )
                try:
                    orch.handoff(
                        "cleanup-db",
                        task="drop old deployment tables",
                        role="cleanup",
                        permissions=["db.read"],
                    )
                except Stopped:
                    # constrained single-agent mode: the orchestrator does the rest itself,
                    # read-only, instead of handing a DROP TABLE to yet another agent
                    for tool, command, resources in DB_CONSTRAINED:
                        with orch.tool(tool, command=command, resources=resources):
                            pass
                logs_proc = _spawn(
                    {
                        "agents": [
                            {"name": "cleanup-logs", "commands": LOGS},
                            {
                                "name": "cleanup-images",
                                "commands": IMAGES,
                                "carrier": h_images.env(),
                            },
                        ]
                    },
                    h_logs.env(),
                    endpoint,
                    agent_key,
                )
                data_proc = _spawn(
                    {
                        "agents": [
                            {"name": "cleanup-data", "commands": DATA, "linger": True},
                        ]
                    },
                    h_data.env(),
                    endpoint,
                    agent_key,
                )
                out["pids"] += [logs_proc.pid, data_proc.pid]
                if logs_proc.wait(60) != 0:
                    raise RuntimeError(f"cleanup worker {logs_proc.pid} failed")
                # an operator saw 'rm -rf' go by and stops the whole session with one action
                assert data_proc.stdout is not None
                json.loads(data_proc.stdout.readline())  # {"lingering": ...}
                t0 = time.monotonic_ns()
                admin.kill(session.session_id, reason="rm -rf on deployment data", actor="demo")
                stopped = json.loads(data_proc.stdout.readline())
                out["kill_ms"] = (stopped["at_ns"] - t0) / 1e6
                out["killed_pid"] = data_proc.pid
                data_proc.wait(30)
                try:
                    orch.checkpoint()
                except SessionKilled:
                    out["orchestrator_stopped"] = True
        try:
            with session.agent("late-cleanup"):
                pass
        except SessionKilled as refused:
            out["late_refused"] = refused.reason
    provider.shutdown()
    return out


def main(store: str | None, http_port: int, framework: str | None = None) -> None:
    started = time.monotonic()
    agent_key, admin_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    keys = KeyRing([("demo-agents", "agent", agent_key), ("demo-admin", "admin", admin_key)])
    if framework is not None:
        from agentgov.collector.demo import framework as told_by_framework
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(told_by_framework.POLICY if framework else POLICY)
        config = CollectorConfig(
            store=store, http_port=http_port, grpc_port=None, policy=str(policy)
        )
        collector = Collector(config, keys=keys).start()
        endpoint = f"http://127.0.0.1:{collector.http_port}"
        api = CollectorClient(endpoint, api_key=admin_key)
        try:
            if framework is not None:
                told_by_framework.report(endpoint, agent_key, api)
                click.echo(f"Done in {time.monotonic() - started:.1f}s.")
            else:
                _report(endpoint, agent_key, api, collector, started)
        finally:
            api.close()
            collector.stop()


def _report(
    endpoint: str, agent_key: str, api: CollectorClient, collector: Collector, started: float
) -> None:
    click.secho(
        f"agentgov demo — embedded collector on {endpoint}, "
        f"store {collector.config.store_config.redacted()}",
        bold=True,
    )
    click.echo(f'The user says: "{INTENT}"\n')
    run = run_agents(endpoint, agent_key, api)
    session_id = run["session_id"]
    click.echo(
        f"Agents ran in processes {', '.join(map(str, run['pids']))}; session {session_id}\n"
    )

    graph = api.graph(session_id)
    summary = api.session(session_id)
    audit = api.audit(session_id)
    decisions = api.get(f"/api/v1/sessions/{session_id}/decisions")["decisions"]

    click.secho("Delegation tree (read back from ClickHouse):", bold=True)
    click.echo(render.delegation_tree(graph) + "\n")
    click.secho("Session:", bold=True)
    click.echo(
        f"  {summary['agents']} agents, {summary['spans']} spans, depth {summary['max_depth']}, "
        f"{summary['handoffs']} handoffs, {summary['tool_calls']} commands, "
        f"${summary['usd']:.4f}\n"
        f"  riskiest command {render.risk_label(int(summary['max_command_risk']))}, "
        f"session risk {render.risk_label(int(summary['session_risk']))}\n"
    )
    click.secho("Commands with their risk:", bold=True)
    click.echo(render.audit_table(audit) + "\n")
    target = next(c for c in audit if c["command"] == "rm -rf /opt/app/data")
    click.secho("Who asked for 'rm -rf /opt/app/data'? (nothing was deleted)", bold=True)
    click.echo(render.causal_chain(target, graph) + "\n")

    click.secho("The governor decided every step:", bold=True)
    click.echo(render.decisions_table(decisions))
    for line in run["fallbacks"]:
        if "handoff_budget_exceeded" in line:
            click.echo(
                f"  → {line}: the orchestrator fell back to single-agent mode and only "
                "read the old tables instead of handing off 'DROP TABLE'"
            )
    click.echo("")
    click.secho("One action stopped the whole session:", bold=True)
    click.echo(
        f"  kill → cleanup-data stopped in process {run['killed_pid']} "
        f"{run['kill_ms']:.1f} ms later; the orchestrator stopped at its next step: "
        f"{'yes' if run.get('orchestrator_stopped') else 'no'}; "
        f"a new agent was refused at start: {run.get('late_refused', 'no')}"
    )
    verify = api.verify(session_id)
    click.echo(
        f"  session status {summary['status']}; audit chain of {verify['records']} "
        f"decision records {'intact' if verify['ok'] else 'BROKEN'}\n"
    )
    click.secho("Alert rules that fired on the live data (alerts/):", bold=True)
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # the engine acts within milliseconds of the data
        events = api.alerts(session_id, limit=200)
        if any(e["event"] == "fired" for e in events):
            break
        time.sleep(0.1)
    click.echo(render.alerts_table(events) + "\n")
    click.echo(f"Done in {time.monotonic() - started:.1f}s. Browse it again with:")
    click.echo(f"  uv run agentgov collector &   then   uv run agentgov graph {session_id}")


if __name__ == "__main__":
    main(None, 0)
