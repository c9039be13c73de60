"""Approving from Slack, end to end: a real collector posts an approval request to a local
server speaking Slack's webhook API (through slack_sdk), with Approve and Deny buttons; a
click is a signed interactive payload (signed with slack_sdk's SignatureVerifier, as
Slack signs it). Forged and stale clicks are 401 and change nothing; a user not on the
allowlist and the agent's own key name are refused; a reviewer's signed click approves,
the waiting agent goes on, and the message is replaced with the outcome.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from slack_sdk.signature import SignatureVerifier

try:  # tests/ as a plain folder (rootdir on sys.path) or as a package
    from conftest import CollectorProcess, free_port, wait_for
    from slack_fake import FakeSlack
except ImportError:  # pragma: no cover
    from tests.conftest import CollectorProcess, free_port, wait_for
    from tests.slack_fake import FakeSlack

from agentgov.instrumentation import GovernorClient, Stopped

AGENT_KEY = "ak-" + secrets.token_hex(16)
REVIEWER_KEY = "rk-" + secrets.token_hex(16)
API_KEYS = f"bots:agent:{AGENT_KEY},alice:reviewer:{REVIEWER_KEY}"
SECRET = secrets.token_hex(16)
REFUND = "billing.refund.create"
POLICY = f"""
multi_agent:
  tool_allowlist: [{REFUND}]
  require_approval_for: [{REFUND}]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CollectorProcess, FakeSlack]]:
    slack = FakeSlack().start()
    base = tmp_path_factory.mktemp("slack-actions")
    policy = base / "policy.yaml"
    policy.write_text(POLICY)
    env = {
        "AGENTGOV_API_KEYS": API_KEYS,
        "AGENTGOV_SLACK_WEBHOOK_URL": slack.webhook_url,
        "AGENTGOV_SLACK_SIGNING_SECRET": SECRET,
        # UBOTS is mapped to the agents' own key name: approving would be self-approval
        "AGENTGOV_SLACK_APPROVERS": "UALICE:alice,UBOTS:bots",
        "AGENTGOV_SLACK_RESPONSE_URL_BASE": slack.url + "/actions/",
    }
    c = CollectorProcess(base / "data", free_port(), free_port()).start(
        ("--policy", str(policy)), env=env
    )
    yield c, slack
    c.stop()
    slack.stop()


def click(
    url: str,
    user: str,
    action_id: str,
    approval_id: str,
    secret: str = SECRET,
    age_s: float = 0.0,
    response_url: str = "",
) -> httpx.Response:
    """A click as Slack sends it: a form-encoded ``payload``, signed with ``secret``."""
    payload = {
        "type": "block_actions",
        "user": {"id": user, "username": user.lower()},
        "actions": [{"action_id": action_id, "value": approval_id, "type": "button"}],
        "response_url": response_url,
    }
    body = urlencode({"payload": json.dumps(payload)})
    timestamp = str(int(time.time() - age_s))
    signature = SignatureVerifier(secret).generate_signature(timestamp=timestamp, body=body)
    return httpx.post(
        f"{url}/api/v1/slack/interactions",
        content=body,
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Slack-Request-Timestamp": timestamp,
            "X-Slack-Signature": signature,
        },
        timeout=10,
    )


def status(url: str, aid: str) -> str:
    r = httpx.get(
        f"{url}/api/v1/approvals/{aid}", headers={"Authorization": f"Bearer {REVIEWER_KEY}"}
    )
    return str(r.json()["status"])


def test_a_signed_click_approves_and_forged_ones_change_nothing(
    stack: tuple[CollectorProcess, FakeSlack],
) -> None:
    collector, slack = stack
    client = GovernorClient(collector.url, api_key=AGENT_KEY, approval_timeout=30)
    sid = f"sess-{uuid.uuid4().hex}"
    token = client.handoff(sid, "", "billing", to_role="billing").lineage_token
    result: dict[str, Any] = {}

    def agent() -> None:
        try:
            result["decision"] = client.tool(sid, "billing", REFUND, "refund 99", token=token)
        except Stopped as exc:  # pragma: no cover - asserted below
            result["stopped"] = exc

    waiting = threading.Thread(target=agent)
    waiting.start()

    def posted() -> dict[str, Any] | None:
        for r in slack.delivered():
            for block in r.body.get("blocks") or []:
                if block.get("type") == "actions" and sid in json.dumps(r.body):
                    return block
        return None

    actions = wait_for(posted, timeout=20)
    approve, deny = actions["elements"][:2]
    assert (approve["action_id"], deny["action_id"]) == ("agentgov_approve", "agentgov_deny")
    aid = approve["value"]
    assert aid.startswith("apr-") and deny["value"] == aid
    message = next(r for r in slack.delivered() if aid in json.dumps(r.body))
    assert f"tool {REFUND}: refund 99" in message.body["text"]

    # forged: another secret; stale: the right secret, 10 minutes old; no signature at all
    assert (
        click(collector.url, "UALICE", "agentgov_approve", aid, secret="x" * 32).status_code == 401
    )
    assert click(collector.url, "UALICE", "agentgov_approve", aid, age_s=600).status_code == 401
    unsigned = httpx.post(
        f"{collector.url}/api/v1/slack/interactions",
        content=urlencode({"payload": json.dumps({"user": {"id": "UALICE"}})}),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert unsigned.status_code == 401
    # signed, but by a user who is no approver, or who is the agents' own key name
    stranger = click(collector.url, "UMALLORY", "agentgov_approve", aid)
    assert stranger.status_code == 200 and "not an approver" in stranger.json()["text"]
    selfish = click(collector.url, "UBOTS", "agentgov_approve", aid)
    assert selfish.status_code == 200 and "may not decide" in selfish.json()["text"]
    assert status(collector.url, aid) == "pending"
    assert "decision" not in result

    reply = f"{slack.url}/actions/T000/1234/abcd"
    approved = click(collector.url, "UALICE", "agentgov_approve", aid, response_url=reply)
    assert approved.status_code == 200, approved.text
    assert approved.json()["text"] == f"✅ {aid} approved by alice (from Slack)"
    waiting.join(30)
    assert "stopped" not in result and result["decision"].outcome == "allow"
    assert status(collector.url, aid) == "approved"
    records = httpx.get(
        f"{collector.url}/api/v1/sessions/{sid}/decisions",
        headers={"Authorization": f"Bearer {REVIEWER_KEY}"},
    ).json()["decisions"]
    decided = [(d["outcome"], d["actor"]) for d in records if d["phase"] == "approval"]
    assert decided == [("requested", ""), ("approved", "alice")]  # refused clicks: no record
    # the message is replaced with the outcome (Slack's response_url, through slack_sdk)
    update = wait_for(
        lambda: next((r for r in slack.delivered() if r.path == "/actions/T000/1234/abcd"), None)
    )
    assert update.body["replace_original"] is True
    assert update.body["text"] == f"✅ {aid} approved by alice (from Slack)"
    # a second click finds it decided: nothing changes
    again = click(collector.url, "UALICE", "agentgov_deny", aid)
    assert "already approved" in again.json()["text"]
