"""Alert rules: YAML files validated with errors that name the file, the rule and the field.

A rule watches one ``source``:

- ``session``: a session's live aggregates (risk, depth, handoffs, budget burn, fan-out,
  pending approvals...), evaluated each time a span or decision of the session arrives;
- ``span``: each arriving tool call, agent or inter-agent message on its own;
- ``decision``: each governor decision as it is made;
- ``sql``: a query over the ClickHouse tables, run every ``interval_s``, one alert per
  returned ``session_id``.

Its ``when`` conditions must all hold. Actions are ``stop`` (an ordinary kill with the
rule as actor), ``slack`` and ``approval_required`` (one session-level approval instead of
many per-command prompts). One incident is one alert: a rule fires at most once per
session within ``throttle_s``.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import re2
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agentgov.collector.risk import compile_re2
from agentgov.collector.store import schema
from agentgov.collector.validation import did_you_mean, error_lines, problems, yaml_line

Source = Literal["session", "span", "decision", "sql"]
Op = Literal[
    ">", ">=", "<", "<=", "==", "!=", "in", "not_in", "contains", "contains_any", "matches"
]
Action = Literal["stop", "slack", "approval_required"]

NUM, TEXT, FLAG, LIST = "number", "text", "bool", "list"

#: the fields each source offers to conditions and message templates, with their types
FIELDS: dict[str, dict[str, str]] = {
    "session": {
        "session_id": TEXT,
        "intent": TEXT,
        "risk": NUM,
        "max_command_risk": NUM,
        "agents": NUM,
        "depth": NUM,
        "handoffs": NUM,
        "usd": NUM,
        "tool_calls": NUM,
        "usd_pct": NUM,
        "tool_calls_pct": NUM,
        "budget_pct": NUM,
        "depth_pct": NUM,
        "handoffs_pct": NUM,
        "max_depth": NUM,
        "max_handoffs": NUM,
        "fanout": NUM,
        "fanout_agent": TEXT,
        "pending_approvals": NUM,
        "injections": NUM,
        "agent_id": TEXT,
        "chain": LIST,
    },
    "span": {
        "session_id": TEXT,
        "intent": TEXT,
        "kind": TEXT,
        "agent_id": TEXT,
        "agent_name": TEXT,
        "parent_id": TEXT,
        "chain": LIST,
        "depth": NUM,
        "role": TEXT,
        "task": TEXT,
        "tool": TEXT,
        "command": TEXT,
        "resources": LIST,
        "permissions": LIST,
        "risk": NUM,
        "risk_rules": LIST,
        "destructive": FLAG,
        "write_granted": FLAG,
        "usd": NUM,
        "message_to": TEXT,
        "injection": NUM,
        "injection_signals": LIST,
        "status": TEXT,
        "verified": FLAG,
    },
    "decision": {
        "session_id": TEXT,
        "phase": TEXT,
        "outcome": TEXT,
        "reason": TEXT,
        "owner": TEXT,
        "from_agent": TEXT,
        "to_agent": TEXT,
        "agent_id": TEXT,
        "task": TEXT,
        "depth": NUM,
        "actor": TEXT,
        "mode": TEXT,
        "tool": TEXT,
        "command": TEXT,
        "risk": NUM,
        "chain": LIST,
        #: what the step touched that the session's plan did not name ("tool: kubectl")
        "drift": LIST,
    },
}

#: available to every template: what the engine adds when a rule fires
COMMON_TEMPLATE_FIELDS = {"rule", "severity", "session_id", "window_s"}

_OPS_FOR: dict[str, set[str]] = {
    NUM: {">", ">=", "<", "<=", "==", "!=", "in", "not_in"},
    TEXT: {"==", "!=", "in", "not_in", "matches"},
    FLAG: {"==", "!="},
    LIST: {"contains", "contains_any"},
}


class Condition(BaseModel):
    """``field op value``; a field without a value (e.g. a limit the policy does not set)
    never matches."""

    model_config = ConfigDict(extra="forbid")

    field: str
    op: Op
    value: float | bool | str | list[float | str]

    @model_validator(mode="after")
    def _value_fits_op(self) -> Condition:
        many = self.op in ("in", "not_in", "contains_any")
        if many != isinstance(self.value, list):
            raise ValueError(
                f"op {self.op!r} takes " + ("a list value, e.g. [a, b]" if many else "one value")
            )
        if self.op == "matches":
            try:
                compile_re2(str(self.value))
            except re2.error as exc:
                raise ValueError(
                    f"value is not an RE2 regular expression ({exc}); RE2 has no "
                    "look-arounds or backreferences"
                ) from exc
        return self


class AlertRule(BaseModel):
    """One rule; see the module docstring and alerts/README.md."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str = ""
    source: Source
    when: list[Condition] = Field(default_factory=list)
    sql: str | None = None
    #: how often a ``sql`` rule runs
    interval_s: float = Field(default=2.0, ge=0.2, le=3600)
    #: the period windowed figures count over (``fanout``); SQL gets it as {window_s:UInt32}
    window_s: float = Field(default=60.0, gt=0, le=86400 * 30)
    severity: Literal["info", "warning", "critical"] = "warning"
    actions: list[Action] = Field(min_length=1)
    #: at most one alert per (rule, session) within this many seconds
    throttle_s: float = Field(default=3600.0, ge=0)
    message: str = Field(min_length=1)
    enabled: bool = True
    #: also act on evidence no lineage token vouches for. In a session the governor
    #: governs, span rules see only spans whose proof shows the named agent made them,
    #: and a sql rule's stop is withheld, unless this says otherwise
    unverified: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> AlertRule:
        found = consistency_problems(
            self.source, self.sql, [(c.field, c.op, c.value) for c in self.when], self.message
        )
        if found:
            raise ValueError("\n".join(found))  # every problem, one line each
        return self


