"""A collector process for the benchmarks: started on a free loopback port, stopped after."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_collector(
    data_dir: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run ``agentgov collector`` on ``data_dir`` (extra CLI ``args`` and ``env``); yield
    its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentgov.collector.cli",
            "collector",
            "--store",
            f"chdb://{data_dir}",
            "--http-port",
            str(port),
            "--grpc-port",
            "-1",
            "--log-level",
            "error",
            *args,
        ],
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the collector did not start")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
