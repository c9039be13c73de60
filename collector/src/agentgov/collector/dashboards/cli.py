"""``agentgov dashboards``: the Grafana dashboards from the command line."""

from __future__ import annotations

import os

import click


@click.group()
def dashboards() -> None:
    """Grafana dashboards over the ClickHouse store."""


@dashboards.command("push")
@click.option(
    "--grafana-url",
    envvar="GRAFANA_URL",
    required=True,
    help="Grafana's root URL, e.g. http://localhost:3000. Credentials come from GRAFANA_TOKEN "
    "(a service account token), or GRAFANA_USER and GRAFANA_PASSWORD.",
)
@click.option(
    "--clickhouse-url",
    default=None,
    help="ClickHouse as Grafana reaches it: clickhouse://user@host:9000/database (native), "
    "clickhouses:// (TLS) or http(s)://user@host:8123/database. Default: the provisioning "
    "file's (the compose service). The password comes from CLICKHOUSE_PASSWORD.",
)
@click.option("--folder", default="agentgov", show_default=True, help="Title of the folder.")
@click.option("--folder-uid", default="agentgov", show_default=True, help="Uid of the folder.")
@click.option("--timeout", default=10.0, show_default=True, type=float, help="Seconds per request.")
def push_command(
    grafana_url: str, clickhouse_url: str | None, folder: str, folder_uid: str, timeout: float
) -> None:
    """Create or update the ClickHouse data source, the folder and the dashboards.

    Safe to run again: objects are addressed by fixed uids and updated in place.
    """
    # imported here: the Grafana client is heavy, and every other command starts faster
    from agentgov.collector.dashboards.push import PushError, push

    try:
        changes = push(
            grafana_url,
            os.environ,
            clickhouse_url=clickhouse_url,
            folder_title=folder,
            folder_uid=folder_uid,
            timeout=timeout,
        )
    except PushError as exc:
        raise click.ClickException(str(exc)) from exc
    for change in changes:
        line = f"{change.kind} {change.uid}: {change.action}"
        click.echo(f"{line}  {change.url}" if change.url else line)