#: the tables a ``sql`` rule may read: the store's and the governor's and the alerts' own
KNOWN_TABLES = frozenset(
    {
        schema.TRACES,
        schema.SPANS,
        schema.SESSIONS,
        schema.AGENTS,
        schema.EDGES,
        schema.SPANS_NATIVE,
        schema.SPANS_RESOLVED,
        schema.SESSIONS_NATIVE,
        schema.SESSIONS_RESOLVED,
        schema.AGENTS_NATIVE,
        schema.AGENTS_RESOLVED,
        "agentgov_decisions",
        "agentgov_alerts",
    }
)


def sql_table_problems(sql: str) -> list[str]:
    """Tables a rule's query reads that do not exist, found before it ever runs (a
    misspelled table would otherwise fail every interval, silently). Names defined in the
    query itself (``WITH x AS (...)``), table functions and ``system.*`` pass."""
    defined = {m.lower() for m in re.findall(r"\b([A-Za-z_]\w*)\s+AS\s*\(", sql, re.I)}
    found = []
    for name, call in re.findall(r"\b(?:FROM|JOIN)\s+([A-Za-z_][\w.]*)\s*(\(?)", sql, re.I):
        if call or name.lower() in defined or name.lower().startswith("system."):
            continue
        if name not in KNOWN_TABLES and name not in found:
            found.append(name)
    return [
        f"sql reads table {name!r}, which does not exist; "
        + (did_you_mean(name, sorted(KNOWN_TABLES)) or "")
        for name in found
    ]


def consistency_problems(
    source: str, sql: str | None, when: Sequence[tuple[Any, Any, Any]], message: str | None
) -> list[str]:
    """Every problem between a rule's fields (source, conditions, sql, message template),
    all at once: a file is fixed in one round, not one error at a time."""
    found: list[str] = []
    if source == "sql":
        if not sql or not re.match(r"^\s*(SELECT|WITH)\b", sql, re.I):
            found.append("a 'sql' rule needs 'sql': one SELECT returning session_id")
        else:
            found.extend(sql_table_problems(sql))
        if when:
            found.append("a 'sql' rule filters in its query: remove 'when'")
        return found
    if sql is not None:
        found.append(f"'sql' belongs to rules with source: sql, not source: {source}")
    if not when:
        found.append("add at least one condition under 'when'")
    fields = FIELDS.get(source, {})
    for i, (name, op, value) in enumerate(when):
        kind = fields.get(str(name))
        if kind is None:
            found.append(
                f"when[{i}].field {name!r} is not a field of source: {source}; "
                + (did_you_mean(str(name), sorted(fields)) or "")
            )
            continue
        if op is not None and op not in _OPS_FOR[kind]:
            found.append(
                f"when[{i}]: op {op!r} does not apply to {kind} field {name!r}; "
                f"use one of: {', '.join(sorted(_OPS_FOR[kind]))}"
            )
        if kind == NUM and not all(
            isinstance(v, (int, float)) and not isinstance(v, bool)
            for v in (value if isinstance(value, list) else [value])
        ):
            found.append(f"when[{i}]: {name!r} is a number; compare it to numbers")
        if kind == FLAG and not isinstance(value, bool):
            found.append(f"when[{i}]: {name!r} is true or false")
    if isinstance(message, str):
        try:
            names = template_fields(message)
        except ValueError as exc:
            found.append(str(exc))
            names = []
        for name in names:
            if name not in fields and name not in COMMON_TEMPLATE_FIELDS:
                found.append(
                    f"message names {{{name}}}, which is not a field of source: {source}; "
                    f"use one of: {', '.join(sorted(set(fields) | COMMON_TEMPLATE_FIELDS))}"
                )
    return found


def _raw_consistency(raw: Mapping[str, Any], failed: set[str]) -> list[str]:
    """:func:`consistency_problems` of a rule whose fields did not all validate (pydantic
    then skips the cross-field checks): the fields that did are checked now, so one lint
    round shows every problem of the rule."""
    source = raw.get("source")
    if "source" in failed or source not in FIELDS and source != "sql":
        return []
    when = raw.get("when") if "when" not in failed else None
    conds = [
        (c.get("field"), c.get("op"), c.get("value"))
        for c in (when if isinstance(when, list) else [])
        if isinstance(c, Mapping)
    ]
    sql = raw.get("sql") if isinstance(raw.get("sql"), str) else None
    message = raw.get("message") if "message" not in failed else None
    if "when" in failed and source != "sql":
        conds = [("session_id", "==", "")]  # its own errors are listed; no 'add one' too
    return consistency_problems(str(source), sql, conds, message)


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names a message template uses; attribute and index access refused
    (a template must not reach into objects)."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(
            f"message is not a valid template: {exc} (write braces as {{{{ }}}})"
        ) from exc
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"message field {{{name}}} must be a plain field name")
        names.append(name)
    return names


