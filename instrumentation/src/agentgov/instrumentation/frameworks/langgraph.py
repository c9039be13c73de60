"""Governed LangGraph: every agent graph run traced with its lineage, every handoff and tool
call decided by the governor first.

>>> from agentgov.instrumentation.frameworks.langgraph import LangGraphInstrumentor
>>> LangGraphInstrumentor().instrument()  # doctest: +SKIP

or, with no change to the app, ``opentelemetry-instrument python app.py`` with
``AGENTGOV_URL`` and ``AGENTGOV_API_KEY`` set. Importing this module does not import
LangGraph or LangChain; :meth:`~LangGraphInstrumentor.instrument` does.

An agent is a compiled graph with a name of its own (``create_react_agent(..., name=)``,
``langchain.agents.create_agent(..., name=)``, ``create_supervisor(...).compile(name=)``,
``StateGraph.compile(name=)``). How each outcome surfaces (see docs/frameworks/langgraph.md):

- a tool call the governor stops does not run: the model receives the tool result
  ``[agentgov] tool call stopped by the governor: <reason> - <detail>`` (a ``ToolMessage``
  with ``status="error"``) and the run goes on;
- a handoff (a tool carrying ``__handoff_destination`` metadata, as langgraph-supervisor's
  ``transfer_to_<agent>``) the governor stops does not hand over: the handing-off agent's
  model receives ``[agentgov] delegation stopped by the governor: <reason> ...`` as the
  tool's result, unless the ``on_stop`` hook answers otherwise (a text, a ``ToolMessage``,
  or a ``Command`` that routes to a node running as the stopped agent: a constrained mode);
- a nested agent graph run (a subgraph, an agent invoked from a node or a tool) the
  governor stops raises :class:`~agentgov.instrumentation.governor.Stopped` out of that
  ``invoke`` (inside a tool: the tool's result names the reason), unless ``on_stop`` returns
  a compiled graph, which then runs in its place as the delegating agent;
- a session kill raises
  :class:`~agentgov.instrumentation.frameworks._langgraph.SessionKilledByGovernor` (a
  ``SessionKilled`` and a ``langgraph.errors.GraphBubbleUp``, so no tool-error handler or
  retry policy turns it into a result) at the run's next step: the next model call, tool
  call, handoff or agent start.
"""

from __future__ import annotations

from agentgov.instrumentation.frameworks._base import FrameworkInstrumentor


class LangGraphInstrumentor(FrameworkInstrumentor):
    """Traces and governs LangGraph graphs and their LangChain tools.

    ``instrument(**options)`` takes the options of :class:`~._base.FrameworkInstrumentor`.
    ``on_stop(graph, stop)`` is called with the compiled graph of the agent whose step was
    stopped; what it returns is described in the module's docstring.
    """

    framework = "langgraph"
    instruments = ("langgraph >= 1.0, < 2", "langchain-core >= 1.0, < 2")
    machinery = "_langgraph"
