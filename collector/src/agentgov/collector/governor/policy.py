"""The multi-agent policy: a YAML file, validated with errors that name file, field and fix."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agentgov.collector.validation import located_problems
from agentgov.instrumentation.permissions import InvalidPermission, normalize_all


class HighRiskDelegation(BaseModel):
    """Which delegations need a reviewer's approval before they run."""

    model_config = ConfigDict(extra="forbid")

    #: a delegation that grants write permissions (``*.write*``, ``*:write``, ``write:*``)
    write: bool = False
    #: a delegation whose task or permissions name production (``prod``, ``production``)
    production: bool = False


class SessionApproval(BaseModel):
    """Which session plans need a reviewer before their first agent starts, and what a
    step outside a planned session's scope is answered. Criteria are alternatives: a plan
    meeting any of them waits for a reviewer."""

    model_config = ConfigDict(extra="forbid")

    #: plans whose blast-radius risk is at least this (0-100)
    blast_radius_risk: int | None = Field(default=None, ge=0, le=100)
    #: plans that name production (a target, an environment, a permission)
    production: bool = False
    #: plans that grant any write permission
    write: bool = False
    #: a step outside the plan's scope: ask a reviewer for that step, or stop it
    out_of_scope: Literal["approval_required", "stop"] = "approval_required"
    #: the longest a reviewer may let a plan approval hold
    max_ttl_s: int = Field(default=86_400, ge=1, le=30 * 86_400)


class MultiAgentPolicy(BaseModel):
    """Limits and rules for every session; ``None`` means "no limit"."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["enforce", "shadow"] = "enforce"
    max_agents_per_run: int | None = Field(default=None, ge=1)
    max_concurrent_agents: int | None = Field(default=None, ge=1)
    max_handoffs: int | None = Field(default=None, ge=0)
    max_delegation_depth: int | None = Field(default=None, ge=0)
    shared_max_usd: float | None = Field(default=None, ge=0)
    shared_max_tool_calls: int | None = Field(default=None, ge=0)
    ownership_lock: bool = True
    #: role -> the tasks that role owns; nobody else may be handed those tasks
    roles: dict[str, list[str]] = Field(default_factory=dict)
    #: role -> the most that role may hold (least privilege)
    permissions: dict[str, list[str]] = Field(default_factory=dict)
    #: tools any agent may call; ``None``: no allowlist
    tool_allowlist: list[str] | None = None
    #: tools (or ``task:NAME``) that need a reviewer's approval first
    require_approval_for: list[str] = Field(default_factory=list)
    high_risk_delegation: HighRiskDelegation = Field(default_factory=HighRiskDelegation)
    approval_ttl_s: int = Field(default=900, ge=1)
    #: session plans: which need a reviewer first, and how out-of-scope steps are met
    session_approval: SessionApproval = Field(default_factory=SessionApproval)
    #: how often the same task may come back to the same agent (role, or name) within a
    #: session before the delegation stops with ``delegation_loop``; None: no limit
    max_task_returns: int | None = Field(default=None, ge=0, le=1000)
    #: refuse every decision request that carries no lineage token (agentgov's SDK always
    #: sends one), except the start of a new session's root. Off (for clients that cannot
    #: carry tokens), a tokenless request may speak only for an agent the governor started,
    #: with the API key that started it: agents sharing a key can then speak for each other
    require_verified_lineage: bool = True
    #: how long a lineage token is valid; agents get a renewed one in their answers
    lineage_ttl_s: int = Field(default=3600, ge=60, le=7 * 86400)
    #: what an agent is told when the governor cannot decide: stop (fail closed) or allow
    on_error: Literal["stop", "allow"] = "stop"

    @field_validator("permissions")
    @classmethod
    def _permissions_in_normal_form(cls, grants: dict[str, list[str]]) -> dict[str, list[str]]:
        try:
            return {role: list(normalize_all(items)) for role, items in grants.items()}
        except InvalidPermission as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("roles")
    @classmethod
    def _one_owner_per_task(cls, roles: dict[str, list[str]]) -> dict[str, list[str]]:
        seen: dict[str, str] = {}
        for role, tasks in roles.items():
            for task in tasks:
                if task in seen and seen[task] != role:
                    raise ValueError(
                        f"task {task!r} is owned by both {seen[task]!r} and {role!r}: "
                        "give each task one owner role"
                    )
                seen[task] = role
        return roles

    def owner_of(self, task: str) -> str | None:
        for role, tasks in self.roles.items():
            if task in tasks:
                return role
        return None


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    multi_agent: MultiAgentPolicy = Field(default_factory=MultiAgentPolicy)


class PolicyError(ValueError):
    """A policy file is missing or invalid; the message names the file, field and fix."""


def parse_policy(text: str, source: str) -> Policy:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {_yaml_error(exc, source)}") from exc
    if data is None:
        # an editor may empty the file before writing it: never read that as "no limits"
        raise PolicyError(f"{source}: the policy is empty; write at least 'multi_agent: {{}}'")
    if not isinstance(data, Mapping):
        raise PolicyError(f"{source}: the policy must be a mapping with a 'multi_agent' section")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        # every error at once, one a line, each with the line of the file it is on
        found = located_problems(exc, text, source, Policy)
        raise PolicyError(
            f"{source}: invalid policy ({len(found)} "
            + ("error" if len(found) == 1 else "errors")
            + "):\n"
            + "\n".join(f"  {line}" for line in found)
        ) from exc


def _yaml_error(exc: yaml.YAMLError, source: str) -> str:
    """PyYAML's message with the file's name where it says ``<unicode string>``."""
    return str(exc).replace('"<unicode string>"', source).replace("<unicode string>", source)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except OSError as exc:
        raise PolicyError(f"{p}: cannot read the policy: {exc.strerror}") from exc
    return parse_policy(text, str(p))


class PolicySource:
    """A policy file that is re-read when it changes; a broken edit keeps the last good one."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path else None
        self._stamp: tuple[float, int] | None = None
        self.policy = load_policy(self.path) if self.path else Policy()
        self._stamp = self._file_stamp()
        self.last_error: str | None = None

    def _file_stamp(self) -> tuple[float, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed; True if a new policy is now in force."""
        stamp = self._file_stamp()
        if self.path is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.policy = load_policy(self.path)
        except PolicyError as exc:
            self.last_error = str(exc)
            return False
        self.last_error = None
        return True
