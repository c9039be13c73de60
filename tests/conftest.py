"""Shared fixtures: a real collector process on loopback, and OpenTelemetry providers
that export to it through the official OTLP exporters."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class CollectorProcess:
    """A collector started with ``agentgov collector`` in its own process."""

    data_dir: Path
    http_port: int
    grpc_port: int
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dsn(self) -> str:
        return f"chdb://{self.data_dir}"

    def start(
        self,
        extra_args: tuple[str, ...] = (),
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> CollectorProcess:
        """Start (or restart, on the same data and ports) ``agentgov collector``.

        ``env`` adds environment variables, e.g. ``AGENTGOV_API_KEYS``.
        """
        self.log_path = self.data_dir.parent / f"collector-{self.http_port}.log"
        if "--alert-rules" not in extra_args:
            # alert rules act on sessions (stops); tests of other features keep them out
            # unless they bring their own rules
            no_rules = self.data_dir.parent / "no-alert-rules"
            no_rules.mkdir(exist_ok=True)
            extra_args = (*extra_args, "--alert-rules", str(no_rules))
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agentgov.collector.cli",
                "collector",
                "--store",
                self.dsn,
                "--http-port",
                str(self.http_port),
                "--grpc-port",
                str(self.grpc_port),
                "--log-level",
                "warning",
                *extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"collector exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"collector did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def health(self) -> dict:
        return dict(httpx.get(f"{self.url}/healthz", timeout=5).json())

    def get(self, path: str, **params: object) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", params=params, timeout=30)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollectorProcess]:
    """One collector per test module, with its own data folder."""
    base = tmp_path_factory.mktemp("collector")
    c = CollectorProcess(base / "data", free_port(), free_port()).start()
    yield c
    c.stop()


def make_provider(
    endpoint: str,
    protocol: str = "http",
    service: str = "tests",
    api_key: str | None = None,
    **bsp: int,
) -> TracerProvider:
    """A tracer provider exporting through the official OTLP exporter (HTTP or gRPC), with
    ``api_key`` as its bearer key when the collector requires one."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else None
    if protocol == "http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces", headers=headers)
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        exporter = GrpcExporter(  # type: ignore[assignment]
            endpoint=endpoint, insecure=True, headers=headers
        )
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter, **bsp))  # type: ignore[arg-type]
    return provider


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


@pytest.fixture(scope="session")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one chDB data path of this test process.

    chDB hosts one data path per process, so every in-process store test (and any
    collector a test embeds with ``Collector(...).start()``) shares this one; tests keep
    apart by using their own session and trace ids.
    """
    return tmp_path_factory.mktemp("store") / "data"


@pytest.fixture(scope="session")
def store_client(store_path: Path):  # type: ignore[no-untyped-def]
    """A clickhouse-connect client on the embedded chDB store with the agentgov schema."""
    from agentgov.collector.risk import RiskRules
    from agentgov.collector.store.connection import StoreConfig, prepare

    client = prepare(StoreConfig(f"chdb://{store_path}"), RiskRules.default())
    yield client
    client.close()
