"""Session plans: what a decision inside an approved plan costs, and policy simulation.

1. **Plan scope vs ordinary decisions, same run.** Two sessions of the same shape (a root
   agent and a worker holding ``fs.write:/opt/app``): one declared a plan a reviewer
   approved, one has none. The worker asks for the same tool call, with the same command
   and resources, over and over; inside the plan the governor also judges the call
   against the plan's scope. Measured in process (the governor alone, real risk rules,
   lineage tokens and audit encoding) and over HTTP (one keep-alive connection to a
   collector process), in alternating rounds (A-B-B-A) so drift of the shared machine
   falls on both. Goal: plan-scope decision <= 1.1x the ordinary one.
2. **policy simulate over 10,000 recorded sessions.** The collector records 10,000
   sessions through its API (a root, a delegation, two tool calls each); then
   ``POST /api/v1/policy/simulate`` replays them all under a stricter candidate. Reports
   the request's wall time and the replay's own time. Goal: report the time.

Usage: uv run python bench/plans.py   (ROUNDS=6 N=5000 SESSIONS=10000)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from collector_process import running_collector

ROUNDS = int(os.environ.get("ROUNDS", 6))
N = int(os.environ.get("N", 5000))
SESSIONS = int(os.environ.get("SESSIONS", 10_000))
TOKEN_HEADER = "Agentgov-Lineage-Token"

POLICY = """
multi_agent:
  require_verified_lineage: true
  high_risk_delegation: {write: true}
  session_approval: {production: true, write: true}
