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

from agentgov.instrumentation.frameworks._base import FrameworkInstrumentor


class AutoGenInstrumentor(FrameworkInstrumentor):
    """Traces and governs AutoGen AgentChat (teams, ``AssistantAgent``, handoffs, agents and
    teams used as tools).

    ``instrument(**options)`` takes the options of :class:`~._base.FrameworkInstrumentor`.
    ``on_stop(agent, stop)`` is called with the AutoGen agent whose step was stopped (the
    team, for a stopped turn); for a stopped turn, the name of a participant already in the
    run (or the participant) it returns takes that turn; for a stopped handoff, a string it
    returns is added to what the handing-off agent's model is told.
    """

    framework = "autogen"
    instruments = ("autogen-agentchat >= 0.7.5, < 0.8",)
    machinery = "_autogen"
