"""The collector service: store, writer, receivers and API in one process.

The collector owns its store: with chDB the engine lives in this process, so other tools
(CLI, dashboards' exports) go through the HTTP API rather than opening the data folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agentgov.collector.alerts.api import AlertsApi
from agentgov.collector.alerts.engine import AlertEngine
from agentgov.collector.alerts.journal import AlertJournal
from agentgov.collector.alerts.rules import RuleSource, default_rules_path
from agentgov.collector.alerts.slack import Notice, SlackNotifier
from agentgov.collector.alerts.slack_actions import post_approvals
from agentgov.collector.analytics import Analytics
from agentgov.collector.api import QueryApi
from agentgov.collector.auth import KeyRing
from agentgov.collector.governor import audit
from agentgov.collector.governor.api import DecisionFastPath, GovernorApi
from agentgov.collector.governor.audit_log import AuditLog
from agentgov.collector.governor.engine import Governor
from agentgov.collector.governor.events import ControlHub
from agentgov.collector.governor.policy import PolicySource
from agentgov.collector.governor.state import Record
from agentgov.collector.governor.tokens import LineageKeys, LineageTokens
from agentgov.collector.health import Metrics, Sources, health
from agentgov.collector.normalize.service import TraceResolver
from agentgov.collector.receiver.decode import Limits
from agentgov.collector.receiver.otlp_grpc import start_grpc_server
from agentgov.collector.receiver.otlp_http import OtlpHttpReceiver
from agentgov.collector.risk import RiskRules
from agentgov.collector.store.connection import StoreConfig, default_dsn, open_client, prepare
from agentgov.collector.store.space import SpaceMonitor
from agentgov.collector.store.writer import SpanWriter

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server, with signals left to :meth:`Collector.run`.

    uvicorn re-raises SIGTERM after its own shutdown, which would end the process before
    the collector drains its write queue; the collector asks it to exit instead.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class CollectorConfig:
    """Everything ``agentgov collector`` takes on its command line."""

    store: str | None = None
    host: str = "127.0.0.1"
    http_port: int = 4318
    #: ``None`` disables the gRPC receiver
    grpc_port: int | None = 4317
    risk_rules: str | None = None
    #: the multi-agent policy YAML (re-read when it changes); None: no limits
    policy: str | None = None
    #: API keys YAML; keys in AGENTGOV_API_KEYS are added to these
    api_keys: str | None = None
    #: lineage signing keys (PASERK k4.secret, newest first); AGENTGOV_SIGNING_KEYS wins
    signing_keys: str | None = None
    #: alert rule files or folders (re-read when they change); empty: the shipped alerts/
    alert_rules: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    log_level: str = "warning"
    #: below this much free space on the store's disk, ingest answers 503 (0: no floor)
    min_free_bytes: int = 256 << 20
    #: the local audit log's folder (None: next to the store; "off": none, records wait
    #: in memory only, which a crash or a long store outage loses: for measurements)
    audit_log: str | None = None
    #: space reserved for the local audit log
    audit_log_bytes: int = 64 << 20

    @property
    def store_config(self) -> StoreConfig:
        return StoreConfig(self.store or default_dsn())

    def audit_log_dir(self) -> Path | None:
        """Where the local audit log lives (None: turned off)."""
        if self.audit_log == "off":
            return None
        if self.audit_log:
            return Path(self.audit_log)
        data = self.store_config.data_path
        return data / "audit-log" if data is not None else Path.cwd() / "agentgov-audit-log"


class Collector:
    """Assembles and runs the collector. ``start()`` returns once it accepts requests."""

    def __init__(self, config: CollectorConfig, keys: KeyRing | None = None) -> None:
        """``keys`` (for embedding, e.g. the demo) replaces the keys from the environment."""
        self.config = config
        self.rules = RiskRules.load(config.risk_rules) if config.risk_rules else RiskRules.default()
        self.policy = PolicySource(config.policy)
        if keys is None:
            keys = KeyRing.from_env()
            if config.api_keys:
                keys = KeyRing.from_file(config.api_keys).merged(keys)
        self.keys = keys
        paths = config.alert_rules or (
            (str(default_rules_path()),) if default_rules_path().exists() else ()
        )
        self.alert_rules = RuleSource(paths)
        self.hub = ControlHub()
        self.governor: Governor | None = None
        self.alerts: AlertEngine | None = None
        self.alert_journal: AlertJournal | None = None
        self.slack: SlackNotifier | None = None
        self._alerts_api: AlertsApi | None = None
        self.audit_writer: audit.AuditWriter | None = None
        self.space: SpaceMonitor | None = None
        self.writer: SpanWriter | None = None
        self.resolver: TraceResolver | None = None
        self.analytics: Analytics | None = None
        self._grpc: grpc.Server | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.grpc_port: int | None = None

    def _app(self) -> DecisionFastPath:
        assert self.writer is not None and self.analytics is not None
        assert self.governor is not None
        receiver = OtlpHttpReceiver(self.writer, self.config.limits, self.keys)
        api = QueryApi(self.analytics, self.governor, self.keys)
        gov_api = GovernorApi(self.governor, self.keys, self.hub, self.analytics, self.audit_writer)
        assert self._alerts_api is not None
        alerts_api = self._alerts_api
        writer = self.writer
        governor = self.governor
        hub = self.hub
        policy = self.policy
        alert_rules = self.alert_rules

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            hub.bind(asyncio.get_running_loop())
            housekeeping = asyncio.create_task(self._housekeeping(governor, policy, alert_rules))
            try:
                yield
            finally:
                housekeeping.cancel()

        resolver = self.resolver
        assert resolver is not None
        assert self.space is not None and self.audit_writer is not None
        sources = Sources(writer, self.space, self.audit_writer, resolver, governor)
        metrics = Metrics(sources)

        async def healthz(request: Request) -> Response:
            status, body = health(sources)
            return JSONResponse(body, status_code=status)

        async def prometheus(request: Request) -> Response:
            return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

        app = Starlette(
            routes=[
                Route("/v1/traces", receiver.handle, methods=["POST"]),
                Route("/healthz", healthz, methods=["GET"]),
                Route("/metrics", prometheus, methods=["GET"]),
                *gov_api.routes(),
                *alerts_api.routes(),
                *api.routes(),
            ],
            lifespan=lifespan,
        )
        return DecisionFastPath(app, gov_api)

    @staticmethod
    async def _housekeeping(
        governor: Governor, policy: PolicySource, alert_rules: RuleSource
    ) -> None:
        """Expire approvals past their TTL; pick up policy and rule edits without a restart."""
        ticks = 0
        reported: str | None = None
        reported_rules: str | None = None
        while True:
            await asyncio.sleep(0.2)
            ticks += 1
            try:
                governor.expire_approvals()
                if ticks % 5 == 0:
                    if policy.reload_if_changed():
                        log.warning("policy reloaded from %s", policy.path)
                    # said once per broken edit; GET /api/v1/policy keeps showing it
                    if policy.last_error != reported:
                        if policy.last_error:
                            log.error("%s (the last good policy stays in force)", policy.last_error)
                        reported = policy.last_error
                    if alert_rules.reload_if_changed():
                        log.warning("alert rules reloaded from %s", alert_rules.paths)
                    if alert_rules.last_error != reported_rules:
                        if alert_rules.last_error:
                            log.error(
                                "%s (the last good rules stay in force)", alert_rules.last_error
                            )
                        reported_rules = alert_rules.last_error
            except Exception:
                log.exception("governor housekeeping failed")

    def _open(self) -> None:
        store = self.config.store_config
        setup_client = prepare(store, self.rules)
        setup_client.close()
        self.analytics = Analytics(open_client(store))
        self.space = SpaceMonitor(store, self.config.min_free_bytes).start()
        log_dir = self.config.audit_log_dir()
        audit_log = (
            AuditLog(log_dir, capacity_bytes=self.config.audit_log_bytes)
            if log_dir is not None
            else None
        )
        self.audit_writer = audit.AuditWriter(
            store, audit_log, check_written=self.space.writes_at_risk
        ).start()
        audit_writer = self.audit_writer

        def sink(record: Record, line: str) -> None:
            if self.alerts is not None:
                self.alerts.observe_record(record)

        self.lineage_tokens = LineageTokens(
            LineageKeys.load(self.config.signing_keys, store.data_path),
            ttl_s=self.policy.policy.multi_agent.lineage_ttl_s,
        )
        self.governor = Governor(
            self.policy,
            self.rules,
            sink=sink,
            tokens=self.lineage_tokens,
            encode=audit.row,
            journal=audit_writer.journal,
        )
        self.governor.listeners.append(self.hub.publish)
        replay_client = open_client(store)
        try:
            # what ClickHouse holds and what still waits in the local audit log
            replayed = self.governor.replay(audit.replay_records(replay_client, audit_writer))
        finally:
            replay_client.close()
        if replayed:
            log.info("governor state rebuilt from %d audit records", replayed)
        self._open_alerts(store)
        assert self.alerts is not None
        alerts = self.alerts
        self.resolver = TraceResolver(
            store, self.rules, on_resolved=alerts.observe_resolved
        ).start()
        resolver = self.resolver

        def stored(insert_id: str, received: float) -> None:
            alerts.observe_spans(insert_id, received)
            resolver.observe_batch(insert_id, received)

        self.writer = SpanWriter(
            store, self.rules, on_stored=stored, space_check=self.space.refusal
        ).start()
        # long-lived objects of the start-up (schema, clients, replayed state) leave the
        # collector's generations: full collections then stay short on the decision path
        gc.collect()
        gc.freeze()
        if not self.keys.enabled:
            log.warning(
                "no API keys configured: the API is open to anyone who can reach %s. "
                "Set AGENTGOV_API_KEYS or --api-keys to require keys.",
                self.config.host,
            )
        if self.config.grpc_port is not None:
            self._grpc, self.grpc_port = start_grpc_server(
                self.writer,
                self.config.limits,
                self.config.host,
                self.config.grpc_port,
                keys=self.keys,
            )
        self._server = _Server(
            uvicorn.Config(
                self._app(),
                host=self.config.host,
                port=self.config.http_port,
                log_level=self.config.log_level,
                access_log=False,
                lifespan="on",
                timeout_graceful_shutdown=10,
            )
        )

    def _open_alerts(self, store: StoreConfig) -> None:
        assert self.governor is not None
        journal = self.alert_journal = AlertJournal(store).start()

        def journal_slack(notice: Notice, event: str, attempt: int, status: str) -> None:
            journal.event(
                notice.alert_id,
                notice.session_id,
                notice.rule,
                notice.severity,
                event,
                attempt=attempt,
                status=status,
                message=notice.text,
            )

        self.slack = SlackNotifier.from_env(journal_slack)
        if self.slack is not None:
            self.slack.start()
            # each approval request goes to Slack with Approve / Deny (alerts/slack_actions)
            self.governor.listeners.append(post_approvals(self.slack))
        self.alerts = AlertEngine(
            self.alert_rules, self.rules, self.governor, journal, self.slack, store
        ).start()
        self._alerts_api = AlertsApi(self.alerts, open_client(store), self.keys)
        log.info(
            "%d alert rules from %s; Slack %s",
            len(self.alert_rules.ruleset.rules),
            ", ".join(str(p) for p in self.alert_rules.paths) or "(none)",
            "configured" if self.slack is not None else "not configured",
        )

    def run(self) -> None:
        """Run in the foreground until SIGINT/SIGTERM, then drain and stop."""
        self._open()
        server = self._server
        assert server is not None

        def request_exit(signum: int, frame: FrameType | None) -> None:
            if server.should_exit:  # a second signal: stop waiting for connections
                server.force_exit = True
            server.should_exit = True
            self.hub.close()

        previous = {
            sig: signal.signal(sig, request_exit) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            server.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._close()

    def start(self, timeout: float = 30.0) -> Collector:
        """Run in a background thread (for embedding: the demo, benchmarks)."""
        self._open()
        assert self._server is not None
        server = self._server
        self._thread = threading.Thread(target=server.run, name="agentgov-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._close()
                raise RuntimeError(
                    f"the collector did not start on {self.config.host}:{self.config.http_port}; "
                    "is the port in use?"
                )
            time.sleep(0.02)
        return self

    @property
    def http_port(self) -> int:
        """The bound HTTP port (useful with port 0)."""
        server = self._server
        if server is not None and server.servers:
            sock = server.servers[0].sockets[0]
            return int(sock.getsockname()[1])
        return self.config.http_port

    def stop(self) -> None:
        self.hub.close()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        self._close()

    def _close(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=5).wait(10)
            self._grpc = None
        if self.writer is not None:
            self.writer.close()
        if self.resolver is not None:
            self.resolver.flush(10)
            self.resolver.close()
            self.resolver = None
        if self.alerts is not None:
            self.alerts.drain(5)
            self.alerts.close()
            self.alerts = None
        if self.slack is not None:
            self.slack.close()
            self.slack = None
        if self.alert_journal is not None:
            self.alert_journal.close()
            self.alert_journal = None
        if self._alerts_api is not None:
            self._alerts_api.close()
            self._alerts_api = None
        if self.audit_writer is not None:
            self.audit_writer.close()
            self.audit_writer = None
        if self.analytics is not None:
            self.analytics.close()
            self.analytics = None
        if self.space is not None:
            self.space.close()
            self.space = None
