"""OpenAI Agents SDK: one agent run calling one async tool, with a scripted model."""

from __future__ import annotations

import secrets
from typing import Any

from framework_steps import Framework


def framework() -> Framework:
    from agents import Agent, ModelSettings, Runner, Usage, function_tool, set_trace_processors
    from agents.items import ModelResponse
    from agents.models.interface import Model
    from openai.types.responses import (
        ResponseFunctionToolCall,
        ResponseOutputMessage,
        ResponseOutputText,
    )
    from openinference.instrumentation.openai_agents import (
        OpenAIAgentsInstrumentor as OpenInference,
    )

    from agentgov.instrumentation.frameworks.openai_agents import OpenAIAgentsInstrumentor

    set_trace_processors([])  # no OpenAI exporter: OpenInference installs its own processor

    class Scripted(Model):
        """Asks for ``list_deployments`` once, then answers."""

        async def get_response(
            self,
            system_instructions: str | None,
            input: str | list[Any],
            model_settings: ModelSettings,
            tools: list[Any],
            output_schema: Any,
            handoffs: list[Any],
            tracing: Any,
            *,
            previous_response_id: str | None,
            conversation_id: str | None,
            prompt: Any,
        ) -> ModelResponse:
            done = isinstance(input, list) and any(
                isinstance(i, dict) and i.get("type") == "function_call_output" for i in input
            )
            usage = Usage(requests=1, input_tokens=50, output_tokens=10, total_tokens=60)
            if done:
                text = ResponseOutputText(type="output_text", text="done", annotations=[])
                message = ResponseOutputMessage(
                    id="msg_1",
                    type="message",
                    role="assistant",
                    status="completed",
                    content=[text],
                )
                return ModelResponse(output=[message], usage=usage, response_id=None)
            call = ResponseFunctionToolCall(
                id="fc_1",
                call_id=f"call_{secrets.token_hex(6)}",
                type="function_call",
                name="list_deployments",
                arguments='{"path": "/opt/app/releases"}',
            )
            return ModelResponse(output=[call], usage=usage, response_id=None)

        def stream_response(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

    # async: a sync tool runs in a worker thread, whose hand-offs of the GIL would be most
    # of what is measured
    @function_tool
    async def list_deployments(path: str) -> str:
        """List the deployments under a folder."""
        return "app-v1 app-v2"

    agent = Agent(
        name="cleanup",
        instructions="You clean up old deployments.",
        tools=[list_deployments],
        model=Scripted(),
    )

    async def step() -> Any:
        return await Runner.run(agent, "clean up old deployments")

    return Framework("openai-agents", step, OpenAIAgentsInstrumentor(), OpenInference())
