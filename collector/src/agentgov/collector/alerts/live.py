"""Live session aggregates for ``session`` rules, kept up to date as facts arrive.

What the stored tables say of a session (risk of its executed commands, agents, depth,
spend) is rebuilt here incrementally from span facts, and merged at evaluation time with
the governor's authoritative state (handoffs, budget in use, pending approvals), so a
rule sees a session the moment a span or decision changes it, without a query.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

from agentgov.collector.alerts.facts import AGENT, MESSAGE, TOOL, SpanFact
from agentgov.collector.risk import risk_from_log_sum, risk_log_term
from agentgov.instrumentation.injection import LIKELY


@dataclass
class _Agent:
    parent: str = ""
    depth: int = 0
    chain: tuple[str, ...] = ()


@dataclass
class LiveSession:
    session_id: str
    intent: str = ""
    last_seen: float = 0.0
    agents: dict[str, _Agent] = field(default_factory=dict)
    #: parent agent -> child agent -> when it was spawned (first seen)
    children: dict[str, dict[str, float]] = field(default_factory=dict)
    #: noisy-OR log-sum of executed command risks, as the stored session aggregate keeps
    risk_log_sum: float = 0.0
    max_command_risk: int = 0
    tool_calls: int = 0
    usd: dict[str, float] = field(default_factory=dict)  # per agent, from agent spans
    injections: int = 0
    #: when the session was killed (its first kill record), as seen by the engine
    killed_at: float | None = None
    #: the agent chain of the latest fact, for alert texts
    last_chain: tuple[str, ...] = ()
    last_agent: str = ""

    def spawn(self, parent: str, child: str, at: float) -> None:
        if not parent or not child or parent == child:
            return
        kids = self.children.setdefault(parent, {})
        if child not in kids or at < kids[child]:
            kids[child] = at

    def add_span(self, fact: SpanFact) -> None:
        self.last_seen = max(self.last_seen, fact.time)
        if fact.intent and not self.intent:
            self.intent = fact.intent
        if fact.agent_id:
            known = self.agents.get(fact.agent_id)
            if known is None or (fact.chain and not known.chain):
                self.agents[fact.agent_id] = _Agent(fact.parent_id, fact.depth, fact.chain)
            self.last_chain = fact.chain or self.last_chain
            self.last_agent = fact.agent_id
        if fact.kind == TOOL:
            self.tool_calls += 1
            self.risk_log_sum += risk_log_term(fact.risk)
            self.max_command_risk = max(self.max_command_risk, fact.risk)
        elif fact.kind == AGENT:
            if fact.usd:
                self.usd[fact.agent_id] = self.usd.get(fact.agent_id, 0.0) + fact.usd
            self.spawn(fact.parent_id, fact.agent_id, fact.time)
        elif fact.kind == MESSAGE and fact.injection:
            self.injections += 1 if fact.injection >= LIKELY else 0

    def remove_span(self, fact: SpanFact) -> None:
        """Take back what :meth:`add_span` counted for ``fact`` (a resolution replaced it).

        Sums come back down; maxima, the agents seen and their spawn times stay, as later
        spans of the same agents say the same of them.
        """
        if fact.kind == TOOL:
            self.tool_calls = max(0, self.tool_calls - 1)
            self.risk_log_sum -= risk_log_term(fact.risk)
        elif fact.kind == AGENT and fact.usd:
            self.usd[fact.agent_id] = self.usd.get(fact.agent_id, 0.0) - fact.usd
        elif fact.kind == MESSAGE and fact.injection >= LIKELY:
            self.injections = max(0, self.injections - 1)

    def fanout(self, window_s: float) -> tuple[int, str]:
        """The most children one agent spawned within any ``window_s``, and that agent."""
        best, who = 0, ""
        for parent, kids in self.children.items():
            if len(kids) <= best:
                continue
            times = sorted(kids.values())
            for i, t in enumerate(times):
                n = bisect.bisect_right(times, t + window_s) - i
                if n > best:
                    best, who = n, parent
        return best, who

    def chain_of(self, agent_id: str) -> tuple[str, ...]:
        agent = self.agents.get(agent_id)
        return agent.chain if agent is not None and agent.chain else ()

    def context(
        self,
        governed: dict[str, Any] | None,
        limits: dict[str, float | None],
        pending_risks: list[int],
        pending_approvals: int,
    ) -> dict[str, Any]:
        """The ``session`` rule fields (without the windowed ``fanout``)."""
        g = governed or {}
        log_sum = self.risk_log_sum + sum(risk_log_term(r) for r in pending_risks)
        risk = risk_from_log_sum(log_sum)
        handoffs = max(
            int(g.get("governed_handoffs", 0)),
            sum(1 for a in self.agents.values() if a.parent),
        )
        depth = max((a.depth for a in self.agents.values()), default=0)
        usd = max(float(g.get("budget_usd", 0.0)), sum(self.usd.values()))
        tool_calls = max(int(g.get("governed_tool_calls", 0)), self.tool_calls)
        agents = max(int(g.get("governed_agents", 0)), len(self.agents))

        def pct(value: float, limit: float | None) -> float | None:
            if limit is None:
                return None
            if limit <= 0:
                return 100.0 if value <= 0 else math.inf
            return round(100.0 * value / limit, 1)

        usd_pct = pct(usd, limits.get("shared_max_usd"))
        calls_pct = pct(tool_calls, limits.get("shared_max_tool_calls"))
        shares = [p for p in (usd_pct, calls_pct) if p is not None]
        return {
            "session_id": self.session_id,
            "intent": self.intent,
            "risk": risk,
            "max_command_risk": max(self.max_command_risk, max(pending_risks, default=0)),
            "agents": agents,
            "depth": depth,
            "handoffs": handoffs,
            "usd": round(usd, 6),
            "tool_calls": tool_calls,
            "usd_pct": usd_pct,
            "tool_calls_pct": calls_pct,
            "budget_pct": max(shares) if shares else None,
            "depth_pct": pct(depth, limits.get("max_delegation_depth")),
            "handoffs_pct": pct(handoffs, limits.get("max_handoffs")),
            "max_depth": limits.get("max_delegation_depth"),
            "max_handoffs": limits.get("max_handoffs"),
            "pending_approvals": pending_approvals,
            "injections": self.injections,
            "agent_id": self.last_agent,
            "chain": list(self.last_chain),
        }
