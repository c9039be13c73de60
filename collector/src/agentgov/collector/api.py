"""The query API (JSON under ``/api/v1``) over :class:`Analytics`."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any, Literal

import numpy as np
import pandas as pd
from clickhouse_connect.driver.exceptions import ClickHouseError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agentgov.collector.analytics import Analytics, SessionNotFound
from agentgov.collector.auth import AuthError, KeyRing
from agentgov.collector.governor.engine import Governor
from agentgov.collector.store.writer import StoreUnavailable, classify
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


def store_error(exc: ClickHouseError) -> JSONResponse:
    """A read the store could not serve: 503 with Retry-After when the store's trouble may
    pass (a full disk, memory, a server down), else 500 naming ClickHouse's error."""
    found = classify(exc)
    if isinstance(found, StoreUnavailable):
        return JSONResponse({"error": str(found)}, status_code=503, headers={"Retry-After": "5"})
    return error(500, f"the store failed this read: {str(exc).strip().splitlines()[0][:300]}")


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
        except ClickHouseError as exc:
            return store_error(exc)

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

    def _graph(self, sid: str) -> dict[str, Any]:
        """The session's graph from its spans, with the governor's lineage over it.

        An agent the governor started has the parent and depth the governor allowed,
        whatever its spans say: a span cannot re-parent a governed agent. Each node says
        whether the governor vouches for it (``verified``: it issued the agent a lineage
        token) and whether spans contradict that lineage (``contradicted``).
        """
        governed = self.governor.lineage(sid) if self.governor is not None else {}
        try:
            g = self.analytics.graph(sid)
            nodes, span_edges = records(g.nodes), records(g.edges)
        except SessionNotFound:
            if not governed:
                raise
            nodes, span_edges = [], []
        by_id = {n["id"]: n for n in nodes}
        for agent_id, lin in governed.items():
            node = by_id.get(agent_id)
            if node is None:  # allowed by the governor, no span stored yet
                node = by_id[agent_id] = {
                    "id": agent_id, "name": "", "role": lin["role"], "depth": lin["depth"],
                    "risk": 0, "tool_calls": 0, "usd": 0.0, "parent_id": lin["parent_id"],
                    "task": "", "error": 0, "via": "", "evidence": "",
                }  # fmt: skip
                nodes.append(node)
            node["contradicted"] = (node["parent_id"] or "") != lin["parent_id"] or int(
                node["depth"]
            ) != int(lin["depth"])
            node["parent_id"], node["depth"] = lin["parent_id"], lin["depth"]
            node["verified"] = bool(lin["token_id"])
            node["lineage"] = "governor"
            if lin["parent_id"]:
                node["via"] = "governor"
        for node in nodes:
            node.setdefault("verified", False)
            node.setdefault("contradicted", False)
            node.setdefault("lineage", "spans")
        nodes.sort(key=lambda n: (int(n["depth"]), str(n["id"])))
        # into a governed agent, the one edge the governor allowed; elsewhere what the
        # spans show, an agent handed work by several agents having several
        edges = [
            {
                "source": e["source"],
                "target": e["target"],
                "task": e.get("task", ""),
                "via": e.get("via") or "explicit",
            }
            for e in span_edges
            if e["target"] not in governed
        ]
        edges += [
            {"source": lin["parent_id"], "target": agent_id, "task": by_id[agent_id].get("task", ""),
             "via": "governor"}
            for agent_id, lin in governed.items()
            if lin["parent_id"]
        ]  # fmt: skip
        return {"session_id": sid, "nodes": nodes, "edges": edges}

    async def graph(self, request: Request) -> Response:
        sid = request.path_params["session_id"]
        return await self._guard(self._graph, sid, request=request)

    def _audit(self, sid: str) -> dict[str, Any]:
        """The session's commands, each marked ``verified`` when its span's proof shows the
        agent it names ran it (see governor/tokens.py)."""
        try:
            rows = records(self.analytics.audit(sid))
        except SessionNotFound:
            # a session the governor decided on but no span of which is stored yet (its
            # agents were refused, or still wait for an approval): no commands, not a 404
            if self.governor is None or not self.governor.knows(sid):
                raise
            rows = []
        tokens = self.governor.tokens if self.governor is not None else None
        for r in rows:
            token_id, proof = r.pop("token_id"), r.pop("proof")
            r["verified"] = tokens is not None and tokens.proves(
                token_id, sid, str(r["agent_id"]), r["trace_id"], r["span_id"], proof
            )
        return {"session_id": sid, "commands": rows}

    async def audit(self, request: Request) -> Response:
        sid = request.path_params["session_id"]
        return await self._guard(self._audit, sid, request=request)

    def _messages(self, sid: str) -> dict[str, Any]:
        rows = records(self.analytics.messages(sid))
        if not rows and (self.governor is None or not self.governor.knows(sid)):
            self.analytics.session(sid)  # 404 for a session nothing is known of
        return {"session_id": sid, "messages": rows}

    async def messages(self, request: Request) -> Response:
        sid = request.path_params["session_id"]
        return await self._guard(self._messages, sid, request=request)

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
            Route("/api/v1/sessions/{session_id}/messages", self.messages, methods=["GET"]),
            Route("/api/v1/fanout", self.fanout, methods=["GET"]),
        ]
