"""Pydantic AI: one agent run calling one async tool, with Pydantic AI's own FunctionModel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from framework_steps import Framework


class OpenInference:
    """OpenInference for Pydantic AI as its documentation sets it up: Pydantic AI's own
    instrumentation, its spans rewritten by OpenInference's span processor. The processor
    cannot be taken off a provider again, so it gets one of its own, of the same kind as
    the benchmark's (a batch processor, a discarding exporter)."""

    def __init__(self) -> None:
        self._provider: Any = None

    def instrument(self, tracer_provider: Any = None) -> None:
        from openinference.instrumentation.pydantic_ai import OpenInferenceSpanProcessor
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
        from pydantic_ai import Agent
        from pydantic_ai.models.instrumented import InstrumentationSettings

        class Discard(SpanExporter):
            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(OpenInferenceSpanProcessor())
        provider.add_span_processor(BatchSpanProcessor(Discard(), max_queue_size=1 << 16))
        self._provider = provider
        Agent.instrument_all(InstrumentationSettings(tracer_provider=provider))

    def uninstrument(self) -> None:
        from pydantic_ai import Agent

        Agent.instrument_all(False)
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None


def framework() -> Framework:
    from pydantic_ai import Agent
    from pydantic_ai.messages import (
        ModelMessage,
        ModelRequest,
        ModelResponse,
        TextPart,
        ToolCallPart,
        ToolReturnPart,
    )
    from pydantic_ai.models.function import AgentInfo, FunctionModel
    from pydantic_ai.usage import RequestUsage

    from agentgov.instrumentation.frameworks.pydantic_ai import PydanticAIInstrumentor

    def scripted(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        """Asks for ``list_deployments`` once, then answers."""
        usage = RequestUsage(input_tokens=50, output_tokens=10)
        done = any(
            isinstance(part, ToolReturnPart)
            for message in messages
            if isinstance(message, ModelRequest)
            for part in message.parts
        )
        if done:
            return ModelResponse(parts=[TextPart("done")], usage=usage)
        call = ToolCallPart("list_deployments", {"path": "/opt/app/releases"})
        return ModelResponse(parts=[call], usage=usage)

    agent = Agent(
        FunctionModel(scripted),
        name="cleanup",
        instructions="You clean up old deployments.",
    )

    # async: a sync tool runs in a worker thread, whose hand-offs of the GIL would be most
    # of what is measured
    @agent.tool_plain
    async def list_deployments(path: str) -> str:
        """List the deployments under a folder."""
        return "app-v1 app-v2"

    async def step() -> Any:
        return await agent.run("clean up old deployments")

    return Framework("pydantic-ai", step, PydanticAIInstrumentor(), OpenInference())
