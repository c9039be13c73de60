"""Slack notifications through the official ``slack_sdk``, off every hot path.

Alerts are queued (bounded) and delivered by one thread: ingest, decisions and stops
never wait on Slack. A failed delivery (5xx, timeout, connection error) is retried with
exponential backoff, a 429 after its ``Retry-After``; a notification is dropped only once
its tries are spent (or the queue is full, or the collector shuts down), and every try
is journaled.

Configuration comes from the environment: ``AGENTGOV_SLACK_WEBHOOK_URL`` (an incoming
webhook), or ``AGENTGOV_SLACK_BOT_TOKEN`` with ``AGENTGOV_SLACK_CHANNEL`` (a bot posting
with ``chat.postMessage``; ``AGENTGOV_SLACK_API_URL`` overrides the API's base URL).
``AGENTGOV_GRAFANA_URL`` adds a link to the session's dashboard. Delivery is tuned with
``AGENTGOV_SLACK_TIMEOUT_S`` (5), ``AGENTGOV_SLACK_MAX_ATTEMPTS`` (5) and
``AGENTGOV_SLACK_BACKOFF_S`` (0.5, doubled after each failed try).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ButtonElement,
    ContextBlock,
    HeaderBlock,
    MarkdownTextObject,
    SectionBlock,
)
from slack_sdk.webhook import WebhookClient

from agentgov.collector.alerts.journal import SLACK_DROPPED, SLACK_RETRY, SLACK_SENT

log = logging.getLogger(__name__)

SENT, RETRY, DROPPED = SLACK_SENT, SLACK_RETRY, SLACK_DROPPED

_ICON = {"critical": "🛑", "warning": "⚠️", "info": "ℹ️"}

#: action ids of the Approve and Deny buttons on an approval's message
APPROVE_ACTION, DENY_ACTION = "agentgov_approve", "agentgov_deny"

#: the drill-down dashboard's uid (dashboards/), reached as /d/<uid>?var-session=<id>
SESSION_DASHBOARD_UID = "agentgov-session"


@dataclass(frozen=True)
class Notice:
    """One alert to deliver."""

    alert_id: str
    session_id: str
    rule: str
    severity: str
    text: str
    reason: str = ""
    chain: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()
    created: float = field(default_factory=time.time)
    #: a pending approval the message lets reviewers decide (Approve / Deny buttons)
    approval_id: str = ""


@dataclass(frozen=True)
class Delivery:
    ok: bool
    status: str  # HTTP status or error text
    retry_after: float | None = None
    #: False when trying again cannot help (a revoked token, an unknown channel)
    retryable: bool = True


# chat.postMessage errors that a retry cannot fix
_FINAL_ERRORS = {
    "invalid_auth",
    "not_authed",
    "account_inactive",
    "token_revoked",
    "token_expired",
    "no_permission",
    "missing_scope",
    "channel_not_found",
    "not_in_channel",
    "is_archived",
    "invalid_blocks",
    "msg_too_long",
    "invalid_arguments",
}


class Sender(Protocol):
    def send(self, text: str, blocks: list[dict[str, Any]]) -> Delivery: ...


def _retry_after(headers: Mapping[str, Any] | None) -> float | None:
    if not headers:
        return None
    for key, value in headers.items():
        if key.lower() == "retry-after":
            raw = value[0] if isinstance(value, list) else value
            try:
                return max(0.0, float(raw))
            except (TypeError, ValueError):
                return None
    return None


class WebhookSender:
    """An incoming webhook (``slack_sdk.webhook.WebhookClient``)."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        # retries are the notifier's, so each try is journaled and backoff is shared
        self._client = WebhookClient(url, timeout=int(max(1, timeout_s)), retry_handlers=[])

    def send(self, text: str, blocks: list[dict[str, Any]]) -> Delivery:
        try:
            resp = self._client.send(text=text, blocks=blocks)
        except Exception as exc:  # timeouts and connection errors: retry
            return Delivery(False, f"error: {type(exc).__name__}: {exc}")
        if resp.status_code == 200:
            return Delivery(True, "200")
        status = resp.status_code
        # 4xx other than 429: the payload or the webhook itself is wrong (revoked, archived)
        return Delivery(
            False,
            f"{status} {resp.body}".strip()[:200],
            _retry_after(resp.headers),
            retryable=status == 429 or status >= 500,
        )


class BotSender:
    """A bot token posting with ``chat.postMessage`` (``slack_sdk.WebClient``)."""

    def __init__(
        self, token: str, channel: str, base_url: str | None = None, timeout_s: float = 5.0
    ) -> None:
        self._channel = channel
        self._client = WebClient(
            token=token,
            base_url=base_url or WebClient.BASE_URL,
            timeout=int(max(1, timeout_s)),
            retry_handlers=[],
        )

    def send(self, text: str, blocks: list[dict[str, Any]]) -> Delivery:
        try:
            self._client.chat_postMessage(channel=self._channel, text=text, blocks=blocks)
        except SlackApiError as exc:
            resp = exc.response
            error = str(resp.get("error", "")) if isinstance(resp.data, dict) else ""
            return Delivery(
                False,
                f"{resp.status_code} {error}".strip(),
                _retry_after(resp.headers),
                retryable=error not in _FINAL_ERRORS,
            )
        except Exception as exc:
            return Delivery(False, f"error: {type(exc).__name__}: {exc}")
        return Delivery(True, "200")


