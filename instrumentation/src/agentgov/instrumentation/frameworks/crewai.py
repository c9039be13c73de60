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

from agentgov.instrumentation.frameworks._base import FrameworkInstrumentor


class CrewAIInstrumentor(FrameworkInstrumentor):
    """Traces and governs CrewAI crews (sequential and hierarchical).

    ``instrument(**options)`` takes the options of :class:`~._base.FrameworkInstrumentor`.
    ``on_stop(agent, stop)`` is called with the CrewAI agent whose step was stopped (the
    ``Crew`` for a task it assigns); for a stopped delegation or task, a ``crewai.Agent`` it
    returns does the work in place of the one refused.
    """

    framework = "crewai"
    instruments = ("crewai >= 1.15, < 2",)
    machinery = "_crewai"
