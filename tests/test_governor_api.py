"""The governor over real HTTP: decisions, limits under concurrency, approvals, API keys,
kills with control events, shadow mode, restart persistence with a tamper-evident audit
chain, and the policy file (lint, refusal to start, live reload).

Every collector here is a real ``agentgov collector`` process on loopback. Collectors are
shared between tests through a small pool (one per policy, started on first use);
tests keep apart by using their own session ids.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentgov.instrumentation.lineage_token import HEADER as TOKEN_HEADER

from .conftest import CollectorProcess, free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_POLICY = REPO / "examples" / "policy.yaml"

HANDOFF = "/api/v1/decisions/handoff"
TOOL = "/api/v1/decisions/tool"
USAGE = "/api/v1/usage"

# -- policies -------------------------------------------------------------------------------

#: the literature scenarios, depth, tools and kills
POLICY_LIT = """\
multi_agent:
  mode: enforce
  max_handoffs: 8
  max_delegation_depth: 3
  shared_max_tool_calls: 20
  roles:
    billing_agent: [refund_check]
  tool_allowlist: [search.read, http.get]
"""

#: a shared USD budget and least-privilege permissions
POLICY_BUDGET = """\
multi_agent:
  shared_max_usd: 10
  permissions:
    cleanup: ["fs.write:/opt/app/logs"]
"""

#: approvals, agent count and concurrency
POLICY_APPROVALS = """\
multi_agent:
  max_agents_per_run: 4
  max_concurrent_agents: 3
  require_approval_for: [billing.refund.create, "task:close_account"]
  high_risk_delegation: {write: true, production: true}
  approval_ttl_s: 900
"""

#: API keys on
POLICY_KEYS = """\
multi_agent:
  roles:
    billing_agent: [refund_check]
  require_approval_for: [billing.refund.create]
"""

POLICY_SHADOW = """\
multi_agent:
  mode: shadow
  max_handoffs: 2
  max_delegation_depth: 2
  shared_max_usd: 1
  roles:
    billing_agent: [refund_check]
  tool_allowlist: [search.read, billing.refund.create]
  require_approval_for: [billing.refund.create]
"""

#: short approval TTL; also the file edited live by the reload tests
POLICY_TTL = """\
multi_agent:
  max_handoffs: 8
  require_approval_for: [billing.refund.create]
  approval_ttl_s: 1
"""

POLICY_PERSIST = """\
multi_agent:
  shared_max_usd: 5
  roles:
    billing_agent: [refund_check]
  require_approval_for: [billing.refund.create]
"""

AGENT_KEY = "agentkey-" + secrets.token_hex(12)
REVIEWER_KEY = "reviewkey-" + secrets.token_hex(12)
ADMIN_KEY = "adminkey-" + secrets.token_hex(12)
#: a reviewer key that carries the same name ("bot") as the agent key
BOT_REVIEWER_KEY = "botreview-" + secrets.token_hex(12)
KEYS_ENV = {
    "AGENTGOV_API_KEYS": ",".join(
        [
            f"bot:agent:{AGENT_KEY}",
            f"rev:reviewer:{REVIEWER_KEY}",
            f"ops:admin:{ADMIN_KEY}",
            f"bot:reviewer:{BOT_REVIEWER_KEY}",
        ]
    )
}

SPECS: dict[str, tuple[str, dict[str, str] | None]] = {
    "lit": (POLICY_LIT, None),
    "budget": (POLICY_BUDGET, None),
    "approvals": (POLICY_APPROVALS, None),
    "keys": (POLICY_KEYS, KEYS_ENV),
    "shadow": (POLICY_SHADOW, None),
    "ttl": (POLICY_TTL, None),
}


# -- a thin client ---------------------------------------------------------------------------


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


class Gov:
    """A running collector and the governor calls the tests make on it."""

    def __init__(self, proc: CollectorProcess, policy_path: Path, key: str | None = None):
        self.proc = proc
        self.policy_path = policy_path
        self.key = key
        #: (session, agent) -> the lineage token the governor issued that agent
        self.tokens: dict[tuple[str, str], str] = {}
        #: session -> its root agent, as started through this client
        self.roots: dict[str, str] = {}

    @property
    def url(self) -> str:
        return self.proc.url

    def _headers(self, key: str | None) -> dict[str, str]:
        return bearer(self.key if key is None else key)

    def post(
        self, path: str, body: Any = None, key: str | None = None, token: str = ""
    ) -> httpx.Response:
        headers = self._headers(key)
        if token:
            headers[TOKEN_HEADER] = token
        return httpx.post(f"{self.url}{path}", json=body or {}, headers=headers, timeout=30)

    def token(self, sid: str, agent: str) -> str:
        """The lineage token the governor issued ``agent`` of ``sid`` ('' if none)."""
        return self.tokens.get((sid, agent), "")

    def _ensure(self, sid: str, agent: str, key: str | None) -> None:
        """Start ``agent`` as the root of a session this client has not started yet, so a
        test can name an acting agent without spelling out its start."""
        if agent and (sid, agent) not in self.tokens and sid not in self.roots:
            answer = self.handoff(sid, agent, key=key)
            assert answer["outcome"] == "allow", answer

    def get(self, path: str, key: str | None = None, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", params=params, headers=self._headers(key), timeout=30)

    def _decide(
        self, path: str, body: dict[str, Any], key: str | None, token: str
    ) -> dict[str, Any]:
        r = self.post(path, body, key, token)
        assert r.status_code == 200, (path, body, r.status_code, r.text)
        return dict(r.json())

    def handoff(
        self,
        sid: str,
        to: str,
        frm: str = "",
        key: str | None = None,
        token: str | None = None,
        **kw: Any,
    ) -> dict[str, Any]:
        """Delegate from ``frm`` with its lineage token (``token`` overrides it), starting
        ``frm`` first if this client has not; without ``frm``, start the session's root.
        An allowed answer's token is kept for ``to`` and taken out of the answer."""
        if token is None:
            self._ensure(sid, frm, key)
        if not frm:
            self.roots.setdefault(sid, to)
        tok = self.token(sid, frm) if token is None and frm else (token or "")
        answer = self._decide(
            HANDOFF, {"session_id": sid, "from_agent": frm, "to_agent": to, **kw}, key, tok
        )
        if answer.get("lineage_token"):
            self.tokens[(sid, to)] = answer.pop("lineage_token")
        return answer

    def tool(
        self,
        sid: str,
        agent: str,
        tool: str,
        key: str | None = None,
        token: str | None = None,
        **kw: Any,
    ) -> dict[str, Any]:
        if token is None:
            self._ensure(sid, agent, key)
        tok = self.token(sid, agent) if token is None else token
        return self._decide(
            TOOL, {"session_id": sid, "agent_id": agent, "tool": tool, **kw}, key, tok
        )

    def usage(
        self, sid: str, agent: str, key: str | None = None, token: str | None = None, **kw: Any
    ) -> dict[str, Any]:
        if token is None:
            self._ensure(sid, agent, key)
        tok = self.token(sid, agent) if token is None else token
        return self._decide(USAGE, {"session_id": sid, "agent_id": agent, **kw}, key, tok)

    def kill(
        self,
        sid: str,
        actor: str = "",
        reason: str = "",
        key: str | None = None,
        unseen: bool = False,
        wait_s: float = 0.0,
    ) -> httpx.Response:
        body = {"actor": actor, "reason": reason, "unseen": unseen, "wait_s": wait_s}
        return self.post(f"/api/v1/sessions/{sid}/kill", body, key)

    def session(self, sid: str, key: str | None = None) -> dict[str, Any]:
        r = self.get(f"/api/v1/sessions/{sid}", key)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def figures(self, sid: str, key: str | None = None) -> dict[str, Any]:
        """The governor's figures of a session."""
        return dict(self.session(sid, key)["governor"])

    def approval(self, aid: str, key: str | None = None) -> dict[str, Any]:
        r = self.get(f"/api/v1/approvals/{aid}", key)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def approvals(self, status: str | None = None, key: str | None = None) -> list[dict]:
        params = {"status": status} if status else {}
        r = self.get("/api/v1/approvals", key, **params)
        assert r.status_code == 200, r.text
        return list(r.json()["approvals"])

    def decide(
        self, aid: str, approve: bool, approver: str = "", key: str | None = None
    ) -> httpx.Response:
        verb = "approve" if approve else "deny"
        return self.post(f"/api/v1/approvals/{aid}/{verb}", {"approver": approver}, key)

    def policy(self) -> dict[str, Any]:
        r = self.get("/api/v1/policy")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def decisions(self, sid: str, key: str | None = None) -> list[dict[str, Any]]:
        r = self.get(f"/api/v1/sessions/{sid}/decisions", key)
        assert r.status_code == 200, (r.status_code, r.text[:300])
        return list(r.json()["decisions"])

    def verify(self, sid: str, key: str | None = None) -> dict[str, Any]:
        r = self.get(f"/api/v1/sessions/{sid}/decisions/verify", key)
        assert r.status_code == 200, r.text
        return dict(r.json())


