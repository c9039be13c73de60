"""What every framework instrumentor is: an OpenTelemetry ``BaseInstrumentor`` whose
``instrument(**options)`` builds a :class:`~._runtime.Runtime` from the options and loads
the framework's side (a module of this package that imports the framework) to patch it.

A framework's public module subclasses :class:`FrameworkInstrumentor` with its name, the
versions it instruments and its machinery module's name; importing it loads no framework.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection
from typing import Any, ClassVar

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from agentgov.instrumentation.frameworks._runtime import Runtime, Settings


class FrameworkInstrumentor(BaseInstrumentor):
    """Traces and governs one framework.

    ``instrument(**options)`` takes the options of
    :class:`~agentgov.instrumentation.frameworks._runtime.Settings` (``tracer_provider``,
    ``governor``, ``approvals``, ``approval_timeout``, ``on_stop``, ``mode``); without
    them, the environment decides (``AGENTGOV_URL``, ``AGENTGOV_API_KEY``, ``AGENTGOV_MODE``,
    ``AGENTGOV_APPROVALS``, ``AGENTGOV_APPROVAL_TIMEOUT``).
    """

    #: the framework's name (``agentgov.framework`` on its workflow spans)
    framework: ClassVar[str]
    #: the framework distributions and versions instrumented (requirement specifiers)
    instruments: ClassVar[tuple[str, ...]]
    #: the module of this package that imports the framework: its ``install(runtime)``
    #: patches the framework and returns the patch, whose ``remove()`` undoes it
    machinery: ClassVar[str]

    _runtime: Runtime | None = None
    _patch: Any = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return self.instruments

    @property
    def runtime(self) -> Runtime | None:
        """The governance in force while instrumented (its settings, its governor)."""
        return self._runtime

    def _instrument(self, **kwargs: Any) -> None:
        module = importlib.import_module(f"{__package__}.{self.machinery}")
        runtime = Runtime(self.framework, Settings.from_kwargs(kwargs))
        try:
            self._patch = module.install(runtime)
        except BaseException:
            runtime.close()
            raise
        self._runtime = runtime

    def _uninstrument(self, **kwargs: Any) -> None:
        if self._patch is not None:
            self._patch.remove()
        if self._runtime is not None:
            self._runtime.close()
        self._patch = None
        self._runtime = None
