"""The README stays true to the CLI: every ``uv run agentgov ...`` it shows names commands
and options that exist, each with help text, and nothing is shown as a bare ``agentgov``
(which is not on PATH after ``uv run``).

Each command is resolved through click's own parser and its ``--help`` is invoked through
``CliRunner``, so a renamed command or option fails here instead of in a reader's terminal;
those that need nothing but the repository (the lints) are also run and must succeed.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from agentgov.collector.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: shell operators that separate commands on one line
_SEPARATORS = {";", "&&", "||", "|", "&"}


def _shell_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:sh|bash|shell|console)\n(.*?)```", text, flags=re.S)


def _commands(block: str) -> list[list[str]]:
    """Each command of a shell block as tokens (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", block)
    out: list[list[str]] = []
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in _SEPARATORS:
                if current:
                    out.append(current)
                current = []
            else:
                current.append(token)
        if current:
            out.append(current)
    return out


def _agentgov_args(tokens: list[str]) -> list[str] | None:
    """The arguments after ``uv run agentgov`` (env assignments and ``python3 -m`` before
    it allowed); None when the command is not an agentgov one."""
    for i in range(len(tokens) - 2):
        if tokens[i : i + 3] == ["uv", "run", "agentgov"]:
            return tokens[i + 3 :]
    return None


def _readme_invocations() -> list[list[str]]:
    text = README.read_text("utf-8")
    found = [
        args
        for block in _shell_blocks(text)
        for tokens in _commands(block)
        if (args := _agentgov_args(tokens)) is not None
    ]
    # commands quoted in the prose: `uv run agentgov sessions`
    for quoted in re.findall(r"`(uv run agentgov [a-z][^`]*)`", text):
        args = _agentgov_args(shlex.split(quoted))
        if args is not None:
            found.append(args)
    return found


def _resolve(args: list[str]) -> tuple[list[str], click.Command, list[str]]:
    """(command path, command, remaining arguments) of an agentgov invocation."""
    command: click.Command = main
    path: list[str] = []
    rest = list(args)
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.commands.get(rest[0])
        if sub is None:
            raise AssertionError(
                f"README: 'agentgov {' '.join(args)}': no command {rest[0]!r} under "
                f"'agentgov {' '.join(path)}' (known: {', '.join(sorted(command.commands))})"
            )
        path.append(rest.pop(0))
        command = sub
    return path, command, rest


def test_the_readme_shows_agentgov_commands() -> None:
    invocations = _readme_invocations()
    # the demo, the collector, the governor's and the alerts' commands at least
    assert len(invocations) >= 10, invocations
    assert ["demo"] in invocations


def test_no_command_in_the_readme_is_a_bare_agentgov() -> None:
    text = README.read_text("utf-8")
    bare = [
        " ".join(tokens)
        for block in _shell_blocks(text)
        for tokens in _commands(block)
        if "agentgov" in tokens and _agentgov_args(tokens) is None
    ]
    assert not bare, f"README commands that do not start with 'uv run agentgov': {bare}"
    prose = re.findall(r"`agentgov [a-z][^`]*`", text)
    assert not prose, f"README prose shows bare agentgov commands: {prose}"


@pytest.mark.parametrize("args", _readme_invocations(), ids=lambda a: " ".join(a)[:60])
def test_each_readme_command_exists_with_its_options(args: list[str]) -> None:
    path, command, rest = _resolve(args)
    assert not isinstance(command, click.Group) or not rest, args
    options = {
        name: param
        for param in command.params
        if isinstance(param, click.Option)
        for name in (*param.opts, *param.secondary_opts)
    }
    for token in rest:
        if token.startswith("--") and token != "--help":
            name = token.split("=", 1)[0]
            assert name in options, (
                f"README: 'agentgov {' '.join(args)}': {' '.join(path)} has no option {name} "
                f"(it has {', '.join(sorted(options))})"
            )
            # the README sends readers to --help: what it shows must say something
            assert options[name].help, f"{' '.join(path)} {name} has no help text"
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output


#: README commands that need nothing but this repository: they are run, not only parsed
#: (the demo runs in test_demo.py; the others need a collector, keys or a Grafana)
RUNNABLE_HERE = (("policy", "lint"), ("alerts", "lint"))


def test_the_readme_commands_that_can_run_here_run_and_succeed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runnable = [a for a in _readme_invocations() if tuple(a[:2]) in RUNNABLE_HERE]
    assert {tuple(a[:2]) for a in runnable} == set(RUNNABLE_HERE), runnable
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository
    for args in runnable:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, (args, result.output)
        assert result.output.strip(), args  # it says what it found


def test_every_option_of_every_command_has_help_text() -> None:
    missing: list[str] = []

    def walk(command: click.Command, path: list[str]) -> None:
        for param in command.params:
            if isinstance(param, click.Option) and not param.help and param.name != "help":
                missing.append(f"agentgov {' '.join(path)} {param.opts[0]}")
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])

    walk(main, [])
    assert not missing, f"options without help text: {missing}"


def test_the_readme_two_commands_are_the_ones_that_run_here() -> None:
    text = README.read_text("utf-8")
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert "uv run agentgov demo" in section
    assert "uv run pytest" in section


def test_the_cli_says_its_version() -> None:
    from importlib.metadata import version

    out = CliRunner().invoke(main, ["--version"])
    assert (
        out.exit_code == 0
        and out.output.strip() == f"agentgov, version {version('agentgov-collector')}"
    )


def test_the_governor_docs_list_every_stop_reason() -> None:
    """Every reason the governor or the SDK can stop a step with is in docs/governor.md."""
    sources = [
        ROOT / "collector/src/agentgov/collector/governor/engine.py",
        ROOT / "collector/src/agentgov/collector/governor/audit_log.py",
        ROOT / "collector/src/agentgov/collector/governor/tokens.py",
        ROOT / "instrumentation/src/agentgov/instrumentation/governor.py",
    ]
    patterns = [
        r'_Verdict\(\s*STOP,\s*"([a-z_]+)"',
        r'return STOP, "([a-z_]+)"',
        r'_Refused\(\s*"([a-z_]+)"',
        r'(?:Stopped|GovernorUnavailable|AuditUnavailable)\(\s*"([a-z_]+)"',
        r'LineageInvalid\([^)]*"(lineage_[a-z_]+)"',
        r'raise AuditUnavailable\(\s*"([a-z_]+)"',
    ]
    reasons = {
        reason
        for path in sources
        for pattern in patterns
        for reason in re.findall(pattern, path.read_text("utf-8"), flags=re.S)
    }
    reasons |= {"awaiting_approval", "session_killed", "governor_error"}  # named by classes
    assert {"approval_timeout", "governor_unreachable", "tool_not_allowed"} <= reasons
    docs = (ROOT / "docs" / "governor.md").read_text("utf-8")
    missing = sorted(r for r in reasons if f"`{r}`" not in docs)
    assert not missing, f"stop reasons docs/governor.md does not explain: {missing}"
