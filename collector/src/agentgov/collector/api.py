"""The query API (JSON under ``/api/v1``) over :class:`Analytics`."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any, Literal

import numpy as np
import pandas as pd
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agentgov.collector.analytics import Analytics, SessionNotFound
from agentgov.collector.auth import AuthError, KeyRing
from agentgov.collector.governor.engine import Governor
from agentgov.instrumentation.lineage import InvalidIdError


def _plain(value: Any) -> Any:
    if isinstance(value, (pd.Timestamp, datetime)):
        return value.isoformat()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """A DataFrame as JSON-ready rows."""
    cols = list(df.columns)
    return [
        {c: _plain(v) for c, v in zip(cols, row, strict=True)} for row in df.itertuples(index=False)
    ]


def json_response(data: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(data, default=_plain, separators=(",", ":")),
        status_code=status,
        media_type="application/json",
    )


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"query parameter {name!r} must be an integer from {lo} to {hi}") from exc
    if not lo <= value <= hi:
        raise ValueError(f"query parameter {name!r} must be an integer from {lo} to {hi}")
    return value


class QueryApi:
    """Route handlers; each runs its query on a worker thread.

    Session figures merge what ClickHouse stores with the governor's live state: a killed
    session reads ``killed`` at once, and a session known only to the governor (no spans
    stored yet) is not a 404.
    """

    def __init__(
        self, analytics: Analytics, governor: Governor | None = None, keys: KeyRing | None = None
    ) -> None:
        self.analytics = analytics
        self.governor = governor
        self.keys = keys or KeyRing([])

    async def _guard(self, fn: Any, *args: Any, request: Request | None = None) -> Response:
        try:
            if request is not None:
                self.keys.authorize(request.headers.get("authorization"), "read")
            return json_response(await run_in_threadpool(fn, *args))
        except AuthError as exc:
            return error(exc.status, str(exc))
        except (InvalidIdError, ValueError) as exc:
            return error(400, str(exc))
        except SessionNotFound as exc:
            return error(404, f"unknown session {exc.args[0]!r}: see GET /api/v1/sessions")

    def _with_governor(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.governor is None:
            return row
        live = self.governor.session(str(row["session_id"]))
        if live is not None:
            if live["status"] == "killed":
                row["status"] = "killed"
            row["governor"] = live
        return row

    def _session(self, session_id: str) -> dict[str, Any]:
        try:
            return self._with_governor(self.analytics.session(session_id))
        except SessionNotFound:
            live = self.governor.session(session_id) if self.governor else None
            if live is None:
                raise
            return {
                "session_id": session_id,
                "status": live["status"],
                "spans": 0,
                "governor": live,
            }

    async def sessions(self, request: Request) -> Response:
        try:
            limit = int_param(request, "limit", 50, 1, 10_000)
        except ValueError as exc:
            return error(400, str(exc))
        raw_order = request.query_params.get("order", "recent")
        if raw_order not in ("recent", "risk"):
            return error(400, "query parameter 'order' must be 'recent' or 'risk'")
        order: Literal["recent", "risk"] = "risk" if raw_order == "risk" else "recent"
        return await self._guard(
            lambda: {
                "sessions": [
                    self._with_governor(r) for r in records(self.analytics.sessions(limit, order))
                ]
            },
            request=request,
        )

    async def session(self, request: Request) -> Response:
        sid = request.path_params["session_id"]
        return await self._guard(self._session, sid, request=request)

    async def graph(self, request: Request) -> Response:
        sid = request.path_params["session_id"]

        def build() -> dict[str, Any]:
            g = self.analytics.graph(sid)
            return {"session_id": sid, "nodes": records(g.nodes), "edges": records(g.edges)}

        return await self._guard(build, request=request)

    async def audit(self, request: Request) -> Response:
        sid = request.path_params["session_id"]
        return await self._guard(
            lambda: {"session_id": sid, "commands": records(self.analytics.audit(sid))},
            request=request,
        )

    async def fanout(self, request: Request) -> Response:
        try:
            limit = int_param(request, "limit", 100, 1, 10_000)
        except ValueError as exc:
            return error(400, str(exc))
        sid = request.query_params.get("session")
        return await self._guard(
            lambda: {"agents": records(self.analytics.fanout(sid, limit))}, request=request
        )

    def routes(self) -> list[Route]:
        return [
            Route("/api/v1/sessions", self.sessions, methods=["GET"]),
            Route("/api/v1/sessions/{session_id}", self.session, methods=["GET"]),
            Route("/api/v1/sessions/{session_id}/graph", self.graph, methods=["GET"]),
            Route("/api/v1/sessions/{session_id}/audit", self.audit, methods=["GET"]),
            Route("/api/v1/fanout", self.fanout, methods=["GET"]),
        ]
