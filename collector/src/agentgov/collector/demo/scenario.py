"""Runs the demo scenario against an embedded collector and prints what it shows."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import click

from agentgov.collector import render
from agentgov.collector.client import CollectorClient
from agentgov.collector.service import Collector, CollectorConfig
from agentgov.instrumentation import Governance, configure

INTENT = "clean up old deployments"

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
DB = [("sql", "DROP TABLE deployments_2023", ["db:prod/deployments_2023"])]


def _spawn(plan: dict, env: dict[str, str], endpoint: str) -> subprocess.Popen[bytes]:
    import os

    child_env = {**os.environ, **env, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    child_env.pop("OTEL_SERVICE_NAME", None)
    return subprocess.Popen(
        [sys.executable, "-m", "agentgov.collector.demo.worker", json.dumps(plan)], env=child_env
    )


def run_agents(endpoint: str) -> tuple[str, list[int]]:
    """The multi-agent run: planner → orchestrator → cleanup agents in two processes."""
    provider = configure(service_name="demo-planner", endpoint=endpoint)
    gov = Governance(provider)
    pids: list[int] = []
    with gov.session(INTENT) as session:
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
                    permissions=["fs.read:/opt/app"],
                )
                h_db = orch.handoff(
                    "cleanup-db",
                    task="archive old deployment tables",
                    role="cleanup",
                    permissions=["db.read"],
                )
                procs = [
                    _spawn(
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
                    ),
                    _spawn(
                        {
                            "agents": [
                                {"name": "cleanup-data", "commands": DATA},
                                {"name": "cleanup-db", "commands": DB, "carrier": h_db.env()},
                            ]
                        },
                        h_data.env(),
                        endpoint,
                    ),
                ]
                pids = [p.pid for p in procs]
                for p in procs:
                    if p.wait(60) != 0:
                        raise RuntimeError(f"cleanup worker {p.pid} failed with {p.returncode}")
                orch.message(to=planner.agent_id, content="cleanup finished")
        session_id = session.session_id
    provider.shutdown()
    return session_id, pids


def main(store: str | None, http_port: int) -> None:
    started = time.monotonic()
    collector = Collector(CollectorConfig(store=store, http_port=http_port, grpc_port=None)).start()
    endpoint = f"http://127.0.0.1:{collector.http_port}"
    api = CollectorClient(endpoint)
    try:
        click.secho(
            f"agentgov demo — embedded collector on {endpoint}, store {collector.config.store_config.redacted()}",
            bold=True,
        )
        click.echo(f'The user says: "{INTENT}"\n')
        session_id, pids = run_agents(endpoint)
        click.echo(
            f"Agents ran in processes {', '.join(map(str, [__import__('os').getpid(), *pids]))}; session {session_id}\n"
        )

        graph = api.graph(session_id)
        summary = api.session(session_id)
        audit = api.audit(session_id)

        click.secho("Delegation tree (read back from ClickHouse):", bold=True)
        click.echo(render.delegation_tree(graph) + "\n")
        click.secho("Session:", bold=True)
        click.echo(
            f"  {summary['agents']} agents, {summary['spans']} spans, depth {summary['max_depth']}, "
            f"{summary['handoffs']} handoffs, {summary['tool_calls']} commands, ${summary['usd']:.4f}\n"
            f"  riskiest command {render.risk_label(int(summary['max_command_risk']))}, "
            f"session risk {render.risk_label(int(summary['session_risk']))}\n"
        )
        click.secho("Commands with their risk:", bold=True)
        click.echo(render.audit_table(audit) + "\n")
        target = next(c for c in audit if c["command"] == "rm -rf /opt/app/data")
        click.secho("Who asked for 'rm -rf /opt/app/data'? (nothing was deleted)", bold=True)
        click.echo(render.causal_chain(target, graph) + "\n")
        click.echo(f"Done in {time.monotonic() - started:.1f}s. Browse it again with:")
        click.echo(
            "  agentgov collector &   then   agentgov sessions / agentgov graph " + session_id
        )
    finally:
        api.close()
        collector.stop()


if __name__ == "__main__":
    main(None, 0)
