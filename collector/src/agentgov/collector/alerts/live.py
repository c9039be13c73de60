"""Live session aggregates for ``session`` rules, kept up to date as facts arrive.

What the stored tables say of a session (risk of its executed commands, agents, depth,
spend) is rebuilt here incrementally from span facts, and merged at evaluation time with
the governor's authoritative state (handoffs, budget in use, pending approvals), so a
rule sees a session the moment a span or decision changes it, without a query.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from agentgov.collector.alerts.facts import AGENT, EDGE, MESSAGE, TOOL, SpanFact
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
    #: facts naming each agent, and each (parent, child) edge: what a replaced fact takes
    #: back is forgotten once nothing else names it
    _refs: Counter[str] = field(default_factory=Counter)
    _edge_refs: Counter[tuple[str, str]] = field(default_factory=Counter)

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
            self._refs[fact.agent_id] += 1
            if fact.kind != EDGE:
                known = self.agents.get(fact.agent_id)
                # an agent's own run says who it is (a later resolution may correct it);
                # other facts only fill in an agent not seen yet
                if known is None or fact.kind == AGENT or (fact.chain and not known.chain):
                    self.agents[fact.agent_id] = _Agent(fact.parent_id, fact.depth, fact.chain)
                self.last_chain = fact.chain or self.last_chain
                self.last_agent = fact.agent_id
        if fact.kind == TOOL:
            self.tool_calls += 1
            self.risk_log_sum += risk_log_term(fact.risk)
            self.max_command_risk = max(self.max_command_risk, fact.risk)
        elif fact.kind in (AGENT, EDGE):
            if fact.usd:
                self.usd[fact.agent_id] = self.usd.get(fact.agent_id, 0.0) + fact.usd
            if fact.parent_id:
                self._edge_refs[(fact.parent_id, fact.agent_id)] += 1
            self.spawn(fact.parent_id, fact.agent_id, fact.time)
        elif fact.kind == MESSAGE and fact.injection:
            self.injections += 1 if fact.injection >= LIKELY else 0

    def remove_span(self, fact: SpanFact) -> None:
        """Take back what :meth:`add_span` counted for ``fact`` (a resolution replaced it).

        Sums come back down; an agent or edge no remaining fact names is forgotten; maxima
        stay.
        """
        if fact.agent_id:
            self._refs[fact.agent_id] -= 1
            if self._refs[fact.agent_id] <= 0:
                del self._refs[fact.agent_id]
                self.agents.pop(fact.agent_id, None)
        if fact.kind == TOOL:
            self.tool_calls = max(0, self.tool_calls - 1)
            self.risk_log_sum -= risk_log_term(fact.risk)
        elif fact.kind in (AGENT, EDGE):
            if fact.usd:
                self.usd[fact.agent_id] = self.usd.get(fact.agent_id, 0.0) - fact.usd
            edge = (fact.parent_id, fact.agent_id)
            if fact.parent_id and self._edge_refs[edge] > 0:
                self._edge_refs[edge] -= 1
                if self._edge_refs[edge] == 0:
                    del self._edge_refs[edge]
                    kids = self.children.get(fact.parent_id, {})
                    kids.pop(fact.agent_id, None)
                    if not kids:
                        self.children.pop(fact.parent_id, None)
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
        # every delegation edge, as the stored aggregate counts them (an agent handed work
        # again by another agent is one more)
        handoffs = max(
            int(g.get("governed_handoffs", 0)),
            sum(len(kids) for kids in self.children.values()),
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
