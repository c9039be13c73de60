"""agentgov instrumentation: governed agent spans with lineage, for agent processes.

Light by design: importing it loads the OpenTelemetry API only (the SDK and the OTLP
exporter when :func:`configure` is called, a framework only when its instrumentor in
:mod:`agentgov.instrumentation.frameworks` is used).

>>> from agentgov.instrumentation import Governance
>>> gov = Governance()
>>> with gov.session("clean up old deployments") as session:
...     with session.agent("planner", role="planner") as planner:
...         with planner.delegate("orchestrator", task="plan the cleanup") as orch:
...             with orch.tool("shell", command="ls /opt/app"):
...                 pass
"""

from agentgov.instrumentation import conventions
from agentgov.instrumentation.context import bind
from agentgov.instrumentation.governor import (
    AsyncGovernorClient,
    AwaitingApproval,
    Decision,
    GovernorClient,
    GovernorUnavailable,
    SessionKilled,
    Stopped,
)
from agentgov.instrumentation.lineage import InvalidIdError, Lineage, current_lineage
from agentgov.instrumentation.plan import PlanAnswer, PlannedAgent, PlanRejected
from agentgov.instrumentation.propagation import extract, inject, inject_env
from agentgov.instrumentation.setup import configure
from agentgov.instrumentation.spans import (
    AgentSpan,
    Governance,
    Handoff,
    NoSessionError,
    SessionScope,
    ToolSpan,
)

__all__ = [
    "AgentSpan",
    "AsyncGovernorClient",
    "AwaitingApproval",
    "Decision",
    "GovernorClient",
    "GovernorUnavailable",
    "SessionKilled",
    "Stopped",
    "Governance",
    "Handoff",
    "InvalidIdError",
    "Lineage",
    "NoSessionError",
    "PlanAnswer",
    "PlannedAgent",
    "PlanRejected",
    "SessionScope",
    "ToolSpan",
    "bind",
    "configure",
    "conventions",
    "current_lineage",
    "extract",
    "inject",
    "inject_env",
]
