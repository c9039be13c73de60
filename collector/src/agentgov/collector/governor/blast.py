"""A plan's blast radius, computed before the run: what the whole run could touch at worst.

The union over the plan's roles of their write scopes, production targets,
destructive-capable tools and network egress, with the number of agents, the depth, the
fan-out and the most the run may spend; and a blast-radius risk scored by the same risk
rules as commands (docs/risk.md):

- each role's worst step inside the plan is scored like a command: the rules its tools
  (as command text) or its targets (resources, environments, permission targets, egress
  hosts) match, plus the rules its capabilities reach by definition: a write grant
  reaches ``write_scope``, a write grant together with a tool reaches
  ``destructive_command`` (the tool may delete what the grant covers), declared egress
  reaches ``network_egress``, a production target reaches ``production_target``, an
  ``admin`` or wildcard grant reaches ``privilege_escalation``;
- the plan's risk combines its roles' scores as a session's risk combines its commands'
  (noisy-OR): many risky roles raise the plan above any one of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from agentgov.collector.governor.plan import Plan, PlannedAgent
from agentgov.collector.governor.policy import MultiAgentPolicy, SessionApproval
from agentgov.collector.risk import RiskRules, combine_session_risk
from agentgov.instrumentation.permissions import is_production, is_write

#: scope words that hand the holder the keys of the system
_PRIVILEGED = frozenset({"admin", "root", "sudo"})


@dataclass(frozen=True)
class RoleRadius:
    """What one planned role could do at worst."""

    role: str
    risk: int
    risk_rules: list[str]
    max_agents: int
    permissions: list[str]
    write_scopes: list[str]
    tools: list[str]
    destructive_tools: list[str]
    resources: list[str]
    environments: list[str]
    egress: list[str]
    production_targets: list[str]


@dataclass(frozen=True)
class BlastRadius:
    """The plan's blast radius (see the module docstring)."""

    risk: int
    risk_rules: list[str]
    agents: int
    roles: list[str]
    max_depth: int
    max_fanout: int
    max_spend_usd: float
    max_tool_calls: int | None
    write_scopes: list[str]
    production: bool
    production_targets: list[str]
    destructive_tools: list[str]
    network_egress: list[str]
    #: every capability the plan grants, by role
    capabilities: list[RoleRadius]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _targets(agent: PlannedAgent) -> list[str]:
    grants = [p.partition(":")[2] for p in agent.permissions if ":" in p]
    return [*agent.resources, *agent.environments, *grants, *agent.egress]


def _privileged(permission: str) -> bool:
    scope = permission.partition(":")[0]
    return scope == "*" or bool(_PRIVILEGED & set(scope.replace("-", ".").split(".")))


def role_radius(agent: PlannedAgent, rules: RiskRules) -> RoleRadius:
    """One role's worst step inside the plan, scored by the risk rules."""
    writes = sorted({p for p in agent.permissions if is_write(p)})
    production = sorted({t for t in [*_targets(agent), *agent.permissions] if is_production(t)})
    matched = rules.matched_by_any(agent.tools, _targets(agent))
    if writes:
        matched.add("write_scope")
        if agent.tools:
            matched.add("destructive_command")
    if agent.egress:
        matched.add("network_egress")
    if production:
        matched.add("production_target")
    if any(_privileged(p) for p in agent.permissions):
        matched.add("privilege_escalation")
    known = {r.name for r in rules.rules}
    matched &= known  # a rule set without a rule scores nothing for it
    destructive = sorted(agent.tools) if writes else []
    destructive += sorted(
        t
        for t in agent.tools
        if t not in destructive and "destructive_command" in rules.matched_by_any([t], [])
    )
    return RoleRadius(
        role=agent.role,
        risk=rules.score_of(matched),
        risk_rules=sorted(matched),
        max_agents=agent.max_agents,
        permissions=list(agent.permissions),
        write_scopes=writes,
        tools=list(agent.tools),
        destructive_tools=destructive,
        resources=list(agent.resources),
        environments=list(agent.environments),
        egress=list(agent.egress),
        production_targets=production,
    )


def blast_radius(plan: Plan, rules: RiskRules, policy: MultiAgentPolicy) -> BlastRadius:
    """The plan's blast radius; spend is the lesser of the plan's budget and the policy's."""
    roles = [role_radius(a, rules) for a in plan.agents]
    spend = plan.budget_usd
    if policy.shared_max_usd is not None:
        spend = min(spend, policy.shared_max_usd)
    calls = plan.max_tool_calls
    if policy.shared_max_tool_calls is not None:
        calls = (
            min(calls, policy.shared_max_tool_calls)
            if calls is not None
            else (policy.shared_max_tool_calls)
        )

    def union(attr: str) -> list[str]:
        return sorted({x for r in roles for x in getattr(r, attr)})

    production = union("production_targets")
    return BlastRadius(
        risk=combine_session_risk([r.risk for r in roles]),
        risk_rules=union("risk_rules"),
        agents=plan.planned_agents,
        roles=[r.role for r in roles],
        max_depth=plan.max_depth,
        max_fanout=plan.max_fanout,
        max_spend_usd=spend,
        max_tool_calls=calls,
        write_scopes=union("write_scopes"),
        production=bool(production),
        production_targets=production,
        destructive_tools=sorted({f"{r.role}: {t}" for r in roles for t in r.destructive_tools}),
        network_egress=union("egress"),
        capabilities=roles,
    )


def needs_approval(radius: Mapping[str, Any], rule: SessionApproval) -> list[str]:
    """Why the policy wants a reviewer to approve a plan of this blast radius (its JSON
    form, as recorded); none: the plan holds without one."""
    out = []
    risk = int(radius.get("risk", 0))
    if rule.blast_radius_risk is not None and risk >= rule.blast_radius_risk:
        out.append(f"blast-radius risk {risk} >= {rule.blast_radius_risk}")
    targets = list(radius.get("production_targets") or ())
    if rule.production and radius.get("production"):
        out.append("names production: " + ", ".join(targets[:5]))
    scopes = list(radius.get("write_scopes") or ())
    if rule.write and scopes:
        out.append("grants write: " + ", ".join(scopes[:5]))
    return out
