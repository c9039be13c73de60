"""Risk scoring of tool and command calls, from documented, configurable rules.

One rule set is evaluated in two places: in Python (the governor scores a command before
it runs) and, compiled to SQL, inside ClickHouse (the materialized view scores every
stored span, whichever route it arrived by). Both run the same engine, RE2, with the same
options (``.`` matches a newline, as in ClickHouse): matching takes time linear in the
command's length whatever the pattern, so no crafted command can stall a decision, and
the two scores cannot disagree.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources as importlib_resources
from pathlib import Path

import re2
import yaml
from clickhouse_connect.driver.binding import format_query_value
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agentgov.collector.validation import problems

# Both engines match the NFKC form of a command, with Unicode spaces and \v read as a
# plain space: "ｒｍ -ｒｆ" (fullwidth) or "rm<no-break space>-rf" cannot slip past a rule
# written for "rm -rf", and RE2's Unicode case folding has nothing left to fold.
_SPACE_CHARS = "\x0b\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_PY_SPACES = re.compile(f"[{_SPACE_CHARS}]")
_SQL_SPACES = (
    "[\\x0b\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}]"
)


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.dot_nl = True  # as ClickHouse's match() compiles its patterns
    options.never_capture = True
    options.log_errors = False
    return options


_RE2_OPTIONS = _re2_options()


def compile_re2(pattern: str) -> re2._Regexp:
    """Compile ``pattern`` with RE2 as ClickHouse does; :class:`re2.error` if it is not RE2."""
    return re2.compile(pattern, _RE2_OPTIONS)


def normalize(text: str) -> str:
    """What the rules see of a command or resource (see :func:`sql_normalize`)."""
    return _PY_SPACES.sub(" ", unicodedata.normalize("NFKC", text))


def sql_normalize(expr: str) -> str:
    """SQL twin of :func:`normalize`."""
    return (
        f"replaceRegexpAll(normalizeUTF8NFKC(toValidUTF8({expr})), "
        f"{format_query_value(_SQL_SPACES)}, ' ')"
    )


#: commands longer than this are scored every time instead of cached (bounds the cache)
_CACHED_COMMAND = 4096


class RiskRule(BaseModel):
    """One rule: a name, a score, and the patterns that trigger it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    score: int = Field(ge=0, le=100)
    description: str = ""
    command: str | None = None
    resources: str | None = None

    @field_validator("command", "resources")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                compile_re2(pattern)
            except re2.error as exc:
                detail = (
                    exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
                )
                raise ValueError(
                    f"not an RE2 regular expression ({detail}); RE2 has no look-arounds "
                    "or backreferences"
                ) from exc
        return pattern

    @model_validator(mode="after")
    def _has_pattern(self) -> RiskRule:
        if self.command is None and self.resources is None:
            raise ValueError("a rule needs a 'command' or a 'resources' pattern")
        return self


class RiskRulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[RiskRule]


class RiskRulesError(ValueError):
    """A risk rules file is missing or invalid; the message names the file and field."""


@dataclass(frozen=True)
class RiskAssessment:
    score: int
    rules: tuple[str, ...]