class Pool:
    """Collectors by name (one per policy), started on first use, stopped at the end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.running: dict[str, Gov] = {}

    def get(self, name: str) -> Gov:
        gov = self.running.get(name)
        if gov is None:
            policy, env = SPECS[name]
            folder = self.base / name
            folder.mkdir(exist_ok=True)
            path = folder / "policy.yaml"
            if not path.exists():
                path.write_text(policy)
            proc = CollectorProcess(folder / "data", free_port(), free_port())
            proc.start(extra_args=("--policy", str(path)), env=env or {"AGENTGOV_API_KEYS": ""})
            gov = Gov(proc, path)
        self.running[name] = gov
        return gov

    def close(self) -> None:
        stoppers = [threading.Thread(target=g.proc.stop) for g in self.running.values()]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(60)
        self.running.clear()


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    p = Pool(tmp_path_factory.mktemp("governor"))
    yield p
    p.close()


@pytest.fixture
def lit(pool: Pool) -> Gov:
    return pool.get("lit")


@pytest.fixture
def budget(pool: Pool) -> Gov:
    return pool.get("budget")


@pytest.fixture
def appr(pool: Pool) -> Gov:
    return pool.get("approvals")


@pytest.fixture
def keyed(pool: Pool) -> Gov:
    return pool.get("keys")


@pytest.fixture
def shadow(pool: Pool) -> Gov:
    return pool.get("shadow")


@pytest.fixture
def ttl(pool: Pool) -> Gov:
    return pool.get("ttl")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentgov.collector.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


# -- concurrency from several OS processes ---------------------------------------------------

BURST = """\
import json, os, sys, threading
import httpx

TOKEN_HEADER = "Agentgov-Lineage-Token"

spec = json.loads(sys.stdin.readline())
reqs = spec["requests"]
results = [None] * len(reqs)
go = threading.Event()
warm = threading.Barrier(spec["threads"] + 1)


def work(idxs):
    with httpx.Client(base_url=spec["url"], timeout=60, headers=spec["headers"]) as c:
        c.get("/healthz")
        warm.wait()
        go.wait()
        for i in idxs:
            path, body, *token = reqs[i]
            r = c.post(path, json=body, headers={TOKEN_HEADER: token[0]} if token else {})
            results[i] = [r.status_code, r.json()]


threads = [
    threading.Thread(target=work, args=(list(range(n, len(reqs), spec["threads"])),))
    for n in range(spec["threads"])
]
for t in threads:
    t.start()
warm.wait()
print("ready", flush=True)
sys.stdin.readline()
go.set()
for t in threads:
    t.join()
