"""Alert routes under ``/api/v1/alerts``: the journal, the loaded rules, dry runs."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from clickhouse_connect.driver.client import Client
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agentgov.collector.alerts import journal
from agentgov.collector.alerts.engine import AlertEngine
from agentgov.collector.alerts.replay import stored_facts
from agentgov.collector.api import error, int_param, json_response
from agentgov.collector.auth import AuthError, KeyRing
from agentgov.collector.governor import audit
from agentgov.instrumentation.lineage import InvalidIdError, check_id


class AlertsApi:
    """Reads go through their own client, serialized (one query at a time)."""

    def __init__(self, engine: AlertEngine, client: Client, keys: KeyRing) -> None:
        self.engine = engine
        self._client = client
        self._lock = threading.Lock()
        self.keys = keys

    def close(self) -> None:
        with self._lock:
            self._client.close()

    async def _read(self, request: Request, fn: Callable[[], Any]) -> Response:
        try:
            self.keys.authorize(request.headers.get("authorization"), "read")
            return json_response(await run_in_threadpool(self._locked, fn))
        except AuthError as exc:
            return error(exc.status, str(exc))
        except (InvalidIdError, ValueError) as exc:
            return error(400, str(exc))

    def _locked(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            return fn()

    async def alerts(self, request: Request) -> Response:
        q = request.query_params
        try:
            limit = int_param(request, "limit", 100, 1, 10_000)
            sid = q.get("session_id") or q.get("session")
            if sid:
                check_id(sid, "session_id")
            event = q.get("event")
            if event and event not in journal.EVENTS:
                raise ValueError(
                    f"unknown event {event!r}; use one of: {', '.join(sorted(journal.EVENTS))}"
                )
        except (ValueError, InvalidIdError) as exc:
            return error(400, str(exc))
        return await self._read(
            request,
            lambda: {
                "alerts": journal.recent(self._client, sid, q.get("rule"), event, limit),
            },
        )

    async def rules(self, request: Request) -> Response:
        source = self.engine.source
        return await self._read(
            request,
            lambda: {
                "rules": [
                    {**r.model_dump(), "file": source.ruleset.files.get(r.name)}
                    for r in source.ruleset.rules
                ],
                "last_error": source.last_error,
                "stats": dataclasses.asdict(self.engine.stats),
            },
        )

    async def test(self, request: Request) -> Response:
        """Which rules would fire on a stored session; acts on nothing."""
        sid = request.query_params.get("session_id") or request.query_params.get("session")
        if not sid:
            return error(400, "give the session: ?session_id=ID")
        try:
            check_id(sid, "session_id")
        except InvalidIdError as exc:
            return error(400, str(exc))

        def run() -> dict[str, Any]:
            facts = stored_facts(self._client, sid)
            records = audit.session_records(self._client, sid)
            if not facts and not records:
                raise LookupError(sid)
            firings = self.engine.dry_run(sid, facts, records, self._client)
            return {
                "session_id": sid,
                "facts": len(facts),
                "decisions": len(records),
                "would_fire": [f.as_json() for f in firings],
            }

        try:
            return await self._read(request, run)
        except LookupError:
            return error(404, f"unknown session {sid!r}: see GET /api/v1/sessions")

    def routes(self) -> list[Route]:
        return [
            Route("/api/v1/alerts", self.alerts, methods=["GET"]),
            Route("/api/v1/alerts/rules", self.rules, methods=["GET"]),
            Route("/api/v1/alerts/test", self.test, methods=["GET"]),
        ]
