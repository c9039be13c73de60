"""The ``agentgov`` command line."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import click

from agentgov.collector import render
from agentgov.collector.client import ApiError, CollectorClient
from agentgov.collector.dashboards.cli import dashboards
from agentgov.collector.plans_cli import Duration, plan, policy_simulate
from agentgov.collector.receiver.decode import Limits


def _client(url: str | None) -> CollectorClient:
    return CollectorClient(url)  # the API key comes from AGENTGOV_API_KEY


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


@click.group(
    epilog="Exit codes: 0 done; 1 an error (the message says what to do); 2 a usage error; "
    "3 'kill': the kill is in force but no running agent was seen stopping."
)
@click.version_option(package_name="agentgov-collector", prog_name="agentgov")
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
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    envvar="AGENTGOV_POLICY",
    help="Multi-agent policy YAML (re-read when it changes).",
)
@click.option(
    "--api-keys",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="API keys YAML (keys in AGENTGOV_API_KEYS are added).",
)
@click.option(
    "--signing-keys",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Lineage signing keys (PASERK k4.secret, one per line, newest first; "
    "AGENTGOV_SIGNING_KEYS wins). Default: a key made once in the embedded data folder.",
)
@click.option(
    "--alert-rules",
    multiple=True,
    type=click.Path(exists=True),
    envvar="AGENTGOV_ALERT_RULES",
    help="Alert rule file or folder, repeatable (default: the shipped alerts/; re-read on change).",
)
@click.option(
    "--max-request-bytes",
    default=Limits.max_request_bytes,
    show_default=True,
    type=int,
    help="Largest OTLP request body accepted (compressed or not); larger ones get 413.",
)
@click.option(
    "--max-attributes",
    default=Limits.max_attributes,
    show_default=True,
    type=int,
    help="Most attributes one span (or event) may carry; more get 400.",
)
@click.option(
    "--min-free-space",
    default="256MiB",
    show_default=True,
    help="Free space the store's disk keeps: below it, ingest answers 503 (retry later) "
    "until space is freed. 0 turns the floor off.",
)
@click.option(
    "--audit-log",
    "audit_log",
    default=None,
    help="Folder of the local audit log every decision is written to before its answer "
    "(default: audit-log/ in the embedded data folder, ./agentgov-audit-log with a server; "
    "'off': records wait in memory only and a crash loses them, for measurements).",
)
@click.option(
    "--audit-log-size",
    default="64MiB",
    show_default=True,
    help="Space reserved for the local audit log: decisions fail closed (audit_log_full) "
    "once that much waits to be written to ClickHouse.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="How much the collector logs (start-up summary at info).",
)
def collector(
    store: str | None,
    host: str,
    http_port: int,
    grpc_port: int,
    risk_rules: str | None,
    policy_path: str | None,
    api_keys: str | None,
    signing_keys: str | None,
    alert_rules: tuple[str, ...],
    max_request_bytes: int,
    max_attributes: int,
    min_free_space: str,
    audit_log: str | None,
    audit_log_size: str,
    log_level: str,
) -> None:
    """Run the collector: OTLP receivers, ClickHouse storage, governor, alerts and the API."""
    from agentgov.collector.alerts.rules import AlertRulesError
    from agentgov.collector.governor.policy import PolicyError
    from agentgov.collector.risk import RiskRulesError
    from agentgov.collector.service import Collector, CollectorConfig
    from agentgov.collector.startup import StartupError, check_data_folder, check_port, summary
    from agentgov.collector.store.connection import StoreError
    from agentgov.collector.store.space import parse_size

    try:
        min_free_bytes, audit_log_bytes = parse_size(min_free_space), parse_size(audit_log_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = CollectorConfig(
        store=store,
        host=host,
        http_port=http_port,
        grpc_port=None if grpc_port < 0 else grpc_port,
        risk_rules=risk_rules,
        policy=policy_path,
        api_keys=api_keys,
        signing_keys=signing_keys,
        alert_rules=alert_rules,
        limits=Limits(max_request_bytes=max_request_bytes, max_attributes=max_attributes),
        log_level=log_level,
        min_free_bytes=min_free_bytes,
        audit_log=audit_log,
        audit_log_bytes=audit_log_bytes,
    )
    try:
        # the usual ways a start fails, as one line with the fix, before anything opens
        check_data_folder(config.store_config.data_path)
        check_port(host, http_port, "OTLP/HTTP and the API", "--http-port")
        if grpc_port >= 0:
            check_port(host, grpc_port, "OTLP/gRPC", "--grpc-port (-1 turns gRPC off)")
        service = Collector(config)
        click.echo(
            summary(
                service,
                f"{host}:{http_port}",
                f"{host}:{grpc_port}" if grpc_port >= 0 else None,
            ),
            err=True,
        )
        service.run()
    except (
        RiskRulesError,
        PolicyError,
        AlertRulesError,
        StoreError,
        StartupError,
        OSError,
        ValueError,
    ) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@url_option
@json_option
@click.option("--limit", default=20, show_default=True, help="How many sessions to list.")
@click.option(
    "--order",
    type=click.Choice(["recent", "risk"]),
    default="recent",
    show_default=True,
    help="Most recent first, or riskiest first.",
)
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


@main.command(context_settings={"ignore_unknown_options": False})
@url_option
@json_option
@click.option(
    "--agent",
    "agent_id",
    default=None,
    help="Only what this agent did, was decided on, sent or received.",
)
@click.option(
    "--only",
    "sections",
    multiple=True,
    type=click.Choice(["commands", "decisions", "messages"]),
    help="Only these parts of the audit (repeatable; default: all three).",
)
@click.argument("args", nargs=-1, required=True, metavar="[verify] SESSION")
def audit(
    url: str | None,
    as_json: bool,
    agent_id: str | None,
    sections: tuple[str, ...],
    args: tuple[str, ...],
) -> None:
    """A session's whole audit: every command that ran or was refused (with its agent,
    parent, risk and the governor's decision), every governor decision (outcome, reason,
    owner, chain) and every inter-agent message (digest, injection score).

    'audit verify SESSION' checks the hash chain of the governor's decision records.
    """
    if len(args) == 2 and args[0] == "verify":
        session_id = args[1]

        def verify() -> None:
            result = _client(url).verify(session_id)
            if as_json:
                click.echo(json.dumps(result, indent=2))
            elif result["ok"]:
                waiting = result.get("not_yet_drained") or 0
                click.echo(
                    f"ok: {result['records']} decision records of {session_id}, chain intact"
                    + (
                        f" ({waiting} still in the collector's local audit log, not yet "
                        "drained into ClickHouse)"
                        if waiting
                        else ""
                    )
                )
            else:
                raise click.ClickException(
                    f"chain broken at record {result['seq']} of {result['records']}: "
                    f"{result['problem']}"
                )

        _run(verify)
        return
    if len(args) != 1:
        raise click.UsageError("use 'agentgov audit SESSION' or 'agentgov audit verify SESSION'")
    session_id = args[0]

    def go() -> None:
        client = _client(url)
        found = 0

        def read(fetch: Any) -> list[dict[str, Any]] | None:
            nonlocal found
            try:
                rows: list[dict[str, Any]] = fetch(session_id)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                return None  # this part knows nothing of the session; others may
            found += 1
            return rows

        commands = read(client.audit)
        decisions = read(client.decisions)
        messages = read(client.messages)
        if not found:
            raise ApiError(f"404: unknown session {session_id!r}: see GET /api/v1/sessions", 404)
        commands, messages = commands or [], messages or []
        if agent_id:
            commands = [c for c in commands if agent_id in (c["agent_id"], c["parent_id"])]
            messages = [m for m in messages if agent_id in (m["from_agent"], m["to_agent"])]
            if decisions is not None:
                decisions = [
                    d
                    for d in decisions
                    if agent_id in (d["from_agent"], d["to_agent"])
                    or agent_id in ((d.get("detail") or {}).get("chain") or ())
                ]
        parts = sections or ("commands", "decisions", "messages")
        if as_json:
            whole = {"commands": commands, "decisions": decisions or [], "messages": messages}
            click.echo(
                json.dumps(
                    {"session_id": session_id, **{k: v for k, v in whole.items() if k in parts}},
                    indent=2,
                )
            )
            return
        click.echo(render.full_audit(session_id, commands, decisions, messages, parts))

    _run(go)


#: ``agentgov kill`` exit code when the session was killed but no agent was seen stopping
EXIT_NOTHING_STOPPED = 3


@main.command()
@url_option
@json_option
@click.argument("session_id")
@click.option("--reason", required=True, help="Why the session is stopped (recorded).")
@click.option(
    "--wait",
    "wait_s",
    default=0.0,
    type=click.FloatRange(0, 60),
    help="Wait up to this many seconds for the running agents to acknowledge the stop.",
)
@click.option(
    "--unseen",
    is_flag=True,
    help="Kill an id no agent has used yet (pre-kill): its agents are refused at start.",
)
def kill(
    url: str | None, as_json: bool, session_id: str, reason: str, wait_s: float, unseen: bool
) -> None:
    """Stop every agent of a session, in every process, including agents not yet started.

    Lists the session's agents and which acknowledged the stop. Exit codes: 0 when agents
    were running and (with --wait) all of them acknowledged; 1 on an error (an unknown
    session without --unseen, say); 3 when the kill is in force but no running agent was
    seen stopping (none was running, or --wait ran out first).
    """

    def go() -> None:
        result = _client(url).kill(session_id, reason, wait_s=wait_s, unseen=unseen)
        if as_json:
            click.echo(json.dumps(result, indent=2))
        else:
            click.echo(render.kill_report(result))
        running, acked = result["running_at_kill"], result["acknowledged"]
        if running == 0 or (wait_s > 0 and acked < running):
            sys.exit(EXIT_NOTHING_STOPPED)

    _run(go)


@main.command()
@url_option
@json_option
@click.option(
    "--status",
    type=click.Choice(["pending", "approved", "denied", "expired", "cancelled", "revoked"]),
    default="pending",
    show_default=True,
    help="Which approvals to list.",
)
def approvals(url: str | None, as_json: bool, status: str) -> None:
    """Approval requests waiting for (or decided by) a reviewer."""

    def go() -> None:
        rows = _client(url).approvals(status)
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        click.echo(render.approvals_table(rows, time.time(), status))
        if rows and status == "pending":
            click.echo(
                "\napprove: uv run agentgov approve APPROVAL   deny: uv run agentgov approve "
                "APPROVAL --deny"
            )

    _run(go)


@main.command()
@url_option
@click.argument("approval_id")
@click.option("--deny", is_flag=True, help="Deny instead of approving.")
@click.option("--approver", default="", help="Your name (taken from the API key when keys are on).")
@click.option("--comment", default="", help="Why (recorded with the decision).")
@click.option(
    "--ttl",
    "ttl_s",
    type=Duration(),
    default=None,
    help="How long a session plan's approval holds (e.g. 2h); plan approvals need one.",
)
def approve(
    url: str | None,
    approval_id: str,
    deny: bool,
    approver: str,
    comment: str,
    ttl_s: float | None,
) -> None:
    """Approve (or --deny) a pending request; a session plan for --ttl."""

    def go() -> None:
        result = _client(url).decide(
            approval_id, not deny, approver, comment, None if deny else ttl_s
        )
        click.echo(f"{approval_id}: {result['status']}")

    _run(go)


@main.group()
def keys() -> None:
    """Keys the collector needs."""


@keys.command("generate")
def keys_generate() -> None:
    """Print a new lineage signing key (PASERK k4.secret) for AGENTGOV_SIGNING_KEYS.

    Rotation: put the new key first (AGENTGOV_SIGNING_KEYS=new,old), restart, and drop
    the old one after one token lifetime (the policy's lineage_ttl_s).
    """
    from agentgov.collector.governor.tokens import generate_key

    click.echo(generate_key())


@main.group()
def policy() -> None:
    """The multi-agent policy."""


@policy.command("lint")
@click.argument("path", type=click.Path(dir_okay=False))
def policy_lint(path: str) -> None:
    """Check a policy file; errors name the file, the field and the fix."""
    from agentgov.collector.governor.policy import PolicyError, load_policy

    try:
        loaded = load_policy(path)
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from exc
    ma = loaded.multi_agent
    click.echo(
        f"{path}: ok (mode {ma.mode}, {len(ma.roles)} owner roles, "
        f"{len(ma.permissions)} permission roles)"
    )


@main.group()
def alerts() -> None:
    """Alert rules: check them, try them on a stored session, read what fired."""


@alerts.command("lint")
@click.argument("paths", nargs=-1, type=click.Path())
def alerts_lint(paths: tuple[str, ...]) -> None:
    """Check rule files or folders (default: the shipped alerts/); errors name file, rule
    and field."""
    from agentgov.collector.alerts.rules import AlertRulesError, default_rules_path, load_rules

    targets = list(paths) or [str(default_rules_path())]
    try:
        ruleset = load_rules(targets)
    except AlertRulesError as exc:
        found = str(exc).splitlines()
        # every problem of every file at once, one a line, each with file and line
        raise click.ClickException(
            f"{len(found)} "
            + ("problem" if len(found) == 1 else "problems")
            + " in the rules:\n"
            + "\n".join(f"  {line}" for line in found)
        ) from exc
    for rule in ruleset.rules:
        click.echo(
            f"{ruleset.files[rule.name]}: {rule.name}: source {rule.source}, {rule.severity}, "
            f"actions {', '.join(rule.actions)}" + ("" if rule.enabled else " (disabled)")
        )
    click.echo(f"ok: {len(ruleset.rules)} rules")


@alerts.command("test")
@url_option
@json_option
@click.argument("session_id")
def alerts_test(url: str | None, as_json: bool, session_id: str) -> None:
    """Show which rules would fire on a stored session; acts on nothing."""

    def go() -> None:
        result = _client(url).alerts_test(session_id)
        if as_json:
            click.echo(json.dumps(result, indent=2))
            return
        click.echo(
            f"{session_id}: {result['facts']} spans and messages, {result['decisions']} decisions"
        )
        if not result["would_fire"]:
            click.echo("no rule would fire")
        for f in result["would_fire"]:
            click.echo(
                f"  {f['rule']} ({f['severity']}; {', '.join(f['actions'])}): {f['message']}"
            )

    _run(go)


@alerts.command("list")
@url_option
@json_option
@click.option("--session", "session_id", default=None, help="Only this session's events.")
@click.option("--rule", default=None, help="Only this rule's events.")
@click.option("--event", default=None, help="fired, throttled, stopped, slack_sent, ...")
@click.option("--limit", default=50, show_default=True, type=int, help="Most events to list.")
def alerts_list(
    url: str | None,
    as_json: bool,
    session_id: str | None,
    rule: str | None,
    event: str | None,
    limit: int,
) -> None:
    """Recent alert events: firings, throttles, stops and Slack deliveries."""

    def go() -> None:
        rows = _client(url).alerts(session_id, rule, event, limit)
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        if not rows:
            click.echo("no alert events")
            return
        click.echo(f"{'TIME':<29} {'EVENT':<18} {'RULE':<28} {'SESSION':<40} MESSAGE")
        for a in rows:
            click.echo(
                f"{render.iso_time(a['time']):<29} {a['event']:<18} {a['rule']:<28} "
                f"{a['session_id']:<40} {a['message'] or a['status']}"
            )

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
@click.option(
    "--framework",
    type=click.Choice(["openai-agents"]),
    default=None,
    help="Tell the story with real framework agents (a scripted model, no network) instead "
    "of agents written with the SDK.",
)
def demo(store: str | None, http_port: int, framework: str | None) -> None:
    """Run the 'clean up old deployments' scenario on an embedded collector."""
    from agentgov.collector.demo.scenario import main as run_demo
    from agentgov.collector.startup import StartupError, check_data_folder
    from agentgov.collector.store.connection import StoreConfig, default_dsn

    try:
        check_data_folder(StoreConfig(store or default_dsn()).data_path, "the demo")
    except StartupError as exc:
        raise click.ClickException(str(exc)) from exc

    run_demo(store, http_port, framework)


main.add_command(dashboards)
main.add_command(plan)
policy.add_command(policy_simulate)

if __name__ == "__main__":
    sys.exit(main())