print(json.dumps({"pid": os.getpid(), "results": results}), flush=True)
"""


def burst(
    tmp_path: Path,
    url: str,
    requests: list[tuple[str, dict[str, Any]]] | list[tuple[str, dict[str, Any], str]],
    processes: int = 4,
    threads: int = 4,
    headers: dict[str, str] | None = None,
) -> list[tuple[dict[str, Any], int, dict[str, Any]]]:
    """Send ``requests`` (path, body[, lineage token]) at once from ``processes`` OS
    processes, ``threads`` threads each.

    Every process warms its connections, says ready, and waits for one "go" sent to all.
    Returns (request body, status, answer) per request.
    """
    script = tmp_path / "burst.py"
    script.write_text(BURST)
    chunks = [requests[i::processes] for i in range(processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in chunks
    ]
    try:
        for p, chunk in zip(procs, chunks, strict=True):
            assert p.stdin is not None
            spec = {"url": url, "requests": chunk, "threads": threads, "headers": headers or {}}
            p.stdin.write(json.dumps(spec) + "\n")
            p.stdin.flush()
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    pids = set()
    answers = []
    for chunk, out in zip(chunks, outs, strict=True):
        done = json.loads(out.strip().splitlines()[-1])
        pids.add(done["pid"])
        for request, (status, answer) in zip(chunk, done["results"], strict=True):
            answers.append((request[1], status, answer))
    assert len(pids) == processes and os.getpid() not in pids
    assert len(answers) == len(requests)
    return answers


def outcomes(answers: list[tuple[dict[str, Any], int, dict[str, Any]]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, status, answer in answers:
        assert status == 200, answer
        key = answer["outcome"] + ("/" + answer["reason"] if answer.get("reason") else "")
        counts[key] = counts.get(key, 0) + 1
    return counts


# == 1. the three scenarios of the policy literature ==========================================


def test_ownership_conflict_stops_and_target_never_starts(lit: Gov) -> None:
    sid = "lit-ownership"
    assert lit.handoff(sid, "planner") == {"outcome": "allow", "reason": None}
    before = lit.figures(sid)

    answer = lit.handoff(sid, "researcher-1", frm="planner", task="refund_check")
    assert answer == {"outcome": "stop", "reason": "ownership_conflict", "owner": "billing_agent"}

    after = lit.figures(sid)
    assert after.pop("decisions") == before.pop("decisions") + 1
    assert after == before
    assert after["governed_agents"] == 1 and after["governed_handoffs"] == 0
    assert after["active_agents"] == 1 and after["budget_usd"] == 0.0

    # the audit row of the refusal
    rows = lit.decisions(sid)
    assert len(rows) == 2
    row = rows[1]
    assert (row["seq"], row["phase"], row["outcome"], row["reason"], row["owner"]) == (
        2,
        "pre_handoff",
        "stop",
        "ownership_conflict",
        "billing_agent",
    )
    assert (row["from_agent"], row["to_agent"], row["task"], row["depth"]) == (
        "planner",
        "researcher-1",
        "refund_check",
        1,
    )
    assert row["prev_hash"] == rows[0]["hash"]

    # the owner role itself (by role or by id prefix) may take the task
    assert lit.handoff(sid, "billing_agent-1", frm="planner", task="refund_check")["outcome"] == (
        "allow"
    )
    assert lit.figures(sid)["governed_agents"] == 2
    # while billing_agent-1 holds the task, nobody else gets it (ownership lock)
    assert (
        lit.handoff(sid, "refunder", frm="planner", task="refund_check", to_role="billing_agent")[
            "owner"
        ]
        == "billing_agent-1"
    )


def test_handoff_budget_allows_eight_then_stops(lit: Gov) -> None:
    sid = "lit-handoff-budget"
    lit.handoff(sid, "planner")
    answers = [lit.handoff(sid, f"worker-{i}", frm="planner") for i in range(1, 10)]
    assert [a["outcome"] for a in answers[:8]] == ["allow"] * 8
    assert answers[8] == {"outcome": "stop", "reason": "handoff_budget_exceeded"}
    figures = lit.figures(sid)
    assert figures["governed_handoffs"] == 8
    assert figures["governed_agents"] == 9  # planner + 8 workers; worker-9 never started


def test_managed_handoff_pre_and_post(lit: Gov) -> None:
    sid = "lit-managed"
    lit.handoff(sid, "planner")
    assert lit.handoff(sid, "researcher-1", frm="planner", task="summarize", estimated_usd=0.2) == {
        "outcome": "allow",
        "reason": None,
    }
    running = lit.figures(sid)
    assert running["active_agents"] == 2 and running["budget_usd"] == pytest.approx(0.2)
    assert lit.usage(sid, "researcher-1", usd=0.5, tool_calls=2, finished=True) == {
        "outcome": "allow",
        "reason": None,
    }
    figures = lit.figures(sid)
    assert figures["governed_agents"] == 2
    assert figures["active_agents"] == 1
    assert figures["governed_handoffs"] == 1
    assert figures["budget_usd"] == pytest.approx(0.5)
    assert figures["governed_tool_calls"] == 2
    assert figures["decisions"] == 3
    result = lit.verify(sid)
    assert result == {"session_id": sid, "records": 3, "ok": True, "problem": None, "seq": None}

    rows = lit.decisions(sid)
    assert [(r["seq"], r["phase"], r["outcome"]) for r in rows] == [
        (1, "pre_handoff", "allow"),
        (2, "pre_handoff", "allow"),
        (3, "post_handoff", "allow"),
    ]
    pre, post = rows[1], rows[2]
    for row in (pre, post):
        assert (row["from_agent"], row["to_agent"], row["task"], row["depth"]) == (
            "planner",
            "researcher-1",
            "summarize",
            1,
        )
        assert row["actor"] == "" and row["mode"] == "enforce"  # no API keys: no caller name
    assert pre["detail"]["estimated_usd"] == 0.2
    assert (post["detail"]["usd"], post["detail"]["tool_calls"], post["detail"]["finished"]) == (
        0.5,
        2,
        True,
    )
    times = [datetime.fromisoformat(r["time"]) for r in rows]
    assert times == sorted(times) and times[-1] - times[0] < timedelta(seconds=60)


def test_decisions_list_names_the_calling_key(keyed: Gov) -> None:
    sid = "keys-decisions"
    keyed.handoff(sid, "planner", key=AGENT_KEY)
    stop = keyed.handoff(sid, "researcher-1", frm="planner", task="refund_check", key=AGENT_KEY)
    assert stop["reason"] == "ownership_conflict"
    keyed.handoff(sid, "researcher-1", frm="planner", task="summarize", key=AGENT_KEY)
    keyed.usage(sid, "researcher-1", usd=0.5, finished=True, key=AGENT_KEY)

    rows = keyed.decisions(sid, key=REVIEWER_KEY)
    assert [r["seq"] for r in rows] == [1, 2, 3, 4]
    conflict, pre, post = rows[1], rows[2], rows[3]
    assert (conflict["phase"], conflict["outcome"], conflict["reason"], conflict["owner"]) == (
        "pre_handoff",
        "stop",
        "ownership_conflict",
        "billing_agent",
    )
    assert (pre["phase"], pre["outcome"], pre["from_agent"], pre["to_agent"], pre["depth"]) == (
        "pre_handoff",
        "allow",
        "planner",
        "researcher-1",
        1,
    )
    assert (post["phase"], post["from_agent"], post["to_agent"], post["depth"]) == (
        "post_handoff",
        "planner",
        "researcher-1",
        1,
    )
    assert {r["actor"] for r in rows} == {"bot"}
    times = [datetime.fromisoformat(r["time"]) for r in rows]
    assert times == sorted(times)
    # the list is readable with any role, and not without a key
    assert keyed.get(f"/api/v1/sessions/{sid}/decisions", key=AGENT_KEY).status_code == 200
    assert keyed.get(f"/api/v1/sessions/{sid}/decisions", key="").status_code == 401
    assert keyed.get("/api/v1/sessions/never-seen/decisions", key=ADMIN_KEY).status_code == 404


# == 2. atomicity under concurrency from several processes ====================================


def test_concurrent_handoffs_respect_handoff_budget(lit: Gov, tmp_path: Path) -> None:
    sid = "lit-burst-handoffs"
    lit.handoff(sid, "planner")
    token = lit.token(sid, "planner")
    reqs = [
        (HANDOFF, {"session_id": sid, "from_agent": "planner", "to_agent": f"w-{i}"}, token)
        for i in range(64)
    ]
    answers = burst(tmp_path, lit.url, reqs)
    assert outcomes(answers) == {"allow": 8, "stop/handoff_budget_exceeded": 56}
    allowed = {body["to_agent"] for body, _, a in answers if a["outcome"] == "allow"}
    assert len(allowed) == 8
    figures = lit.figures(sid)
    assert figures["governed_handoffs"] == 8
    assert figures["governed_agents"] == 9  # the planner and its eight
    assert figures["decisions"] == 65
    assert lit.verify(sid)["ok"] is True
    assert lit.verify(sid)["records"] == 65


def test_concurrent_tool_calls_respect_shared_tool_budget(lit: Gov, tmp_path: Path) -> None:
    sid = "lit-burst-tools"
    lit.handoff(sid, "planner")
    for i in range(6):
        lit.handoff(sid, f"a-{i}", frm="planner")
    reqs = [
        (
            TOOL,
            {"session_id": sid, "agent_id": f"a-{i % 6}", "tool": "search.read"},
            lit.token(sid, f"a-{i % 6}"),
        )
        for i in range(60)
    ]
    answers = burst(tmp_path, lit.url, reqs)
    assert outcomes(answers) == {"allow": 20, "stop/shared_budget_exceeded": 40}
    assert lit.figures(sid)["governed_tool_calls"] == 20
    # the spent tool budget also stops handoffs and usage reports of that session
    assert lit.handoff(sid, "late", frm="a-1") == {
        "outcome": "stop",
        "reason": "shared_budget_exceeded",
    }
    assert lit.usage(sid, "a-1", tool_calls=1) == {
        "outcome": "stop",
        "reason": "shared_budget_exceeded",
    }


def test_concurrent_handoffs_respect_shared_usd_budget(budget: Gov, tmp_path: Path) -> None:
    sid = "budget-burst"
    budget.handoff(sid, "planner")
    reqs = [
        (
            HANDOFF,
            {"session_id": sid, "from_agent": "planner", "to_agent": f"w-{i}", "estimated_usd": 1},
            budget.token(sid, "planner"),
        )
        for i in range(40)
    ]
    seen: list[float] = []
    done = threading.Event()

    def watch() -> None:
        with httpx.Client(base_url=budget.url, timeout=30) as c:
            while True:
                last = done.is_set()
                r = c.get(f"/api/v1/sessions/{sid}")
                if r.status_code == 200:
                    seen.append(float(r.json()["governor"]["budget_usd"]))
                if last:
                    return

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        answers = burst(tmp_path, budget.url, reqs)
    finally:
        done.set()
        watcher.join(30)
    assert outcomes(answers) == {"allow": 10, "stop/shared_budget_exceeded": 30}
    figures = budget.figures(sid)
    assert figures["budget_usd"] == 10.0
    assert figures["governed_agents"] == 11  # the planner (estimate 0) and ten
    assert seen and max(seen) <= 10.0


def test_concurrency_cap_under_load_and_freed_by_finish(appr: Gov, tmp_path: Path) -> None:
    sid = "appr-burst-concurrency"
    appr.handoff(sid, "planner")
    token = appr.token(sid, "planner")
    reqs = [
        (HANDOFF, {"session_id": sid, "from_agent": "planner", "to_agent": f"w-{i}"}, token)
        for i in range(24)
    ]
    answers = burst(tmp_path, appr.url, reqs)
    # the planner holds one of the three slots
    assert outcomes(answers) == {"allow": 2, "stop/concurrency_limit": 22}
    running = sorted(body["to_agent"] for body, _, a in answers if a["outcome"] == "allow")
    for body, _, a in answers:
        if a["outcome"] == "allow":
            appr.tokens[(sid, body["to_agent"])] = a["lineage_token"]
    assert appr.figures(sid)["active_agents"] == 3

    assert appr.handoff(sid, "extra-1", frm="planner") == {
        "outcome": "stop",
        "reason": "concurrency_limit",
    }
    assert appr.usage(sid, running[0], finished=True)["outcome"] == "allow"
    assert appr.figures(sid)["active_agents"] == 2
    assert appr.handoff(sid, "extra-1", frm="planner")["outcome"] == "allow"
    assert appr.figures(sid)["active_agents"] == 3
    # the run now has had max_agents_per_run (4) agents: no new one, whatever is free
    appr.usage(sid, running[1], finished=True)
    assert appr.handoff(sid, "extra-2", frm="planner") == {
        "outcome": "stop",
        "reason": "agent_budget_exceeded",
    }
    figures = appr.figures(sid)
    assert (figures["governed_agents"], figures["active_agents"]) == (4, 2)


# == 3. every stop reason ====================================================================


def test_delegation_depth_exceeded(lit: Gov) -> None:
    sid = "lit-depth"
    lit.handoff(sid, "root")
    chain = ["root", "a", "b", "c"]
    for parent, child in zip(chain, chain[1:], strict=False):
        assert lit.handoff(sid, child, frm=parent)["outcome"] == "allow"
    assert lit.handoff(sid, "d", frm="c") == {
        "outcome": "stop",
        "reason": "delegation_depth_exceeded",
    }
    # depth is the governor's: without a token nobody can claim a place in a chain
    assert lit.handoff("lit-depth-2", "x", frm="outside", depth=0, token="")["reason"] == (
        "lineage_required"
    )


def test_tool_not_allowed(lit: Gov) -> None:
    sid = "lit-tools"
    answer = lit.tool(sid, "worker", "shell.exec", command="rm -rf /srv/data")
    assert (answer["outcome"], answer["reason"]) == ("stop", "tool_not_allowed")
    # the answer names the tool and what the allowlist holds
    assert answer["detail"] == "tool 'shell.exec' is not on the allowlist: search.read, http.get"
    assert answer["risk"] == 80  # scored even when stopped: destructive 60 + write scope 20
    answer = lit.tool(sid, "worker", "search.read", command="find refunds")
    assert (answer["outcome"], answer["reason"], answer["risk"]) == ("allow", None, 0)
    assert lit.figures(sid)["governed_tool_calls"] == 1


def test_agent_budget_exceeded(appr: Gov) -> None:
    sid = "appr-agents"
    appr.handoff(sid, "planner")
    for i in range(3):
        assert appr.handoff(sid, f"w-{i}", frm="planner")["outcome"] == "allow"
        appr.usage(sid, f"w-{i}", finished=True)
    # 4 agents so far, 1 active: the cap on concurrency is not what stops this one
    assert appr.figures(sid)["active_agents"] == 1
    assert appr.handoff(sid, "w-3", frm="planner") == {
        "outcome": "stop",
        "reason": "agent_budget_exceeded",
    }
    # re-delegating to an agent the run already has is not a new agent
    assert appr.handoff(sid, "w-0", frm="planner")["outcome"] == "allow"


def test_usage_of_agents_never_started_is_refused_and_changes_nothing(appr: Gov) -> None:
    sid = "appr-ghosts"
    appr.handoff(sid, "planner")
    before = appr.figures(sid)
    for i in range(3):
        answer = appr.usage(sid, f"ghost-{i}", usd=0.1, finished=True, token="")
        assert (answer["outcome"], answer["reason"]) == ("stop", "lineage_required")
    # not even a record: a refusal nobody can be held to is not written into the chain
    assert appr.figures(sid) == before
    assert appr.handoff(sid, "worker", frm="planner")["outcome"] == "allow"


def test_shared_usd_budget_on_handoff_and_usage(budget: Gov) -> None:
    sid = "budget-paths"
    assert budget.handoff(sid, "a", frm="planner", estimated_usd=6)["outcome"] == "allow"
    assert budget.handoff(sid, "b", frm="planner", estimated_usd=5) == {
        "outcome": "stop",
        "reason": "shared_budget_exceeded",
    }
    assert budget.handoff(sid, "c", frm="planner", estimated_usd=4)["outcome"] == "allow"
    assert budget.figures(sid)["budget_usd"] == 10.0
    # usage within a's estimate is fine; spending beyond the shared budget stops
    assert budget.usage(sid, "a", usd=5.5)["outcome"] == "allow"
    assert budget.usage(sid, "a", usd=1.0) == {
        "outcome": "stop",
        "reason": "shared_budget_exceeded",
    }
    assert budget.figures(sid)["budget_usd"] == pytest.approx(10.5)  # real spend stays counted


def test_redelegation_keeps_spent_budget(budget: Gov) -> None:
    sid = "budget-redelegate"
    budget.handoff(sid, "w", frm="planner")
    budget.usage(sid, "w", usd=8, finished=True)
    assert budget.figures(sid)["budget_usd"] == 8.0
    assert budget.handoff(sid, "w", frm="planner")["outcome"] == "allow"
    assert budget.figures(sid)["budget_usd"] == 8.0
    assert budget.handoff(sid, "x", frm="planner", estimated_usd=9) == {
        "outcome": "stop",
        "reason": "shared_budget_exceeded",
    }


def test_permission_escalation_by_parent_and_role(budget: Gov) -> None:
    sid = "budget-perms"
    assert budget.handoff(sid, "planner", permissions=["fs.write:/opt/app"])["outcome"] == "allow"
    ok = budget.handoff(sid, "w-logs", frm="planner", permissions=["fs.write:/opt/app/logs"])
    assert ok["outcome"] == "allow"
    assert (
        budget.handoff(sid, "w-same", frm="planner", permissions=["fs.write:/opt/app"])["outcome"]
        == "allow"
    )
    for wanted in (["fs.write:/opt/application"], ["fs.read:/opt/app"], ["fs.write:/opt"]):
        assert budget.handoff(sid, "w-bad", frm="planner", permissions=wanted) == {
            "outcome": "stop",
            "reason": "permission_escalation",
        }, wanted
    # a grandchild may not hold more than its own parent (w-logs), even if planner could
    assert budget.handoff(sid, "g", frm="w-logs", permissions=["fs.write:/opt/app"])["reason"] == (
        "permission_escalation"
    )
    # no permissions asked: the child inherits its parent's
    assert budget.handoff(sid, "g2", frm="w-logs")["outcome"] == "allow"
    assert budget.handoff(sid, "g3", frm="g2", permissions=["fs.write:/opt/app"])["reason"] == (
        "permission_escalation"
    )

    # the role's own permissions in the policy (cleanup: fs.write:/opt/app/logs)
    sid = "budget-role"
    role = {"to_role": "cleanup"}
    assert budget.handoff(sid, "root", permissions=["fs.write:/"])["outcome"] == "allow"
    assert (
        budget.handoff(sid, "c1", frm="root", permissions=["fs.write:/opt/app/logs"], **role)[
            "outcome"
        ]
        == "allow"
    )
    assert (
        budget.handoff(sid, "c2", frm="root", permissions=["fs.write:/opt/app/logs/today"], **role)[
            "outcome"
        ]
        == "allow"
    )
    assert budget.handoff(sid, "c3", frm="root", permissions=["fs.write:/opt/app"], **role)[
        "reason"
    ] == ("permission_escalation")
    assert (
        budget.handoff(sid, "c4", frm="root", permissions=["fs.write:/opt/app/logsx"], **role)[
            "reason"
        ]
        == "permission_escalation"
    )
    assert budget.figures(sid)["governed_agents"] == 3


# == 4. approvals ==============================================================================


def test_approval_granted_for_tool(appr: Gov) -> None:
    sid = "appr-granted"
    ask = {"command": "refund order 1234"}
    first = appr.tool(sid, "refunder", "billing.refund.create", **ask)
    assert (first["outcome"], first["reason"]) == (
        "approval_required",
        "approval_required_for_tool",
    )
    aid = first["approval_id"]
    pending = {a["approval_id"]: a for a in appr.approvals("pending")}
    assert pending[aid]["session_id"] == sid and pending[aid]["requested_by"] == "refunder"
    assert pending[aid]["kind"] == "tool"

    # not yet decided: the re-ask waits
    waiting = appr.tool(sid, "refunder", "billing.refund.create", approval_id=aid, **ask)
    assert (waiting["outcome"], waiting["reason"]) == ("approval_required", "awaiting_approval")

    r = appr.decide(aid, True, approver="alice")
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["approver"]) == ("approved", "alice")
    again = appr.tool(sid, "refunder", "billing.refund.create", approval_id=aid, **ask)
    assert (again["outcome"], again["reason"], again["approval_id"]) == ("allow", None, aid)
    # the approval covers that request only
    other = appr.tool(
        sid, "refunder", "billing.refund.create", approval_id=aid, command="refund order 9999"
    )
    assert (other["outcome"], other["reason"]) == ("stop", "approval_mismatch")
    # and an approval cannot be decided twice
    assert appr.decide(aid, False, approver="bob").status_code == 409
    assert appr.decide("apr-0000000000000000", True, approver="bob").status_code == 404


def test_approval_denied_for_write_delegation(appr: Gov) -> None:
    sid = "appr-denied"
    ask = {"task": "rotate logs", "permissions": ["fs.write:/var/log"]}
    first = appr.handoff(sid, "rotator", frm="planner", **ask)
    assert (first["outcome"], first["reason"]) == ("approval_required", "high_risk_delegation")
    aid = first["approval_id"]
    assert appr.approval(aid)["kind"] == "handoff"
    r = appr.decide(aid, False, approver="alice")
    assert r.status_code == 200 and r.json()["status"] == "denied"
    again = appr.handoff(sid, "rotator", frm="planner", approval_id=aid, **ask)
    assert (again["outcome"], again["reason"]) == ("stop", "approval_denied")
    assert appr.figures(sid)["governed_agents"] == 1  # the planner only


def test_high_risk_and_task_approvals(appr: Gov) -> None:
    sid = "appr-risky"
    plain = appr.handoff(sid, "reader", frm="planner", task="read docs", permissions=["docs.read"])
    assert plain["outcome"] == "allow"
    cases = [
        ({"task": "deploy to production"}, "high_risk_delegation"),
        ({"task": "deploy", "permissions": ["deploy:prod"]}, "high_risk_delegation"),
        ({"task": "cleanup", "permissions": ["db.delete:orders"]}, "high_risk_delegation"),
        ({"task": "close_account"}, "approval_required_for_task"),
    ]
    for n, (ask, reason) in enumerate(cases):
        answer = appr.handoff(sid, f"risky-{n}", frm="planner", **ask)
        assert (answer["outcome"], answer["reason"]) == ("approval_required", reason), ask
        assert answer["approval_id"].startswith("apr-")
    # a production word inside another word is not production
    assert appr.handoff(sid, "p", frm="planner", task="reproduce bug")["outcome"] == "allow"


def test_approval_does_not_cover_wider_permissions(appr: Gov) -> None:
    sid = "appr-scope"
    ask = {"task": "deploy", "permissions": ["fs.write:/tmp/scratch"]}
    aid = appr.handoff(sid, "deployer", frm="planner", **ask)["approval_id"]
    assert appr.decide(aid, True, approver="alice").status_code == 200
    wider = appr.handoff(
        sid,
        "deployer",
        frm="planner",
        task="deploy",
        permissions=["fs.write:/", "db.admin:production"],
        approval_id=aid,
    )
    assert (wider["outcome"], wider["reason"]) == ("stop", "approval_mismatch")


def test_kill_cancels_pending_approvals(appr: Gov) -> None:
    sid = "appr-kill"
    a1 = appr.tool(sid, "refunder", "billing.refund.create", command="refund 1")["approval_id"]
    a2 = appr.handoff(sid, "closer", frm="refunder", task="close_account")["approval_id"]
    r = appr.kill(sid, actor="oncall", reason="fraud suspected")
    assert r.status_code == 200
    assert sorted(r.json()["cancelled_approvals"]) == sorted([a1, a2])
    cancelled = {a["approval_id"] for a in appr.approvals("cancelled")}
    assert {a1, a2} <= cancelled
    assert appr.approval(a1)["status"] == "cancelled"
    again = appr.tool(sid, "refunder", "billing.refund.create", command="refund 1", approval_id=a1)
    assert (again["outcome"], again["reason"]) == ("stop", "session_killed")
    again = appr.handoff(sid, "closer", frm="refunder", task="close_account", approval_id=a2)
    assert (again["outcome"], again["reason"]) == ("stop", "session_killed")
    assert appr.decide(a1, True, approver="alice").status_code == 409


def test_agent_cannot_approve_own_request_without_keys(appr: Gov) -> None:
    sid = "appr-self"
    aid = appr.tool(sid, "refunder", "billing.refund.create", command="refund 7")["approval_id"]
    r = appr.decide(aid, True, approver="refunder")
    assert r.status_code == 403 and "own request" in r.json()["error"]
    hid = appr.handoff(sid, "closer", frm="refunder", task="close_account")["approval_id"]
    assert appr.decide(hid, True, approver="refunder").status_code == 403
    assert appr.decide(hid, False, approver="refunder").status_code == 403
    assert appr.approval(aid)["status"] == "pending"
    assert appr.approval(hid)["status"] == "pending"
    # no approver named at all
    assert appr.decide(aid, True, approver="").status_code == 400
    assert appr.decide(aid, True, approver="alice").json()["status"] == "approved"


def test_approval_expires(ttl: Gov) -> None:
    sid = "ttl-expire"
    ask = {"command": "refund order 55"}
    t0 = time.monotonic()
    first = ttl.tool(sid, "refunder", "billing.refund.create", **ask)
    aid = first["approval_id"]
    assert first["outcome"] == "approval_required"
    wait_for(
        lambda: aid in {a["approval_id"] for a in ttl.approvals("expired")},
        timeout=6,
        interval=0.1,
    )
    assert time.monotonic() - t0 >= 0.9
    assert ttl.approval(aid)["status"] == "expired"
    again = ttl.tool(sid, "refunder", "billing.refund.create", approval_id=aid, **ask)
    assert (again["outcome"], again["reason"]) == ("stop", "approval_expired")
    r = ttl.decide(aid, True, approver="alice")
    assert r.status_code == 409 and "expired" in r.json()["error"]


# == 5. API keys ===============================================================================


def test_api_keys_and_roles(keyed: Gov) -> None:
    sid = "keys-roles"
    body = {"session_id": sid, "to_agent": "planner"}
    none = httpx.post(f"{keyed.url}{HANDOFF}", json=body, timeout=30)
    assert none.status_code == 401 and "missing API key" in none.json()["error"]
    assert keyed.post(HANDOFF, body, key="not-a-configured-key-123").status_code == 401
    wrong = keyed.post(HANDOFF, body, key=REVIEWER_KEY)
    assert wrong.status_code == 403 and "reviewer" in wrong.json()["error"]
    planner = keyed.post(HANDOFF, body, key=AGENT_KEY).json()
    assert planner["outcome"] == "allow"
    # the admin key may decide too (a delegation by the planner, with its token)
    x = keyed.post(
        HANDOFF,
        {**body, "from_agent": "planner", "to_agent": "x"},
        key=ADMIN_KEY,
        token=planner["lineage_token"],
    )
    assert (x.status_code, x.json()["outcome"]) == (200, "allow")

    # the query API needs a key too
    assert httpx.get(f"{keyed.url}/api/v1/sessions", timeout=30).status_code == 401
    assert keyed.get("/api/v1/sessions", key="not-a-configured-key-123").status_code == 401
    assert keyed.get("/api/v1/sessions", key=AGENT_KEY).status_code == 200
    assert httpx.get(f"{keyed.url}/api/v1/sessions/{sid}", timeout=30).status_code == 401
    assert keyed.figures(sid, key=REVIEWER_KEY)["governed_agents"] == 2

    # kill needs admin
    killed = keyed.kill(sid, actor="someone", reason="test", key=AGENT_KEY)
    assert killed.status_code == 403 and "admin" in killed.json()["error"]
    assert keyed.kill(sid, reason="test", key=REVIEWER_KEY).status_code == 403
    assert keyed.kill(sid, reason="test", key="").status_code == 401
    assert keyed.figures(sid, key=AGENT_KEY)["status"] == "active"
    r = keyed.kill(sid, actor="someone else", reason="drill", key=ADMIN_KEY)
    assert r.status_code == 200
    summary = keyed.session(sid, key=AGENT_KEY)
    assert (summary["status"], summary["governor"]["killed_by"]) == ("killed", "ops")
    assert summary["governor"]["kill_reason"] == "drill"


def test_approve_needs_reviewer_and_not_the_requester(keyed: Gov) -> None:
    sid = "keys-approve"
    first = keyed.tool(sid, "refunder", "billing.refund.create", command="refund 1", key=AGENT_KEY)
    aid = first["approval_id"]
    assert keyed.approval(aid, key=REVIEWER_KEY)["requester"] == "bot"
    r = keyed.decide(aid, True, approver="alice", key=AGENT_KEY)
    assert r.status_code == 403 and "approve" in r.json()["error"]
    # what sessions wait for is the reviewers' business: agent keys cannot list approvals
    listed = keyed.get("/api/v1/approvals", key=AGENT_KEY)
    assert listed.status_code == 403 and "reviewer" in listed.json()["error"]
    assert keyed.get(f"/api/v1/approvals/{aid}", key=AGENT_KEY).status_code == 403
    assert keyed.decide(aid, True, approver="alice", key="").status_code == 401
    # a reviewer key with the requesting agent key's name ("bot") cannot approve it either
    same = keyed.decide(aid, True, key=BOT_REVIEWER_KEY)
    assert same.status_code == 403 and "own request" in same.json()["error"]
    assert keyed.approval(aid, key=REVIEWER_KEY)["status"] == "pending"
    ok = keyed.decide(aid, True, approver="bot", key=REVIEWER_KEY)  # name comes from the key
    assert ok.status_code == 200
    assert (ok.json()["status"], ok.json()["approver"]) == ("approved", "rev")
    again = keyed.tool(
        sid,
        "refunder",
        "billing.refund.create",
        command="refund 1",
        approval_id=aid,
        key=AGENT_KEY,
    )
    assert again["outcome"] == "allow"


MALFORMED_KEYS = [
    (
        "bot:agent:short",
        "AGENTGOV_API_KEYS entry 1: needs a name of letters, digits and . _ : @ - (64 at most), "
        "a role among agent, reviewer, admin, ingest and a key of 16 characters or more",
    ),
    ("justonefield", "AGENTGOV_API_KEYS entry 1 is not name:role:key"),
    (
        f"ok:agent:{AGENT_KEY},bot:wizard:0123456789abcdef0",
        "AGENTGOV_API_KEYS entry 2: needs a name of letters, digits and . _ : @ - (64 at most), "
        "a role among agent, reviewer, admin",
    ),
    (f"bad name:agent:{AGENT_KEY}", "AGENTGOV_API_KEYS entry 1: needs a name of letters"),
]


def test_bad_key_name_message_names_the_entry() -> None:
    from agentgov.collector.auth import KeyRing

    with pytest.raises(ValueError, match="AGENTGOV_API_KEYS entry 2"):
        KeyRing.from_env(f"ok:agent:{AGENT_KEY},bad name:agent:{AGENT_KEY}")


def test_malformed_api_keys_refuse_start(tmp_path: Path) -> None:
    """Each malformed AGENTGOV_API_KEYS stops the collector before it listens (the refusals
    run side by side to keep the test short)."""
    ports = [free_port() for _ in MALFORMED_KEYS]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agentgov.collector.cli",
                "collector",
                "--store",
                f"chdb://{tmp_path / f'data{n}'}",
                "--http-port",
                str(port),
                "--grpc-port",
                "-1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "AGENTGOV_API_KEYS": value},
        )
        for n, ((value, _), port) in enumerate(zip(MALFORMED_KEYS, ports, strict=True))
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for (value, fragment), port, p, (_, err) in zip(
        MALFORMED_KEYS, ports, procs, results, strict=True
    ):
        assert p.returncode != 0, value
        assert err.startswith("Error: ") and fragment in err, (value, err)
        assert AGENT_KEY not in err  # the message never echoes a key
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)


# == 6. kill and control events ===============================================================


def read_events(response: httpx.Response, into: list[tuple[str, dict]], until: str) -> None:
    """Collect server-sent events from ``response`` until one of kind ``until``."""
    kind = ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            into.append((kind, json.loads(line[len("data: ") :])))
            if kind == until:
                return


def test_kill_stops_everything_later(lit: Gov) -> None:
    sid = "lit-kill"
    lit.handoff(sid, "planner")
    lit.handoff(sid, "worker", frm="planner")
    r = lit.kill(sid, actor="oncall", reason="runaway loop")
    assert r.status_code == 200
    answer = r.json()
    assert {k: answer[k] for k in ("session_id", "actor", "reason", "status")} == {
        "session_id": sid,
        "actor": "oncall",
        "reason": "runaway loop",
        "status": "killed",
    }
    assert answer["cancelled_approvals"] == []
    # the answer lists the agents it stopped: both were running, neither has said so yet
    assert [(a["agent_id"], a["running_at_kill"], a["acknowledged"]) for a in answer["agents"]] == [
        ("planner", True, False),
        ("worker", True, False),
    ]
    summary = lit.session(sid)
    assert summary["status"] == "killed"
    assert (summary["governor"]["killed_by"], summary["governor"]["kill_reason"]) == (
        "oncall",
        "runaway loop",
    )
    # every refusal says who stopped the session and why, for agents the kill event has
    # not reached yet
    killed = {
        "outcome": "stop",
        "reason": "session_killed",
        "killed": {"actor": "oncall", "reason": "runaway loop"},
    }
    assert lit.handoff(sid, "worker-2", frm="planner") == killed
    assert lit.handoff(sid, "sub", frm="worker") == killed
    assert lit.tool(sid, "worker", "search.read")["reason"] == "session_killed"
    assert lit.usage(sid, "worker", usd=0.1, finished=True) == killed
    assert lit.figures(sid)["governed_agents"] == 2

    # killed before any agent started: the first agent is refused
    early = "lit-kill-early"
    # an id nobody used is a 404 (a typo must not read as a kill) unless said on purpose
    unknown = lit.kill(early, actor="oncall", reason="bad intent")
    assert unknown.status_code == 404 and '"unseen": true' in unknown.json()["error"]
    assert lit.kill(early, actor="oncall", reason="bad intent", unseen=True).status_code == 200
    assert lit.handoff(early, "planner") == {
        **killed,
        "killed": {"actor": "oncall", "reason": "bad intent"},
    }
    figures = lit.figures(early)
    assert (figures["status"], figures["governed_agents"]) == ("killed", 0)


def test_a_refused_usage_report_counts_for_the_agent_that_sent_it(lit: Gov) -> None:
    """A usage report is recorded as the parent's handoff: refused after the kill, it says
    the worker learned of the stop, not its parent (whose own acknowledgement still counts)."""
    sid = "lit-kill-usage"
    lit.handoff(sid, "planner")
    lit.handoff(sid, "worker", frm="planner")
    assert lit.kill(sid, actor="oncall", reason="stop").status_code == 200
    assert lit.usage(sid, "worker", usd=0.1, finished=True)["reason"] == "session_killed"
    again = lit.kill(sid, actor="oncall", reason="stop").json()
    assert [(a["agent_id"], a["acknowledged"]) for a in again["agents"]] == [
        ("planner", False),
        ("worker", True),
    ]


def test_kill_event_stream(lit: Gov) -> None:
    sid = "lit-events"
    lit.handoff(sid, "planner")
    events: list[tuple[str, dict]] = []
    timeout = httpx.Timeout(10, read=30)

    def listen() -> None:
        with httpx.stream("GET", f"{lit.url}/api/v1/sessions/{sid}/events", timeout=timeout) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            read_events(r, events, until="kill")

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    wait_for(lambda: len(events) >= 1, timeout=10)
    kind, state = events[0]
    assert kind == "state"
    assert (state["session_id"], state["status"], state["governed_agents"]) == (sid, "active", 1)
    assert lit.kill(sid, actor="oncall", reason="operator stop").status_code == 200
    wait_for(lambda: any(k == "kill" for k, _ in events), timeout=10)
    listener.join(10)
    assert [k for k, _ in events] == ["state", "kill"]
    assert events[1][1] == {
        "session_id": sid,
        "actor": "oncall",
        "reason": "operator stop",
        "cancelled_approvals": [],
    }

    # a listener connecting after the kill hears about it at once
    late: list[tuple[str, dict]] = []
    t0 = time.monotonic()
    with httpx.stream("GET", f"{lit.url}/api/v1/sessions/{sid}/events", timeout=timeout) as r:
        read_events(r, late, until="kill")
    assert time.monotonic() - t0 < 5
    assert [k for k, _ in late] == ["state", "kill"]
    assert late[0][1]["status"] == "killed"
    assert late[1][1] == {"session_id": sid, "actor": "oncall", "reason": "operator stop"}


# == 7. shadow mode ============================================================================


def test_shadow_mode_allows_and_reports(shadow: Gov) -> None:
    def shadowed(answer: dict[str, Any], outcome: str, reason: str) -> None:
        assert answer["outcome"] == "allow", answer
        assert answer["shadow"] == {"outcome": outcome, "reason": reason}, answer

    sid = "shadow-1"
    first = shadow.handoff(sid, "planner")
    assert first == {"outcome": "allow", "reason": None}  # nothing to report: no shadow
    shadowed(
        shadow.handoff(sid, "researcher-1", frm="planner", task="refund_check"),
        "stop",
        "ownership_conflict",
    )
    assert "shadow" not in shadow.handoff(sid, "w1", frm="planner")
    shadowed(shadow.handoff(sid, "w2", frm="planner"), "stop", "handoff_budget_exceeded")
    figures = shadow.figures(sid)
    # shadow decisions never block: every one of them went ahead
    assert (figures["governed_agents"], figures["governed_handoffs"]) == (4, 3)

    for parent, child in (("", "d0"), ("d0", "d1"), ("d1", "d2")):
        shadow.handoff("shadow-depth", child, frm=parent)
    shadowed(shadow.handoff("shadow-depth", "d3", frm="d2"), "stop", "delegation_depth_exceeded")
    shadowed(
        shadow.handoff("shadow-usd", "spender", frm="p", estimated_usd=2),
        "stop",
        "shared_budget_exceeded",
    )
    shadowed(shadow.usage("shadow-usage", "u1", usd=5), "stop", "shared_budget_exceeded")
    shadowed(shadow.tool("shadow-tool", "w", "shell.exec"), "stop", "tool_not_allowed")
    shadowed(
        shadow.tool("shadow-tool", "w", "billing.refund.create"),
        "approval_required",
        "approval_required_for_tool",
    )
    assert "shadow" not in shadow.tool("shadow-tool", "w", "search.read")

    assert (
        shadow.kill("shadow-kill", actor="oncall", reason="drill", unseen=True).status_code == 200
    )
    shadowed(shadow.handoff("shadow-kill", "planner"), "stop", "session_killed")
    shadowed(shadow.tool("shadow-kill", "planner", "search.read"), "stop", "session_killed")


def test_shadow_decisions_list_records_real_outcome(shadow: Gov) -> None:
    sid = "shadow-list"
    shadow.handoff(sid, "planner")
    shadow.handoff(sid, "researcher-1", frm="planner", task="refund_check")
    shadow.tool(sid, "planner", "shell.exec")
    rows = shadow.decisions(sid)
    assert [(r["phase"], r["outcome"], r["reason"], r["mode"]) for r in rows] == [
        ("pre_handoff", "allow", "", "shadow"),
        ("pre_handoff", "stop", "ownership_conflict", "shadow"),
        ("tool", "stop", "tool_not_allowed", "shadow"),
    ]


# == 8. restart persistence and a tamper-evident chain =========================================

TAMPER = """\
import json, sys
import clickhouse_connect

