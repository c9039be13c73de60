"""Instrumentors that trace and govern agent frameworks, one module per framework.

Each is an OpenTelemetry ``BaseInstrumentor`` registered under the
``opentelemetry_instrumentor`` entry point, so ``opentelemetry-instrument python app.py``
instruments every installed framework; :func:`instrument_all` does the same from code.
Importing this package loads no framework.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from agentgov.instrumentation.frameworks._runtime import Settings

log = logging.getLogger(__name__)

#: the settings :func:`instrument_all` shared among the instrumentors it instrumented
_shared: Settings | None = None

#: framework -> (module, instrumentor class)
FRAMEWORKS: dict[str, tuple[str, str]] = {
    "openai-agents": (f"{__name__}.openai_agents", "OpenAIAgentsInstrumentor"),
    "langgraph": (f"{__name__}.langgraph", "LangGraphInstrumentor"),
    "crewai": (f"{__name__}.crewai", "CrewAIInstrumentor"),
    "autogen": (f"{__name__}.autogen", "AutoGenInstrumentor"),
    "pydantic-ai": (f"{__name__}.pydantic_ai", "PydanticAIInstrumentor"),
    "smolagents": (f"{__name__}.smolagents", "SmolagentsInstrumentor"),
}


def _instrumentors() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for framework, (module_name, class_name) in FRAMEWORKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name in (module_name, "opentelemetry.instrumentation"):
                continue  # no instrumentor for it here
            raise
        out[framework] = getattr(module, class_name)()
    return out


def instrument_all(**kwargs: Any) -> list[str]:
    """Instrument every installed framework with the same options (one governor for all);
    skip the frameworks that are not installed. Returns the frameworks instrumented."""
    global _shared
    settings = _shared = Settings.from_kwargs(kwargs)
    options = {
        "tracer_provider": settings.tracer_provider,
        "governor": settings.governor,
        "approvals": settings.approvals,
        "approval_timeout": settings.approval_timeout,
        "on_stop": settings.on_stop,
        "mode": settings.mode,
    }
    done: list[str] = []
    skipped: list[str] = []
    for framework, instrumentor in _instrumentors().items():
        if instrumentor.is_instrumented_by_opentelemetry:
            done.append(framework)
            continue
        conflict = instrumentor._check_dependency_conflicts()
        if conflict is not None:
            skipped.append(f"{framework} ({conflict})")
            continue
        instrumentor.instrument(**options)
        done.append(framework)
    log.info(
        "agentgov instrumented %s; skipped %s",
        ", ".join(done) or "no framework",
        "; ".join(skipped) or "none",
    )
    return done


def uninstrument_all() -> list[str]:
    """Undo :func:`instrument_all` (every framework instrumented, by any route)."""
    global _shared
    done = []
    for framework, instrumentor in _instrumentors().items():
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
            done.append(framework)
    if _shared is not None and _shared.owns_governor and _shared.governor is not None:
        _shared.governor.close()
    _shared = None
    return done


__all__ = ["FRAMEWORKS", "Settings", "instrument_all", "uninstrument_all"]
