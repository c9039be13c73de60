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

from agentgov.instrumentation.frameworks._base import FrameworkInstrumentor


class SmolagentsInstrumentor(FrameworkInstrumentor):
    """Traces and governs smolagents (``ToolCallingAgent``, ``CodeAgent``, managed agents).

    ``instrument(**options)`` takes the options of :class:`~._base.FrameworkInstrumentor`.
    ``on_stop(agent, stop)`` is called with the smolagents agent whose step was stopped; for
    a stopped delegation, a ``smolagents.MultiStepAgent`` it returns does the task in place
    of the managed agent.
    """

    framework = "smolagents"
    instruments = ("smolagents >= 1.26, < 2",)
    machinery = "_smolagents"
