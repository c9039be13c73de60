"""API keys with roles: who may decide, approve, kill and read.

Keys come from the environment (``AGENTGOV_API_KEYS="name:role:key,..."``) or a YAML file
(``--api-keys FILE``: ``keys: [{name, role, key}]``), never from code. Callers send
``Authorization: Bearer <key>``: the API, and OTLP exporters too (HTTP header or gRPC
metadata, e.g. ``OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer%20<key>``). With no keys
configured everything is open (local use); the collector says so at start.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ROLES = ("agent", "reviewer", "admin", "ingest")

#: action -> roles allowed to perform it
ALLOWED: dict[str, frozenset[str]] = {
    # OTLP spans (HTTP and gRPC); ``ingest`` keys are for pipelines that only forward spans
    "ingest": frozenset({"agent", "admin", "ingest"}),
    "decide": frozenset({"agent", "admin"}),  # decisions, usage
    "events": frozenset({"agent", "reviewer", "admin"}),  # control-event streams
    "approve": frozenset({"reviewer", "admin"}),  # approve, deny, list approvals
    "read": frozenset({"agent", "reviewer", "admin"}),  # query API, approvals, audit
    # replaying stored sessions under a candidate policy: reviewers try one before it is
    # enforced; it costs the collector CPU, so agents may not
    "simulate": frozenset({"reviewer", "admin"}),
    "kill": frozenset({"admin"}),
    "policy": frozenset({"admin"}),
}


class AuthError(Exception):
    """Refused: ``status`` is 401 (no or unknown key) or 403 (role not allowed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Caller:
    name: str
    role: str


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9._:@-]{1,64}$")
    role: str = Field(pattern="^(agent|reviewer|admin|ingest)$")
    key: str = Field(min_length=16)


class _KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[_KeyEntry]


class KeyRing:
    """The configured keys; ``enabled`` is False when there are none."""

    def __init__(self, entries: list[tuple[str, str, str]]) -> None:
        self._entries = [(name, role, key.encode()) for name, role, key in entries]

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def from_env(cls, value: str | None = None) -> KeyRing:
        raw = value if value is not None else os.environ.get("AGENTGOV_API_KEYS", "")
        entries = []
        for n, item in enumerate(x for x in raw.split(",") if x.strip()):
            parts = item.strip().split(":", 2)
            if len(parts) != 3:
                raise ValueError(
                    f"AGENTGOV_API_KEYS entry {n + 1} is not name:role:key; "
                    "e.g. AGENTGOV_API_KEYS=ci-agent:agent:<32 random characters>"
                )
            name, role, key = parts
            entries.append(cls._check(name, role, key, f"AGENTGOV_API_KEYS entry {n + 1}"))
        return cls(entries)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KeyRing:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text("utf-8"))
            parsed = _KeyFile.model_validate(data)
        except OSError as exc:
            raise ValueError(f"{p}: cannot read API keys: {exc.strerror}") from exc
        except (yaml.YAMLError, ValidationError) as exc:
            raise ValueError(
                f"{p}: invalid API key file ({exc}); expected keys: [{{name, role, key}}] with "
                f"role one of {', '.join(ROLES)} and keys of 16 characters or more"
            ) from exc
        return cls([(k.name, k.role, k.key) for k in parsed.keys])

    @staticmethod
    def _check(name: str, role: str, key: str, where: str) -> tuple[str, str, str]:
        try:
            entry = _KeyEntry.model_validate({"name": name, "role": role, "key": key})
        except ValidationError as exc:
            raise ValueError(
                f"{where}: needs a name of letters, digits and . _ : @ - (64 at most), a role "
                f"among {', '.join(ROLES)} and a key of 16 characters or more"
            ) from exc
        return entry.name, entry.role, entry.key

    def merged(self, other: KeyRing) -> KeyRing:
        ring = KeyRing([])
        ring._entries = self._entries + other._entries
        return ring

    def authenticate(self, authorization: str | None) -> Caller | None:
        """The caller for an ``Authorization`` header; None when keys are off."""
        if not self.enabled:
            return None
        if not authorization or not authorization.lower().startswith("bearer "):
            raise AuthError(
                401,
                "missing API key: set AGENTGOV_API_KEY to one of the collector's keys "
                "(AGENTGOV_API_KEYS); the CLI and the SDK send it as 'Authorization: Bearer <key>'",
            )
        presented = authorization[7:].strip().encode()
        found: Caller | None = None
        for name, role, key in self._entries:
            # compare against every key, so timing does not tell which prefix matched
            if hmac.compare_digest(presented, key):
                found = Caller(name, role)
        if found is None:
            raise AuthError(
                401,
                "unknown API key: AGENTGOV_API_KEY must be one of the keys in the collector's "
                "AGENTGOV_API_KEYS (or --api-keys file)",
            )
        return found

    def authorize(self, authorization: str | None, action: str) -> Caller | None:
        caller = self.authenticate(authorization)
        if caller is not None and caller.role not in ALLOWED[action]:
            allowed = " or ".join(sorted(ALLOWED[action]))
            raise AuthError(
                403,
                f"the {caller.role} key {caller.name!r} may not {action}: needs {allowed}; "
                f"set AGENTGOV_API_KEY to a key with that role",
            )
        return caller
