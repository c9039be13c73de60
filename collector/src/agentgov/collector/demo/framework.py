"""The demo told by real framework agents: the OpenAI Agents SDK, governed by agentgov.

Real ``agents.Agent`` objects run through the SDK's own ``Runner`` with a scripted model in
this process (no network, no API key): a planner hands off to a coordinator, which uses two
cleanup agents as tools; one of them runs ``rm -rf /opt/app/data`` (recorded, never
executed). Nothing in the app mentions agentgov: the instrumentor traces every agent and
asks the governor before every handoff, nested run and tool call. The governor refuses the
coordinator's ``drop_old_tables`` (not on the policy's tool allowlist) and the model reads
why; then an operator's kill, as ``rm -rf`` goes by, ends the run at its next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

from agentgov.collector import render
from agentgov.collector.client import CollectorClient

INTENT = "clean up old deployments"

POLICY = """\
multi_agent:
  mode: enforce
  max_handoffs: 4
  max_delegation_depth: 3
  shared_max_usd: 5
  tool_allowlist: [list_deployments, run_shell]
"""

#: what each agent's model does, turn by turn: a tool call (name, JSON arguments) or an answer
SCRIPT: dict[str, list[tuple[str, dict[str, str]] | str]] = {
    "planner": [("transfer_to_cleanup_coordinator", {})],
    "cleanup_coordinator": [
        ("list_deployments", {"path": "/opt/app/releases"}),
        ("drop_old_tables", {"sql": "DROP TABLE deployments_2023"}),
        ("cleanup_images", {"input": "prune images older than 30 days"}),
        ("cleanup_data", {"input": "remove stale deployment data"}),
        ("cleanup_images", {"input": "prune the remaining images"}),
        "The cleanup is done.",
    ],
    "cleanup_images": [
        ("run_shell", {"command": "docker image prune --filter until=720h"}),
        "Pruned the old images.",
    ],
    "cleanup_data": [
        ("run_shell", {"command": "rm -rf /opt/app/data"}),
        "Removed the stale data.",
    ],
}


@dataclass
class Transcript:
    """What happened during the run, for the report."""

    session_id: str = ""
    refused_tools: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    ended_by: str = ""


def build(on_rm: Callable[[], None], transcript: Transcript) -> Any:
    # ``on_rm`` is the operator: it sees ``rm -rf`` go by
    """The app: plain OpenAI Agents SDK agents with a scripted model; no agentgov in it."""
    from agents import Agent, ModelSettings, Usage, function_tool
    from agents.items import ModelResponse
    from agents.models.interface import Model
    from openai.types.responses import (
        ResponseFunctionToolCall,
        ResponseOutputMessage,
        ResponseOutputText,
    )

    class ScriptedModel(Model):
        """Plays each agent's turns from :data:`SCRIPT` (the agent is named in its
        instructions); reads the tool results it gets back into the transcript."""

        def __init__(self, agent: str) -> None:
            self.agent, self.turn = agent, 0

        async def get_response(
            self,
            system_instructions: str | None,
            input: str | list[Any],
            model_settings: ModelSettings,
            tools: list[Any],
            output_schema: Any,
            handoffs: list[Any],
            tracing: Any,
            **_: Any,
        ) -> ModelResponse:
            if isinstance(input, list) and input:
                last = input[-1]
                if isinstance(last, dict) and "[agentgov]" in str(last.get("output", "")):
                    transcript.refused_tools.append(str(last["output"]))
            step = SCRIPT[self.agent][min(self.turn, len(SCRIPT[self.agent]) - 1)]
            self.turn += 1
            usage = Usage(requests=1, input_tokens=400, output_tokens=40, total_tokens=440)
            if isinstance(step, str):
                text = ResponseOutputText(type="output_text", text=step, annotations=[])
                out: Any = ResponseOutputMessage(
                    id=f"msg_{secrets.token_hex(4)}", type="message", role="assistant",
                    status="completed", content=[text],
                )  # fmt: skip
            else:
                name, args = step
                out = ResponseFunctionToolCall(
                    id=f"fc_{secrets.token_hex(4)}", call_id=f"call_{secrets.token_hex(6)}",
                    type="function_call", name=name, arguments=json.dumps(args),
                )  # fmt: skip
            return ModelResponse(output=[out], usage=usage, response_id=None)

        def stream_response(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("the demo's model does not stream")

    @function_tool
    def list_deployments(path: str) -> str:
        """List the deployments under a folder."""
        return "app-v1 (2023) app-v2 (2023) app-v7 (live)"

    @function_tool
    def run_shell(command: str) -> str:
        """Run a shell command (the demo records it and runs nothing)."""
        transcript.commands.append(command)
        if command.startswith("rm -rf"):
            on_rm()
        return "(demo: recorded, not executed)"

    @function_tool
    def drop_old_tables(sql: str) -> str:
        """Drop old deployment tables."""
        return "(demo: never reached)"

    def agent(name: str, **kwargs: Any) -> Any:
        return Agent(
            name=name, instructions=f"You are {name}.", model=ScriptedModel(name), **kwargs
        )

    images = agent("cleanup_images", tools=[run_shell])
    data = agent("cleanup_data", tools=[run_shell])
    coordinator = agent(
        "cleanup_coordinator",
        tools=[
            list_deployments,
            drop_old_tables,
            images.as_tool("cleanup_images", "prune old images"),
            data.as_tool("cleanup_data", "remove stale deployment data"),
        ],
    )
    return agent("planner", handoffs=[coordinator])


def run(endpoint: str, agent_key: str, admin: CollectorClient) -> Transcript:
    """Instrument the SDK, run the app, kill the session when ``rm -rf`` goes by."""
    try:
        from agents import Runner, set_trace_processors
    except ImportError as exc:
        raise click.ClickException(
            "the framework demo needs the OpenAI Agents SDK: "
            "pip install 'agentgov-instrumentation[openai-agents]'"
        ) from exc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from agentgov.instrumentation import AsyncGovernorClient, SessionKilled
    from agentgov.instrumentation.frameworks.openai_agents import OpenAIAgentsInstrumentor

    set_trace_processors([])  # the SDK's own exporter would call OpenAI's servers
    provider = TracerProvider(resource=Resource.create({"service.name": "demo-openai-agents"}))
    provider.add_span_processor(
        BatchSpanProcessor(
            OTLPSpanExporter(
                endpoint=f"{endpoint}/v1/traces",
                headers={"authorization": f"Bearer {agent_key}"},
            ),
            schedule_delay_millis=200,
        )
    )
    governor = AsyncGovernorClient(endpoint, api_key=agent_key)
    instrumentor = OpenAIAgentsInstrumentor()
    instrumentor.instrument(tracer_provider=provider, governor=governor)
    transcript = Transcript()
    try:

        async def main() -> None:
            sid = f"demo-{secrets.token_hex(6)}"
            transcript.session_id = sid

            def kill_now() -> None:
                admin.kill(sid, reason="rm -rf on deployment data", actor="demo-operator")

            runnable = build(kill_now, transcript)
            try:
                await Runner.run(runnable, INTENT, conversation_id=sid)
            except SessionKilled as killed:
                transcript.ended_by = f"{type(killed).__name__}: {killed.reason}"

        asyncio.run(main())
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
    return transcript


def report(endpoint: str, agent_key: str, api: CollectorClient) -> None:
    click.secho(f"agentgov demo — the OpenAI Agents SDK, governed, on {endpoint}", bold=True)
    click.echo(f'The user says: "{INTENT}"\n')
    t = run(endpoint, agent_key, api)
    sid = t.session_id
    graph = api.graph(sid)
    click.secho("Delegation tree (read back from ClickHouse):", bold=True)
    click.echo(render.delegation_tree(graph) + "\n")
    click.secho("Commands with their risk:", bold=True)
    click.echo(render.audit_table(api.audit(sid)) + "\n")
    click.secho("The governor decided every step:", bold=True)
    decisions = api.get(f"/api/v1/sessions/{sid}/decisions")["decisions"]
    click.echo(render.decisions_table(decisions))
    for text in t.refused_tools:
        click.echo(f"  → the coordinator's model was told: {text[:110]}")
    click.echo("")
    click.secho("One action stopped the whole session:", bold=True)
    click.echo(
        f"  an operator killed it as `rm -rf /opt/app/data` went by; the run ended at its "
        f"next step: {t.ended_by or 'no, it had already finished'}"
    )
    verify = api.verify(sid)
    click.echo(
        f"  audit chain of {verify['records']} decision records "
        f"{'intact' if verify['ok'] else 'BROKEN'}\n"
    )
