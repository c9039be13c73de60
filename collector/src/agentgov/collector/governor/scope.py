"""A plan's scope, compiled for the decision path: is this step inside what the plan named?

Each check answers the step's drift: what it touches that the plan did not name, one
``"kind: value"`` item each (``tool: kubectl``, ``resource: /etc``, ``agent: auditor``,
``permission: fs.write:/``, ``egress: evil.example``, ``environment: production``,
``destructive: ...``, ``depth``, ``fanout``, ``agents``, ``budget``,
``tool_calls``). No drift: the step is in scope.

Built once per plan from its normalized form (the one recorded on the session's audit
chain, so a restarted governor compiles the same scope). Tool calls repeat, so a tool
call's verdict on what it touches is kept per (role, tool, resources, risk rules): a
decision inside the scope costs a dictionary lookup more than one outside a plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import re2

from agentgov.collector.governor.plan import normal_target
from agentgov.instrumentation.permissions import (
    InvalidPermission,
    is_production,
    is_write,
    uncovered,
)

#: an SDK-made agent id: the agent's name and 12 hex digits (lineage.new_id)
_MADE_ID = re2.compile(r"(.+)-[0-9a-f]{12}")
_MAX_CACHE = 4096


def agent_key(role: str, agent_id: str) -> str:
    """Which planned role (or, for loops, which agent) a governed agent is: its role, or
    without one its name, read from an id the SDK made (``cleanup-3f9a1c2e5d4b``)."""
    if role:
        return role
    m = _MADE_ID.fullmatch(agent_id)
    return m.group(1) if m else agent_id


@dataclass(frozen=True, slots=True)
class RoleScope:
    """What agents of one planned role may do."""

    role: str
    permissions: tuple[str, ...]
    tools: frozenset[str]
    #: resources it may touch, with its permissions' targets (normal form)
    targets: tuple[str, ...]
    egress: tuple[str, ...]
    production: bool
    write: bool
    max_agents: int


def _covered(resource: str, targets: Sequence[str]) -> bool:
    """Whether a touched resource lies within one of the planned targets (the target
    itself, below it, or a ``*`` continuation), also when it carries a scheme
    (``file:/opt/app``)."""
    candidates = []
    for r in (resource, resource.partition(":")[2]):
        if not r:
            continue
        try:
            candidates.append(normal_target(r))
        except ValueError:
            return False  # a resource that climbs with '..' is never in scope
    for target in targets:
        if target.endswith("*"):
            stem = target[:-1]
            if any(c.startswith(stem) for c in candidates):
                return True
            continue
        base = target.rstrip("/")
        if any(c == base or c.startswith(base + "/") for c in candidates):
            return True
    return False


def _host_of(resource: str) -> str | None:
    """The host a resource reaches over the network (a URL), or None."""
    if "://" not in resource:
        return None
    try:
        host = urlsplit(resource).hostname
    except ValueError:
        return "(unreadable URL)"
    return host or "(no host)"


def _host_allowed(host: str, egress: Sequence[str]) -> bool:
    for allowed in egress:
        name = allowed.partition(":")[0]
        if name.startswith("*."):
            if host.endswith(name[1:]):
                return True
        elif host == name:
            return True
    return False


class PlanScope:
    """A plan's scope (see the module docstring)."""

    def __init__(self, plan: Mapping[str, Any]) -> None:
        roles: dict[str, RoleScope] = {}
        for agent in plan.get("agents", ()):
            permissions = tuple(agent.get("permissions", ()))
            grants = [p.partition(":")[2] for p in permissions if ":" in p]
            environments = list(agent.get("environments", ()))
            resources = list(agent.get("resources", ()))
            roles[agent["role"]] = RoleScope(
                role=agent["role"],
                permissions=permissions,
                tools=frozenset(agent.get("tools", ())),
                targets=tuple(dict.fromkeys([*resources, *grants])),
                egress=tuple(agent.get("egress", ())),
                production=any(is_production(x) for x in [*environments, *resources, *permissions]),
                write=any(is_write(p) for p in permissions),
                max_agents=int(agent.get("max_agents", 1)),
            )
        self.roles = roles
        self.max_depth = int(plan.get("max_depth", 0))
        self.max_fanout = int(plan.get("max_fanout", 0))
        self.budget_usd = float(plan.get("budget_usd", 0.0))
        calls = plan.get("max_tool_calls")
        self.max_tool_calls = int(calls) if calls is not None else None
        self._touches: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], tuple[str, ...]] = {}

    def role_of(self, role: str, agent_id: str) -> RoleScope | None:
        """The planned role a governed agent belongs to, or None (the plan names none)."""
        found = self.roles.get(role) if role else None
        return found if found is not None else self.roles.get(agent_key("", agent_id))

    def handoff_drift(
        self,
        role: str,
        agent_id: str,
        permissions: Sequence[str] | None,
        task: str,
        depth: int,
        new_agent: bool,
        of_role: int,
        siblings: int | None,
        usd_after: float,
    ) -> tuple[str, ...]:
        """A delegation's drift. ``of_role``: agents of the target's role started so far;
        ``siblings``: children the delegating agent started so far (None: the session's
        root starts); ``usd_after``: the run's budget in use with this delegation's
        estimate."""
        target = self.role_of(role, agent_id)
        if target is None:
            return (f"agent: {agent_key(role, agent_id)}",)
        drift: list[str] = []
        if permissions:
            try:
                wider = uncovered(list(permissions), target.permissions)
            except InvalidPermission:
                wider = list(permissions)
            drift += [f"permission: {p}" for p in wider[:8]]
        if new_agent and of_role >= target.max_agents:
            drift.append(f"agents: more than {target.max_agents} of role {target.role}")
        if depth > self.max_depth:
            drift.append(f"depth: {depth} beyond the planned {self.max_depth}")
        if new_agent and siblings is not None and siblings >= self.max_fanout:
            drift.append(f"fanout: more than the planned {self.max_fanout} children")
        if usd_after > self.budget_usd:
            drift.append(f"budget: {usd_after:g} USD beyond the planned {self.budget_usd:g}")
        if not target.production and is_production(task):
            drift.append("environment: production")
        return tuple(drift)

    def tool_drift(
        self,
        role: str,
        agent_id: str,
        tool: str,
        resources: Sequence[str],
        risk_rules: Sequence[str],
        tool_calls_after: int,
    ) -> tuple[str, ...]:
        """A tool call's drift; ``risk_rules``: the risk rules its command matched."""
        scope = self.role_of(role, agent_id)
        if scope is None:
            return (f"agent: {agent_key(role, agent_id)}",)
        key = (scope.role, tool, tuple(resources), tuple(risk_rules))
        drift = self._touches.get(key)
        if drift is None:
            drift = self._judge_touches(scope, tool, resources, risk_rules)
            if len(self._touches) >= _MAX_CACHE:
                self._touches.clear()
            self._touches[key] = drift
        if self.max_tool_calls is not None and tool_calls_after > self.max_tool_calls:
            drift = (*drift, f"tool_calls: beyond the planned {self.max_tool_calls}")
        return drift

    @staticmethod
    def _judge_touches(
        scope: RoleScope,
        tool: str,
        resources: Sequence[str],
        risk_rules: Sequence[str],
    ) -> tuple[str, ...]:
        drift: list[str] = []
        if tool not in scope.tools:
            drift.append(f"tool: {tool}")
        for resource in resources[:64]:
            host = _host_of(resource)
            if host is not None:
                if not _host_allowed(host, scope.egress):
                    drift.append(f"egress: {host}")
            elif not _covered(resource, scope.targets):
                drift.append(f"resource: {resource[:200]}")
        if "network_egress" in risk_rules and not scope.egress:
            drift.append("egress: the command reaches the network")
        if "production_target" in risk_rules and not scope.production:
            drift.append("environment: production")
        if "destructive_command" in risk_rules and not scope.write:
            drift.append("destructive: a destructive command without a planned write grant")
        return tuple(dict.fromkeys(drift))  # each item once, in order
