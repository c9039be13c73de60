"""The agent's side of signed lineage tokens: carry them, prove spans with them.

The governor issues each agent it allows a PASETO ``v4.public`` token (Ed25519) binding
session, agent, parent, chain, depth, task and permissions; agents present it on every
request (header :data:`HEADER`) and the governor judges the request by the token, never
by what the body claims. The agent never verifies its own token (the governor does), so
this module only reads the public claims and needs no cryptography library.

Spans carry the token's id and a *proof*: an HMAC of the span's ids under a key only the
token holder knows (``pk``, inside the token). Anyone can read a token id off a span; only
the agent that holds the token can make the proof, so the collector can tell evidence an
agent really produced from spans someone else sent in its name.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

from agentgov.instrumentation import conventions as cv

#: the request header that carries an agent's lineage token to the governor
HEADER = "Agentgov-Lineage-Token"
PREFIX = "v4.public."
_SIGNATURE_BYTES = 64


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(token: str) -> dict[str, Any] | None:
    """The token's claims as the governor wrote them, unverified; None if it is no token."""
    if not token.startswith(PREFIX):
        return None
    body = token[len(PREFIX) :].split(".", 1)[0]
    try:
        raw = _b64decode(body)
        data = json.loads(raw[:-_SIGNATURE_BYTES]) if len(raw) > _SIGNATURE_BYTES else None
    except (binascii.Error, ValueError):
        return None
    return data if isinstance(data, dict) else None


def proof(proof_key: bytes, trace_id: int, span_id: int) -> str:
    """The proof that the holder of ``proof_key`` made span (``trace_id``, ``span_id``)."""
    message = trace_id.to_bytes(16, "big") + span_id.to_bytes(8, "big")
    return b64encode(hmac.digest(proof_key, message, hashlib.sha256)[:16])


class SpanProver:
    """Token id and proof key of one token, read once (agents start many spans)."""

    __slots__ = ("token", "token_id", "_key")

    def __init__(self, token: str) -> None:
        self.token = token
        data = claims(token) or {}
        self.token_id = str(data.get("jti", ""))
        try:
            self._key = _b64decode(str(data.get("pk", ""))) if data.get("pk") else b""
        except (binascii.Error, ValueError):
            self._key = b""

    def attributes(self, trace_id: int, span_id: int) -> dict[str, str]:
        """``agentgov.lineage.token_id`` and ``agentgov.lineage.proof`` for one span."""
        if not self.token_id or not self._key:
            return {}
        return {
            cv.LINEAGE_TOKEN_ID: self.token_id,
            cv.LINEAGE_PROOF: proof(self._key, trace_id, span_id),
        }
