"""Carry the current lineage into threads.

asyncio tasks copy the current context on creation, so lineage follows them without
help. Threads start with an empty context; :func:`bind` captures the caller's context
(span, baggage, lineage) and runs the function inside it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from opentelemetry import context as otel_context

P = ParamSpec("P")
R = TypeVar("R")


def bind(fn: Callable[P, R]) -> Callable[P, R]:
    """Wrap ``fn`` to run in the context current at the time of this call."""
    ctx = otel_context.get_current()

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        token = otel_context.attach(ctx)
        try:
            return fn(*args, **kwargs)
        finally:
            otel_context.detach(token)

    return run
