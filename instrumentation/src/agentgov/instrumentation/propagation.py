"""Carry lineage across processes with standard W3C ``traceparent`` and ``baggage``.

Carriers are plain mappings: HTTP headers (``traceparent``/``baggage``) or a child
process's environment (``TRACEPARENT``/``BAGGAGE``, the OpenTelemetry convention for
environment-variable carriers). Anything else that can hold strings works too.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from agentgov.instrumentation import conventions as cv
from agentgov.instrumentation.lineage import (
    MAX_BAGGAGE_INTENT,
    MAX_BAGGAGE_TEXT,
    Lineage,
    TokenCell,
    check_id,
    clip_for_baggage,
    current_lineage,
    with_lineage,
)

_TRACE = TraceContextTextMapPropagator()
_BAGGAGE = W3CBaggagePropagator()

#: environment variable names for process carriers
ENV_KEYS = {
    "traceparent": "TRACEPARENT",
    "tracestate": "TRACESTATE",
    "baggage": "BAGGAGE",
    cv.CARRIER_TOKEN: cv.ENV_TOKEN,
}
#: the largest token a carrier accepts (tokens are about 1 KiB)
MAX_TOKEN = 16 << 10


_LINEAGE_KEYS = (
    cv.BAGGAGE_SESSION_ID,
    cv.BAGGAGE_CHAIN,
    cv.BAGGAGE_INTENT,
    cv.BAGGAGE_PERMISSIONS,
    cv.BAGGAGE_TASK,
    cv.BAGGAGE_HANDOFF_TO,
    cv.BAGGAGE_ROLE,
)


def _lineage_entries(lineage: Lineage) -> dict[str, str]:
    entries = {
        cv.BAGGAGE_SESSION_ID: lineage.session_id,
        cv.BAGGAGE_CHAIN: ",".join(lineage.chain),
        cv.BAGGAGE_INTENT: clip_for_baggage(lineage.intent, MAX_BAGGAGE_INTENT),
        cv.BAGGAGE_TASK: clip_for_baggage(lineage.task, MAX_BAGGAGE_TEXT),
        cv.BAGGAGE_HANDOFF_TO: lineage.handoff_to,
        cv.BAGGAGE_ROLE: clip_for_baggage(lineage.role, MAX_BAGGAGE_TEXT),
    }
    if lineage.permissions is not None:
        entries[cv.BAGGAGE_PERMISSIONS] = ",".join(lineage.permissions)
    return {k: v for k, v in entries.items() if v != "" or k == cv.BAGGAGE_PERMISSIONS}


def context_with_baggage(ctx: otel_context.Context | None = None) -> otel_context.Context:
    """``ctx`` with the active lineage written into its W3C baggage entries.

    Lineage entries received from upstream are replaced, not merged: a handoff's task and
    target belong to the hop that received it and must not travel one hop further.
    """
    ctx = ctx if ctx is not None else otel_context.get_current()
    lineage = current_lineage(ctx)
    if lineage is None:
        return ctx
    for key in _LINEAGE_KEYS:
        ctx = baggage.remove_baggage(key, ctx)
    for key, value in _lineage_entries(lineage).items():
        ctx = baggage.set_baggage(key, value, ctx)
    return ctx


def inject(carrier: MutableMapping[str, str], ctx: otel_context.Context | None = None) -> None:
    """Write ``traceparent`` and ``baggage`` (with lineage) for ``ctx`` into ``carrier``."""
    full = context_with_baggage(ctx)
    _TRACE.inject(carrier, context=full)
    _BAGGAGE.inject(carrier, context=full)
    lineage = current_lineage(full)
    if lineage is not None and lineage.handoff_to and lineage.token.value:
        # only a handoff carries a token: the target's own, issued when it was allowed
        carrier[cv.CARRIER_TOKEN] = lineage.token.value


def inject_env(
    env: MutableMapping[str, str] | None = None, ctx: otel_context.Context | None = None
) -> dict[str, str]:
    """Lineage as environment variables for a child process; merged into ``env`` if given."""
    headers: dict[str, str] = {}
    inject(headers, ctx)
    out = {ENV_KEYS[k]: v for k, v in headers.items() if k in ENV_KEYS}
    if env is not None:
        env.update(out)
    return out


def _lineage_from_baggage(ctx: otel_context.Context, token: str) -> Lineage | None:
    entries = baggage.get_all(ctx)
    session_id = entries.get(cv.BAGGAGE_SESSION_ID)
    if not isinstance(session_id, str) or not session_id:
        return None
    check_id(session_id, "session id")
    raw_chain = str(entries.get(cv.BAGGAGE_CHAIN, "") or "")
    chain = tuple(check_id(a, "agent id") for a in raw_chain.split(",") if a)
    perms_raw = entries.get(cv.BAGGAGE_PERMISSIONS)
    permissions = None if perms_raw is None else tuple(p for p in str(perms_raw).split(",") if p)
    handoff_to = str(entries.get(cv.BAGGAGE_HANDOFF_TO, "") or "")
    return Lineage(
        session_id=session_id,
        intent=str(entries.get(cv.BAGGAGE_INTENT, "") or ""),
        chain=chain,
        permissions=permissions,
        task=str(entries.get(cv.BAGGAGE_TASK, "") or ""),
        handoff_to=check_id(handoff_to, "agent id") if handoff_to else "",
        role=str(entries.get(cv.BAGGAGE_ROLE, "") or ""),
        token=TokenCell(token if handoff_to else ""),
    )


def extract(
    carrier: Mapping[str, str], ctx: otel_context.Context | None = None
) -> otel_context.Context:
    """A context with the trace parent, baggage and lineage found in ``carrier``.

    Keys are matched case-insensitively, so HTTP headers and ``TRACEPARENT``-style
    environment variables both work.
    """
    names = {k: k for k in ENV_KEYS} | {v.lower(): k for k, v in ENV_KEYS.items()}
    lowered = {names[k.lower()]: v for k, v in carrier.items() if k.lower() in names}
    out = _TRACE.extract(lowered, context=ctx)
    out = _BAGGAGE.extract(lowered, context=out)
    token = str(lowered.get(cv.CARRIER_TOKEN, ""))
    lineage = _lineage_from_baggage(out, token if len(token) <= MAX_TOKEN else "")
    return with_lineage(lineage, out) if lineage is not None else out
