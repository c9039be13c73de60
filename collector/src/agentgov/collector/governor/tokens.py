"""Signed lineage tokens: issued by the governor, verified on every request.

Why PASETO ``v4.public`` (through ``pyseto``): one fixed algorithm per version (Ed25519), so
there is no algorithm field to downgrade and no ``none``; the key id travels in the
authenticated footer, which makes rotation a matter of keeping the old public key for one
token lifetime; an implicit assertion binds tokens to this purpose, so a PASETO minted
for something else with the same key never passes as lineage. Public-key signatures mean
every collector that shares the public keys can verify a token, while only the holder of
the secret key can issue one. (Biscuit's offline attenuation buys nothing here: every
delegation must be decided centrally anyway, and the governor issues the narrowed token
in the same answer.)

A verified token is cached by its exact text (agents present the same token on every
request), so an Ed25519 verification (~100 µs) is paid once per token, not per decision.

Spans prove who made them with a key only the token holder knows: ``pk``, derived here
from a per-key secret, the token id, the session and the agent, and carried inside the
token. The collector derives it again from what a span claims (token id, session, agent),
so it keeps no token and no table of them, and a span that claims another agent than the
token's holder fails its proof.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyseto
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyseto import Key, KeyInterface

from agentgov.instrumentation.lineage_token import b64encode, proof

log = logging.getLogger(__name__)

#: binds tokens to this use: the same key signing anything else never yields lineage
IMPLICIT_ASSERTION = b"agentgov lineage v1"
KEY_FILE_NAME = "lineage-signing.keys"
ENV_KEYS = "AGENTGOV_SIGNING_KEYS"
_CACHE_MAX = 65_536


class LineageInvalid(Exception):
    """A token that proves nothing: ``reason`` is ``lineage_invalid`` or
    ``lineage_expired``; the message says what is wrong with it."""

    def __init__(self, message: str, reason: str = "lineage_invalid") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LineageClaims:
    """What a verified token says about its holder."""

    session_id: str
    agent_id: str
    parent_id: str
    chain: tuple[str, ...]
    depth: int
    role: str
    task_digest: str
    permissions: tuple[str, ...] | None
    issued: int
    expires: int
    token_id: str


def task_digest(task: str) -> str:
    return hashlib.sha256(task.encode()).hexdigest()[:32]


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class _SigningKey:
    secret: KeyInterface
    public: KeyInterface
    kid: str  # the public key's PASERK id (k4.pid.…)
    short: str  # the prefix of token ids signed with it
    proof_secret: bytes


def _load_key(paserk: str) -> _SigningKey:
    try:
        secret = Key.from_paserk(paserk.strip())
    except Exception as exc:
        raise ValueError(
            "a lineage signing key is not a PASERK k4.secret key: generate one with "
            "'agentgov keys generate'"
        ) from exc
    if not paserk.strip().startswith("k4.secret."):
        raise ValueError("lineage signing keys must be PASERK k4.secret keys (v4.public)")
    raw = secret._key  # the cryptography Ed25519 private key pyseto wraps
    pem = raw.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public = Key.new(4, "public", pem)
    kid = public.to_paserk_id()
    proof_secret = hashlib.sha256(b"agentgov lineage proof\0" + paserk.strip().encode()).digest()
    return _SigningKey(secret, public, kid, kid.removeprefix("k4.pid.")[:10], proof_secret)


def generate_key() -> str:
    """A new PASERK ``k4.secret`` key (Ed25519), from the operating system's randomness."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return str(Key.new(4, "public", pem).to_paserk())


def _parse_key_list(text: str) -> list[str]:
    """Keys one per line or comma-separated; ``#`` starts a comment."""
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    return [key.strip() for line in lines for key in line.split(",") if key.strip()]


class LineageKeys:
    """The signing key (the first) and every key still accepted for verification."""

    def __init__(self, paserks: Sequence[str], source: str) -> None:
        if not paserks:
            raise ValueError(f"{source}: no lineage signing key")
        self.keys = [_load_key(p) for p in paserks]
        self.source = source
        self.by_kid = {k.kid: k for k in self.keys}
        self.by_short = {k.short: k for k in self.keys}

    @property
    def signing(self) -> _SigningKey:
        return self.keys[0]

    @classmethod
    def load(cls, path: str | None = None, data_dir: Path | None = None) -> LineageKeys:
        """Keys from ``AGENTGOV_SIGNING_KEYS``, else the file at ``path``, else the store's
        data folder (made there once, readable by this user only), else a key that lives
        only as long as this process (said in the log: tokens die with a restart)."""
        env = os.environ.get(ENV_KEYS, "")
        if env.strip():
            return cls(_parse_key_list(env), ENV_KEYS)
        if path:
            try:
                text = Path(path).read_text("utf-8")
            except OSError as exc:
                raise ValueError(
                    f"{path}: cannot read lineage signing keys: {exc.strerror}"
                ) from exc
            return cls(_parse_key_list(text), str(path))
        if data_dir is not None:
            file = data_dir / KEY_FILE_NAME
            if not file.exists():
                data_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as out:
                    out.write(
                        "# agentgov lineage signing keys (PASERK k4.secret), newest first.\n"
                        "# Rotation: put a new key on top, keep the old one for one token\n"
                        "# lifetime, then remove it.\n" + generate_key() + "\n"
                    )
                log.warning("made a lineage signing key in %s", file)
            return cls(_parse_key_list(file.read_text("utf-8")), str(file))
        log.warning(
            "no lineage signing key configured (%s or --signing-keys): using one that dies "
            "with this process, so agents' tokens stop working at a restart",
            ENV_KEYS,
        )
        return cls([generate_key()], "a key of this process")


