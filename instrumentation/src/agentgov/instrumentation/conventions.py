"""The agentgov semantic conventions: attribute and event names on the wire.

OpenTelemetry GenAI names are used where they exist; governance facts live under
``agentgov.*``. Agents written in other languages emit exactly these names, and the
collector derives every governance table from them (see docs/semantic-conventions.md).
"""

from typing import Final

# OpenTelemetry GenAI conventions
OPERATION_NAME: Final = "gen_ai.operation.name"
AGENT_ID: Final = "gen_ai.agent.id"
AGENT_NAME: Final = "gen_ai.agent.name"
TOOL_NAME: Final = "gen_ai.tool.name"
USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
#: the session, on every agentgov span (GenAI's name for a conversation or thread)
CONVERSATION_ID: Final = "gen_ai.conversation.id"
WORKFLOW_NAME: Final = "gen_ai.workflow.name"

OP_INVOKE_AGENT: Final = "invoke_agent"
OP_EXECUTE_TOOL: Final = "execute_tool"
#: the root of a framework run: the whole workflow a human instruction started
OP_INVOKE_WORKFLOW: Final = "invoke_workflow"

# agentgov governance namespace
SESSION_ID: Final = "agentgov.session.id"
PARENT_AGENT_ID: Final = "agentgov.agent.parent_id"
DELEGATION_CHAIN: Final = "agentgov.delegation.chain"
DELEGATION_DEPTH: Final = "agentgov.delegation.depth"
INTENT: Final = "agentgov.intent"
TASK: Final = "agentgov.task"
AGENT_ROLE: Final = "agentgov.agent.role"
PERMISSIONS: Final = "agentgov.permissions"
COMMAND: Final = "agentgov.command"
RESOURCES: Final = "agentgov.resources"
RISK_SCORE: Final = "agentgov.risk.score"
COST_USD: Final = "agentgov.cost.usd"
#: id of the signed lineage token the agent held, and the span's proof made with it
LINEAGE_TOKEN_ID: Final = "agentgov.lineage.token_id"
LINEAGE_PROOF: Final = "agentgov.lineage.proof"

# inter-agent message event
MESSAGE_EVENT: Final = "agentgov.message"
MESSAGE_FROM: Final = "agentgov.message.from"
MESSAGE_TO: Final = "agentgov.message.to"
MESSAGE_DIGEST: Final = "agentgov.message.digest"
MESSAGE_SIZE: Final = "agentgov.message.size"
MESSAGE_INJECTION: Final = "agentgov.message.injection"  # 0-100
MESSAGE_INJECTION_SIGNALS: Final = "agentgov.message.injection.signals"

# usage event, for spend recorded after a span started
USAGE_EVENT: Final = "agentgov.usage"

# Baggage keys that carry lineage between processes (W3C baggage).
BAGGAGE_SESSION_ID: Final = SESSION_ID
BAGGAGE_AGENT_ID: Final = "agentgov.agent.id"
BAGGAGE_CHAIN: Final = DELEGATION_CHAIN
BAGGAGE_INTENT: Final = INTENT
BAGGAGE_PERMISSIONS: Final = PERMISSIONS
BAGGAGE_TASK: Final = TASK
BAGGAGE_HANDOFF_TO: Final = "agentgov.handoff.to"
BAGGAGE_ROLE: Final = AGENT_ROLE
#: the handoff target's lineage token: a carrier entry of its own next to ``traceparent`` and
#: ``baggage`` (never baggage, which instrumented clients forward to any service)
CARRIER_TOKEN: Final = "agentgov-lineage-token"
ENV_TOKEN: Final = "AGENTGOV_LINEAGE_TOKEN"

# Tool arguments that hold a call's command text, and those that name what it touches: the
# SDK's framework instrumentors read a tool call's arguments by these, and so does the
# collector when it reads arguments other instrumentations recorded.
TOOL_COMMAND_ARGUMENTS: Final = (
    "command",
    "cmd",
    "shell_command",
    "script",
    "code",
    "sql",
    "query",
    "statement",
)
TOOL_RESOURCE_ARGUMENTS: Final = (
    "path",
    "paths",
    "file",
    "files",
    "filename",
    "url",
    "urls",
    "host",
    "hosts",
    "table",
    "tables",
    "directory",
    "dir",
)
