"""A session plan: what a run means to do, declared before its first agent starts.

An orchestrator declares the agents (by role) it intends to use, each with the
permissions, tools, resources, environments and network egress it needs, and the run's
expected fan-out, depth and budget. The governor computes the plan's blast radius from it
(:mod:`agentgov.collector.governor.blast`), decides whether a reviewer must approve it
first, and judges every later step of the session against it
(:mod:`agentgov.collector.governor.scope`).

Plans come from callers, so they are hostile input: every list and string is bounded,
permissions and resources are brought to their normal form (a path that climbs with
``..`` is refused), hosts and names are whole-string matches. Errors name the field and
the fix, as the policy's do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import re2
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from agentgov.collector.governor.policy import MultiAgentPolicy
from agentgov.collector.validation import problems
from agentgov.instrumentation.permissions import (
    InvalidPermission,
    normalize,
    uncovered,
)

#: what one plan may hold: enough for any real run, small enough to judge in microseconds
MAX_AGENTS = 64
MAX_ITEMS = 256

# RE2, whole-string matches: linear in what a caller sends, whatever it sends
_ROLE = re2.compile(r"[A-Za-z0-9._:@-]{1,128}")
_ENVIRONMENT = re2.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_HOST = re2.compile(r"(\*\.)?[a-z0-9][a-z0-9-]{0,62}(\.[a-z0-9][a-z0-9-]{0,62})*(:[0-9]{1,5})?")
_CONTROL = re2.compile(r"[\x00-\x1f\x7f]")


class PlanError(ValueError):
    """A plan the governor will not take; the message names the field and the fix."""


def _role(value: str) -> str:
    if not _ROLE.fullmatch(value):
        raise ValueError(
            f"role {value[:80]!r} is not a role name: use 1-128 letters, digits and . _ : @ -"
        )
    return value


def _permission(value: str) -> str:
    try:
        return normalize(value)
    except InvalidPermission as exc:
        raise ValueError(str(exc)) from exc


def normal_target(value: str) -> str:
    """A resource (path, table, host name) in normal form, as permissions' targets are
    compared: repeated and ``.`` segments dropped; ``..`` refused (:class:`ValueError`)."""
    if not value or len(value) > 512:
        raise ValueError("a resource is 1-512 characters")
    if _CONTROL.search(value) or "," in value:
        raise ValueError(
            f"resource {value[:80]!r} holds a comma or a control character: one resource "
            "per list item, printable characters only"
        )
    try:
        return normalize(f"r:{value}").partition(":")[2]
    except InvalidPermission:
        raise ValueError(
            f"resource {value[:80]!r} climbs out of its path with '..': name the target "
            "directly (e.g. /opt/app/logs)"
        ) from None


def _tool(value: str) -> str:
    if not value or len(value) > 256 or _CONTROL.search(value):
        raise ValueError("a tool name is 1-256 printable characters")
    return value


def _environment(value: str) -> str:
    value = value.lower()
    if not _ENVIRONMENT.fullmatch(value):
        raise ValueError(
            f"environment {value[:80]!r} is not a name: use lower-case letters, digits, "
            "'.', '_' and '-' (e.g. staging, production)"
        )
    return value


def _host(value: str) -> str:
    value = value.lower()
    if not _HOST.fullmatch(value) or len(value) > 253:
        raise ValueError(
            f"egress host {value[:80]!r} is not a host name: write api.example.com, "
            "*.example.com or api.example.com:8443 (no scheme, no path)"
        )
    return value


Role = Annotated[str, AfterValidator(_role)]
Permission = Annotated[str, AfterValidator(_permission)]
Target = Annotated[str, AfterValidator(normal_target)]
Tool = Annotated[str, AfterValidator(_tool)]
Environment = Annotated[str, AfterValidator(_environment)]
Host = Annotated[str, AfterValidator(_host)]


class PlannedAgent(BaseModel):
    """One role the run will use, and everything an agent of it may do."""

    model_config = ConfigDict(extra="forbid")

    #: matched against an agent's role, or (an agent without one) its name
    role: Role
    #: the most an agent of this role may hold (a child's grants stay within them)
    permissions: list[Permission] = Field(default_factory=list, max_length=MAX_ITEMS)
    #: the tools it may call
    tools: list[Tool] = Field(default_factory=list, max_length=MAX_ITEMS)
    #: paths, tables and other targets it may touch (the place and below; a trailing
    #: ``*`` matches any continuation)
    resources: list[Target] = Field(default_factory=list, max_length=MAX_ITEMS)
    #: environments it works in (``staging``, ``production``...)
    environments: list[Environment] = Field(default_factory=list, max_length=32)
    #: hosts it may reach over the network (``api.example.com``, ``*.example.com``)
    egress: list[Host] = Field(default_factory=list, max_length=MAX_ITEMS)
    #: how many agents of this role the run may start
    max_agents: int = Field(default=1, ge=1, le=1000)


class Plan(BaseModel):
    """A session's plan (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    intent: str = Field(default="", max_length=1000)
    agents: list[PlannedAgent] = Field(min_length=1, max_length=MAX_AGENTS)
    #: the most children any one agent hands work to
    max_fanout: int = Field(ge=0, le=1000)
    #: the deepest delegation (the root agent is depth 0)
    max_depth: int = Field(ge=0, le=64)
    #: the most the run may spend, in USD
    budget_usd: float = Field(ge=0, le=1_000_000, allow_inf_nan=False)
    #: the most tool calls the run may make; None: not planned
    max_tool_calls: int | None = Field(default=None, ge=0, le=1_000_000)

    @model_validator(mode="after")
    def _one_entry_per_role(self) -> Plan:
        seen: dict[str, int] = {}
        for i, agent in enumerate(self.agents):
            if agent.role in seen:
                raise ValueError(
                    f"agents.{i}.role: role {agent.role!r} is planned twice (also agents."
                    f"{seen[agent.role]}): merge the two entries"
                )
            seen[agent.role] = i
        return self

    @property
    def planned_agents(self) -> int:
        return sum(a.max_agents for a in self.agents)


