"""Session plans end to end: a real collector process, real agents on the SDK.

One collector with API keys on (agent, reviewer, admin) runs the shipped plan and limit
alert rules (copies of ``alerts/plans.yaml`` and ``alerts/limits.yaml``); each test
writes the policy it needs and reloads it. Covered:

1. a plan whose blast radius needs a reviewer blocks the first agent until one approves
   it (with a TTL, under the reviewer key's name); then the steps inside the plan run
   with no approval of their own, and a step outside it stops with ``out_of_scope``;
2. with ``out_of_scope: approval_required`` the off-plan step goes to a reviewer
   instead; its drift is in the plan's view and fires the shipped ``plan_drift`` rule;
3. a kill revokes the plan's approval and cancels every pending one;
4. once the plan's approval has expired, the session's new steps stop;
5. ``policy simulate`` (API and CLI) replays recorded sessions under a stricter policy
   and reports exactly the stops it would have made, changing nothing;
6. delegation ping-pong stops at ``max_task_returns`` with ``delegation_loop`` and fires
   the shipped rule;
7. bad plans are refused (4xx, the field named) without any change of state; a plan is
   the declaring key's; sessions without a plan decide as before.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider

try:  # tests/ as a plain folder (rootdir on sys.path) or as a package
    from conftest import CollectorProcess, free_port, wait_for
except ImportError:  # pragma: no cover
    from tests.conftest import CollectorProcess, free_port, wait_for

from agentgov.collector.governor.policy import MultiAgentPolicy
from agentgov.instrumentation import (
    AwaitingApproval,
    Governance,
    GovernorClient,
    PlannedAgent,
    PlanRejected,
    SessionKilled,
    Stopped,
)

REPO = Path(__file__).resolve().parents[1]
AGENT_KEY = "ak-" + secrets.token_hex(16)
OTHER_AGENT_KEY = "ok-" + secrets.token_hex(16)
REVIEWER_KEY = "rk-" + secrets.token_hex(16)
ADMIN_KEY = "dk-" + secrets.token_hex(16)
API_KEYS = (
    f"agent-1:agent:{AGENT_KEY},agent-2:agent:{OTHER_AGENT_KEY},"
    f"reviewer-1:reviewer:{REVIEWER_KEY},admin-1:admin:{ADMIN_KEY}"
)

DEPLOY = "deploy.release"

#: the plan of a release run: an orchestrator hands the release to a deployer, which
#: writes below /opt/app and runs the deploy tool against production
RELEASE_PLAN = [
    PlannedAgent(
        role="orchestrator",
        permissions=["fs.read:/opt/app", "fs.write:/opt/app"],
        tools=["shell"],
        resources=["/opt/app"],
    ),
    PlannedAgent(
        role="deployer",
        permissions=["fs.write:/opt/app"],
        tools=[DEPLOY, "shell"],
        resources=["/opt/app/releases"],
        environments=["production"],
    ),
]


# -- helpers -------------------------------------------------------------------------------


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Stack:
    collector: CollectorProcess
    policy_path: Path
    _stamp: int = field(default_factory=time.time_ns)

    @property
    def url(self) -> str:
        return self.collector.url

    def get(self, path: str, key: str = REVIEWER_KEY, **params: Any) -> Any:
        r = httpx.get(self.url + path, params=params, headers=headers(key), timeout=30)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text}"
        return r.json()

    def post(self, path: str, body: Any, key: str) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=headers(key), timeout=60)

    def set_policy(self, **multi_agent: Any) -> None:
        """Write the policy, reload it, and check the governor now applies exactly it."""
        staged = self.policy_path.with_suffix(".staged")
        staged.write_text(json.dumps({"multi_agent": multi_agent}))
        self._stamp += 1_000_000_000  # a strictly later mtime, whatever the file size
        os.utime(staged, ns=(self._stamp, self._stamp))
        os.replace(staged, self.policy_path)
        r = self.post("/api/v1/policy/reload", {}, ADMIN_KEY)
        assert r.status_code == 200, r.text
        expected = MultiAgentPolicy.model_validate(multi_agent).model_dump()
        assert r.json()["policy"]["multi_agent"] == expected

    def approvals(self, sid: str, status: str | None = None) -> list[dict[str, Any]]:
        params = {"status": status} if status else {}
        rows = self.get("/api/v1/approvals", **params)["approvals"]
        return [a for a in rows if a["session_id"] == sid]

    def decisions(self, sid: str) -> list[dict[str, Any]]:
        return list(self.get(f"/api/v1/sessions/{sid}/decisions")["decisions"])

    def plan(self, sid: str) -> dict[str, Any]:
        return dict(self.get(f"/api/v1/sessions/{sid}/plan"))

    def fired(self, sid: str, rule: str) -> list[dict[str, Any]]:
        rows = self.get("/api/v1/alerts", session_id=sid, event="fired", limit="100")["alerts"]
        return [a for a in rows if a["rule"] == rule]

    def cli(self, *args: str, key: str = REVIEWER_KEY) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "AGENTGOV_URL": self.url, "AGENTGOV_API_KEY": key}
        return subprocess.run(
            [sys.executable, "-m", "agentgov.collector.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("plans")
    rules = base / "alerts"
    rules.mkdir()
    for name in ("plans.yaml", "limits.yaml"):  # the shipped rules, as shipped
        shutil.copy(REPO / "alerts" / name, rules / name)
    policy = base / "policy.yaml"
    policy.write_text(json.dumps({"multi_agent": {}}))
    c = CollectorProcess(base / "data", free_port(), free_port())
    c.start(
        extra_args=("--policy", str(policy), "--alert-rules", str(rules)),
        env={"AGENTGOV_API_KEYS": API_KEYS},
    )
    yield Stack(c, policy)
    c.stop()


def governance(url: str, key: str = AGENT_KEY, **kwargs: Any) -> Governance:
    """Agents of this process: the agent key, no span export."""
    client = GovernorClient(url, api_key=key, approval_timeout=30, timeout=10)
    return Governance(TracerProvider(), governor=client, **kwargs)


def new_sid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}"


class PlanReviewer(threading.Thread):
    """A reviewer in another thread: waits for the session's plan approval to be pending,
    notes whether the root agent had started by then, then approves it for ``ttl_s``."""

    def __init__(
        self,
        stack: Stack,
        sid: str,
        started: threading.Event,
        ttl_s: float,
        hold_s: float = 0.3,
    ) -> None:
        super().__init__(daemon=True)
        self.stack, self.sid, self.started, self.ttl_s = stack, sid, started, ttl_s
        self.hold_s = hold_s
        self.pending: dict[str, Any] = {}
        self.started_before_approval: bool | None = None
        self.self_approval = 0
        self.without_ttl = 0
        self.response: dict[str, Any] = {}

    def run(self) -> None:
        found = wait_for(lambda: self.stack.approvals(self.sid, "pending"), timeout=20)
        self.pending = found[0]
        time.sleep(self.hold_s)  # the root keeps waiting (and asking) while nobody decides
        self.started_before_approval = self.started.is_set()
        aid = self.pending["approval_id"]
        # an agent key may not approve; a plan approval without a TTL is refused
        self.self_approval = self.stack.post(
            f"/api/v1/approvals/{aid}/approve", {"ttl_s": 60}, AGENT_KEY
        ).status_code
        self.without_ttl = self.stack.post(
            f"/api/v1/approvals/{aid}/approve", {}, REVIEWER_KEY
        ).status_code
        r = self.stack.post(
            f"/api/v1/approvals/{aid}/approve",
            {"ttl_s": self.ttl_s, "approver": "mallory", "comment": "release 42"},
            REVIEWER_KEY,
        )
        assert r.status_code == 200, r.text
        self.response = r.json()


def _approved_run(
    stack: Stack, sid: str, ttl_s: float = 600, hold_s: float = 0.3
) -> tuple[Any, PlanReviewer, Any]:
    """Declare the release plan, have a reviewer approve it after ``hold_s``; the root's
    start waits."""
    gov = governance(stack.url)
    session = gov.session("ship release 42 to production", session_id=sid)
    answer = session.plan(RELEASE_PLAN, max_fanout=2, max_depth=1, budget_usd=5.0)
    started = threading.Event()
    reviewer = PlanReviewer(stack, sid, started, ttl_s, hold_s)
    reviewer.start()
    root = session.agent(
        "orchestrator", role="orchestrator", permissions=["fs.read:/opt/app", "fs.write:/opt/app"]
    )
    started.set()
    reviewer.join(30)
    return answer, reviewer, root


RELEASE_POLICY: dict[str, Any] = {
    "session_approval": {"blast_radius_risk": 60, "production": True, "out_of_scope": "stop"},
    "require_approval_for": [DEPLOY],
    "high_risk_delegation": {"write": True},
}


# -- 1. approve the plan once, then the steps inside it run ------------------------------


def test_approved_plan_runs_in_scope_steps_and_stops_out_of_scope(stack: Stack) -> None:
    stack.set_policy(**RELEASE_POLICY)
    sid = new_sid("release")
    # the reviewer takes long enough for the waiting root to ask again (every 2 s)
    answer, reviewer, root = _approved_run(stack, sid, hold_s=2.5)

    # the governor computed the blast radius before anything ran, and asked a reviewer
    assert answer.awaits_reviewer and answer.approval_id
    radius = answer.blast_radius
    assert radius["production"] is True
    assert radius["write_scopes"] == ["fs.write:/opt/app"]
    assert radius["agents"] == 2 and radius["max_depth"] == 1 and radius["max_spend_usd"] == 5.0
    assert sorted(radius["destructive_tools"]) == sorted(
        ["orchestrator: shell", f"deployer: {DEPLOY}", "deployer: shell"]
    )
    assert radius["risk"] >= 60
    assert any(r.startswith("blast-radius risk") for r in answer.needs_approval)
    assert any(r.startswith("names production") for r in answer.needs_approval)
    # the reviewer saw the blast radius and the capabilities it grants
    pending = reviewer.pending
    assert (pending["kind"], pending["approval_id"]) == ("plan", answer.approval_id)
    assert pending["request"]["blast_radius"] == dict(radius)
    assert {c["role"] for c in pending["request"]["blast_radius"]["capabilities"]} == {
        "orchestrator",
        "deployer",
    }
    # the root waited for the reviewer; agent keys cannot approve; a TTL is required
    assert reviewer.started_before_approval is False
    assert (reviewer.self_approval, reviewer.without_ttl) == (403, 400)
    # the approver is the reviewer key's name, not what the body claims
    assert (reviewer.response["status"], reviewer.response["approver"]) == (
        "approved",
        "reviewer-1",
    )
    # the wait is one decision record, however often the root asked again meanwhile
    waited = [d for d in stack.decisions(sid) if d["reason"] == "plan_approval_required"]
    assert len(waited) == 1, waited

    with root:
        # a write delegation and a tool on require_approval_for: both would wait for a
        # reviewer without the plan; inside the approved plan they run at once
        with root.delegate(
            "deployer", task="release-42", role="deployer", permissions=["fs.write:/opt/app"]
        ) as deployer:
            with deployer.tool(
                DEPLOY, command="deploy release 42", resources=["/opt/app/releases/42"]
            ):
                pass
            with deployer.tool(
                "shell", command="ls /opt/app/releases", resources=["/opt/app/releases"]
            ):
                pass
            # outside the plan: a path it never named
            with pytest.raises(Stopped) as off_plan:
                with deployer.tool("shell", command="rm -rf /etc/nginx", resources=["/etc/nginx"]):
                    pytest.fail("an out-of-scope step ran")
    assert off_plan.value.reason == "out_of_scope"
    assert "resource: /etc/nginx" in off_plan.value.detail

    # no approval was asked for any step: only the plan's
    assert [a["kind"] for a in stack.approvals(sid)] == ["plan"]
    decisions = stack.decisions(sid)
    steps = [d for d in decisions if d["phase"] in ("pre_handoff", "tool")]
    via = [d for d in steps if d["detail"].get("via_plan")]
    assert {d["detail"]["via_plan"] for d in via} == {answer.approval_id}
    # the root's and the deployer's write grants, and the deploy call
    assert [(d["phase"], d["outcome"]) for d in via] == [
        ("pre_handoff", "allow"),
        ("pre_handoff", "allow"),
        ("tool", "allow"),
    ]
    # the root's start asked (and asked again) until the reviewer approved; then only
    # the off-plan step was refused
    refused = [(d["outcome"], d["reason"]) for d in steps if d["outcome"] != "allow"]
    assert set(refused[:-1]) == {("approval_required", "plan_approval_required")}
    assert refused[-1] == ("stop", "out_of_scope")

    view = stack.plan(sid)
    assert view["status"] == "approved"
    approval = view["approval"]
    assert (approval["approved_by"], approval["ttl_s"]) == ("reviewer-1", 600)
    assert approval["holds_until"] == pytest.approx(time.time() + 600, abs=60)
    assert view["drift_count"] == 1
    assert view["drift"][0]["items"] == ["resource: /etc/nginx"]
    assert stack.get(f"/api/v1/sessions/{sid}")["governor"]["plan"]["drift"] == 1

    # the CLI shows the same plan, blast radius and drift
    shown = stack.cli("plan", "show", sid)
    assert shown.returncode == 0, shown.stderr
    assert f"plan of {sid}: approved" in shown.stdout
    assert "by reviewer-1 for 600 s" in shown.stdout
    assert "write scopes  fs.write:/opt/app" in shown.stdout
    assert "resource: /etc/nginx" in shown.stdout


# -- 2. off-plan steps sent to a reviewer; drift fires the shipped rule ------------------


def test_out_of_scope_goes_to_a_reviewer_and_drift_fires_its_rule(stack: Stack) -> None:
    stack.set_policy(session_approval={"out_of_scope": "approval_required"})
    sid = new_sid("drift")
    gov = governance(stack.url, approvals="raise")
    with gov.session("rotate the logs", session_id=sid) as session:
        answer = session.plan(
            [PlannedAgent(role="janitor", tools=["shell"], resources=["/var/log/app"])],
            max_fanout=0,
            max_depth=0,
            budget_usd=1.0,
        )
        # a plan no criterion flags holds without a reviewer
        assert (answer.status, answer.approval_id, answer.needs_approval) == ("active", "", ())
        with session.agent("janitor", role="janitor") as janitor:
            with janitor.tool("shell", command="gzip old.log", resources=["/var/log/app/old"]):
                pass
            with pytest.raises(AwaitingApproval) as asked:
                with janitor.tool("kubectl", command="kubectl get pods"):
                    pytest.fail("an off-plan step ran without a reviewer")
    pending = stack.approvals(sid, "pending")
    assert [a["approval_id"] for a in pending] == [asked.value.approval_id]
    assert pending[0]["request"]["out_of_scope"] == ["tool: kubectl"]
    view = stack.plan(sid)
    assert (view["status"], view["drift_count"]) == ("active", 1)
    assert view["drift"][0]["outcome"] == "approval_required"
    firing = wait_for(lambda: stack.fired(sid, "plan_drift"), timeout=20)[0]
    assert "tool: kubectl" in firing["message"]


# -- 3. a kill revokes the plan approval and every pending one ---------------------------


def test_kill_revokes_the_plan_approval_and_pending_ones(stack: Stack) -> None:
    stack.set_policy(**{**RELEASE_POLICY, "session_approval": {"production": True}})
    sid = new_sid("revoke")
    answer, reviewer, root = _approved_run(stack, sid)
    with root:
        root.governor_approvals = None
        # an off-plan step left waiting for a reviewer (approval_required mode)
        root._gov.approvals = "raise"
        with pytest.raises(AwaitingApproval) as asked:
            with root.tool("kubectl", command="kubectl get pods"):
                pass
        r = stack.post(f"/api/v1/sessions/{sid}/kill", {"reason": "wrong release"}, ADMIN_KEY)
        assert r.status_code == 200, r.text
        killed = r.json()
        assert killed["revoked_plan_approval"] == answer.approval_id
        assert killed["cancelled_approvals"] == [asked.value.approval_id]
        with pytest.raises(SessionKilled):
            with root.tool("shell", command="ls /opt/app", resources=["/opt/app"]):
                pytest.fail("a step ran on a revoked plan")
    status = {a["approval_id"]: a["status"] for a in stack.approvals(sid)}
    assert status == {answer.approval_id: "revoked", asked.value.approval_id: "cancelled"}
    assert [a["approval_id"] for a in stack.approvals(sid, "revoked")] == [answer.approval_id]
    assert stack.plan(sid)["status"] == "revoked"
    listed = stack.cli("approvals", "--status", "revoked")
    assert listed.returncode == 0 and answer.approval_id in listed.stdout, listed.stderr


# -- 4. an expired plan approval stops the session's new steps ---------------------------


def test_expired_plan_approval_stops_new_steps(stack: Stack) -> None:
    stack.set_policy(**RELEASE_POLICY)
    sid = new_sid("expire")
    answer, reviewer, root = _approved_run(stack, sid, ttl_s=1.5)
    with root:
        with root.tool("shell", command="ls /opt/app", resources=["/opt/app"]):
            pass
        time.sleep(max(0.0, reviewer.response["decided_at"] + 1.6 - time.time()))
        with pytest.raises(Stopped) as late_tool:
            with root.tool("shell", command="ls /opt/app", resources=["/opt/app"]):
                pytest.fail("a step ran on an expired plan approval")
        with pytest.raises(Stopped) as late_delegation:
            root.delegate("deployer", task="release-43", role="deployer")
    assert late_tool.value.reason == "plan_approval_expired"
    assert "reviewer-1" in late_tool.value.detail
    assert late_delegation.value.reason == "plan_approval_expired"
    assert stack.plan(sid)["status"] == "expired"


# -- 5. policy simulation on recorded sessions --------------------------------------------


def _record_history(stack: Stack, tag: str) -> list[str]:
    """Three sessions recorded under a lax policy: depths 0, 1 and 2, a shell call each."""
    stack.set_policy()
    gov = governance(stack.url)
    sids = []
    for depth in range(3):
        sid = new_sid(f"{tag}{depth}")
        sids.append(sid)
        with gov.session("survey the fleet", session_id=sid) as session:
            with session.agent("planner", role="planner") as agent:
                for level in range(depth):
                    agent = agent.delegate(f"worker{level}", task=f"survey-{level}")
                    agent.start()
                with agent.tool("shell", command="uptime"):
                    pass
                with agent.tool("kubectl", command="kubectl get nodes"):
                    pass
    return sids


def test_simulate_reports_the_stops_a_stricter_policy_would_make(
    stack: Stack, tmp_path: Path
) -> None:
    sids = _record_history(stack, "sim")
    before = {sid: stack.decisions(sid) for sid in sids}
    governed = {sid: stack.get(f"/api/v1/sessions/{sid}")["governor"] for sid in sids}
    candidate = "multi_agent:\n  max_delegation_depth: 1\n  tool_allowlist: [shell]\n"

    report = {}
    for sid in sids:
        r = stack.post(
            "/api/v1/policy/simulate", {"policy": candidate, "session_id": sid}, REVIEWER_KEY
        )
        assert r.status_code == 200, r.text
        report[sid] = r.json()
    # depth 0 and 1: the kubectl call is off the allowlist; depth 2: the second worker
    # would never start, so its two calls are never reached
    s0, s1, s2 = (report[s] for s in sids)
    assert s0["totals"]["new_stops"] == {"tool_not_allowed": 1}
    assert s1["totals"]["new_stops"] == {"tool_not_allowed": 1}
    assert s2["totals"]["new_stops"] == {"delegation_depth_exceeded": 1}
    assert s2["totals"]["not_reached"] == 2
    for r in report.values():
        assert r["sessions"] == 1 and r["changed_sessions"] == 1
        assert r["totals"]["new_approvals"] == {} and r["totals"]["lifted_stops"] == {}
    change = s2["sessions_changed"][0]["changes"][0]
    assert (change["kind"], change["candidate"]) == (
        "new_stop",
        {"outcome": "stop", "reason": "delegation_depth_exceeded"},
    )
    # an agent key may not simulate; a broken candidate is a 400 naming the field
    assert (
        stack.post("/api/v1/policy/simulate", {"policy": candidate}, AGENT_KEY).status_code == 403
    )
    bad = stack.post(
        "/api/v1/policy/simulate", {"policy": "multi_agent:\n  max_handoffs: -1\n"}, REVIEWER_KEY
    )
    assert bad.status_code == 400 and "max_handoffs" in bad.text

    # the CLI, over every recent session
    path = tmp_path / "candidate.yaml"
    path.write_text(candidate)
    out = stack.cli("policy", "simulate", str(path), "--since", "1h", "--json")
    assert out.returncode == 0, out.stderr
    everything = json.loads(out.stdout)
    by_sid = {s["session_id"]: s for s in everything["sessions_changed"]}
    assert {sid: by_sid[sid]["new_stops"] for sid in sids} == {
        sids[0]: {"tool_not_allowed": 1},
        sids[1]: {"tool_not_allowed": 1},
        sids[2]: {"delegation_depth_exceeded": 1},
    }
    text = stack.cli("policy", "simulate", str(path), "--session", sids[2])
    assert text.returncode == 0, text.stderr
    assert "new stops         delegation_depth_exceeded 1" in text.stdout

    # nothing changed: the records, the governor's state, the policy in force
    assert {sid: stack.decisions(sid) for sid in sids} == before
    assert {sid: stack.get(f"/api/v1/sessions/{sid}")["governor"] for sid in sids} == governed
    assert stack.get("/api/v1/policy")["policy"]["multi_agent"]["tool_allowlist"] is None
    for sid in sids:
        assert stack.get(f"/api/v1/sessions/{sid}/decisions/verify")["ok"] is True


# -- 6. delegation ping-pong --------------------------------------------------------------


def test_ping_pong_stops_at_its_limit_and_fires_the_rule(stack: Stack) -> None:
    # with the ownership lock on, an active holder cannot hand its task on at all; loops
    # happen where the lock is off (or holders finish), and are stopped by their own limit
    stack.set_policy(max_task_returns=2, ownership_lock=False)
    sid = new_sid("pingpong")
    gov = governance(stack.url)
    hops: list[str] = []
    with gov.session("fix the flaky test", session_id=sid) as session:
        agent = session.agent("planner", role="planner", task="fix-flaky")
        agent.start()
        with pytest.raises(Stopped) as loop:
            for hop in range(10):
                role = "coder" if hop % 2 == 0 else "planner"
                agent = agent.delegate(role, task="fix-flaky", role=role)
                agent.start()
                hops.append(role)
    assert loop.value.reason == "delegation_loop"
    # planner -> coder, then back and forth: each role got the task back twice
    assert hops == ["coder", "planner", "coder", "planner", "coder"]
    stops = [d for d in stack.decisions(sid) if d["outcome"] == "stop"]
    assert [(d["phase"], d["reason"]) for d in stops] == [("pre_handoff", "delegation_loop")]
    assert stops[0]["detail"]["return"] == {"agent": "planner", "count": 3}
    wait_for(lambda: stack.fired(sid, "delegation_loop"), timeout=20)

    # a task handed on to other agents (no return) is not a loop
    sid2 = new_sid("relay")
    with gov.session("relay", session_id=sid2) as session:
        with session.agent("lead", role="lead") as lead:
            for i in range(4):
                with lead.delegate(f"worker{i}", task="survey", role=f"worker{i}"):
                    pass
    assert all(d["outcome"] == "allow" for d in stack.decisions(sid2))


# -- 7. bad plans, ownership of a plan, sessions without one ------------------------------


def test_bad_plans_are_refused_naming_the_field_and_change_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    stack.set_policy(max_delegation_depth=2, permissions={"janitor": ["fs.write:/var/log"]})
    sid = new_sid("bad")
    good = {
        "agents": [{"role": "janitor", "tools": ["shell"], "resources": ["/var/log"]}],
        "max_fanout": 1,
        "max_depth": 1,
        "budget_usd": 1,
    }
    cases: list[tuple[Any, str]] = [
        ({**good, "agents": []}, "agents"),
        ({k: v for k, v in good.items() if k != "budget_usd"}, "budget_usd"),
        ({**good, "max_depth": 3}, "max_delegation_depth"),
        ({**good, "budget_usd": -1}, "budget_usd"),
        ({**good, "surprise": 1}, "surprise"),
        (
            {**good, "agents": [{**good["agents"][0], "resources": ["/var/log/../../etc"]}]},
            "agents.0.resources.0",
        ),
        (
            {**good, "agents": [{**good["agents"][0], "egress": ["https://x.example/a"]}]},
            "agents.0.egress.0",
        ),
        (
            {**good, "agents": [{"role": "janitor", "permissions": ["fs.write:/"]}]},
            "agents.0.permissions",
        ),
        ({**good, "agents": [good["agents"][0], good["agents"][0]]}, "agents.1.role"),
        ({**good, "agents": [{"role": "bad role!"}]}, "agents.0.role"),
        ([1, 2], "mapping"),
    ]
    for body, named in cases:
        r = stack.post(f"/api/v1/sessions/{sid}/plan", body, AGENT_KEY)
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert named in r.json()["error"], (named, r.json()["error"])
    # nothing was declared, nothing was recorded
    assert (
        httpx.get(
            f"{stack.url}/api/v1/sessions/{sid}/plan", headers=headers(REVIEWER_KEY)
        ).status_code
        == 404
    )
    assert (
        httpx.get(f"{stack.url}/api/v1/sessions/{sid}", headers=headers(REVIEWER_KEY))
        .json()
        .get("governor")
        is None
    )

    # the SDK raises PlanRejected with the governor's whole message
    gov = governance(stack.url)
    with gov.session("rotate the logs", session_id=sid) as session:
        with pytest.raises(PlanRejected) as rejected:
            session.plan(
                [PlannedAgent(role="janitor", resources=["/var/../etc"], egress=["not a host"])],
                max_fanout=1,
                max_depth=9,
                budget_usd=1,
            )
        assert rejected.value.status == 400
        message = str(rejected.value)
        assert "agents.0.resources.0" in message and "agents.0.egress.0" in message

        # a good plan is declared once, before the first agent, and is its key's own
        assert (
            session.plan(
                [PlannedAgent(role="janitor", tools=["shell"], resources=["/var/log"])],
                max_fanout=1,
                max_depth=1,
                budget_usd=1,
            ).status
            == "active"
        )
        again = stack.post(f"/api/v1/sessions/{sid}/plan", good, AGENT_KEY)
        assert again.status_code == 409 and "declared once" in again.text
        other = governance(stack.url, key=OTHER_AGENT_KEY)
        with pytest.raises(Stopped) as borrowed:
            other.session("rotate the logs", session_id=sid).agent("janitor", role="janitor")
        assert borrowed.value.reason == "lineage_invalid"
        with session.agent("janitor", role="janitor") as janitor:
            with janitor.tool("shell", command="ls /var/log", resources=["/var/log"]):
                pass
        late = stack.post(f"/api/v1/sessions/{new_sid('late')}/plan", good, REVIEWER_KEY)
        assert late.status_code == 403  # declaring is an agent's (decide) action

    # the CLI checks a plan file the same way, offline and against the running policy
    bad_file = tmp_path / "plan.yaml"
    bad_file.write_text(
        "agents:\n  - role: janitor\n    resources: [/var/../etc]\nmax_fanout: 1\nmax_depth: 1\nbudget_usd: 1\n"
    )
    linted = stack.cli("plan", "lint", str(bad_file))
    assert linted.returncode == 1 and "agents.0.resources.0" in linted.stderr, linted.stderr
    good_file = tmp_path / "good.yaml"
    good_file.write_text(json.dumps({**good, "max_depth": 3}))
    checked = stack.cli("plan", "check", str(good_file), key=AGENT_KEY)
    assert checked.returncode == 1 and "max_delegation_depth" in checked.stderr, checked.stderr
    good_file.write_text(json.dumps(good))
    checked = stack.cli("plan", "check", str(good_file), key=AGENT_KEY)
    assert checked.returncode == 0 and "blast radius: risk" in checked.stdout, checked.stderr

    # a plan after the first agent started is refused
    sid3 = new_sid("started")
    with gov.session("no plan yet", session_id=sid3) as session:
        with session.agent("janitor"):
            r = stack.post(f"/api/v1/sessions/{sid3}/plan", good, AGENT_KEY)
            assert r.status_code == 409 and "before its first agent" in r.text


def test_sessions_without_a_plan_decide_as_before(stack: Stack) -> None:
    stack.set_policy(
        require_approval_for=[DEPLOY],
        session_approval={"production": True, "out_of_scope": "stop"},
        max_task_returns=5,
    )
    sid = new_sid("noplan")
    gov = governance(stack.url, approvals="raise")
    with gov.session("deploy without a plan", session_id=sid) as session:
        with session.agent("deployer", permissions=["fs.write:/"]) as agent:
            # any tool, any path: no scope to leave
            with agent.tool("kubectl", command="kubectl get pods", resources=["/etc"]):
                pass
            with pytest.raises(AwaitingApproval):
                with agent.tool(DEPLOY, command="deploy release 44"):
                    pass
    summary = stack.get(f"/api/v1/sessions/{sid}")["governor"]
    assert "plan" not in summary
    assert [a["kind"] for a in stack.approvals(sid)] == ["tool"]
    assert all(
        "drift" not in d["detail"] and "via_plan" not in d["detail"] for d in stack.decisions(sid)
    )


def test_plan_state_is_rebuilt_from_the_audit_records() -> None:
    """A restarted governor replays the session's records: the same plan, approval,
    scope and drift, so an approved plan keeps its scope and its time limit."""
    from agentgov.collector.governor.engine import Governor, HandoffRequest, ToolRequest
    from agentgov.collector.governor.plan import parse_plan
    from agentgov.collector.governor.policy import PolicySource, parse_policy
    from agentgov.collector.governor.state import Record
    from agentgov.collector.risk import RiskRules

    source = PolicySource(None)
    source.policy = parse_policy(
        "multi_agent:\n  require_verified_lineage: false\n"
        "  session_approval: {write: true, out_of_scope: stop}\n",
        "test",
    )
    records: list[Record] = []
    gov = Governor(source, RiskRules.default(), sink=lambda r, _row: records.append(r))
    plan = parse_plan(
        {
            "agents": [{"role": "janitor", "permissions": ["fs.write:/var/log"], "tools": ["sh"]}],
            "max_fanout": 0,
            "max_depth": 0,
            "budget_usd": 1,
        }
    )
    view = gov.declare_plan("s1", plan)
    gov.decide_approval(view["approval"]["approval_id"], True, "rev", ttl_s=3600)
    start = HandoffRequest(
        "s1", "", "janitor", permissions=["fs.write:/var/log"], to_role="janitor"
    )
    assert gov.handoff(start).outcome == "allow"
    assert gov.tool(ToolRequest("s1", "janitor", "sh", "ls", ["/var/log/a"])).outcome == "allow"
    off = gov.tool(ToolRequest("s1", "janitor", "sh", "ls", ["/etc"]))
    assert (off.outcome, off.reason) == ("stop", "out_of_scope")

    again = Governor(source, RiskRules.default())
    assert again.replay(records) == len(records)
    assert again.plan_view("s1") == gov.plan_view("s1")
    # the replayed scope decides as the live one did
    for governor in (gov, again):
        later = governor.tool(ToolRequest("s1", "janitor", "sh", "ls", ["/etc/x"]))
        assert (later.outcome, later.reason) == ("stop", "out_of_scope")
