"""Governed framework steps: what agentgov's instrumentor costs each framework.

Per framework, one agent step (an agent run that calls one tool and answers: two turns of
an in-process scripted model, one tool call), measured in the same process and the same
event loop under four variants, interleaved round by round (the order rotates each round):

* bare:        the framework uninstrumented;
* agentgov:    agentgov's instrumentor, tracing only (no governor);
* governed:    agentgov's instrumentor with a live governor (a collector process on
               loopback, API keys on, every request with its lineage token);
* openinference: OpenInference's instrumentor for the framework.

Every variant exports through the same kind of tracer provider (BatchSpanProcessor, a
discarding exporter). Printed per framework: the median time of a step, each variant's
ratio to the bare step, agentgov's tracing against OpenInference's, and the governed step's
added time against the governor's own round trips (counted per step, each measured on the
same collector from the same client): goal, tracing no slower than OpenInference and the
added time of a governed step nothing but its decisions' round trips.

A framework plugs in with a module in bench/framework_steps/ defining ``framework()``.
Usage: uv run python bench/frameworks.py [framework ...]   (N=200 ROUNDS=7)
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

sys.path.insert(0, str(Path(__file__).parent))
from collector_process import running_collector
from framework_steps import Framework
from opentelemetry import context as otel_context

from agentgov.instrumentation import AsyncGovernorClient, Governance

N = int(os.environ.get("N", 200))
ROUNDS = int(os.environ.get("ROUNDS", 7))
KEY = "bench-agent-" + secrets.token_hex(12)


class Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _registry() -> dict[str, Callable[[], Framework]]:
    """Every framework of framework_steps/, by name (module name with dashes)."""
    import importlib
    import pkgutil

    import framework_steps

    found = {}
    for info in sorted(pkgutil.iter_modules(framework_steps.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"framework_steps.{info.name}")
        found[info.name.replace("_", "-")] = module.framework
    return found


FRAMEWORKS: dict[str, Callable[[], Framework]] = _registry()


# -- measuring ----------------------------------------------------------------------------------


class Counting(AsyncGovernorClient):
    """The governor client, counting its requests: the awaited ones and the blocking ones
    (a framework that runs its steps in worker threads decides through those)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests = 0
        self._count_lock = threading.Lock()

    def _count(self) -> None:
        with self._count_lock:
            self.requests += 1

    async def _apost(self, path: str, body: dict[str, Any], token: str = "") -> Any:
        self._count()
        return await super()._apost(path, body, token)

    def _post(self, path: str, body: dict[str, Any], token: str = "") -> Any:
        self._count()
        return super()._post(path, body, token)


def per_step(loop: asyncio.AbstractEventLoop, step: Callable[[], Awaitable[Any]]) -> float:
    """Median seconds of one step, over ``N``."""
    times = []
    gc.collect()
    for _ in range(N):
        start = time.perf_counter()
        loop.run_until_complete(step())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def with_requests(
    loop: asyncio.AbstractEventLoop,
    client: AsyncGovernorClient,
    step: Callable[[], Awaitable[Any]],
    host: Any = None,
) -> float:
    """Median seconds of the bare step with the requests a governed step makes, made
    directly by the client around it: the agent's start (a new session's root, or a
    delegation by ``host``), one tool call, the agent's finish."""

    async def governed_by_hand() -> None:
        agent = f"cleanup-{secrets.token_hex(4)}"
        if host is None:
            sid, token = f"bench-{secrets.token_hex(6)}", ""
        else:
            sid, token = host.session_id, host.token
        start = await client.ahandoff(sid, host.agent_id if host else "", agent, token=token)
        await step()
        await client.atool(sid, agent, "list_deployments", "/opt", token=start.lineage_token)
        await client.ausage(sid, agent, finished=True, token=start.lineage_token)

    return per_step(loop, governed_by_hand)


def session_steps(loop: asyncio.AbstractEventLoop, client: AsyncGovernorClient) -> float:
    """Median seconds of the same requests through the SDK's steps (a session, its root
    agent started and listening to the session's events, a tool call, the finish)."""
    gov = Governance(governor=client)

    async def measure() -> float:
        times = []
        for _ in range(N):
            start = time.perf_counter()
            with gov.session("clean up old deployments") as session:
                agent = await session.aagent("cleanup")
                async with agent:
                    async with agent.atool("list_deployments", command="/opt"):
                        pass
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return loop.run_until_complete(measure())


