"""A session plan as the SDK declares it: plain data the governor checks.

Before its first agent starts, an orchestrator may say what the run will do
(:meth:`agentgov.instrumentation.SessionScope.plan`): the roles it will use, each with
its permissions, tools, resources, environments and network egress, and the run's
fan-out, depth and budget. The governor answers with the plan's blast radius and whether
a reviewer must approve it before the first agent may start; the plan's scope then
governs every step of the session.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PlannedAgent:
    """One role the run will use and everything an agent of it may do."""

    role: str
    permissions: Sequence[str] = ()
    tools: Sequence[str] = ()
    resources: Sequence[str] = ()
    environments: Sequence[str] = ()
    egress: Sequence[str] = ()
    max_agents: int = 1

    def as_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "permissions": list(self.permissions),
            "tools": list(self.tools),
            "resources": list(self.resources),
            "environments": list(self.environments),
            "egress": list(self.egress),
            "max_agents": self.max_agents,
        }


def plan_body(
    agents: Sequence[PlannedAgent | Mapping[str, Any]],
    max_fanout: int,
    max_depth: int,
    budget_usd: float,
    max_tool_calls: int | None = None,
    intent: str = "",
) -> dict[str, Any]:
    """The plan as the governor's API takes it."""
    body: dict[str, Any] = {
        "intent": intent,
        "agents": [a.as_json() if isinstance(a, PlannedAgent) else dict(a) for a in agents],
        "max_fanout": max_fanout,
        "max_depth": max_depth,
        "budget_usd": budget_usd,
    }
    if max_tool_calls is not None:
        body["max_tool_calls"] = max_tool_calls
    return body


class PlanRejected(ValueError):
    """The governor refused the plan (``status`` 400: invalid, the message names the field
    and the fix; 409: the session has started, has a plan, or was killed)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PlanAnswer:
    """The governor's answer to a declared plan."""

    session_id: str
    #: ``active`` (holds without a reviewer) or ``pending`` (the first agent waits for one)
    status: str
    approval_id: str = ""
    #: why the policy asks a reviewer first (empty: it does not)
    needs_approval: tuple[str, ...] = ()
    blast_radius: Mapping[str, Any] = field(default_factory=dict)

    @property
    def awaits_reviewer(self) -> bool:
        return self.status == "pending"
