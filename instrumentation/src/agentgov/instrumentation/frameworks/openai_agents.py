"""Governed OpenAI Agents SDK: every agent run traced with its lineage, every handoff and
tool call decided by the governor first.

>>> from agentgov.instrumentation.frameworks.openai_agents import OpenAIAgentsInstrumentor
>>> OpenAIAgentsInstrumentor().instrument()  # doctest: +SKIP

or, with no change to the app, ``opentelemetry-instrument python app.py`` with
``AGENTGOV_URL`` and ``AGENTGOV_API_KEY`` set. Importing this module does not import the
SDK; :meth:`~OpenAIAgentsInstrumentor.instrument` does.

How each outcome surfaces (see docs/frameworks/openai-agents.md):

- a tool call the governor stops does not run: the model receives the tool result
  ``[agentgov] tool call stopped by the governor: <reason> - <detail>`` (the SDK's own
  rejection of a tool call) and the run goes on; so does a stopped delegation to an agent
  used as a tool;
- a handoff the governor stops raises
  :class:`~agentgov.instrumentation.frameworks._openai_agents.StoppedByGovernor` out of
  ``Runner.run`` (an agentgov ``Stopped`` and an ``agents.exceptions.AgentsException``),
  unless the ``on_stop`` hook returns an agent, which then takes over in place of the
  handoff's target (a constrained, single-agent mode);
- a session kill raises ``SessionKilledByGovernor`` (a ``SessionKilled``) at the run's next
  step: the next model call, tool call or handoff.
"""

from __future__ import annotations

from agentgov.instrumentation.frameworks._base import FrameworkInstrumentor


class OpenAIAgentsInstrumentor(FrameworkInstrumentor):
    """Traces and governs the OpenAI Agents SDK.

    ``instrument(**options)`` takes the options of :class:`~._base.FrameworkInstrumentor`.
    ``on_stop(agent, stop)`` is called with the SDK agent whose step was stopped; for a
    stopped handoff, an ``agents.Agent`` it returns takes over the run in place of the
    target.
    """

    framework = "openai-agents"
    instruments = ("openai-agents >= 0.24, < 0.25",)
    machinery = "_openai_agents"
