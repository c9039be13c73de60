"""The command line of session plans and policy simulation: ``agentgov plan ...`` and
``agentgov policy simulate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import re2
import yaml

from agentgov.collector import render
from agentgov.collector.client import ApiError, CollectorClient

_DURATION = re2.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}
#: the longest look back a simulation takes (the audit records of 30 days are replayed)
MAX_SINCE_S = 30 * 86_400


class Duration(click.ParamType):
    """``90s``, ``30m``, ``24h``, ``7d`` (or plain seconds), as seconds."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, (int, float)):
            seconds = float(value)
        else:
            m = _DURATION.fullmatch(str(value).strip().lower())
            if m is None:
                self.fail(
                    f"{value!r} is not a duration: write e.g. 90s, 30m, 24h or 7d", param, ctx
                )
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
        if not 0 < seconds <= MAX_SINCE_S:
            self.fail(f"{value!r}: give more than 0 and at most 30 days", param, ctx)
        return seconds


def _run(fn: Any) -> None:
    try:
        fn()
    except ApiError as exc:
        raise click.ClickException(str(exc)) from exc


def _read_plan(path: str) -> dict[str, Any]:
    """A plan file's content (YAML or JSON), or a usage error naming the file."""
    from agentgov.collector.governor.plan import PlanError, parse_plan_text

    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read the plan: {exc.strerror}") from exc
    try:
        parse_plan_text(text, path)  # the server checks again; say what is wrong here first
    except PlanError as exc:
        raise click.ClickException(str(exc)) from exc
    data = yaml.safe_load(text)
    return dict(data)


url_option = click.option(
    "--url",
    envvar="AGENTGOV_URL",
    default=None,
    help="Collector URL (default http://127.0.0.1:4318).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


@click.group()
def plan() -> None:
    """Session plans: check one, see a session's blast radius, approval and drift."""


@plan.command("lint")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Also check the plan against this policy's limits.",
)
@click.option(
    "--risk-rules",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Score the blast radius with these risk rules (default: the built-in rules).",
)
@json_option
def plan_lint(path: str, policy_path: str | None, risk_rules: str | None, as_json: bool) -> None:
    """Check a plan file without a collector; errors name the field and the fix. Prints
    its blast radius."""
    from agentgov.collector.governor.blast import blast_radius, needs_approval
    from agentgov.collector.governor.plan import PlanError, check_plan, parse_plan_text
    from agentgov.collector.governor.policy import Policy, PolicyError, load_policy
    from agentgov.collector.risk import RiskRules, RiskRulesError

    try:
        loaded = parse_plan_text(Path(path).read_text("utf-8"), path)
        policy = load_policy(policy_path).multi_agent if policy_path else Policy().multi_agent
        check_plan(loaded, policy, path)
        rules = RiskRules.load(risk_rules) if risk_rules else RiskRules.default()
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read the plan: {exc.strerror}") from exc
    except (PlanError, PolicyError, RiskRulesError) as exc:
        raise click.ClickException(str(exc)) from exc
    radius = blast_radius(loaded, rules, policy).as_json()
    reasons = needs_approval(radius, policy.session_approval)
    if as_json:
        click.echo(json.dumps({"blast_radius": radius, "needs_approval": reasons}, indent=2))
        return
    click.echo(f"{path}: ok ({len(loaded.agents)} roles)")
    click.echo(render.blast_radius(radius))
    if policy_path:
        click.echo("needs a reviewer: " + ("; ".join(reasons) if reasons else "no"))


@plan.command("check")
@url_option
@json_option
@click.argument("path", type=click.Path(dir_okay=False))
def plan_check(url: str | None, as_json: bool, path: str) -> None:
    """Check a plan file against the running collector's policy and risk rules: its blast
    radius and whether a reviewer would be asked. Declares nothing."""
    data = _read_plan(path)

    def go() -> None:
        result = CollectorClient(url).check_plan(data)
        if as_json:
            click.echo(json.dumps(result, indent=2))
            return
        click.echo(render.blast_radius(result["blast_radius"]))
        reasons = result["needs_approval"]
        click.echo("needs a reviewer: " + ("; ".join(reasons) if reasons else "no"))

    _run(go)


@plan.command("show")
@url_option
@json_option
@click.argument("session_id")
def plan_show(url: str | None, as_json: bool, session_id: str) -> None:
    """A session's plan: status, approval, blast radius and drift."""

    def go() -> None:
        view = CollectorClient(url).plan(session_id)
        click.echo(json.dumps(view, indent=2) if as_json else render.plan_view(view))

    _run(go)


@click.command("simulate")
@url_option
@json_option
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--session", "session_id", default=None, help="Replay this session only.")
@click.option(
    "--since",
    "since_s",
    type=Duration(),
    default=None,
    help="Replay the sessions active within this time (e.g. 24h, the default; at most 30d).",
)
@click.option(
    "--limit",
    default=10_000,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="The most sessions to replay (the most recently active first).",
)
def policy_simulate(
    url: str | None,
    as_json: bool,
    path: str,
    session_id: str | None,
    since_s: float | None,
    limit: int,
) -> None:
    """Replay stored sessions' decisions under the policy in PATH and report what would
    change: new stops and approvals by reason, per session. Changes nothing."""
    from agentgov.collector.governor.policy import PolicyError, load_policy

    if session_id and since_s is not None:
        raise click.UsageError("give --session or --since, not both")
    try:
        load_policy(path)  # errors name the file and the field before anything is sent
        text = Path(path).read_text("utf-8")
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from exc

    def go() -> None:
        client = CollectorClient(url, timeout=600)
        report = client.simulate(text, session_id, since_s, limit)
        click.echo(json.dumps(report, indent=2) if as_json else render.simulation(report))

    _run(go)
