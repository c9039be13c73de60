"""The governor's HTTP API: decisions, usage, approvals, kills and control events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Annotated, Any, TypeVar

import orjson
from clickhouse_connect.driver.exceptions import ClickHouseError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agentgov.collector.analytics import Analytics, SessionNotFound
from agentgov.collector.api import records, store_error
from agentgov.collector.auth import AuthError, Caller, KeyRing
from agentgov.collector.governor import audit
from agentgov.collector.governor.engine import (
    Forbidden,
    Governor,
    GovernorError,
    HandoffRequest,
    ToolRequest,
    UnknownSession,
    UsageRequest,
)
from agentgov.collector.governor.events import ControlHub
from agentgov.collector.governor.plan import parse_plan
from agentgov.collector.governor.policy import PolicyError, parse_policy
from agentgov.collector.governor.simulate import MAX_SESSIONS, Simulator, load_sessions
from agentgov.collector.governor.tokens import LineageInvalid
from agentgov.instrumentation.governor import Decision
from agentgov.instrumentation.lineage import check_id
from agentgov.instrumentation.lineage_token import HEADER as TOKEN_HEADER
from agentgov.instrumentation.permissions import InvalidPermission, normalize_all

log = logging.getLogger(__name__)

_MAX_BODY = 64 << 10
_TOKEN_HEADER = TOKEN_HEADER.lower().encode()
#: the most one request may say was spent; a budget is a sum of many such reports
MAX_USD = 1_000_000.0
MAX_TOOL_CALLS = 1_000_000

Text = Annotated[str, StringConstraints(max_length=4096)]


def _id(value: str) -> str:
    return check_id(value, "id")


def _opt_id(value: str) -> str:
    return check_id(value, "id") if value else value


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _permissions(value: list[str] | None) -> list[str] | None:
    """Permissions in normal form; ``..`` and other unjudgeable forms are a 400."""
    if value is None:
        return None
    try:
        return list(normalize_all(value))
    except InvalidPermission as exc:
        raise ValueError(str(exc)) from exc


class HandoffBody(_Body):
    """A delegation request. Who delegates comes from the lineage token (header), never
    from ``from_agent``, which older clients send and which must then agree with it."""

    session_id: str = ""
    from_agent: str = ""
    to_agent: str
    task: str = Field(default="", max_length=1000)
    permissions: list[Text] | None = Field(default=None, max_length=256)
    estimated_usd: float = Field(default=0.0, ge=0, le=MAX_USD, allow_inf_nan=False)
    to_role: str = Field(default="", max_length=128)
    depth: int | None = Field(default=None, ge=0, le=10_000)
    approval_id: str = ""

    _ids = field_validator("to_agent")(_id)
    _opt = field_validator("session_id", "from_agent", "approval_id")(_opt_id)
    _perms = field_validator("permissions")(_permissions)


class ToolBody(_Body):
    """A tool call. Who calls comes from the lineage token; ``session_id`` and
    ``agent_id`` are for tokenless clients (and must agree with a token if one is sent)."""

    session_id: str = ""
    agent_id: str = ""
    tool: str = Field(min_length=1, max_length=256)
    command: str = Field(default="", max_length=64_000)
    resources: list[Text] = Field(default_factory=list, max_length=1024)
    approval_id: str = ""

    _opt = field_validator("session_id", "agent_id", "approval_id")(_opt_id)


class UsageBody(_Body):
    session_id: str = ""
    agent_id: str = ""
    usd: float = Field(default=0.0, ge=0, le=MAX_USD, allow_inf_nan=False)
    tool_calls: int = Field(default=0, ge=0, le=MAX_TOOL_CALLS)
    finished: bool = False

    _opt = field_validator("session_id", "agent_id")(_opt_id)


class StoppedBody(_Body):
    session_id: str = ""
    agent_id: str = ""

    _opt = field_validator("session_id", "agent_id")(_opt_id)


class KillBody(_Body):
    actor: str = Field(default="", max_length=256)
    reason: str = Field(default="", max_length=2000)
    #: kill an id the governor has not seen (agents not started yet): say so explicitly
    unseen: bool = False
    #: wait up to this long for the running agents to acknowledge the stop
    wait_s: float = Field(default=0.0, ge=0, le=60, allow_inf_nan=False)


class ApprovalBody(_Body):
    approver: str = Field(default="", max_length=256)
    comment: str = Field(default="", max_length=4000)
    #: how long a plan approval holds (plan approvals only; bounded by the policy's
    #: session_approval.max_ttl_s)
    ttl_s: float | None = Field(default=None, gt=0, le=30 * 86_400, allow_inf_nan=False)


class SimulateBody(_Body):
    """A candidate policy (its YAML text) and the stored sessions to replay under it."""

    policy: str = Field(min_length=1, max_length=60_000)
    #: one session; without it, the sessions active within ``since_s``
    session_id: str = ""
    since_s: float = Field(default=86_400, gt=0, le=30 * 86_400, allow_inf_nan=False)
    limit: int = Field(default=10_000, ge=1, le=MAX_SESSIONS)

    _opt = field_validator("session_id")(_opt_id)


B = TypeVar("B", bound=_Body)


class BadRequest(Exception):
    pass


async def _body(request: Request, model: type[B]) -> B:
    raw = await request.body()
    if len(raw) > _MAX_BODY:
        raise BadRequest(f"request body exceeds {_MAX_BODY} bytes")
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or '(body)'}: {e['msg']}" for e in exc.errors()
        )
        raise BadRequest(f"invalid request: {problems}") from exc


async def _json(request: Request) -> Any:
    """The request's body as JSON (at most the usual 64 KiB)."""
    raw = await request.body()
    if len(raw) > _MAX_BODY:
        raise BadRequest(f"request body exceeds {_MAX_BODY} bytes")
    try:
        return json.loads(raw or b"{}")
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from exc


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class GovernorApi:
    def __init__(
        self,
        governor: Governor,
        keys: KeyRing,
        hub: ControlHub,
        analytics: Analytics,
        audit_writer: audit.AuditWriter | None,
    ) -> None:
        self.governor = governor
        self.keys = keys
        self.hub = hub
        self.analytics = analytics
        self.audit_writer = audit_writer
        # Slack's Approve / Deny buttons (AGENTGOV_SLACK_SIGNING_SECRET turns them on)
        from agentgov.collector.alerts.slack_actions import SlackInteractions

        self.slack = SlackInteractions.from_env(governor)

    def _caller(self, request: Request, action: str) -> Caller | None:
        return self.keys.authorize(request.headers.get("authorization"), action)

    def _token(self, request: Request) -> str:
        return request.headers.get(TOKEN_HEADER, "")

    async def _handle(self, request: Request, action: str, fn: Any) -> Response:
        try:
            caller = self._caller(request, action)
            result = await fn(caller)
        except AuthError as exc:
            return _error(exc.status, str(exc))
        except (BadRequest, ValueError) as exc:
            return _error(400, str(exc))
        except Forbidden as exc:
            return _error(403, str(exc))
        except UnknownSession as exc:
            return _error(404, str(exc))
        except GovernorError as exc:
            return _error(404 if "unknown" in str(exc) else 409, str(exc))
        except SessionNotFound as exc:
            return _error(404, f"no decisions recorded for session {exc.args[0]!r}")
        except audit.AuditUnavailable as exc:
            return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "5"})
        except ClickHouseError as exc:  # a read of the store (audit, verify, simulate) failed
            return store_error(exc)
        if isinstance(result, Response):
            return result
        return JSONResponse(result)

    def _fail_safe(self, fn: Any, *args: Any) -> dict[str, Any]:
        try:
            decision: Decision = fn(*args)
        except audit.AuditUnavailable as exc:
            # never on_error's allow: a decision nobody could record must not go ahead
            return {"outcome": "stop", "reason": exc.reason, "detail": exc.detail}
        except Exception:
            log.exception("the governor could not decide")
            outcome = "allow" if self.governor.policy.on_error == "allow" else "stop"
            return {"outcome": outcome, "reason": "governor_error"}
        return decision.as_json()

    # -- decisions (served by DecisionFastPath) --------------------------------------------

    def decision_handlers(self) -> dict[str, tuple[type[_Body], Any, Any]]:
        """path -> (body model, governor method, request type) for the hot endpoints."""
        return {
            "/api/v1/decisions/handoff": (HandoffBody, self.governor.handoff, HandoffRequest),
            "/api/v1/decisions/tool": (ToolBody, self.governor.tool, ToolRequest),
            "/api/v1/usage": (UsageBody, self.governor.usage, UsageRequest),
        }

    # -- approvals -------------------------------------------------------------------------

    async def approvals(self, request: Request) -> Response:
        status = request.query_params.get("status")
        allowed = ("pending", "approved", "denied", "expired", "cancelled", "revoked")
        if status is not None and status not in allowed:
            return _error(400, f"query parameter 'status' must be one of {', '.join(allowed)}")
        raw = request.query_params.get("include_escalated", "false").lower()
        if raw not in ("true", "false", "1", "0"):
            return _error(400, "query parameter 'include_escalated' must be true or false")
        folded = raw in ("true", "1")

        async def go(caller: Caller | None) -> dict[str, Any]:
            rows = self.governor.approvals(status, include_escalated=folded)
            return {"approvals": [self._for_reviewer(a) for a in rows]}

        # what every session waits for is the reviewers' business, not the agents'
        return await self._handle(request, "approve", go)

    def _for_reviewer(self, approval: dict[str, Any]) -> dict[str, Any]:
        """An approval with what a reviewer weighs it by: the asking agent's delegation
        chain and the session's risk so far (from the governor's state)."""
        sid = str(approval["session_id"])
        agent = str(approval.get("requested_by") or "")
        lineage = self.governor.lineage(sid).get(agent)
        chain = list(lineage["chain"]) if lineage else ([agent] if agent else [])
        to_agent = approval.get("request", {}).get("to_agent")
        if approval.get("kind") == "handoff" and to_agent and to_agent not in chain:
            chain.append(str(to_agent))  # the delegation asked for: chain and new agent
        live = self.governor.session(sid) or {}
        return {**approval, "chain": chain, "session_risk": live.get("decided_risk", 0)}

    async def approval(self, request: Request) -> Response:
        async def go(caller: Caller | None) -> dict[str, Any]:
            return self.governor.get_approval(_id(request.path_params["approval_id"]))

        return await self._handle(request, "approve", go)

    async def _decide(self, request: Request, approve: bool) -> Response:
        async def go(caller: Caller | None) -> dict[str, Any]:
            body = await _body(request, ApprovalBody)
            approver = caller.name if caller else body.approver
            if not approver:
                raise BadRequest('name the approver: {"approver": "..."}')
            return self.governor.decide_approval(
                _id(request.path_params["approval_id"]),
                approve,
                approver,
                body.comment,
                _name(caller),
                ttl_s=body.ttl_s,
            )

        return await self._handle(request, "approve", go)

    async def approve(self, request: Request) -> Response:
        return await self._decide(request, True)

    async def deny(self, request: Request) -> Response:
        return await self._decide(request, False)

    async def withdraw(self, request: Request) -> Response:
        """The agent that asked stopped waiting (it gave up or was told not to wait): its
        request leaves the reviewers' queue, cancelled."""

        async def go(caller: Caller | None) -> dict[str, Any]:
            return self.governor.withdraw_approval(
                _id(request.path_params["approval_id"]), _name(caller)
            )

        return await self._handle(request, "decide", go)

    # -- kill and events -------------------------------------------------------------------

    async def kill(self, request: Request) -> Response:
        """Kill a session; the answer lists its agents and which acknowledged the stop.

        An unknown id is a 404 (a typo must not look like a kill) unless the body says
        ``unseen: true``; ``wait_s`` waits for the running agents' acknowledgements.
        """

        async def go(caller: Caller | None) -> dict[str, Any]:
            sid = _id(request.path_params["session_id"])
            body = await _body(request, KillBody)
            actor = caller.name if caller else (body.actor or "anonymous")
            unseen = body.unseen or self.governor.knows(sid)
            if not unseen:
                # a session known only from its spans is not unseen
                try:
                    await run_in_threadpool(self.analytics.session, sid)
                    unseen = True
                except SessionNotFound:
                    raise UnknownSession(
                        f"unknown session {sid!r}: no span or decision of it was seen. "
                        "To stop agents that have not started yet, kill it with "
                        '{"unseen": true} (agentgov kill --unseen)'
                    ) from None
            result = self.governor.kill(sid, actor, body.reason, unseen=True)
            deadline = time.monotonic() + body.wait_s
            while result["acknowledged"] < result["running_at_kill"]:
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.02)
                result = {**result, **self.governor.kill_status(sid)}
            result["waited_s"] = body.wait_s
            return result

        return await self._handle(request, "kill", go)

    async def stopped(self, request: Request) -> Response:
        """An agent acknowledges its session's stop (identified by its lineage token)."""

        async def go(caller: Caller | None) -> dict[str, Any]:
            sid = _id(request.path_params["session_id"])
            body = await _body(request, StoppedBody)
            if body.session_id and body.session_id != sid:
                raise BadRequest("the body names another session than the path")
            return self.governor.stopped(sid, body.agent_id, self._token(request), _name(caller))

        return await self._handle(request, "decide", go)

    async def events(self, request: Request) -> Response:
        async def go(caller: Caller | None) -> Response:
            sid = _id(request.path_params["session_id"])
            self._check_stream_token(caller, sid, self._token(request))
            first: list[tuple[str, dict[str, Any]]] = [
                ("state", self.governor.session(sid) or {"session_id": sid, "status": "active"})
            ]
            killed = self.governor.kill_info(sid)
            if killed is not None:
                first.append(("kill", killed))
            return StreamingResponse(
                self.hub.stream(sid, first),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            )

        return await self._handle(request, "events", go)

    # -- audit -----------------------------------------------------------------------------

    async def decisions(self, request: Request) -> Response:
        async def go(caller: Caller | None) -> dict[str, Any]:
            sid = _id(request.path_params["session_id"])
            if self.audit_writer is not None:
                await run_in_threadpool(self.audit_writer.flush, 5.0)
            df = await run_in_threadpool(self.analytics.decisions, sid)
            rows = records(df)
            for row in rows:
                row["detail"] = json.loads(row["detail"]) if row["detail"] else {}
            return {"session_id": sid, "decisions": rows}

        return await self._handle(request, "read", go)

    async def verify(self, request: Request) -> Response:
        async def go(caller: Caller | None) -> dict[str, Any]:
            sid = _id(request.path_params["session_id"])
            pending: list[Any] = []
            if self.audit_writer is not None:
                await run_in_threadpool(self.audit_writer.flush, 1.0)
                # records still in the local audit log are "not yet drained", not deleted
                pending = self.audit_writer.pending_records(sid)
            return await run_in_threadpool(self.analytics.verify_decisions, sid, pending)

        return await self._handle(request, "read", go)

    # -- policy ----------------------------------------------------------------------------

    async def policy(self, request: Request) -> Response:
        async def go(caller: Caller | None) -> dict[str, Any]:
            source = self.governor.policy_source
            return {
                "path": str(source.path) if source.path else None,
                "policy": source.policy.model_dump(),
                "last_error": source.last_error,
            }

        return await self._handle(request, "read", go)

    async def reload(self, request: Request) -> Response:
        async def go(caller: Caller | None) -> dict[str, Any]:
            source = self.governor.policy_source
            changed = source.reload_if_changed()
            if source.last_error:
                raise BadRequest(f"kept the last good policy: {source.last_error}")
            return {"reloaded": changed, "policy": source.policy.model_dump()}

        return await self._handle(request, "policy", go)

    # -- plans and policy simulation --------------------------------------------------------

    async def declare_plan(self, request: Request) -> Response:
        """Declare a session's plan before its first agent starts (the orchestrator's API
        key; the root then starts with the same key). Answers the blast radius and whether
        a reviewer must approve the plan first."""

        async def go(caller: Caller | None) -> dict[str, Any]:
            sid = _id(request.path_params["session_id"])
            plan = parse_plan(await _json(request), "plan")
            return self.governor.declare_plan(sid, plan, _name(caller))

        return await self._handle(request, "decide", go)

    async def plan(self, request: Request) -> Response:
        """A session's plan: blast radius, approval, and drift (what its steps touched that
        the plan did not name)."""

        async def go(caller: Caller | None) -> dict[str, Any]:
            sid = _id(request.path_params["session_id"])
            view = self.governor.plan_view(sid)
            if view is None:
                raise UnknownSession(f"unknown plan: session {sid!r} declared none")
            return view

        return await self._handle(request, "read", go)

    async def check_plan(self, request: Request) -> Response:
        """A plan checked against the policy in force, with its blast radius and whether it
        would need a reviewer; nothing is declared."""

        async def go(caller: Caller | None) -> dict[str, Any]:
            plan = parse_plan(await _json(request), "plan")
            return self.governor.check_plan(plan)

        return await self._handle(request, "read", go)

    async def simulate(self, request: Request) -> Response:
        """Replay stored sessions' decisions under a candidate policy; changes nothing."""

        async def go(caller: Caller | None) -> dict[str, Any]:
            body = await _body(request, SimulateBody)
            try:
                candidate = parse_policy(body.policy, "candidate policy")
            except PolicyError as exc:
                raise BadRequest(str(exc)) from exc
            if self.audit_writer is not None:
                await run_in_threadpool(self.audit_writer.flush, 5.0)
            sessions = await run_in_threadpool(
                self.analytics.recorded_sessions,
                load_sessions,
                body.session_id or None,
                body.since_s,
                body.limit,
            )
            if body.session_id and not sessions:
                raise SessionNotFound(body.session_id)
            simulator = Simulator(candidate, self.governor.rules)
            report = await run_in_threadpool(simulator.run, sessions)
            return report.as_json()

        return await self._handle(request, "simulate", go)

    def _check_stream_token(self, caller: Caller | None, session_id: str, token: str) -> None:
        """Where the policy requires verified lineage, an agent key hears only the sessions
        it holds a lineage token of."""
        if caller is None or caller.role != "agent":
            return
        if not self.governor.policy.require_verified_lineage:
            return
        if self.governor.tokens is None:
            raise Forbidden("lineage_required: this governor issues no lineage tokens")
        try:
            claims = self.governor.tokens.verify(token) if token else None
        except LineageInvalid as exc:
            raise Forbidden(f"{exc.reason}: {exc}") from None
        if claims is None or claims.session_id != session_id:
            raise Forbidden(
                f"lineage_required: an agent key hears a session's events with a lineage "
                f"token of that session (header {TOKEN_HEADER})"
            )

    def routes(self) -> list[Route]:
        return [
            Route("/api/v1/approvals", self.approvals, methods=["GET"]),
            Route("/api/v1/approvals/{approval_id}", self.approval, methods=["GET"]),
            Route("/api/v1/approvals/{approval_id}/approve", self.approve, methods=["POST"]),
            Route("/api/v1/approvals/{approval_id}/deny", self.deny, methods=["POST"]),
            Route("/api/v1/approvals/{approval_id}/withdraw", self.withdraw, methods=["POST"]),
            Route("/api/v1/sessions/{session_id}/kill", self.kill, methods=["POST"]),
            Route("/api/v1/sessions/{session_id}/stopped", self.stopped, methods=["POST"]),
            Route("/api/v1/sessions/{session_id}/events", self.events, methods=["GET"]),
            Route("/api/v1/sessions/{session_id}/decisions", self.decisions, methods=["GET"]),
            Route("/api/v1/sessions/{session_id}/decisions/verify", self.verify, methods=["GET"]),
            Route("/api/v1/sessions/{session_id}/plan", self.declare_plan, methods=["POST"]),
            Route("/api/v1/sessions/{session_id}/plan", self.plan, methods=["GET"]),
            Route("/api/v1/plans/check", self.check_plan, methods=["POST"]),
            Route("/api/v1/policy/simulate", self.simulate, methods=["POST"]),
            Route("/api/v1/policy", self.policy, methods=["GET"]),
            Route("/api/v1/policy/reload", self.reload, methods=["POST"]),
            *(self.slack.routes() if self.slack is not None else []),
        ]


