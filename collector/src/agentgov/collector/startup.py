"""Start-up checks that turn the usual ways a start fails into one line saying what to do,
and the one-line summary of what a collector started with.

Checked before anything is opened, so a failure leaves nothing half-started and no
traceback: a data folder another process owns, a port something else listens on.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the summary reads a built collector; the checks need none of it
    from agentgov.collector.service import Collector


class StartupError(RuntimeError):
    """A start that cannot succeed; the message is one line with the fix."""


def data_folder_owner(data_path: Path) -> str | None:
    """Who holds the embedded engine's lock on ``data_path``: ``process N`` (or
    ``another process``), None when nobody does.

    ClickHouse (chDB included) holds an exclusive ``flock`` on ``<data>/status`` while it
    runs and writes its PID into it; trying the same lock without waiting tells whether a
    live process holds it (a stale file of a crashed one is not locked)."""
    status = data_path / "status"
    try:
        fd = os.open(status, os.O_RDONLY)
    except OSError:
        return None  # no folder or no status file yet: nobody runs on it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            text = os.read(fd, 4096).decode("utf-8", "replace")
            pid = re.search(r"PID:\s*(\d+)", text)
            return f"process {pid.group(1)}" if pid else "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_data_folder(data_path: Path | None, what: str = "this collector") -> None:
    """Refuse to start on an embedded data folder another process runs on."""
    if data_path is None:
        return  # a ClickHouse server: any number of collectors may write to it
    owner = data_folder_owner(data_path)
    if owner is not None:
        raise StartupError(
            f"the data folder {data_path} is in use by {owner} (lock {data_path / 'status'}), "
            f"a collector most likely: one process owns an embedded store. Stop that process, "
            f"give {what} a folder of its own (--store chdb:///another/folder), or read this "
            "one through the running collector (uv run agentgov sessions --url ...)"
        )


def check_port(host: str, port: int, what: str, option: str) -> None:
    """Refuse to start when ``host:port`` cannot be listened on (in use, or not allowed)."""
    if port == 0:
        return  # any free port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # the servers set SO_REUSEADDR too: a port in TIME_WAIT is not "in use"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            why = (
                "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})"
            )
            raise StartupError(
                f"port {port} ({what}) on {host} {why}: stop what listens there, or choose "
                f"another port with {option}"
            ) from None


def summary(service: Collector, http: str, grpc: str | None) -> str:
    """What the collector runs with, in one line: listeners, store, auth, policy, rules."""
    config = service.config
    keys = service.keys
    auth = (
        f"auth on ({len(keys)} API keys)"
        if keys.enabled
        else "auth OFF (anyone who can reach it may decide, approve and kill: set AGENTGOV_API_KEYS)"
    )
    policy = service.policy
    if policy.path is not None:
        ma = policy.policy.multi_agent
        policy_text = f"policy {policy.path} (mode {ma.mode})"
    else:
        policy_text = "no policy (no limits: --policy FILE sets them)"
    rules = service.alert_rules
    where = ", ".join(str(p) for p in rules.paths) or "none"
    return (
        f"agentgov collector: OTLP/HTTP + API on {http}"
        + (f", OTLP/gRPC on {grpc}" if grpc else ", OTLP/gRPC off")
        + f"; store {config.store_config.redacted()}; {auth}; {policy_text}; "
        + f"{len(rules.ruleset.rules)} alert rules ({where})"
    )