class LineageTokens:
    """Issues tokens and verifies them (with a cache of verified tokens)."""

    def __init__(self, keys: LineageKeys, ttl_s: int = 3600, clock: object = time.time) -> None:
        self.keys = keys
        self.ttl_s = ttl_s
        self._clock = clock
        self._verified: dict[str, LineageClaims] = {}

    def now(self) -> int:
        return int(self._clock())  # type: ignore[operator]

    def issue(
        self,
        session_id: str,
        agent_id: str,
        parent_id: str,
        chain: Sequence[str],
        role: str,
        task: str,
        permissions: Sequence[str] | None,
        digest: str | None = None,
        ttl_s: int | None = None,
    ) -> tuple[str, str]:
        """A token for ``agent_id``; returns (token, token id). ``digest`` replaces the
        task's digest (renewals know only that)."""
        key = self.keys.signing
        token_id = f"{key.short}.{secrets.token_hex(9)}"
        now = self.now()
        claims = {
            "sid": session_id,
            "aid": agent_id,
            "par": parent_id,
            "chn": list(chain),
            "dep": len(chain) - 1,
            "role": role,
            "tsk": digest if digest is not None else task_digest(task),
            "prm": list(permissions) if permissions is not None else None,
            "iat": now,
            "xp": now + (ttl_s or self.ttl_s),
            "jti": token_id,
            "pk": b64encode(self._proof_key(key.proof_secret, token_id, session_id, agent_id)),
        }
        token = pyseto.encode(
            key.secret,
            json.dumps(claims, separators=(",", ":")).encode(),
            footer=json.dumps({"kid": key.kid}).encode(),
            implicit_assertion=IMPLICIT_ASSERTION,
        )
        return token.decode(), token_id

    def verify(self, token: str) -> LineageClaims:
        """The claims of a token this governor issued, unexpired; else :class:`LineageInvalid`."""
        claims = self._verified.get(token)
        if claims is None:
            claims = self._verify(token)
            if len(self._verified) >= _CACHE_MAX:
                self._verified.clear()  # rare; a miss only costs one verification
            self._verified[token] = claims
        if claims.expires <= self.now():
            raise LineageInvalid(
                f"lineage token {claims.token_id} expired; an agent's token is renewed in "
                "the answers to its requests, and a new one comes with a new delegation",
                "lineage_expired",
            )
        return claims

    def _verify(self, token: str) -> LineageClaims:
        parts = token.split(".")
        if len(token) > 16 << 10 or len(parts) != 4 or parts[:2] != ["v4", "public"]:
            raise LineageInvalid("not a lineage token (expected a PASETO v4.public token)")
        try:
            footer = json.loads(_b64decode(parts[3]))
            key = self.keys.by_kid.get(str(footer.get("kid")))
        except (binascii.Error, ValueError, AttributeError):
            key = None
        if key is None:
            raise LineageInvalid("lineage token signed with an unknown key")
        try:
            payload = pyseto.decode(
                key.public, token, implicit_assertion=IMPLICIT_ASSERTION
            ).payload
            data = json.loads(payload if isinstance(payload, bytes) else b"")
            perms = data["prm"]
            return LineageClaims(
                session_id=str(data["sid"]),
                agent_id=str(data["aid"]),
                parent_id=str(data["par"]),
                chain=tuple(str(a) for a in data["chn"]),
                depth=int(data["dep"]),
                role=str(data["role"]),
                task_digest=str(data["tsk"]),
                permissions=None if perms is None else tuple(str(p) for p in perms),
                issued=int(data["iat"]),
                expires=int(data["xp"]),
                token_id=str(data["jti"]),
            )
        except pyseto.VerifyError as exc:
            raise LineageInvalid("lineage token fails its signature: altered or forged") from exc
        except (pyseto.PysetoError, ValueError, KeyError, TypeError) as exc:
            raise LineageInvalid(f"lineage token unreadable: {exc}") from exc

    def needs_renewal(self, claims: LineageClaims) -> bool:
        """Past half its life: the next answer to its holder carries a fresh one."""
        return claims.expires - self.now() < (claims.expires - claims.issued) // 2

    @staticmethod
    def _proof_key(proof_secret: bytes, token_id: str, session_id: str, agent_id: str) -> bytes:
        message = f"{token_id}\n{session_id}\n{agent_id}".encode()
        return hmac.digest(proof_secret, message, hashlib.sha256)

    def proves(
        self,
        token_id: str,
        session_id: str,
        agent_id: str,
        trace_id: str,
        span_id: str,
        given: str,
    ) -> bool:
        """Whether ``given`` is the proof that agent ``agent_id`` of ``session_id``, holding
        token ``token_id``, made the span (hex ``trace_id``, ``span_id``)."""
        key = self.keys.by_short.get(token_id.split(".", 1)[0])
        if key is None or not given or len(trace_id) != 32 or len(span_id) != 16:
            return False
        try:
            tid, sid = int(trace_id, 16), int(span_id, 16)
        except ValueError:
            return False
        pk = self._proof_key(key.proof_secret, token_id, session_id, agent_id)
        expected = proof(pk, tid, sid)
        return hmac.compare_digest(expected, given)
