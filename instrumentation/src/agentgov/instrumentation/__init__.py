"""agentgov instrumentation: governed agent spans with lineage, for agent processes.

Light by design: it needs only the OpenTelemetry API, SDK and OTLP exporter.

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
    Decision,
    GovernorClient,
    GovernorUnavailable,
    SessionKilled,
    Stopped,
)
from agentgov.instrumentation.lineage import InvalidIdError, Lineage, current_lineage
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
