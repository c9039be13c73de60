"""One module per framework: its benchmark step and the two instrumentors to compare.

Each module defines ``framework() -> Framework``; bench/frameworks.py finds them all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Framework:
    """One framework's benchmark: a step, and the two instrumentors to compare."""

    name: str
    #: one agent step (a coroutine function; sync frameworks wrap their step in one)
    step: Callable[[], Awaitable[Any]]
    #: agentgov's instrumentor and OpenInference's (BaseInstrumentor instances)
    agentgov: Any
    openinference: Any