data_dir, dump_sid, del_sid, alt_sid = sys.argv[1:5]
c = clickhouse_connect.get_client(dsn=f"chdb://{data_dir}")
cols = ("Seq, toFloat64(Time), Phase, Outcome, Reason, Owner, FromAgent, ToAgent, Task, "
        "Depth, Actor, Mode, Detail, PrevHash, Hash")
rows = c.query(
    f"SELECT {cols} FROM agentgov_decisions WHERE SessionId = '{dump_sid}' ORDER BY Seq"
).result_rows
c.command(
    f"ALTER TABLE agentgov_decisions DELETE WHERE SessionId = '{del_sid}' AND Seq = 3 "
    "SETTINGS mutations_sync = 1"
)
c.command(
    "ALTER TABLE agentgov_decisions UPDATE Reason = 'routine maintenance' "
    f"WHERE SessionId = '{alt_sid}' AND Seq = 2 SETTINGS mutations_sync = 1"
)
left = c.query(
    f"SELECT count() FROM agentgov_decisions WHERE SessionId = '{del_sid}'"
).result_rows[0][0]
reason = c.query(
    f"SELECT Reason FROM agentgov_decisions WHERE SessionId = '{alt_sid}' AND Seq = 2"
).result_rows[0][0]
c.close()
print(json.dumps({"rows": [list(r) for r in rows], "left": left, "reason": reason}))
"""

PERSIST_KEYS = {
    "AGENTGOV_API_KEYS": f"planner-svc:agent:{AGENT_KEY},ops:admin:{ADMIN_KEY},"
    f"rev:reviewer:{REVIEWER_KEY}"
}


def test_restart_keeps_state_and_audit_chain_detects_tampering(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY_PERSIST)
    args = ("--policy", str(policy))
    proc = CollectorProcess(tmp_path / "data", free_port(), free_port())
    gov = Gov(proc, policy, key=AGENT_KEY)
    admin_env = {"AGENTGOV_API_KEY": ADMIN_KEY}
    s_budget, s_kill, s_appr, s_lit = "p-budget", "p-killed", "p-approval", "p-lit"
    t0 = time.time()
    proc.start(extra_args=args, env=PERSIST_KEYS)
    try:
        gov.handoff(s_budget, "planner")
        assert gov.handoff(s_budget, "w1", frm="planner", estimated_usd=2)["outcome"] == "allow"
        assert gov.usage(s_budget, "w1", usd=4, finished=True)["outcome"] == "allow"
        assert gov.figures(s_budget)["budget_usd"] == 4.0

        gov.handoff(s_kill, "planner")
        assert gov.kill(s_kill, reason="runaway", key=ADMIN_KEY).status_code == 200

        aid = gov.tool(s_appr, "refunder", "billing.refund.create", command="refund 3")[
            "approval_id"
        ]

        gov.handoff(s_lit, "planner")
        assert (
            gov.handoff(s_lit, "researcher-1", frm="planner", task="refund_check")["reason"]
            == "ownership_conflict"
        )
        gov.handoff(s_lit, "researcher-1", frm="planner", task="summarize", estimated_usd=0.25)
        gov.usage(s_lit, "researcher-1", usd=0.5, tool_calls=2, finished=True)

        proc.stop()
        proc.start(extra_args=args, env=PERSIST_KEYS)

        figures = gov.figures(s_budget)
        assert (figures["budget_usd"], figures["governed_agents"]) == (4.0, 2)
        assert gov.handoff(s_budget, "w2", frm="planner", estimated_usd=2) == {
            "outcome": "stop",
            "reason": "shared_budget_exceeded",
        }
        assert gov.handoff(s_budget, "w3", frm="planner", estimated_usd=1)["outcome"] == "allow"

        summary = gov.session(s_kill)
        assert summary["status"] == "killed"
        assert (summary["governor"]["killed_by"], summary["governor"]["kill_reason"]) == (
            "ops",
            "runaway",
        )
        assert gov.handoff(s_kill, "w", frm="planner")["reason"] == "session_killed"

        assert gov.approval(aid, key=REVIEWER_KEY)["status"] == "pending"
        assert aid in {a["approval_id"] for a in gov.approvals("pending", key=REVIEWER_KEY)}

        res = cli("audit", "verify", s_budget, "--url", proc.url, env=admin_env)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == f"ok: 5 decision records of {s_budget}, chain intact"
        res = cli("audit", "verify", s_kill, "--url", proc.url, env=admin_env)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == f"ok: 3 decision records of {s_kill}, chain intact"
        # the refunder's start, the approval request and the tool decision
        assert gov.verify(s_appr)["records"] == 3 and gov.verify(s_appr)["ok"] is True
        assert gov.verify(s_lit) == {
            "session_id": s_lit,
            "records": 4,
            "ok": True,
            "problem": None,
            "seq": None,
        }

        # tamper with the stored chain while the collector is down
        proc.stop()
        script = tmp_path / "tamper.py"
        script.write_text(TAMPER)
        out = subprocess.run(
            [sys.executable, str(script), str(proc.data_dir), s_lit, s_budget, s_kill],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        tampered = json.loads(out.stdout.strip().splitlines()[-1])
        assert (tampered["left"], tampered["reason"]) == (4, "routine maintenance")

        # the stored records of the literature session, as written before any tampering
        rows = [
            dict(
                zip(
                    [
                        "seq",
                        "time",
                        "phase",
                        "outcome",
                        "reason",
                        "owner",
                        "from_agent",
                        "to_agent",
                        "task",
                        "depth",
                        "actor",
                        "mode",
                        "detail",
                        "prev_hash",
                        "hash",
                    ],
                    row,
                    strict=True,
                )
            )
            for row in tampered["rows"]
        ]
        assert [r["seq"] for r in rows] == [1, 2, 3, 4]
        got = [
            (r["phase"], r["outcome"], r["reason"], r["owner"], r["from_agent"], r["to_agent"])
            for r in rows
        ]
        assert got == [
            ("pre_handoff", "allow", "", "", "", "planner"),
            (
                "pre_handoff",
                "stop",
                "ownership_conflict",
                "billing_agent",
                "planner",
                "researcher-1",
            ),
            ("pre_handoff", "allow", "", "", "planner", "researcher-1"),
            ("post_handoff", "allow", "", "", "planner", "researcher-1"),
        ]
        assert [r["depth"] for r in rows] == [0, 1, 1, 1]
        assert {r["actor"] for r in rows} == {"planner-svc"}
        assert {r["mode"] for r in rows} == {"enforce"}
        times = [r["time"] for r in rows]
        assert times == sorted(times) and t0 - 1 < times[0] and times[-1] < time.time()
        post = json.loads(rows[3]["detail"])
        assert (post["usd"], post["tool_calls"], post["finished"]) == (0.5, 2, True)
        assert rows[0]["prev_hash"] == ""
        assert all(rows[n]["prev_hash"] == rows[n - 1]["hash"] for n in range(1, 4))

        proc.start(extra_args=args, env=PERSIST_KEYS)
        res = cli("audit", "verify", s_budget, "--url", proc.url, env=admin_env)
        assert res.returncode != 0
        assert "chain broken at record 3 of 4" in res.stderr and "deleted" in res.stderr
        res = cli("audit", "verify", s_kill, "--url", proc.url, env=admin_env)
        assert res.returncode != 0
        assert "chain broken at record 2 of 3" in res.stderr and "altered" in res.stderr
        deleted = gov.verify(s_budget)
        assert (deleted["ok"], deleted["seq"], deleted["records"]) == (False, 3, 4)
        assert "missing" in deleted["problem"]
        altered = gov.verify(s_kill)
        assert (altered["ok"], altered["seq"]) == (False, 2)
        assert "altered" in altered["problem"]
        assert gov.verify(s_lit)["ok"] is True
        assert gov.verify(s_appr)["ok"] is True
    finally:
        proc.stop()


# == 9. the policy file ========================================================================

BROKEN_POLICIES = [
    ("bad_yaml", "multi_agent:\n  max_handoffs: [\n", ["not valid YAML", "line 3"]),
    (
        "unknown_field",
        "multi_agent:\n  max_handofs: 3\n",
        [
            "unknown_field.yaml:2: multi_agent.max_handofs: unknown field",
            "did you mean `max_handoffs`?",
        ],
    ),
    (
        "negative_limit",
        "multi_agent:\n  shared_max_usd: -5\n",
        ["multi_agent.shared_max_usd", "greater than or equal to 0"],
    ),
    ("wrong_mode", "multi_agent:\n  mode: audit\n", ["multi_agent.mode", "'enforce' or 'shadow'"]),
    (
        "two_owners",
        "multi_agent:\n  roles:\n    billing_agent: [refund_check]\n"
        "    support_agent: [refund_check]\n",
        ["multi_agent.roles", "refund_check", "billing_agent", "support_agent"],
    ),
]


def test_lint_example_policy() -> None:
    res = cli("policy", "lint", str(EXAMPLE_POLICY))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (
        f"{EXAMPLE_POLICY}: ok (mode enforce, 1 owner roles, 1 permission roles)"
    )


@pytest.mark.parametrize(
    ("name", "text", "fragments"),
    BROKEN_POLICIES,
    ids=["bad_yaml", "unknown_field", "negative_limit", "wrong_mode", "two_owners"],
)
def test_lint_broken_policy(tmp_path: Path, name: str, text: str, fragments: list[str]) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    res = cli("policy", "lint", str(path))
    assert res.returncode != 0
    assert str(path) in res.stderr
    for fragment in fragments:
        assert fragment in res.stderr, (fragment, res.stderr)


def test_collector_refuses_broken_policy(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("multi_agent:\n  max_handoffs: -1\n")
    port = free_port()
    res = cli(
        "collector",
        "--store",
        f"chdb://{tmp_path / 'data'}",
        "--http-port",
        str(port),
        "--grpc-port",
        "-1",
        "--policy",
        str(path),
    )
    assert res.returncode != 0
    assert str(path) in res.stderr and "multi_agent.max_handoffs" in res.stderr
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)


def _edit(path: Path, text: str) -> None:
    """Replace the policy file in one step, as an editor saving atomically would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_policy_edit_takes_effect_and_broken_edit_keeps_last_good(ttl: Gov) -> None:
    path = ttl.policy_path
    try:
        t0 = time.monotonic()
        _edit(path, POLICY_TTL.replace("max_handoffs: 8", "max_handoffs: 2"))
        wait_for(lambda: ttl.policy()["policy"]["multi_agent"]["max_handoffs"] == 2, timeout=5)
        assert time.monotonic() - t0 < 3.0
        sid = "ttl-reload-1"
        ttl.handoff(sid, "planner")
        got = [ttl.handoff(sid, f"w{i}", frm="planner")["outcome"] for i in range(3)]
        assert got == ["allow", "allow", "stop"]

        errors = ttl.proc.log().count("the last good policy stays in force")
        _edit(path, "multi_agent:\n  max_handoffs: -1\n  mode: enforce\n")
        wait_for(
            lambda: ttl.proc.log().count("the last good policy stays in force") > errors,
            timeout=5,
        )
        assert "multi_agent.max_handoffs" in ttl.proc.log()
        assert ttl.policy()["policy"]["multi_agent"]["max_handoffs"] == 2
        sid = "ttl-reload-2"
        ttl.handoff(sid, "planner")
        answers = [ttl.handoff(sid, f"w{i}", frm="planner") for i in range(3)]
        assert [a["outcome"] for a in answers] == ["allow", "allow", "stop"]
        assert answers[2]["reason"] == "handoff_budget_exceeded"
        assert ttl.proc.health()["status"] == "ok"
    finally:
        _edit(path, POLICY_TTL)
        wait_for(lambda: ttl.policy()["policy"]["multi_agent"]["max_handoffs"] == 8, timeout=5)