"""
PLAN: dict[str, Any] = {
    "intent": "ship release 42",
    "agents": [
        {"role": "orchestrator", "permissions": ["fs.write:/opt/app"], "resources": ["/opt/app"]},
        {
            "role": "deployer",
            "permissions": ["fs.write:/opt/app"],
            "tools": ["shell"],
            "resources": ["/opt/app/releases"],
            "environments": ["production"],
        },
    ],
    "max_fanout": 2,
    "max_depth": 1,
    "budget_usd": 10,
}
COMMAND = "ls -la /opt/app/releases/42"
RESOURCES = ["/opt/app/releases/42"]


# -- 1a. in process ------------------------------------------------------------------------


def in_process() -> tuple[float, float]:
    """Median µs per decision: (inside an approved plan, ordinary)."""
    from agentgov.collector.governor import audit
    from agentgov.collector.governor.engine import Governor, HandoffRequest, ToolRequest
    from agentgov.collector.governor.plan import parse_plan
    from agentgov.collector.governor.policy import PolicySource, parse_policy
    from agentgov.collector.governor.tokens import LineageKeys, LineageTokens, generate_key
    from agentgov.collector.risk import RiskRules

    source = PolicySource(None)
    source.policy = parse_policy(POLICY, "bench policy")
    tokens = LineageTokens(LineageKeys([generate_key()], "bench"))
    gov = Governor(source, RiskRules.default(), tokens=tokens, encode=audit.row)

    def worker(sid: str, planned: bool) -> ToolRequest:
        if planned:
            view = gov.declare_plan(sid, parse_plan(PLAN))
            gov.decide_approval(view["approval"]["approval_id"], True, "reviewer", ttl_s=3600)
        perms = ["fs.write:/opt/app"]
        root = gov.handoff(
            HandoffRequest(sid, "", "orchestrator", permissions=perms, to_role="orchestrator")
        )
        assert root.outcome == "allow" or not planned, root
        if not planned:  # the ordinary session's write grants go to a reviewer once
            aid = root.approval_id
            gov.decide_approval(aid, True, "reviewer")
            root = gov.handoff(
                HandoffRequest(
                    sid,
                    "",
                    "orchestrator",
                    permissions=perms,
                    to_role="orchestrator",
                    approval_id=aid,
                )
            )
        child = HandoffRequest(
            sid,
            "",
            "deployer",
            task="release",
            permissions=perms,
            to_role="deployer",
            token=root.lineage_token,
        )
        answer = gov.handoff(child)
        if answer.outcome != "allow":
            gov.decide_approval(answer.approval_id, True, "reviewer")
            child.approval_id = answer.approval_id
            answer = gov.handoff(child)
        assert answer.outcome == "allow", answer
        return ToolRequest(sid, "", "shell", COMMAND, RESOURCES, token=answer.lineage_token)

    planned, ordinary = worker("bench-planned", True), worker("bench-ordinary", False)
    assert gov.tool(planned).outcome == "allow" and gov.tool(ordinary).outcome == "allow"

    def per_call(req: ToolRequest) -> float:
        # each call timed on its own: the median is the decision, not a GC pause that
        # happened to fall into one load's block
        lat = []
        for _ in range(N):
            began = time.perf_counter()
            gov.tool(req)
            lat.append(time.perf_counter() - began)
        return statistics.median(lat) * 1e6

    a: list[float] = []
    b: list[float] = []
    for i in range(ROUNDS):
        if i % 2 == 0:
            a.append(per_call(planned))
            b.append(per_call(ordinary))
        else:
            b.append(per_call(ordinary))
            a.append(per_call(planned))
    view = gov.plan_view("bench-planned")
    assert view is not None and view["drift_count"] == 0, view
    return statistics.median(a), statistics.median(b)


# -- 1b. over HTTP -------------------------------------------------------------------------


def _start(c: httpx.Client, sid: str, planned: bool, admin: dict[str, str]) -> bytes:
    """Start a session's root and worker; the worker's tool-call request body and token."""
    if planned:
        view = c.post(f"/api/v1/sessions/{sid}/plan", json=PLAN).json()
        aid = view["approval"]["approval_id"]
        r = c.post(f"/api/v1/approvals/{aid}/approve", json={"approver": "rev", "ttl_s": 3600})
        assert r.status_code == 200, r.text
    perms = ["fs.write:/opt/app"]

    def handoff(body: dict[str, Any], token: str = "") -> dict[str, Any]:
        headers = {TOKEN_HEADER: token} if token else {}
        answer = dict(c.post("/api/v1/decisions/handoff", json=body, headers=headers).json())
        if answer["outcome"] == "approval_required":
            aid = answer["approval_id"]
            c.post(f"/api/v1/approvals/{aid}/approve", json={"approver": "rev"})
            answer = c.post(
                "/api/v1/decisions/handoff", json={**body, "approval_id": aid}, headers=headers
            ).json()
        assert answer["outcome"] == "allow", answer
        return answer

    root = handoff(
        {
            "session_id": sid,
            "to_agent": "orchestrator",
            "to_role": "orchestrator",
            "permissions": perms,
        }
    )
    child = handoff(
        {
            "session_id": sid,
            "to_agent": "deployer",
            "to_role": "deployer",
            "task": "release",
            "permissions": perms,
        },
        root["lineage_token"],
    )
    return child["lineage_token"].encode()


def over_http(url: str) -> tuple[float, float]:
    """Median µs per round trip: (inside an approved plan, ordinary)."""
    import json

    with httpx.Client(base_url=url, timeout=30) as c:
        tokens = {p: _start(c, f"bench-http-{p}", p, {}) for p in (True, False)}
        body = {
            "session_id": "",
            "agent_id": "deployer",
            "tool": "shell",
            "command": COMMAND,
            "resources": RESOURCES,
        }

        def per_call(planned: bool) -> float:
            payload = json.dumps({**body, "session_id": f"bench-http-{planned}"}).encode()
            headers = {TOKEN_HEADER: tokens[planned].decode(), "content-type": "application/json"}
            lat = []
            for _ in range(N // 5):
                began = time.perf_counter()
                r = c.post("/api/v1/decisions/tool", content=payload, headers=headers)
                lat.append(time.perf_counter() - began)
                assert r.json()["outcome"] == "allow", r.text
            return statistics.median(lat) * 1e6

        a: list[float] = []
        b: list[float] = []
        for i in range(ROUNDS):
            order = (True, False) if i % 2 == 0 else (False, True)
            for planned in order:
                (a if planned else b).append(per_call(planned))
    return statistics.median(a), statistics.median(b)


# -- 2. simulate over recorded sessions ----------------------------------------------------


def record_sessions(url: str, n: int, threads: int = 4) -> float:
    """Record ``n`` sessions through the API; seconds taken."""

    def work(part: range) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            for i in part:
                sid = f"bench-sim-{i}"
                root = c.post(
                    "/api/v1/decisions/handoff",
                    json={"session_id": sid, "to_agent": "planner", "to_role": "planner"},
                ).json()["lineage_token"]
                child = c.post(
                    "/api/v1/decisions/handoff",
                    json={"session_id": sid, "to_agent": "worker", "task": f"survey-{i % 7}"},
                    headers={TOKEN_HEADER: root},
                ).json()["lineage_token"]
                for tool, command in (("shell", "uptime"), ("kubectl", "kubectl get nodes")):
                    c.post(
                        "/api/v1/decisions/tool",
                        json={
                            "session_id": sid,
                            "agent_id": "worker",
                            "tool": tool,
                            "command": command,
                        },
                        headers={TOKEN_HEADER: child},
                    )

    began = time.perf_counter()
    parts = [range(t, n, threads) for t in range(threads)]
    workers = [threading.Thread(target=work, args=(p,)) for p in parts]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - began


def simulate(url: str, n: int) -> dict[str, Any]:
    candidate = "multi_agent:\n  tool_allowlist: [shell]\n  max_handoffs: 5\n"
    began = time.perf_counter()
    r = httpx.post(
        f"{url}/api/v1/policy/simulate",
        json={"policy": candidate, "since_s": 3600, "limit": n},
        timeout=600,
    )
    wall = time.perf_counter() - began
    assert r.status_code == 200, r.text
    report = dict(r.json())
    report["wall_s"] = wall
    return report


def main() -> None:
    planned, ordinary = in_process()
    print(
        f"in process: plan-scope tool decision {planned:.1f} µs, ordinary {ordinary:.1f} µs "
        f"(median of {ROUNDS} rounds x {N}); ratio {planned / ordinary:.3f} (goal <= 1.1)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        with running_collector(Path(tmp) / "data", "--policy", str(policy)) as url:
            hp, ho = over_http(url)
            print(
                f"over HTTP: plan-scope round trip p50 {hp:.0f} µs, ordinary {ho:.0f} µs; "
                f"ratio {hp / ho:.3f} (goal <= 1.1)"
            )
            took = record_sessions(url, SESSIONS)
            print(f"recorded {SESSIONS} sessions (4 decisions each) in {took:.1f} s")
            report = simulate(url, SESSIONS)
            print(
                f"policy simulate over {report['sessions']} sessions ({report['records']} "
                f"records, {report['steps']} steps): {report['wall_s']:.2f} s wall "
                f"(replay {report['elapsed_s']:.2f} s); new stops "
                f"{report['totals']['new_stops']}, {report['changed_sessions']} sessions changed"
            )


if __name__ == "__main__":
    main()