def _name(caller: Caller | None) -> str:
    return caller.name if caller else ""


class DecisionFastPath:
    """ASGI middleware answering the decision endpoints before any routing.

    Decisions are the hot path (one per delegation and tool call of every agent): body
    parsing and validation happen in one pydantic call, and no request or response objects
    are built. Everything else goes on to the application.
    """

    def __init__(self, app: Any, api: GovernorApi) -> None:
        self.app = app
        self.api = api
        self.handlers = api.decision_handlers()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.handlers.get(scope["path"])
            if handler is not None:
                status, payload = await self._decide(scope, receive, handler)
                body = orjson.dumps(payload)
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    async def _decide(
        self, scope: dict[str, Any], receive: Any, handler: tuple[type[_Body], Any, Any]
    ) -> tuple[int, dict[str, Any]]:
        model, method, request_type = handler
        authorization = None
        token = ""
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == _TOKEN_HEADER:
                token = value.decode("latin-1")
        try:
            caller = self.api.keys.authorize(authorization, "decide")
        except AuthError as exc:
            return exc.status, {"error": str(exc)}
        chunks = []
        size = 0
        more = True
        while more:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > _MAX_BODY:
                return 413, {"error": f"request body exceeds {_MAX_BODY} bytes"}
            chunks.append(chunk)
            more = message.get("more_body", False)
        try:
            body = model.model_validate_json(b"".join(chunks) or b"{}")
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in e['loc']) or '(body)'}: {e['msg']}"
                for e in exc.errors()
            )
            return 400, {"error": f"invalid request: {problems}"}
        request = request_type(**body.model_dump(), token=token)
        return 200, self.api._fail_safe(method, request, _name(caller))