def test_policy_api_reports_broken_edit(ttl: Gov) -> None:
    path = ttl.policy_path
    try:
        errors = ttl.proc.log().count("the last good policy stays in force")
        _edit(path, "multi_agent:\n  max_handoffs: -1\n  mode: enforce\n")
        wait_for(
            lambda: ttl.proc.log().count("the last good policy stays in force") > errors,
            timeout=5,
        )
        last_error = ttl.policy()["last_error"]
        assert last_error is not None and "multi_agent.max_handoffs" in last_error
        reload = ttl.post("/api/v1/policy/reload")
        assert reload.status_code == 400 and "kept the last good policy" in reload.text
    finally:
        _edit(path, POLICY_TTL)
        wait_for(lambda: ttl.policy()["policy"]["multi_agent"]["max_handoffs"] == 8, timeout=5)


# == 10. bad requests ==========================================================================

SQL_ID = "x'; DROP TABLE agentgov_decisions; --"

BAD_REQUESTS = [
    ("invalid_json", HANDOFF, b'{"session_id": "bad-1", "to_agent": ', "JSON"),
    ("not_an_object", HANDOFF, b'["bad-1", "a"]', "(body)"),
    (
        "unknown_field",
        HANDOFF,
        {"session_id": "bad-2", "to_agent": "a", "bogus": 1},
        "bogus: Extra inputs are not permitted",
    ),
    ("sql_session", HANDOFF, {"session_id": SQL_ID, "to_agent": "a"}, "session_id:"),
    ("sql_agent", TOOL, {"session_id": "bad-3", "agent_id": SQL_ID, "tool": "t"}, "agent_id:"),
    ("long_id", HANDOFF, {"session_id": "bad-4", "to_agent": "a" * 129}, "to_agent:"),
    ("slash_id", USAGE, {"session_id": "bad/5", "agent_id": "a"}, "session_id:"),
    (
        "negative_estimate",
        HANDOFF,
        {"session_id": "bad-6", "to_agent": "a", "estimated_usd": -1},
        "estimated_usd:",
    ),
    ("negative_usd", USAGE, {"session_id": "bad-7", "agent_id": "a", "usd": -0.5}, "usd:"),
    (
        "nan_usd",
        HANDOFF,
        b'{"session_id": "bad-8", "to_agent": "a", "estimated_usd": NaN}',
        "estimated_usd:",
    ),
    (
        "negative_tool_calls",
        USAGE,
        {"session_id": "bad-9", "agent_id": "a", "tool_calls": -3},
        "tool_calls:",
    ),
    ("missing_field", TOOL, {"session_id": "bad-10", "agent_id": "a"}, "tool:"),
]


def test_bad_requests_are_400_naming_the_field(lit: Gov) -> None:
    for name, path, body, fragment in BAD_REQUESTS:
        if isinstance(body, bytes):
            r = httpx.post(
                f"{lit.url}{path}",
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=30,
            )
        else:
            r = lit.post(path, body)
        assert r.status_code == 400, (name, r.status_code, r.text)
        assert fragment in r.json()["error"], (name, r.json())

    # ids in the path are checked too
    assert lit.post("/api/v1/sessions/bad%20id/kill", {"reason": "x"}).status_code == 400
    r = lit.post("/api/v1/sessions/bad-11/kill", {"reason": "x", "force": True})
    assert r.status_code == 400 and "force" in r.json()["error"]
    assert lit.get("/api/v1/approvals", status="whatever").status_code == 400

    # nothing was decided or created, and the collector is fine
    for sid in ("bad-1", "bad-2", "bad-3", "bad-4", "bad-6", "bad-7", "bad-11"):
        assert lit.get(f"/api/v1/sessions/{sid}").status_code == 404, sid
    assert lit.proc.health()["status"] == "ok"
    assert lit.handoff("bad-after", "planner") == {"outcome": "allow", "reason": None}
    assert lit.verify("bad-after")["ok"] is True