class RiskRules:
    """A compiled rule set."""

    def __init__(self, rules: Sequence[RiskRule]) -> None:
        self.rules = tuple(rules)
        self._cache: dict[tuple[str, tuple[str, ...]], RiskAssessment] = {}
        self._compiled = [
            (
                r,
                compile_re2(r.command) if r.command else None,
                compile_re2(r.resources) if r.resources else None,
            )
            for r in self.rules
        ]

    @classmethod
    def default(cls) -> RiskRules:
        text = (
            importlib_resources.files("agentgov.collector")
            .joinpath("risk_rules.yaml")
            .read_text("utf-8")
        )
        return cls.parse(text, "built-in risk_rules.yaml")

    @classmethod
    def load(cls, path: str | Path) -> RiskRules:
        p = Path(path)
        try:
            text = p.read_text("utf-8")
        except OSError as exc:
            raise RiskRulesError(f"{p}: cannot read risk rules: {exc.strerror}") from exc
        return cls.parse(text, str(p))

    @classmethod
    def parse(cls, text: str, source: str) -> RiskRules:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RiskRulesError(f"{source}: not valid YAML: {exc}") from exc
        try:
            parsed = RiskRulesFile.model_validate(data)
        except ValidationError as exc:
            raise RiskRulesError(
                f"{source}: invalid risk rules: {'; '.join(problems(exc))}. "
                "Expected 'rules:' with items of name, score (0-100), command and/or resources."
            ) from exc
        return cls(parsed.rules)

    @property
    def digest(self) -> str:
        """Identifies the rule set; stored with the materialized view that applies it."""
        canon = repr([r.model_dump() for r in self.rules]).encode()
        return hashlib.sha256(canon).hexdigest()[:16]

    def assess(self, command: str = "", resources: Sequence[str] = ()) -> RiskAssessment:
        """Score one command in Python, exactly as the SQL expression does.

        Agents repeat their commands, so recent results are kept (the rules are immutable).
        """
        if len(command) > _CACHED_COMMAND or len(resources) > 16:
            return self._assess(command, resources)  # long inputs are not worth keeping
        key = (command, tuple(resources))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        result = self._assess(command, resources)
        if len(self._cache) >= 4096:
            self._cache.clear()
        self._cache[key] = result
        return result

    def _assess(self, command: str, resources: Sequence[str]) -> RiskAssessment:
        total = 0
        hits: list[str] = []
        command = normalize(command)
        resources = [normalize(r) for r in resources]
        for rule, cmd_re, res_re in self._compiled:
            matched = bool(cmd_re and cmd_re.search(command)) or bool(
                res_re and any(res_re.search(r) for r in resources)
            )
            if matched:
                total += rule.score
                hits.append(rule.name)
        return RiskAssessment(min(100, total), tuple(hits))

    def matched_by_any(self, commands: Sequence[str], resources: Sequence[str]) -> set[str]:
        """Names of the rules whose ``command`` pattern matches one of ``commands`` or whose
        ``resources`` pattern matches one of ``resources``: the rules a set of capabilities
        (a plan's tools and targets) can trigger, rather than one command."""
        texts = [normalize(c) for c in commands]
        targets = [normalize(r) for r in resources]
        return {
            rule.name
            for rule, cmd_re, res_re in self._compiled
            if (cmd_re is not None and any(cmd_re.search(t) for t in texts))
            or (res_re is not None and any(res_re.search(t) for t in targets))
        }

    def score_of(self, names: set[str] | Sequence[str]) -> int:
        """The score of a set of matched rules, as for a command: their sum, capped at 100."""
        return min(100, sum(r.score for r in self.rules if r.name in names))

    def _condition(self, rule: RiskRule, command: str, resources: str) -> str:
        parts = []
        if rule.command:
            parts.append(f"match({command}, {format_query_value(rule.command)})")
        if rule.resources:
            parts.append(
                f"arrayExists(r -> match(r, {format_query_value(rule.resources)}), {resources})"
            )
        return "(" + " OR ".join(parts) + ")"

    def sql_hits(self, command: str, resources: str) -> str:
        """SQL expression: one UInt8 per rule, 1 where the rule matches (Array(UInt8)).

        ``command`` and ``resources`` must already be normalized (:func:`sql_normalize`).
        """
        if not self.rules:
            return "CAST([], 'Array(UInt8)')"
        return (
            "["
            + ", ".join(f"toUInt8{self._condition(r, command, resources)}" for r in self.rules)
            + "]"
        )

    def sql_score(self, hits: str) -> str:
        """SQL expression for the score, from the :meth:`sql_hits` array ``hits``."""
        scores = "[" + ", ".join(str(r.score) for r in self.rules) + "]"
        return f"toUInt8(least(100, arraySum(arrayMap((h, w) -> h * w, {hits}, CAST({scores}, 'Array(UInt32)')))))"

    def sql_rule_names(self, hits: str) -> str:
        """SQL expression for the names of the matched rules (Array(String))."""
        names = "[" + ", ".join(format_query_value(r.name) for r in self.rules) + "]"
        return f"arrayFilter((n, h) -> h = 1, CAST({names}, 'Array(String)'), {hits})"


def risk_log_term(score: int) -> float:
    """One command's term of the session risk's log-sum (capped at 99.5, as in SQL)."""
    return math.log1p(-min(score, 99.5) / 100.0)


def risk_from_log_sum(log_sum: float) -> int:
    """Session risk, 0-100, from the sum of its commands' :func:`risk_log_term`."""
    return round(100 * (1 - math.exp(log_sum)))


def combine_session_risk(scores: Sequence[int]) -> int:
    """Session risk from command risks: the chance that at least one command is harmful,
    treating each score as an independent probability (noisy-OR), on 0-100.

    Mirrors the SQL aggregate (``RiskLogSum`` in the sessions table): many moderately
    risky commands raise a session above any single one of them. Kept as a running
    log-sum (:func:`risk_log_term`), it costs O(1) per command.
    """
    return risk_from_log_sum(sum(risk_log_term(s) for s in scores))