def bench(fw: Framework, url: str) -> None:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard(), max_queue_size=1 << 16))
    client = Counting(url, api_key=KEY)
    loop = asyncio.new_event_loop()
    variants: dict[str, tuple[Any, dict[str, Any]]] = {
        "bare": (None, {}),
        "agentgov": (fw.agentgov, {"tracer_provider": provider, "governor": None}),
        "governed": (fw.agentgov, {"tracer_provider": provider, "governor": client}),
        "governed/sess": (fw.agentgov, {"tracer_provider": provider, "governor": client}),
        "openinference": (fw.openinference, {"tracer_provider": provider}),
    }
    # "governed/sess": each step runs inside an agent of a session already running (the
    # step is that agent's delegation), so the session's event listener is not the step's
    gov = Governance(provider, governor=client)
    session = gov.session("clean up old deployments")
    host = loop.run_until_complete(session.aagent("host"))
    loop.run_until_complete(host.astart())
    results: dict[str, list[float]] = {name: [] for name in variants}
    direct: list[float] = []
    direct_sess: list[float] = []
    bare_now: list[float] = []
    sdk: list[float] = []
    requests = 0
    names = list(variants)
    for r in range(ROUNDS):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            instrumentor, options = variants[name]
            if instrumentor is not None:
                instrumentor.instrument(**options)
            token = otel_context.attach(host.context) if name == "governed/sess" else None
            try:
                loop.run_until_complete(fw.step())  # warm: first session, connections
                before = client.requests
                results[name].append(per_step(loop, fw.step))
                if name == "governed":
                    requests = (client.requests - before) // N
            finally:
                if token is not None:
                    otel_context.detach(token)
                if instrumentor is not None:
                    instrumentor.uninstrument()
        bare_now.append(per_step(loop, fw.step))
        direct.append(with_requests(loop, client, fw.step))
        direct_sess.append(with_requests(loop, client, fw.step, host))
        sdk.append(session_steps(loop, client))
    loop.run_until_complete(host.aend())
    provider.shutdown()
    loop.run_until_complete(client.aclose())
    loop.close()

    med = {name: statistics.median(v) for name, v in results.items()}
    bare = med["bare"]
    # the requests' own cost: the bare step with them made by hand, less the bare step
    rtt = statistics.median(direct) - statistics.median(bare_now)
    rtt_sess = statistics.median(direct_sess) - statistics.median(bare_now)
    steps = statistics.median(sdk)
    print(f"\n{fw.name}: one agent step (2 model turns, 1 tool call), N={N} x {ROUNDS} rounds")
    for name in names:
        spread = f"{min(results[name]) * 1e3:.2f}-{max(results[name]) * 1e3:.2f}"
        print(
            f"  {name:14} {med[name] * 1e3:8.3f} ms/step  ({spread} ms over rounds)"
            f"  {med[name] / bare:5.2f}x bare"
        )
    print(
        f"  tracing: agentgov {med['agentgov'] / med['openinference']:.2f}x OpenInference "
        f"(goal <= 1.0)"
    )
    added = med["governed"] - med["agentgov"]
    inside = med["governed/sess"] - med["agentgov"]
    print(
        f"  governed, a new session: +{added * 1e3:.3f} ms over tracing; its {requests} "
        f"governor requests made by hand around the bare step add {rtt * 1e3:.3f} ms "
        f"({added / rtt:.2f}x; goal ~1.0); the SDK's own steps for them, with the "
        f"session's event listener, take {steps * 1e3:.3f} ms"
    )
    print(
        f"  governed, in a running session: +{inside * 1e3:.3f} ms over tracing; the same "
        f"requests by hand add {rtt_sess * 1e3:.3f} ms ({inside / rtt_sess:.2f}x; goal ~1.0)"
    )


def main(argv: list[str]) -> None:
    chosen = argv or list(FRAMEWORKS)
    unknown = [name for name in chosen if name not in FRAMEWORKS]
    if unknown:
        raise SystemExit(f"unknown framework(s) {unknown}; known: {', '.join(FRAMEWORKS)}")
    data = Path(tempfile.mkdtemp(prefix="agentgov-bench-frameworks-"))
    try:
        env = {"AGENTGOV_API_KEYS": f"bench:agent:{KEY}"}
        # alert rules judge sessions, not decisions: hundreds of steps in one session would
        # read as a fan-out burst and stop it
        no_rules = data / "no-alert-rules"
        no_rules.mkdir()
        with running_collector(data / "data", "--alert-rules", str(no_rules), env=env) as url:
            for name in chosen:
                bench(FRAMEWORKS[name](), url)
    finally:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
