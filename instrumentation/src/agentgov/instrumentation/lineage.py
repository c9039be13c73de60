"""Lineage: who an agent is, which session it belongs to, and how it got there.

A :class:`Lineage` is plain, immutable data. In process it rides in the OpenTelemetry
context under a private key (cheap: one dict write per agent); across processes it is
written into W3C baggage entries by :mod:`agentgov.instrumentation.propagation`.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field, replace

from opentelemetry import context as otel_context

_ID_RE = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")
_LINEAGE_KEY = otel_context.create_key("agentgov.lineage")

#: W3C baggage allows 8192 bytes in all; the intent is the only free-text entry,
#: so it is capped well below that (the full text is also on the root agent's span).
MAX_INTENT_BYTES = 2048


class InvalidIdError(ValueError):
    """An agent or session id does not fit the convention."""


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid agentgov id, else raise a clear error.

    Ids are 1-128 characters of letters, digits and ``. _ : @ / -``; commas and spaces
    are excluded because chains are carried as comma-separated baggage values.
    """
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InvalidIdError(
            f"invalid {what} {value!r}: use 1-128 characters of letters, digits and . _ : @ / -"
        )
    return value


def new_id(prefix: str) -> str:
    """A fresh id such as ``cleanup-3f9a1c2e`` (prefix sanitised to the id alphabet)."""
    clean = re.sub(r"[^A-Za-z0-9._:@/-]", "-", prefix)[:100] or "agent"
    return f"{clean}-{uuid.uuid4().hex[:8]}"


def clip_intent(intent: str) -> str:
    """Cap the intent to :data:`MAX_INTENT_BYTES` of UTF-8 without splitting a character."""
    raw = intent.encode("utf-8")
    if len(raw) <= MAX_INTENT_BYTES:
        return intent
    return raw[:MAX_INTENT_BYTES].decode("utf-8", errors="ignore")


@dataclass(frozen=True, slots=True)
class Lineage:
    """The causal position of the current agent.

    ``chain`` lists agent ids from the root agent to the current one (inclusive);
    ``agent_id`` is empty while a session is open but no agent runs yet.
    """

    session_id: str
    intent: str = ""
    chain: tuple[str, ...] = ()
    permissions: tuple[str, ...] | None = None
    #: a pending handoff: the task and target id the next agent takes on
    task: str = ""
    handoff_to: str = ""
    role: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def agent_id(self) -> str:
        return self.chain[-1] if self.chain else ""

    @property
    def depth(self) -> int:
        """Delegation depth of the current agent: 0 for the root agent."""
        return max(len(self.chain) - 1, 0)

    def child(self, agent_id: str, role: str = "") -> Lineage:
        """Lineage of a new agent started by the current one."""
        return replace(self, chain=(*self.chain, agent_id), task="", handoff_to="", role=role)


def current_lineage(ctx: otel_context.Context | None = None) -> Lineage | None:
    """The lineage active in ``ctx`` (default: the current context), if any."""
    value = otel_context.get_value(_LINEAGE_KEY, ctx)
    return value if isinstance(value, Lineage) else None


def with_lineage(lineage: Lineage, ctx: otel_context.Context | None = None) -> otel_context.Context:
    """A context carrying ``lineage``."""
    return otel_context.set_value(_LINEAGE_KEY, lineage, ctx)
