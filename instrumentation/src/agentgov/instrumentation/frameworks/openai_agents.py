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

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from agentgov.instrumentation.frameworks._runtime import Runtime, Settings

_INSTRUMENTS = ("openai-agents >= 0.24, < 0.25",)


class OpenAIAgentsInstrumentor(BaseInstrumentor):
    """Traces and governs the OpenAI Agents SDK.

    ``instrument(**options)`` takes the options of
    :class:`~agentgov.instrumentation.frameworks._runtime.Settings` (``tracer_provider``,
    ``governor``, ``approvals``, ``approval_timeout``, ``on_stop``, ``mode``); without
    them, the environment decides (``AGENTGOV_URL``, ``AGENTGOV_API_KEY``, ``AGENTGOV_MODE``,
    ``AGENTGOV_APPROVALS``, ``AGENTGOV_APPROVAL_TIMEOUT``). ``on_stop(agent, stop)`` is
    called with the SDK agent whose step was stopped; for a stopped handoff, an
    ``agents.Agent`` it returns takes over the run in place of the target.
    """

    _runtime: Runtime | None = None
    _patch: Any = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS

    @property
    def runtime(self) -> Runtime | None:
        """The governance in force while instrumented (its settings, its governor)."""
        return self._runtime

    def _instrument(self, **kwargs: Any) -> None:
        from agentgov.instrumentation.frameworks import _openai_agents

        self._runtime = Runtime("openai-agents", Settings.from_kwargs(kwargs))
        self._patch = _openai_agents.install(self._runtime)

    def _uninstrument(self, **kwargs: Any) -> None:
        if self._patch is not None:
            self._patch.remove()
        if self._runtime is not None:
            self._runtime.close()
        self._patch = None
        self._runtime = None
