"""Governed CrewAI: every crew run traced with its lineage, every delegation to a coworker
and every tool call decided by the governor first.

>>> from agentgov.instrumentation.frameworks.crewai import CrewAIInstrumentor
>>> CrewAIInstrumentor().instrument()  # doctest: +SKIP

or, with no change to the app, ``opentelemetry-instrument python app.py`` with
``AGENTGOV_URL`` and ``AGENTGOV_API_KEY`` set. Importing this module does not import
CrewAI; :meth:`~CrewAIInstrumentor.instrument` does.

How each outcome surfaces (see docs/frameworks/crewai.md):

- a tool call the governor stops does not run: CrewAI blocks it (its own before-tool-call
  hook refusal) and the model receives the tool result
  ``[agentgov] tool call stopped by the governor: <reason> - <detail>``; the run goes on;
- a delegation to a coworker ("Delegate work to coworker", "Ask question to coworker")
  the governor stops is blocked the same way: the coworker does not start and the
  delegating agent's model receives ``[agentgov] delegation stopped by the governor:
  <reason>``, unless the ``on_stop`` hook returns a CrewAI agent, which then does the
  delegated work itself, as the delegating agent (a constrained, single-agent mode);
- a task the crew assigns (a sequential crew's next task) that the governor stops raises
  :class:`~agentgov.instrumentation.frameworks._crewai.StoppedByGovernor` out of
  ``Crew.kickoff`` (an agentgov ``Stopped`` and a ``crewai.hooks.HookAborted``, which
  CrewAI neither retries nor wraps), unless ``on_stop`` returns an agent to do the task;
- a session kill raises ``SessionKilledByGovernor`` (a ``SessionKilled``) out of
  ``Crew.kickoff`` at the run's next step: the next model call, tool call, delegation or
  task.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from agentgov.instrumentation.frameworks._runtime import Runtime, Settings

_INSTRUMENTS = ("crewai >= 1.15, < 2",)


class CrewAIInstrumentor(BaseInstrumentor):
    """Traces and governs CrewAI crews (sequential and hierarchical).

    ``instrument(**options)`` takes the options of
    :class:`~agentgov.instrumentation.frameworks._runtime.Settings` (``tracer_provider``,
    ``governor``, ``approvals``, ``approval_timeout``, ``on_stop``, ``mode``); without
    them, the environment decides (``AGENTGOV_URL``, ``AGENTGOV_API_KEY``, ``AGENTGOV_MODE``,
    ``AGENTGOV_APPROVALS``, ``AGENTGOV_APPROVAL_TIMEOUT``). ``on_stop(agent, stop)`` is
    called with the CrewAI agent whose step was stopped (the ``Crew`` for a task it
    assigns); for a stopped delegation or task, a ``crewai.Agent`` it returns does the
    work in place of the one refused.
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
        from agentgov.instrumentation.frameworks import _crewai

        self._runtime = Runtime("crewai", Settings.from_kwargs(kwargs))
        self._patch = _crewai.install(self._runtime)

    def _uninstrument(self, **kwargs: Any) -> None:
        if self._patch is not None:
            self._patch.remove()
        if self._runtime is not None:
            self._runtime.close()
        self._patch = None
        self._runtime = None