class _RuleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[dict[Any, Any]]


class AlertRulesError(ValueError):
    """A rule file is missing or invalid; the message names file, rule and field."""


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[AlertRule, ...]
    #: where each rule came from, by name
    files: Mapping[str, str]

    def by_source(self, source: str) -> list[AlertRule]:
        return [r for r in self.rules if r.source == source and r.enabled]


def parse_rules(text: str, source: str) -> list[AlertRule]:
    """The rules of one file's text; every problem of the file in one error."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise AlertRulesError(f"{source}: not valid YAML: {exc}") from exc
    if data is None:
        raise AlertRulesError(f"{source}: the file is empty; write 'rules: []' for no rules")
    try:
        doc = _RuleFile.model_validate(data)
    except ValidationError as exc:
        raise AlertRulesError(
            f"{source}: " + "; ".join(problems(exc)) + " (a rule file is 'rules: [...]')"
        ) from exc
    out: list[AlertRule] = []
    errors: list[str] = []
    for i, raw in enumerate(doc.rules):
        label = f"rule {raw.get('name')!r}" if isinstance(raw.get("name"), str) else f"rules[{i}]"
        odd = [k for k in raw if not isinstance(k, str)]
        if odd:
            # YAML 1.1 reads on/off/yes/no keys as booleans: `on: session` is {True: ...}
            errors.append(
                f"{source}: {label}: key {odd[0]!r} is not a field name (YAML reads on, off, "
                "yes and no as true/false); the field is 'source', e.g. source: session"
            )
            continue
        try:
            out.append(AlertRule.model_validate(raw))
        except ValidationError as exc:
            where = f"{source}:{line}" if (line := yaml_line(text, ("rules", i))) else source
            for err in exc.errors():
                # each error at its own line of the file (the rule's, for a whole-rule one)
                at = yaml_line(text, ("rules", i, *err["loc"])) or line
                errors.extend(
                    error_lines(
                        [err],
                        prefix=f"{source}:{at}: {label}: " if at else f"{source}: {label}: ",
                        field_word="field ",
                        model=AlertRule,
                    )
                )
            if all(e["loc"] for e in exc.errors()):  # the cross-field checks did not run
                failed = {str(e["loc"][0]) for e in exc.errors()}
                errors.extend(f"{where}: {label}: {p}" for p in _raw_consistency(raw, failed))
    if errors:
        raise AlertRulesError("\n".join(errors))
    return out


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return [path]


def load_rules(paths: Sequence[str | os.PathLike[str]]) -> RuleSet:
    """Rules from files and folders (every ``*.yaml`` in a folder); names must be unique."""
    rules: list[AlertRule] = []
    files: dict[str, str] = {}
    errors: list[str] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            errors.append(f"{path}: no such file or folder; give a rule file or a folder of them")
            continue
        for file in _files(path):
            try:
                text = file.read_text("utf-8")
                parsed = parse_rules(text, str(file))
            except OSError as exc:
                errors.append(f"{file}: cannot read: {exc.strerror}")
                continue
            except AlertRulesError as exc:
                errors.append(str(exc))
                continue
            for rule in parsed:
                if rule.name in files:
                    errors.append(
                        f"{file}: rule {rule.name!r} is also defined in {files[rule.name]}; "
                        "give each rule its own name"
                    )
                    continue
                files[rule.name] = str(file)
                rules.append(rule)
    if errors:
        raise AlertRulesError("\n".join(errors))
    return RuleSet(tuple(rules), files)


def default_rules_path() -> Path:
    """The shipped rules: ``AGENTGOV_ALERT_RULES``, else the ``alerts/`` folder of the
    checkout this package runs from (editable installs and the container image)."""
    env = os.environ.get("AGENTGOV_ALERT_RULES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[5] / "alerts"


class RuleSource:
    """Rule files re-read when they change; a broken edit keeps the last good rules."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        self.paths = [Path(p) for p in paths]
        self.ruleset = load_rules(self.paths) if self.paths else RuleSet((), {})
        self._stamp = self._stamps()
        self.last_error: str | None = None

    def _stamps(self) -> tuple[tuple[str, float, int], ...]:
        out = []
        for path in self.paths:
            try:
                files = _files(path) if path.exists() else []
                for file in files:
                    st = file.stat()
                    out.append((str(file), st.st_mtime, st.st_size))
            except OSError:
                out.append((str(path), -1.0, -1))
        return tuple(out)

    def reload_if_changed(self) -> bool:
        """True if new rules are now in force."""
        stamp = self._stamps()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.ruleset = load_rules(self.paths)
        except AlertRulesError as exc:
            self.last_error = str(exc)
            return False
        self.last_error = None
        return True
