"""The ``agentgov`` command line."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from agentgov.collector import render
from agentgov.collector.client import ApiError, CollectorClient
from agentgov.collector.receiver.decode import Limits


def _client(url: str | None) -> CollectorClient:
    return CollectorClient(url)


def _run(fn: Any) -> None:
    try:
        fn()
    except ApiError as exc:
        raise click.ClickException(str(exc)) from exc


url_option = click.option(
    "--url",
    envvar="AGENTGOV_URL",
    default=None,
    help="Collector URL (default http://127.0.0.1:4318).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


@click.group()
def main() -> None:
    """agentgov: governance telemetry and runtime control for multi-agent AI systems."""


@main.command()
@click.option(
    "--store",
    envvar="AGENTGOV_STORE",
    default=None,
    help="chdb:///path (embedded, default ./agentgov-data) or http(s)://user:password@host:8123/db.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--http-port", default=4318, show_default=True, type=int, help="OTLP/HTTP and API port."
)
@click.option(
    "--grpc-port", default=4317, show_default=True, type=int, help="OTLP/gRPC port (-1 disables)."
)
@click.option(
    "--risk-rules",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Risk rules YAML replacing the built-in rules.",
)
@click.option("--max-request-bytes", default=Limits.max_request_bytes, show_default=True, type=int)
@click.option("--max-attributes", default=Limits.max_attributes, show_default=True, type=int)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def collector(
    store: str | None,
    host: str,
    http_port: int,
    grpc_port: int,
    risk_rules: str | None,
    max_request_bytes: int,
    max_attributes: int,
    log_level: str,
) -> None:
    """Run the collector: OTLP receivers, ClickHouse storage and the API."""
    from agentgov.collector.risk import RiskRulesError
    from agentgov.collector.service import Collector, CollectorConfig
    from agentgov.collector.store.connection import StoreError

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = CollectorConfig(
        store=store,
        host=host,
        http_port=http_port,
        grpc_port=None if grpc_port < 0 else grpc_port,
        risk_rules=risk_rules,
        limits=Limits(max_request_bytes=max_request_bytes, max_attributes=max_attributes),
        log_level=log_level,
    )
    try:
        service = Collector(config)
        click.echo(
            f"agentgov collector: store {config.store_config.redacted()}, "
            f"OTLP/HTTP + API on {host}:{http_port}"
            + (f", OTLP/gRPC on {host}:{grpc_port}" if grpc_port >= 0 else ""),
            err=True,
        )
        service.run()
    except (RiskRulesError, StoreError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@url_option
@json_option
@click.option("--limit", default=20, show_default=True)
@click.option("--order", type=click.Choice(["recent", "risk"]), default="recent", show_default=True)
def sessions(url: str | None, as_json: bool, limit: int, order: str) -> None:
    """Recent sessions with status, agents, depth, handoffs, spend and risk."""

    def go() -> None:
        rows = _client(url).sessions(limit, order)
        click.echo(json.dumps(rows, indent=2) if as_json else render.sessions_table(rows))

    _run(go)


@main.command()
@url_option
@json_option
@click.argument("session_id")
def graph(url: str | None, as_json: bool, session_id: str) -> None:
    """A session's delegation tree."""

    def go() -> None:
        g = _client(url).graph(session_id)
        click.echo(json.dumps(g, indent=2) if as_json else render.delegation_tree(g))

    _run(go)


@main.command()
@url_option
@json_option
@click.argument("session_id")
def audit(url: str | None, as_json: bool, session_id: str) -> None:
    """Every command of a session, with its agent, parent, chain, intent and risk."""

    def go() -> None:
        rows = _client(url).audit(session_id)
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        click.echo(render.audit_table(rows))
        if rows:
            click.echo(f"\nintent: {rows[0]['intent']!r}")

    _run(go)


@main.command()
@click.option("--store", default=None, help="Store DSN (default ./agentgov-data).")
@click.option(
    "--http-port",
    default=0,
    show_default=True,
    type=int,
    help="Port of the embedded collector (0: any free port).",
)
def demo(store: str | None, http_port: int) -> None:
    """Run the 'clean up old deployments' scenario on an embedded collector."""
    from agentgov.collector.demo.scenario import main as run_demo

    run_demo(store, http_port)


if __name__ == "__main__":
    sys.exit(main())
