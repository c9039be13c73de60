"""AutoGen AgentChat: one ``AssistantAgent`` run calling one async tool, with a scripted
model client (autogen_ext's replay client, answering from the conversation)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from framework_steps import Framework


def framework() -> Framework:
    from autogen_agentchat.agents import AssistantAgent
    from autogen_core import CancellationToken, FunctionCall
    from autogen_core.models import (
        CreateResult,
        FunctionExecutionResultMessage,
        LLMMessage,
        ModelFamily,
        RequestUsage,
    )
    from autogen_core.tools import FunctionTool
    from autogen_ext.models.replay import ReplayChatCompletionClient
    from openinference.instrumentation.autogen_agentchat import (
        AutogenAgentChatInstrumentor as OpenInference,
    )

    from agentgov.instrumentation.frameworks.autogen import AutoGenInstrumentor

    class Scripted(ReplayChatCompletionClient):
        """Asks for ``list_deployments`` once, then answers."""

        async def create(
            self,
            messages: Sequence[LLMMessage],
            *,
            tools: Sequence[Any] = (),
            tool_choice: Any = "auto",
            json_output: Any = None,
            extra_create_args: Mapping[str, Any] = {},
            cancellation_token: CancellationToken | None = None,
        ) -> CreateResult:
            usage = RequestUsage(prompt_tokens=50, completion_tokens=10)
            if any(isinstance(m, FunctionExecutionResultMessage) for m in messages):
                return CreateResult(finish_reason="stop", content="done", usage=usage, cached=False)
            call = FunctionCall(
                id=f"call_{secrets.token_hex(6)}",
                name="list_deployments",
                arguments='{"path": "/opt/app/releases"}',
            )
            return CreateResult(
                finish_reason="function_calls", content=[call], usage=usage, cached=False
            )

    async def list_deployments(path: str) -> str:
        """List the deployments under a folder."""
        return "app-v1 app-v2"

    model = Scripted(
        [],
        model_info={
            "vision": False,
            "function_calling": True,
            "json_output": False,
            "family": ModelFamily.UNKNOWN,
            "structured_output": False,
        },
    )
    agent = AssistantAgent(
        "cleanup",
        model_client=model,
        tools=[FunctionTool(list_deployments, "List the deployments under a folder.")],
        max_tool_iterations=2,  # the tool's result goes back to the model, which answers
        system_message="You clean up old deployments.",
    )

    async def step() -> Any:
        await agent.on_reset(CancellationToken())  # each step starts a fresh conversation
        return await agent.run(task="clean up old deployments")

    return Framework("autogen", step, AutoGenInstrumentor(), OpenInference())