def blocks_for(notice: Notice, grafana_url: str | None = None) -> list[dict[str, Any]]:
    """Block Kit layout: what happened, to which session, by which rule, through which
    agents, and a link to the session's dashboard when Grafana is configured."""
    icon = _ICON.get(notice.severity, "")
    out: list[Block] = [
        HeaderBlock(text=f"{icon} {notice.rule}"[:150]),
        SectionBlock(text=MarkdownTextObject(text=notice.text[:3000])),
        SectionBlock(
            fields=[
                MarkdownTextObject(text=f"*Session*\n`{notice.session_id}`"),
                MarkdownTextObject(text=f"*Rule*\n{notice.rule} ({notice.severity})"),
                MarkdownTextObject(text=f"*Reason*\n{notice.reason or notice.rule}"),
                MarkdownTextObject(
                    text="*Agent chain*\n" + (" → ".join(notice.chain) or "(unknown)")
                ),
            ]
        ),
        ContextBlock(
            elements=[
                MarkdownTextObject(
                    text=f"actions: {', '.join(notice.actions) or 'notify'} · alert {notice.alert_id}"
                )
            ]
        ),
    ]
    buttons: list[ButtonElement] = []
    if notice.approval_id:
        # handled by the collector's Slack interactivity endpoint (alerts/slack_actions.py)
        buttons += [
            ButtonElement(
                text="Approve", action_id=APPROVE_ACTION, value=notice.approval_id, style="primary"
            ),
            ButtonElement(
                text="Deny", action_id=DENY_ACTION, value=notice.approval_id, style="danger"
            ),
        ]
    if grafana_url:
        link = (
            f"{grafana_url.rstrip('/')}/d/{SESSION_DASHBOARD_UID}"
            f"?var-session={quote(notice.session_id, safe='')}"
        )
        buttons.append(ButtonElement(text="Open the session", url=link, action_id="open"))
    if buttons:
        out.append(ActionsBlock(block_id="agentgov_actions", elements=buttons))
    return [b.to_dict() for b in out]


#: journal(notice, event, attempt, status)
Journal = Callable[[Notice, str, int, str], None]


class SlackNotifier:
    """Delivers notices on its own thread; :meth:`notify` never blocks."""

    def __init__(
        self,
        sender: Sender,
        journal: Journal,
        grafana_url: str | None = None,
        queue_size: int = 1000,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self._sender = sender
        self._journal = journal
        self._grafana = grafana_url
        self._queue: queue.Queue[Notice | None] = queue.Queue(maxsize=queue_size)
        self._max_attempts = max(1, max_attempts)
        self._backoff = backoff_s
        self._max_backoff = max_backoff_s
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.dropped = 0

    @classmethod
    def from_env(
        cls, journal: Journal, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> SlackNotifier | None:
        """A notifier from ``AGENTGOV_SLACK_*``, or None when Slack is not configured."""
        env = os.environ if env is None else env
        grafana = env.get("AGENTGOV_GRAFANA_URL") or None
        webhook = env.get("AGENTGOV_SLACK_WEBHOOK_URL")
        token = env.get("AGENTGOV_SLACK_BOT_TOKEN")

        def number(name: str, default: float, lo: float, hi: float) -> float:
            raw = env.get(name)
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not lo <= value <= hi:
                raise ValueError(f"{name}={raw!r}: use a number from {lo:g} to {hi:g}")
            return value

        timeout = number("AGENTGOV_SLACK_TIMEOUT_S", 5.0, 1, 60)
        kwargs.setdefault("max_attempts", int(number("AGENTGOV_SLACK_MAX_ATTEMPTS", 5, 1, 20)))
        kwargs.setdefault("backoff_s", number("AGENTGOV_SLACK_BACKOFF_S", 0.5, 0.01, 60))
        sender: Sender
        if webhook:
            sender = WebhookSender(webhook, timeout)
        elif token:
            channel = env.get("AGENTGOV_SLACK_CHANNEL")
            if not channel:
                raise ValueError(
                    "AGENTGOV_SLACK_BOT_TOKEN is set but AGENTGOV_SLACK_CHANNEL is not: "
                    "name the channel to post to (e.g. #agent-alerts or its id)"
                )
            sender = BotSender(token, channel, env.get("AGENTGOV_SLACK_API_URL") or None, timeout)
        else:
            return None
        return cls(sender, journal, grafana_url=grafana, **kwargs)

    def start(self) -> SlackNotifier:
        self._thread = threading.Thread(target=self._run, name="agentgov-slack", daemon=True)
        self._thread.start()
        return self

    def notify(self, notice: Notice) -> bool:
        """Queue a notice; False (and journaled as dropped) when the queue is full."""
        try:
            self._queue.put_nowait(notice)
            return True
        except queue.Full:
            self.dropped += 1
            self._journal(notice, DROPPED, 0, "queue full: Slack is slower than the alerts")
            return False

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued within ``timeout``; what remains is journaled as dropped."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._closing.set()
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            notice = self._queue.get()
            if notice is None:
                return
            self._deliver(notice)

    def _deliver(self, notice: Notice) -> None:
        blocks = blocks_for(notice, self._grafana)
        for attempt in range(1, self._max_attempts + 1):
            result = self._sender.send(notice.text, blocks)
            if result.ok:
                self.sent += 1
                self._journal(notice, SENT, attempt, result.status)
                return
            if not result.retryable:
                self.dropped += 1
                self._journal(notice, DROPPED, attempt, f"{result.status}; not retryable")
                return
            if attempt == self._max_attempts:
                break
            delay = min(self._max_backoff, self._backoff * 2 ** (attempt - 1))
            if result.retry_after is not None:
                delay = min(max(result.retry_after, delay), 300.0)
            self._journal(notice, RETRY, attempt, f"{result.status}; next try in {delay:.1f}s")
            if self._closing.wait(delay):
                self.dropped += 1
                self._journal(notice, DROPPED, attempt, "collector shutting down")
                return
        self.dropped += 1
        self._journal(notice, DROPPED, self._max_attempts, f"{result.status}; tries spent")
