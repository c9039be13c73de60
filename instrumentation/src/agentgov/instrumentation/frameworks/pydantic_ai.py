"""Governed Pydantic AI: every agent run traced with its lineage, every tool call and every
delegation (an agent run started inside another agent's tool) decided by the governor first.

>>> from agentgov.instrumentation.frameworks.pydantic_ai import PydanticAIInstrumentor
>>> PydanticAIInstrumentor().instrument()  # doctest: +SKIP

or, with no change to the app, ``opentelemetry-instrument python app.py`` with
``AGENTGOV_URL`` and ``AGENTGOV_API_KEY`` set. Importing this module does not import
Pydantic AI; :meth:`~PydanticAIInstrumentor.instrument` does.

How each outcome surfaces (see docs/frameworks/pydantic-ai.md):

- a tool call the governor stops does not run: Pydantic AI's ``ToolFailed`` gives the model
  the failed tool result ``[agentgov] tool call stopped by the governor: <reason> - <detail>``
  and the run goes on;
- a delegation the governor stops (an agent run started inside a tool) does not start: the
  nested ``run()`` raises
  :class:`~agentgov.instrumentation.frameworks._pydantic_ai.StoppedByGovernor` (an agentgov
  ``Stopped`` and a ``pydantic_ai.exceptions.AgentRunError``), which reaches the calling
  agent's model as that tool's failed result naming the reason, unless the ``on_stop`` hook
  returns an agent, which then does the task itself as the delegating agent (a constrained,
  single-agent mode);
- a session kill raises ``SessionKilledByGovernor`` (a ``SessionKilled``) out of the run at
  its next step (the next model request, tool call or delegation), nested runs included.
"""

from __future__ import annotations

from agentgov.instrumentation.frameworks._base import FrameworkInstrumentor


class PydanticAIInstrumentor(FrameworkInstrumentor):
    """Traces and governs Pydantic AI agents.

    ``instrument(**options)`` takes the options of :class:`~._base.FrameworkInstrumentor`.
    ``on_stop(agent, stop)`` is called with the Pydantic AI agent whose step was stopped;
    for a stopped delegation, a ``pydantic_ai`` agent it returns runs the delegated task in
    place of the refused one.
    """

    framework = "pydantic-ai"
    instruments = ("pydantic-ai-slim >= 2.68, < 3",)
    machinery = "_pydantic_ai"
