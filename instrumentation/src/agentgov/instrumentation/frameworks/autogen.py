"""Governed AutoGen AgentChat: every team and agent run traced with its lineage, every
speaker turn, handoff, nested agent and tool call decided by the governor first.

>>> from agentgov.instrumentation.frameworks.autogen import AutoGenInstrumentor
>>> AutoGenInstrumentor().instrument()  # doctest: +SKIP

or, with no change to the app, ``opentelemetry-instrument python app.py`` with
``AGENTGOV_URL`` and ``AGENTGOV_API_KEY`` set. Importing this module does not import
AutoGen; :meth:`~AutoGenInstrumentor.instrument` does.

How each outcome surfaces (see docs/frameworks/autogen.md):

- a tool call the governor stops does not run: the model receives the tool result
  ``[agentgov] tool call stopped by the governor: <reason> - <detail>`` (an error result,
  as AutoGen reports a failed tool) and the agent goes on; so does a stopped delegation to
  an agent or team used as a tool (``AgentTool``, ``TeamTool``);
- a handoff the governor stops is not handed over: the handing-off agent's model receives
  the stop as the handoff tool's result and the agent keeps the floor (in a ``Swarm``, the
  same speaker goes on);
- a participant's turn the governor stops (a team's delegation to it) ends the team through
  its own termination: ``TaskResult.stop_reason`` is ``[agentgov] delegation stopped by the
  governor: <reason> ...``, unless the ``on_stop`` hook names a participant already in the
  run, which then takes the turn instead (a constrained mode);
- a session kill raises :class:`~agentgov.instrumentation.governor.SessionKilled` out of
  ``run`` / ``run_stream`` at the run's next step: the next turn, model call, tool call or
  handoff.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from agentgov.instrumentation.frameworks._runtime import Runtime, Settings

_INSTRUMENTS = ("autogen-agentchat >= 0.7.5, < 0.8",)


class AutoGenInstrumentor(BaseInstrumentor):
    """Traces and governs AutoGen AgentChat (teams, ``AssistantAgent``, handoffs, agents and
    teams used as tools).

    ``instrument(**options)`` takes the options of
    :class:`~agentgov.instrumentation.frameworks._runtime.Settings` (``tracer_provider``,
    ``governor``, ``approvals``, ``approval_timeout``, ``on_stop``, ``mode``); without
    them, the environment decides (``AGENTGOV_URL``, ``AGENTGOV_API_KEY``, ``AGENTGOV_MODE``,
    ``AGENTGOV_APPROVALS``, ``AGENTGOV_APPROVAL_TIMEOUT``). ``on_stop(agent, stop)`` is
    called with the AutoGen agent whose step was stopped (the team, for a stopped turn);
    for a stopped turn, the name of a participant already in the run (or the participant)
    it returns takes that turn; for a stopped handoff, a string it returns is added to what
    the handing-off agent's model is told.
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
        from agentgov.instrumentation.frameworks import _autogen

        self._runtime = Runtime("autogen", Settings.from_kwargs(kwargs))
        self._patch = _autogen.install(self._runtime)

    def _uninstrument(self, **kwargs: Any) -> None:
        if self._patch is not None:
            self._patch.remove()
        if self._runtime is not None:
            self._runtime.close()
        self._patch = None
        self._runtime = None
