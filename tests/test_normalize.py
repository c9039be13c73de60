"""Foreign traces become delegation graphs, whatever order their spans arrive in.

Every recorded fixture (tests/foreign_fixtures.py) is replayed into one collector process
over OTLP/HTTP three times (requests in order, reversed, shuffled), all copies at once from
concurrent senders, each copy's last request held back until its trace groups were already
resolved without it. Every copy must read back from the API as the run really was: one
session, its root, each agent once, the real delegation edges and every tool call owned by
the agent that made it. Then what sits downstream of the graph (session list, risk, fan-out,
the shipped alert rules, the CLI) is checked on a foreign session.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentgov.collector.normalize.model import VIA
from tests.conftest import CollectorProcess, free_port, wait_for
from tests.foreign_fixtures import ORDERS, Replay, fixtures, graph_shape, truth_shape

SHIPPED_RULES = Path(__file__).parents[1] / "alerts"
FIXTURES = {fx.name: fx for fx in fixtures()}
#: the late request of each copy arrives after this: longer than the resolver waits for a
#: quiet trace group (2 s at most), so every group is resolved once without it, then again
LATE_S = 2.5


def post(client: httpx.Client, body: bytes) -> None:
    r = client.post("/v1/traces", content=body, headers={"Content-Type": "application/x-protobuf"})
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollectorProcess]:
    base = tmp_path_factory.mktemp("normalize")
    c = CollectorProcess(base / "data", free_port(), free_port())
    c.start(("--alert-rules", str(SHIPPED_RULES)))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def replays(collector: CollectorProcess) -> dict[str, Replay]:
    copies = [Replay(fx, order) for fx in FIXTURES.values() for order in ORDERS]

    def send(replay: Replay, part: slice) -> None:
        with httpx.Client(base_url=collector.url, timeout=60) as client:
            for body in replay.requests[part]:
                post(client, body)

    # one sender per copy, every copy at once: a copy's requests arrive in its order,
    # interleaved with the other copies' (and committed together, as under real load)
    with ThreadPoolExecutor(len(copies)) as pool:
        list(pool.map(lambda r: send(r, slice(None, -1)), copies))
        time.sleep(LATE_S)
        list(pool.map(lambda r: send(r, slice(-1, None)), copies))
    return {r.id: r for r in copies}


def sessions_of(c: CollectorProcess, replay: Replay) -> list[str]:
    """The stored sessions of a copy. (A session the governor alone knows is left out: an
    alert may have stopped a session id that a trace group had before the rest of its
    traces arrived and renamed it; the group's final session is judged again.)"""
    found = []
    for sid in sorted(replay.candidates):
        r = c.get(f"/api/v1/sessions/{sid}")
        if r.status_code == 200 and r.json()["spans"] > 0:
            found.append(sid)
    return found


def observed(c: CollectorProcess, replay: Replay) -> dict[str, Any]:
    found = sessions_of(c, replay)
    graphs = [answer(c, f"/api/v1/sessions/{s}/graph") for s in found]
    audits = [answer(c, f"/api/v1/sessions/{s}/audit")["commands"] for s in found]
    return graph_shape(graphs, audits)


def answer(c: CollectorProcess, path: str) -> dict[str, Any]:
    r = c.get(path)
    if r.status_code != 200:  # still converging; the test prints the last state it saw
        return {
            "nodes": [{"id": "?", "name": f"{path}: {r.status_code}", "parent_id": ""}],
            "edges": [],
            "commands": [],
        }
    return dict(r.json())


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_replay_converges_to_the_runs_real_graph(
    collector: CollectorProcess, replays: dict[str, Replay], name: str, order: str
) -> None:
    replay = replays[f"{name}-{order}"]
    want = truth_shape(replay.fixture.truth)
    got: dict[str, Any] = {}

    def converged() -> bool:
        got.update(observed(collector, replay))
        return got == want

    try:
        wait_for(converged, timeout=120, interval=0.5)
    except AssertionError:
        diff = {k: {"got": got.get(k), "want": v} for k, v in want.items() if got.get(k) != v}
        pytest.fail(f"{replay.id} did not converge: {json.dumps(diff, indent=1, default=str)}")

    (sid,) = sessions_of(collector, replay)
    summary = collector.get(f"/api/v1/sessions/{sid}").json()
    assert summary["intent"] == replay.fixture.truth["intent"]
    assert summary["agents"] == len(want["agents"])
    assert summary["tool_calls"] == sum(t[2] for t in want["tools"])
    graph = collector.get(f"/api/v1/sessions/{sid}/graph").json()
    for edge in graph["edges"]:
        assert edge["via"] in VIA, edge  # every edge says how it was derived
    assert all(n["evidence"] for n in graph["nodes"] if n["parent_id"]), graph["nodes"]


# -- downstream of the graph, on one foreign session -----------------------------------------


@pytest.fixture(scope="module")
def foreign(collector: CollectorProcess, replays: dict[str, Replay]) -> str:
    """The OpenAI Agents x OpenInference copy (planner > coordinator > two workers, one of
    which ran ``rm -rf /opt/app/data``), once converged."""
    replay = replays["openai_agents_openinference-in-order"]
    want = truth_shape(replay.fixture.truth)
    wait_for(lambda: observed(collector, replay) == want, timeout=120, interval=0.5)
    (sid,) = sessions_of(collector, replay)
    return sid


def cli(collector: CollectorProcess, *args: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "agentgov.collector.cli", *args, "--url", collector.url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_session_list_risk_and_fanout_cover_foreign_sessions(
    collector: CollectorProcess, foreign: str
) -> None:
    listed = collector.get("/api/v1/sessions", limit=10_000, order="risk").json()["sessions"]
    row = next(s for s in listed if s["session_id"] == foreign)
    assert row["agents"] == 4
    assert row["max_depth"] == 2
    # rm -rf on a data folder: the session is as risky as that command
    audit = collector.get(f"/api/v1/sessions/{foreign}/audit").json()["commands"]
    rm = next(r for r in audit if r["command"] == "rm -rf /opt/app/data")
    assert rm["agent_name"] == "cleanup_data" and rm["risk"] >= 80
    assert "destructive_command" in rm["risk_rules"]
    assert row["session_risk"] >= rm["risk"]

    names = {
        n["id"]: n["name"]
        for n in collector.get(f"/api/v1/sessions/{foreign}/graph").json()["nodes"]
    }
    fanout = collector.get("/api/v1/fanout", session=foreign).json()["agents"]
    children = {names[a["agent_id"]]: a["children"] for a in fanout}
    assert children == {"planner": 1, "cleanup_coordinator": 2}


def test_the_shipped_rules_fire_on_a_foreign_session(
    collector: CollectorProcess, foreign: str
) -> None:
    def fired() -> set[str]:
        alerts = collector.get("/api/v1/alerts", session_id=foreign).json()["alerts"]
        return {a["rule"] for a in alerts}

    rules = wait_for(lambda: fired() & {"destructive_without_write"}, timeout=20)
    assert rules == {"destructive_without_write"}
    # the rule's stop reached the governor: the session is killed
    assert collector.get(f"/api/v1/sessions/{foreign}").json()["status"] == "killed"


def test_the_cli_reads_foreign_sessions(collector: CollectorProcess, foreign: str) -> None:
    listed = cli(collector, "sessions", "--limit", "10000")
    assert foreign in {s["session_id"] for s in listed}
    graph = cli(collector, "graph", foreign)
    assert sorted(n["name"] for n in graph["nodes"]) == [
        "cleanup_coordinator",
        "cleanup_data",
        "cleanup_images",
        "planner",
    ]
    audit = cli(collector, "audit", foreign)
    assert "rm -rf /opt/app/data" in {r["command"] for r in audit["commands"]}
    dry = cli(collector, "alerts", "test", foreign)
    assert "destructive_without_write" in {f["rule"] for f in dry["would_fire"]}


def test_a_handoff_back_is_an_edge_of_its_own(
    collector: CollectorProcess, replays: dict[str, Replay]
) -> None:
    """The AutoGen swarm hands work back to its planner: the planner stays the root, the
    back edge is a further edge into it, and the CLI's tree shows it without looping."""
    replay = replays["autogen_swarm_native-in-order"]
    want = truth_shape(replay.fixture.truth)
    wait_for(lambda: observed(collector, replay) == want, timeout=120, interval=0.5)
    (sid,) = sessions_of(collector, replay)
    graph = answer(collector, f"/api/v1/sessions/{sid}/graph")
    planner = next(n for n in graph["nodes"] if n["name"] == "planner")
    assert planner["parent_id"] == "" and planner["depth"] == 0
    into_planner = [e for e in graph["edges"] if e["target"] == planner["id"]]
    assert [e["via"] for e in into_planner] == ["handoff"]
    summary = answer(collector, f"/api/v1/sessions/{sid}")
    assert summary["handoffs"] == 3
    out = subprocess.run(
        [sys.executable, "-m", "agentgov.collector.cli", "graph", sid, "--url", collector.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("planner (") and len(lines) == 4, out.stdout
    assert lines[-1].strip().startswith("└── ↩ planner ("), out.stdout


def test_the_docs_name_every_attribute_the_model_reads() -> None:
    """docs/semantic-conventions.md says what is read from where: every attribute of the
    model is in it."""
    from agentgov.collector.normalize.model import RULES, Attr, JsonMember

    doc = (Path(__file__).parents[1] / "docs" / "semantic-conventions.md").read_text()
    keys = {
        src.key
        for sources in RULES.values()
        for src in sources
        if isinstance(src, Attr | JsonMember)
    }
    assert len(keys) > 30
    assert sorted(k for k in keys if f"`{k}`" not in doc) == []
