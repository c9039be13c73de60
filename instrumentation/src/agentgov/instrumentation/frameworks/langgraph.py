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

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from agentgov.instrumentation.frameworks._runtime import Runtime, Settings

_INSTRUMENTS = ("langgraph >= 1.0, < 2", "langchain-core >= 1.0, < 2")


class LangGraphInstrumentor(BaseInstrumentor):
    """Traces and governs LangGraph graphs and their LangChain tools.

    ``instrument(**options)`` takes the options of
    :class:`~agentgov.instrumentation.frameworks._runtime.Settings` (``tracer_provider``,
    ``governor``, ``approvals``, ``approval_timeout``, ``on_stop``, ``mode``); without
    them, the environment decides (``AGENTGOV_URL``, ``AGENTGOV_API_KEY``, ``AGENTGOV_MODE``,
    ``AGENTGOV_APPROVALS``, ``AGENTGOV_APPROVAL_TIMEOUT``). ``on_stop(graph, stop)`` is
    called with the compiled graph of the agent whose step was stopped; what it returns is
    described in the module's docstring.
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
        from agentgov.instrumentation.frameworks import _langgraph

        self._runtime = Runtime("langgraph", Settings.from_kwargs(kwargs))
        self._patch = _langgraph.install(self._runtime)

    def _uninstrument(self, **kwargs: Any) -> None:
        if self._patch is not None:
            self._patch.remove()
        if self._runtime is not None:
            self._runtime.close()
        self._patch = None
        self._runtime = None
