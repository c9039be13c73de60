"""smolagents: one ToolCallingAgent run calling one tool, with a scripted in-process model.

smolagents is synchronous: the step runs the agent in a worker thread
(``asyncio.to_thread``), as an asyncio app would, so the event loop is never held.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from framework_steps import Framework


def framework() -> Framework:
    from openinference.instrumentation.smolagents import (
        SmolagentsInstrumentor as OpenInference,
    )
    from smolagents import Model, ToolCallingAgent, tool
    from smolagents.models import (
        ChatMessage,
        ChatMessageToolCall,
        ChatMessageToolCallFunction,
        MessageRole,
    )
    from smolagents.monitoring import TokenUsage

    from agentgov.instrumentation.frameworks.smolagents import SmolagentsInstrumentor

    class Scripted(Model):
        """Asks for ``list_deployments`` once, then gives the final answer."""

        def generate(
            self,
            messages: list[Any],
            stop_sequences: list[str] | None = None,
            response_format: dict[str, str] | None = None,
            tools_to_call_from: list[Any] | None = None,
            **kwargs: Any,
        ) -> ChatMessage:
            listed = any("Observation:" in str(getattr(m, "content", None) or "") for m in messages)
            name, arguments = (
                ("final_answer", {"answer": "done"})
                if listed
                else ("list_deployments", {"path": "/opt/app/releases"})
            )
            call = ChatMessageToolCall(
                function=ChatMessageToolCallFunction(name=name, arguments=arguments),
                id=f"call_{secrets.token_hex(6)}",
                type="function",
            )
            return ChatMessage(
                role=MessageRole.ASSISTANT,
                content=None,
                tool_calls=[call],
                token_usage=TokenUsage(input_tokens=50, output_tokens=10),
            )

    @tool
    def list_deployments(path: str) -> str:
        """List the deployments under a folder.

        Args:
            path: the folder.
        """
        return "app-v1 app-v2"

    agent = ToolCallingAgent(
        tools=[list_deployments],
        model=Scripted(model_id="scripted"),
        name="cleanup",
        verbosity_level=-1,
        max_steps=3,
    )

    async def step() -> Any:
        return await asyncio.to_thread(agent.run, "clean up old deployments")

    return Framework("smolagents", step, SmolagentsInstrumentor(), OpenInference())
