"""A small HTTP client for the collector's API (used by the CLI and the demo)."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:4318"


def _segment(value: str) -> str:
    """``value`` as one URL path segment: whatever it holds cannot change the path."""
    return quote(value, safe="")


class ApiError(RuntimeError):
    """The collector answered with an error (``status``), or could not be reached (0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class CollectorClient:
    def __init__(
        self, url: str | None = None, timeout: float = 30.0, api_key: str | None = None
    ) -> None:
        self.url = (url or os.environ.get("AGENTGOV_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("AGENTGOV_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else None
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self._http.close()

    def get(self, path: str, **params: Any) -> Any:
        return self._call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("POST", path, json=body)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(
                f"cannot reach the collector at {self.url} ({exc}); start it with "
                "'agentgov collector' or set --url / AGENTGOV_URL"
            ) from exc
        if resp.status_code >= 400:
            try:
                message = resp.json().get("error", resp.text)
            except ValueError:
                message = resp.text
            if resp.status_code == 401 and "AGENTGOV_API_KEY" not in str(message):
                # the collector requires keys: say which variable the CLI reads one from
                message = (
                    f"{message} (the CLI sends the key in AGENTGOV_API_KEY: set it to a key "
                    "from the collector's AGENTGOV_API_KEYS)"
                )
            raise ApiError(f"{resp.status_code}: {message}", resp.status_code)
        return resp.json()

    def sessions(self, limit: int = 50, order: str = "recent") -> list[dict[str, Any]]:
        return list(self.get("/api/v1/sessions", limit=limit, order=order)["sessions"])

    def session(self, session_id: str) -> dict[str, Any]:
        return dict(self.get(f"/api/v1/sessions/{_segment(session_id)}"))

    def graph(self, session_id: str) -> dict[str, Any]:
        return dict(self.get(f"/api/v1/sessions/{_segment(session_id)}/graph"))

    def audit(self, session_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/api/v1/sessions/{_segment(session_id)}/audit")["commands"])

    def decisions(self, session_id: str) -> list[dict[str, Any]]:
        """The governor's decision records of a session, in order."""
        path = f"/api/v1/sessions/{_segment(session_id)}/decisions"
        return list(self.get(path)["decisions"])

    def messages(self, session_id: str) -> list[dict[str, Any]]:
        """A session's inter-agent messages (digests and injection scores)."""
        return list(self.get(f"/api/v1/sessions/{_segment(session_id)}/messages")["messages"])

    def fanout(self, session_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/fanout", session=session_id, limit=limit)["agents"])

    def kill(
        self,
        session_id: str,
        reason: str,
        actor: str = "",
        wait_s: float = 0.0,
        unseen: bool = False,
    ) -> dict[str, Any]:
        body = {"actor": actor, "reason": reason, "wait_s": wait_s, "unseen": unseen}
        return dict(self.post(f"/api/v1/sessions/{_segment(session_id)}/kill", body))

    def verify(self, session_id: str) -> dict[str, Any]:
        return dict(self.get(f"/api/v1/sessions/{_segment(session_id)}/decisions/verify"))

    def approvals(self, status: str | None = None) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/approvals", status=status)["approvals"])

    def decide(
        self,
        approval_id: str,
        approve: bool,
        approver: str,
        comment: str,
        ttl_s: float | None = None,
    ) -> Any:
        verb = "approve" if approve else "deny"
        body: dict[str, Any] = {"approver": approver, "comment": comment}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        return self.post(f"/api/v1/approvals/{_segment(approval_id)}/{verb}", body)

    def plan(self, session_id: str) -> dict[str, Any]:
        """A session's plan, blast radius, approval and drift."""
        return dict(self.get(f"/api/v1/sessions/{_segment(session_id)}/plan"))

    def check_plan(self, plan: dict[str, Any]) -> dict[str, Any]:
        """A plan's blast radius and approval needs under the policy in force."""
        return dict(self.post("/api/v1/plans/check", plan))

    def simulate(
        self,
        policy_text: str,
        session_id: str | None = None,
        since_s: float | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """What a candidate policy would have changed in stored sessions."""
        body: dict[str, Any] = {"policy": policy_text}
        if session_id:
            body["session_id"] = session_id
        if since_s is not None:
            body["since_s"] = since_s
        if limit is not None:
            body["limit"] = limit
        return dict(self.post("/api/v1/policy/simulate", body))

    def alerts(
        self,
        session_id: str | None = None,
        rule: str | None = None,
        event: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        return list(
            self.get("/api/v1/alerts", session_id=session_id, rule=rule, event=event, limit=limit)[
                "alerts"
            ]
        )

    def alerts_test(self, session_id: str) -> dict[str, Any]:
        return dict(self.get("/api/v1/alerts/test", session_id=session_id))
