"""LangGraph: one agent run (a ``create_agent`` graph) calling one async tool, with an
in-process scripted chat model."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from framework_steps import Framework


def framework() -> Framework:
    from langchain.agents import create_agent
    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
    from langchain_core.outputs import ChatGeneration, ChatResult
    from langchain_core.tools import tool
    from openinference.instrumentation.langchain import LangChainInstrumentor

    from agentgov.instrumentation.frameworks.langgraph import LangGraphInstrumentor

    class Scripted(BaseChatModel):
        """Asks for ``list_deployments`` once, then answers."""

        @property
        def _llm_type(self) -> str:
            return "scripted"

        def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
            return self

        def _reply(self, messages: list[BaseMessage]) -> ChatResult:
            usage = {"input_tokens": 50, "output_tokens": 10, "total_tokens": 60}
            if any(isinstance(m, ToolMessage) for m in messages):
                message = AIMessage("done", usage_metadata=usage)
            else:
                call = {
                    "name": "list_deployments",
                    "args": {"path": "/opt/app/releases"},
                    "id": f"call_{secrets.token_hex(6)}",
                }
                message = AIMessage("", tool_calls=[call], usage_metadata=usage)
            return ChatResult(generations=[ChatGeneration(message=message)])

        def _generate(
            self,
            messages: list[BaseMessage],
            stop: list[str] | None = None,
            run_manager: CallbackManagerForLLMRun | None = None,
            **kwargs: Any,
        ) -> ChatResult:
            return self._reply(messages)

        async def _agenerate(
            self,
            messages: list[BaseMessage],
            stop: list[str] | None = None,
            run_manager: AsyncCallbackManagerForLLMRun | None = None,
            **kwargs: Any,
        ) -> ChatResult:
            return self._reply(messages)

    # async: a sync tool runs in a worker thread, whose hand-offs of the GIL would be most
    # of what is measured
    @tool
    async def list_deployments(path: str) -> str:
        """List the deployments under a folder."""
        return "app-v1 app-v2"

    agent = create_agent(
        Scripted(),
        [list_deployments],
        system_prompt="You clean up old deployments.",
        name="cleanup",
    )

    async def step() -> Any:
        return await agent.ainvoke({"messages": [HumanMessage("clean up old deployments")]})

    return Framework("langgraph", step, LangGraphInstrumentor(), LangChainInstrumentor())
