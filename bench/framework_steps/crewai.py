"""CrewAI: one agent executing one task that calls one tool, with an in-process scripted
model (CrewAI's native async task execution, so the step runs on the benchmark's loop)."""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

from framework_steps import Framework


def framework() -> Framework:
    # offline: no telemetry, no trace upload, no first-run prompt
    for name, value in (
        ("CREWAI_DISABLE_TELEMETRY", "true"),
        ("CREWAI_DISABLE_TRACKING", "true"),
        ("CREWAI_TRACING_ENABLED", "false"),
        ("CREWAI_TESTING", "true"),
    ):
        os.environ.setdefault(name, value)

    from crewai import Agent, Task
    from crewai.events.event_listener import event_listener
    from crewai.llms.base_llm import BaseLLM
    from crewai.tools import tool
    from openinference.instrumentation.crewai import CrewAIInstrumentor as OpenInference

    from agentgov.instrumentation.frameworks.crewai import CrewAIInstrumentor

    class Scripted(BaseLLM):
        """Asks for ``list_deployments`` once, then answers (50 tokens in, 10 out)."""

        def call(self, messages: Any, *args: Any, **kwargs: Any) -> Any:
            self._track_token_usage_internal(
                {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60}
            )
            if any(isinstance(m, dict) and m.get("role") == "tool" for m in messages):
                return "done"
            return [
                {
                    "id": f"call_{secrets.token_hex(6)}",
                    "type": "function",
                    "function": {
                        "name": "list_deployments",
                        "arguments": '{"path": "/opt/app/releases"}',
                    },
                }
            ]

        async def acall(self, messages: Any, *args: Any, **kwargs: Any) -> Any:
            return self.call(messages, *args, **kwargs)

        def supports_function_calling(self) -> bool:
            return True

    @tool("list_deployments")
    def list_deployments(path: str) -> str:
        """List the deployments under a folder."""
        return "app-v1 app-v2"

    # CrewAI's console panels are on until a crew says otherwise (this step has no crew),
    # and it warns at each call of a model with no native token count
    event_listener.formatter.verbose = False
    logging.getLogger("crewai.llms.base_llm").setLevel(logging.ERROR)

    agent = Agent(
        role="cleanup",
        goal="Clean up old deployments.",
        backstory="You clean up old deployments.",
        tools=[list_deployments],
        llm=Scripted(model="scripted"),
    )
    task = Task(
        description="clean up old deployments", expected_output="What was done.", agent=agent
    )

    async def step() -> Any:
        return await task.aexecute_sync()

    return Framework("crewai", step, CrewAIInstrumentor(), OpenInference())
