"""Lineage: who an agent is, which session it belongs to, and how it got there.

A :class:`Lineage` is plain, immutable data. In process it rides in the OpenTelemetry
context under a private key (cheap: one dict write per agent); across processes it is
written into W3C baggage entries by :mod:`agentgov.instrumentation.propagation`.
"""

from __future__ import annotations

import functools
import re
import secrets
from dataclasses import dataclass, field
from urllib.parse import quote_plus

from opentelemetry import context as otel_context

_ID_RE = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_LINEAGE_KEY = otel_context.create_key("agentgov.lineage")

#: W3C baggage entries are percent-encoded and capped (4096 bytes each, 8192 in all, in
#: the OpenTelemetry propagator, which silently drops a longer entry). Free-text entries
#: are clipped to these encoded sizes when they cross a process boundary; in the process
#: that opened the session, spans carry the full intent.
MAX_BAGGAGE_INTENT = 3000
MAX_BAGGAGE_TEXT = 600


class InvalidIdError(ValueError):
    """An agent or session id does not fit the convention."""


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid agentgov id, else raise a clear error.

    Ids are 1-128 characters of letters, digits and ``. _ : @ -``: commas because chains
    travel as comma-separated baggage values, ``/`` because ids are URL path segments.
    """
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidIdError(
            f"invalid {what} {value!r}: use 1-128 characters of letters, digits and . _ : @ -"
        )
    return value


@functools.lru_cache(maxsize=1024)
def _id_prefix(prefix: str) -> str:
    return re.sub(r"[^A-Za-z0-9._:@-]", "-", prefix)[:100] or "agent"


def new_id(prefix: str) -> str:
    """A fresh id such as ``cleanup-3f9a1c2e5d4b`` (prefix sanitised to the id alphabet),
    from :mod:`secrets`: ids name the parties of governed decisions, so nobody may guess
    the next one."""
    return f"{_id_prefix(prefix)}-{secrets.token_hex(6)}"


def new_session_id() -> str:
    return f"sess-{secrets.token_hex(16)}"


def clip_for_baggage(text: str, limit: int = MAX_BAGGAGE_INTENT) -> str:
    """The longest prefix of ``text`` whose percent-encoded form fits in ``limit`` bytes.

    Cuts between characters, never inside one.
    """
    if len(quote_plus(text)) <= limit:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # largest prefix length that fits
        mid = (lo + hi + 1) // 2
        if len(quote_plus(text[:mid])) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


class TokenCell:
    """The agent's signed lineage token, shared by every context that carries its lineage.

    A cell rather than a field: the governor renews a token in the answer to any request,
    and threads, tasks and tools that captured the lineage earlier must present the new
    one. The token is a bearer credential: it never goes into span attributes.
    """

    __slots__ = ("value",)

    def __init__(self, value: str = "") -> None:
        self.value = value

    def __repr__(self) -> str:
        return "TokenCell(<set>)" if self.value else "TokenCell(<empty>)"


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
    #: the current agent's signed lineage token, issued by the governor (empty without one)
    token: TokenCell = field(default_factory=TokenCell, compare=False)

    @property
    def agent_id(self) -> str:
        return self.chain[-1] if self.chain else ""

    @property
    def depth(self) -> int:
        """Delegation depth of the current agent: 0 for the root agent."""
        return max(len(self.chain) - 1, 0)

    def child(
        self, agent_id: str, role: str = "", permissions: tuple[str, ...] | None = None
    ) -> Lineage:
        """Lineage of a new agent started by the current one.

        ``permissions`` None keeps the current agent's; the central governor checks that a
        child's permissions are a subset of its parent's. The child starts without a token:
        the governor issues it one when it allows the delegation.
        """
        return Lineage(
            session_id=self.session_id,
            intent=self.intent,
            chain=(*self.chain, agent_id),
            permissions=self.permissions if permissions is None else permissions,
            role=role,
        )


def current_lineage(ctx: otel_context.Context | None = None) -> Lineage | None:
    """The lineage active in ``ctx`` (default: the current context), if any."""
    value = otel_context.get_value(_LINEAGE_KEY, ctx)
    return value if isinstance(value, Lineage) else None


def with_lineage(lineage: Lineage, ctx: otel_context.Context | None = None) -> otel_context.Context:
    """A context carrying ``lineage``."""
    return otel_context.set_value(_LINEAGE_KEY, lineage, ctx)
