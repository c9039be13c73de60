"""Governed smolagents: every agent run traced with its lineage, every delegation to a
managed agent and every tool call decided by the governor first.

>>> from agentgov.instrumentation.frameworks.smolagents import SmolagentsInstrumentor
>>> SmolagentsInstrumentor().instrument()  # doctest: +SKIP

or, with no change to the app, ``opentelemetry-instrument python app.py`` with
``AGENTGOV_URL`` and ``AGENTGOV_API_KEY`` set. Importing this module does not import
smolagents; :meth:`~SmolagentsInstrumentor.instrument` does.

How each outcome surfaces (see docs/frameworks/smolagents.md):

- a tool call, a delegation to a managed agent or a ``CodeAgent``'s code (decided as a
  ``python_interpreter`` call) that the governor stops does not run: the step fails as
  smolagents' own failed steps do, with an error naming the reason
  (``[agentgov] tool call stopped by the governor: <reason> - <detail>``, raised as
  :class:`~agentgov.instrumentation.frameworks._smolagents.StoppedByGovernor`), the model
  is shown it and the run goes on;
- for a stopped delegation, an agent the ``on_stop`` hook returns does the managed agent's
  task instead, as the delegating agent (a constrained, single-agent mode);
- a session kill raises ``SessionKilledByGovernor`` (a ``SessionKilled``) out of ``run``
  at the run's next step, in every agent of the session.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from agentgov.instrumentation.frameworks._runtime import Runtime, Settings

_INSTRUMENTS = ("smolagents >= 1.26, < 2",)


class SmolagentsInstrumentor(BaseInstrumentor):
    """Traces and governs smolagents (``ToolCallingAgent``, ``CodeAgent``, managed agents).

    ``instrument(**options)`` takes the options of
    :class:`~agentgov.instrumentation.frameworks._runtime.Settings` (``tracer_provider``,
    ``governor``, ``approvals``, ``approval_timeout``, ``on_stop``, ``mode``); without
    them, the environment decides (``AGENTGOV_URL``, ``AGENTGOV_API_KEY``, ``AGENTGOV_MODE``,
    ``AGENTGOV_APPROVALS``, ``AGENTGOV_APPROVAL_TIMEOUT``). ``on_stop(agent, stop)`` is
    called with the smolagents agent whose step was stopped; for a stopped delegation, a
    ``smolagents.MultiStepAgent`` it returns does the task in place of the managed agent.
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
        from agentgov.instrumentation.frameworks import _smolagents

        self._runtime = Runtime("smolagents", Settings.from_kwargs(kwargs))
        self._patch = _smolagents.install(self._runtime)

    def _uninstrument(self, **kwargs: Any) -> None:
        if self._patch is not None:
            self._patch.remove()
        if self._runtime is not None:
            self._runtime.close()
        self._patch = None
        self._runtime = None
