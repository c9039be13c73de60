"""Risk rules: scores, rule files and their errors, and session risk."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentgov.collector.risk import RiskRules, RiskRulesError, combine_session_risk

DEFAULT = RiskRules.default()


@pytest.mark.parametrize(
    ("command", "resources", "score", "rules"),
    [
        ("rm -rf /opt/app/data", [], 80, ("destructive_command", "write_scope")),
        ("ｒｍ -ｒｆ /opt/app/data", [], 80, ("destructive_command", "write_scope")),  # fullwidth
        ("rm\u00a0-rf /opt/app/data", [], 80, ("destructive_command", "write_scope")),  # nbsp
        (
            "DROP TABLE deployments",
            ["db:prod/deployments"],
            100,
            ("destructive_command", "write_scope", "production_target"),
        ),
        ("git push --force origin main", [], 60, ("destructive_command",)),
        ("curl https://example.org/x.sh", [], 15, ("network_egress",)),
        ("sudo systemctl restart app", [], 30, ("privilege_escalation",)),
        ("ls -la /opt/app", [], 0, ()),
        ("SELECT count() FROM deployments", ["db:staging/deployments"], 0, ()),
    ],
)
def test_default_rules_score_commands(
    command: str, resources: list[str], score: int, rules: tuple[str, ...]
) -> None:
    got = DEFAULT.assess(command, resources)
    assert (got.score, got.rules) == (score, rules)


def test_session_risk_is_a_noisy_or_of_command_risks() -> None:
    assert combine_session_risk([]) == 0
    assert combine_session_risk([80]) == 80
    assert combine_session_risk([50, 50]) == 75
    assert combine_session_risk([100]) == 100  # capped at 99.5 per command, rounds to 100
    assert combine_session_risk([20] * 10) == 89  # many small risks add up


def test_custom_rules_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "rules:\n"
        "  - name: payments\n    score: 40\n    command: '(?i)payments\\.internal'\n"
        "  - name: billing_db\n    score: 70\n    resources: '^db:billing/'\n"
    )
    rules = RiskRules.load(path)
    assert rules.assess("curl payments.internal/refund").score == 40
    assert rules.assess("SELECT 1", ["db:billing/invoices"]).rules == ("billing_db",)
    assert rules.digest != DEFAULT.digest


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("rules: [", "not valid YAML"),
        ("rules:\n  - name: x\n    score: 10\n", "needs a 'command' or a 'resources' pattern"),
        ("rules:\n  - name: x\n    score: 101\n    command: a\n", "rules.0.score"),
        ("rules:\n  - name: Bad Name\n    score: 1\n    command: a\n", "rules.0.name"),
        ("rules:\n  - name: x\n    score: 1\n    command: '(?=a)'\n", "look-arounds"),
        ("rules:\n  - name: x\n    score: 1\n    command: '(a'\n", "rules.0.command"),
        ("rules:\n  - name: x\n    score: 1\n    command: a\n    colour: red\n", "colour"),
        ("nothing: here\n", "rules"),
    ],
)
def test_broken_rule_files_name_the_file_and_field(
    tmp_path: Path, text: str, fragment: str
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(RiskRulesError) as info:
        RiskRules.load(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_missing_rule_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RiskRulesError, match="cannot read risk rules"):
        RiskRules.load(tmp_path / "absent.yaml")


def test_collector_refuses_a_broken_rules_file_at_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "broken.yaml"
    path.write_text("rules:\n  - name: x\n    score: 500\n    command: a\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentgov.collector.cli",
            "collector",
            "--risk-rules",
            str(path),
            "--store",
            f"chdb://{tmp_path / 'data'}",
            "--http-port",
            "0",
            "--grpc-port",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert f"Error: {path}: invalid risk rules: rules.0.score" in proc.stderr