def parse_plan(data: Any, source: str = "plan") -> Plan:
    """A validated plan from decoded JSON or YAML; :class:`PlanError` naming every problem."""
    if not isinstance(data, Mapping):
        raise PlanError(
            f"{source}: a plan is a mapping with 'agents', 'max_fanout', 'max_depth' and "
            "'budget_usd'"
        )
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise PlanError(f"{source}: invalid plan: " + "; ".join(problems(exc))) from exc


def parse_plan_text(text: str, source: str) -> Plan:
    """A plan from a YAML (or JSON) file's text."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PlanError(f"{source}: not valid YAML or JSON: {exc}") from exc
    return parse_plan(data, source)


def policy_problems(plan: Plan, policy: MultiAgentPolicy) -> list[str]:
    """What the plan asks for beyond the policy's limits, one message per field: a plan
    narrows what the policy allows, it never widens it."""
    out: list[str] = []
    if policy.max_delegation_depth is not None and plan.max_depth > policy.max_delegation_depth:
        out.append(
            f"max_depth: {plan.max_depth} is deeper than the policy's max_delegation_depth "
            f"({policy.max_delegation_depth}): plan at most {policy.max_delegation_depth}"
        )
    if policy.shared_max_usd is not None and plan.budget_usd > policy.shared_max_usd:
        out.append(
            f"budget_usd: {plan.budget_usd:g} is more than the policy's shared_max_usd "
            f"({policy.shared_max_usd:g}): plan at most that"
        )
    if (
        policy.shared_max_tool_calls is not None
        and plan.max_tool_calls is not None
        and plan.max_tool_calls > policy.shared_max_tool_calls
    ):
        out.append(
            f"max_tool_calls: {plan.max_tool_calls} is more than the policy's "
            f"shared_max_tool_calls ({policy.shared_max_tool_calls}): plan at most that"
        )
    if policy.max_agents_per_run is not None and plan.planned_agents > policy.max_agents_per_run:
        out.append(
            f"agents: {plan.planned_agents} agents planned (max_agents summed), more than the "
            f"policy's max_agents_per_run ({policy.max_agents_per_run}): plan fewer"
        )
    for i, agent in enumerate(plan.agents):
        grants = policy.permissions.get(agent.role)
        if grants is not None:
            wider = uncovered(agent.permissions, grants)
            if wider:
                out.append(
                    f"agents.{i}.permissions: {', '.join(wider[:5])} is more than the policy "
                    f"lets role {agent.role!r} hold (permissions.{agent.role}): narrow it"
                )
        if policy.tool_allowlist is not None:
            banned = [t for t in agent.tools if t not in policy.tool_allowlist]
            if banned:
                out.append(
                    f"agents.{i}.tools: {', '.join(banned[:5])} is not on the policy's "
                    "tool_allowlist: remove it or ask for the allowlist to include it"
                )
    return out


def check_plan(plan: Plan, policy: MultiAgentPolicy, source: str = "plan") -> Plan:
    """``plan`` if the policy allows all of it, else :class:`PlanError` naming each field."""
    found = policy_problems(plan, policy)
    if found:
        raise PlanError(f"{source}: the plan goes beyond the policy: " + "; ".join(found))
    return plan
