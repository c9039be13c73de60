"""Approving from Slack: approval messages with Approve and Deny buttons, and the
endpoint receiving Slack's interactive payloads when a reviewer clicks one.

Who clicked comes from Slack's signed request only: the request's signature is checked
with ``slack_sdk``'s :class:`SignatureVerifier` (the app's signing secret, from
``AGENTGOV_SLACK_SIGNING_SECRET``; timestamps older than five minutes are refused), and
the Slack user id it carries is mapped to a named approver through an allowlist
(``AGENTGOV_SLACK_APPROVERS="U0123ABCD:alice,U0456EFGH:bob"``). A bad signature, a stale
timestamp or a malformed payload is a 401/400 and changes nothing; a user not on the
allowlist, or the agent's own key name (self-approval), is refused and told so. The
decision is the governor's usual one (the same record, the same rules as
``agentgov approve``), and the message is replaced with its outcome through the
payload's ``response_url`` (only under ``AGENTGOV_SLACK_RESPONSE_URL_BASE``, by default
``https://hooks.slack.com/``, so a signed payload cannot point the collector elsewhere).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

from slack_sdk.signature import SignatureVerifier
from slack_sdk.webhook import WebhookClient
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agentgov.collector.alerts.slack import APPROVE_ACTION, DENY_ACTION, Notice, SlackNotifier
from agentgov.collector.governor.engine import Forbidden, Governor, GovernorError
from agentgov.collector.render import approval_reason, approval_what

log = logging.getLogger(__name__)

#: Slack's interactive payloads are small; anything bigger is not one
MAX_BODY = 64 << 10
DEFAULT_RESPONSE_BASE = "https://hooks.slack.com/"
#: the rule name a pending approval's Slack message is recorded under (no rule fired it)
APPROVAL_NOTICE = "approval requested"


def approval_notice(approval: Mapping[str, Any]) -> Notice:
    """The Slack message of a pending approval: what is asked, why, and the buttons."""
    aid = str(approval["approval_id"])
    what = approval_what(dict(approval))
    reason = approval_reason(dict(approval))
    return Notice(
        alert_id=aid,
        session_id=str(approval["session_id"]),
        rule=APPROVAL_NOTICE,
        severity="warning",
        text=f"✋ {approval.get('requested_by') or 'an agent'} asks: {what} ({reason}). "
        f"Approve or deny here, or: uv run agentgov approve {aid} [--deny]",
        reason=reason,
        chain=tuple(str(a) for a in approval.get("chain") or [approval.get("requested_by")] if a),
        actions=("approval_required",),
        approval_id=aid,
    )


def post_approvals(notifier: SlackNotifier) -> Callable[[str, dict[str, Any]], None]:
    """A governor listener posting each new per-request approval to Slack (session-level
    approvals are posted by the alert rule that folded them)."""

    def listener(kind: str, payload: dict[str, Any]) -> None:
        if kind != "approval" or payload.get("status") != "pending":
            return
        if payload.get("kind") in ("handoff", "tool", "plan") and not payload.get("decided_at"):
            notifier.notify(approval_notice(payload))

    return listener


def parse_approvers(raw: str) -> dict[str, str]:
    """``U0123:alice,U0456:bob`` -> {Slack user id: approver name}."""
    out: dict[str, str] = {}
    for n, item in enumerate(x.strip() for x in raw.split(",") if x.strip()):
        user, sep, name = item.partition(":")
        if not sep or not user.strip() or not name.strip():
            raise ValueError(
                f"AGENTGOV_SLACK_APPROVERS entry {n + 1} is not SLACK_USER_ID:name; "
                "e.g. AGENTGOV_SLACK_APPROVERS=U0123ABCD:alice"
            )
        out[user.strip()] = name.strip()
    return out


class SlackInteractions:
    """``POST /api/v1/slack/interactions``: Slack's request URL for interactivity."""

    def __init__(
        self,
        governor: Governor,
        signing_secret: str,
        approvers: Mapping[str, str],
        response_base: str = DEFAULT_RESPONSE_BASE,
    ) -> None:
        self.governor = governor
        self.verifier = SignatureVerifier(signing_secret)
        self.approvers = dict(approvers)
        self.response_base = response_base

    @classmethod
    def from_env(
        cls, governor: Governor, env: Mapping[str, str] | None = None
    ) -> SlackInteractions | None:
        """Configured by ``AGENTGOV_SLACK_SIGNING_SECRET`` (None without it)."""
        env = os.environ if env is None else env
        secret = env.get("AGENTGOV_SLACK_SIGNING_SECRET")
        if not secret:
            return None
        return cls(
            governor,
            secret,
            parse_approvers(env.get("AGENTGOV_SLACK_APPROVERS", "")),
            env.get("AGENTGOV_SLACK_RESPONSE_URL_BASE") or DEFAULT_RESPONSE_BASE,
        )

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY:
            return JSONResponse({"error": "payload too large"}, status_code=413)
        timestamp = request.headers.get("x-slack-request-timestamp", "")
        signature = request.headers.get("x-slack-signature", "")
        # identity from the signature, never from the body: nothing else is read before it
        try:
            valid = bool(timestamp.isdigit() and signature) and self.verifier.is_valid(
                body, timestamp, signature
            )
        except (ValueError, TypeError):  # a header slack_sdk cannot even parse
            valid = False
        if not valid:
            log.warning("refused a Slack interaction: bad signature or stale timestamp")
            return JSONResponse(
                {"error": "invalid Slack signature or stale timestamp"}, status_code=401
            )
        try:
            payload = json.loads(parse_qs(body.decode("utf-8"))["payload"][0])
            user = str(payload["user"]["id"])
            action = payload["actions"][0]
            action_id, approval_id = str(action["action_id"]), str(action["value"])
        except (KeyError, IndexError, TypeError, ValueError, UnicodeDecodeError):
            return JSONResponse({"error": "not a Slack block_actions payload"}, status_code=400)
        if action_id not in (APPROVE_ACTION, DENY_ACTION):
            return Response(status_code=200)  # another button (a link): nothing to decide
        text = self._decide(user, approval_id, action_id == APPROVE_ACTION)
        response_url = str(payload.get("response_url") or "")
        task = None
        if response_url.startswith(self.response_base):
            task = BackgroundTask(run_in_threadpool, self._reply, response_url, text)
        elif response_url:
            log.warning("Slack interaction: response_url outside %s ignored", self.response_base)
        return JSONResponse({"ok": True, "text": text}, background=task)

    def _decide(self, user: str, approval_id: str, approve: bool) -> str:
        """The decision, as the line the message is replaced with."""
        approver = self.approvers.get(user)
        if approver is None:
            log.warning("Slack user %s is not an approver (AGENTGOV_SLACK_APPROVERS)", user)
            return (
                f"<@{user}> is not an approver: nothing was decided on {approval_id}. "
                "Approvers are listed in AGENTGOV_SLACK_APPROVERS."
            )
        try:
            result = self.governor.decide_approval(
                approval_id, approve, approver, "from Slack", caller=approver
            )
        except Forbidden as exc:
            return f"{approver} may not decide {approval_id}: {exc}"
        except (GovernorError, ValueError) as exc:
            return f"{approval_id}: {exc}"
        status = str(result.get("status") or "decided")
        return f"{'✅' if approve else '⛔'} {approval_id} {status} by {approver} (from Slack)"

    def _reply(self, response_url: str, text: str) -> None:
        try:
            WebhookClient(response_url, timeout=5).send(
                text=text,
                replace_original=True,
                blocks=[{"type": "section", "text": {"type": "mrkdwn", "text": text}}],
            )
        except Exception as exc:  # the decision stands; only the message stays as it was
            log.warning("could not update the Slack message: %s", exc)

    def routes(self) -> list[Route]:
        return [Route("/api/v1/slack/interactions", self.handle, methods=["POST"])]
