"""The recorded foreign-convention fixtures (tests/fixtures/foreign) and their replay.

Each fixture is a real multi-agent run recorded with a real third-party instrumentation:
the OTLP requests its exporter sent (``requests/*.pb``, in the order sent) and what the run
really did (``truth.json``: sessions, root, agents, delegation edges, tool calls and their
owners). A :class:`Replay` is one fresh copy of a fixture: new trace and span ids, session
attribute values tagged, timestamps moved to now, so any number of copies coexist in one
store and each is found again by its own ids.
"""

from __future__ import annotations

import json
import random
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

ROOT = Path(__file__).parent / "fixtures" / "foreign"

#: span attributes that carry a session in some convention: tagged per replay so copies of
#: one fixture never share a session
SESSION_KEYS = frozenset(
    {
        "agentgov.session.id",
        "session.id",
        "gen_ai.conversation.id",
        "traceloop.association.properties.session_id",
    }
)

ORDERS = ("in-order", "reversed", "shuffled")


@dataclass(frozen=True)
class Fixture:
    name: str
    requests: tuple[bytes, ...]
    truth: dict[str, Any]

    @property
    def spans(self) -> int:
        return sum(
            1 for r in self.requests for _ in _spans(ExportTraceServiceRequest.FromString(r))
        )


def fixtures() -> list[Fixture]:
    """Every recorded fixture, by name."""
    out = []
    for folder in sorted(p for p in ROOT.iterdir() if (p / "truth.json").is_file()):
        requests = tuple(p.read_bytes() for p in sorted((folder / "requests").glob("*.pb")))
        out.append(Fixture(folder.name, requests, json.loads((folder / "truth.json").read_text())))
    return out


def _spans(request: ExportTraceServiceRequest) -> Iterator[Span]:
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            yield from ss.spans


@dataclass
class Replay:
    """One copy of a fixture with fresh ids, its requests in the given arrival order."""

    fixture: Fixture
    order: str
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    requests: list[bytes] = field(default_factory=list)
    #: every session id this copy could resolve to: its tagged session attribute values
    #: and ``trace:<id>`` of each of its traces (a trace group without any)
    candidates: set[str] = field(default_factory=set)
    trace_ids: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        ids: dict[bytes, bytes] = {}

        def fresh(old: bytes) -> bytes:
            if not old:
                return old
            if old not in ids:
                ids[old] = secrets.token_bytes(len(old))
            return ids[old]

        parsed = [ExportTraceServiceRequest.FromString(r) for r in self.fixture.requests]
        first = min(s.start_time_unix_nano for r in parsed for s in _spans(r))
        shift = time.time_ns() - 60_000_000_000 - first  # the run happened a minute ago
        for request in parsed:
            for s in _spans(request):
                s.trace_id, s.span_id = fresh(s.trace_id), fresh(s.span_id)
                s.parent_span_id = fresh(s.parent_span_id)
                for link in s.links:
                    link.trace_id, link.span_id = fresh(link.trace_id), fresh(link.span_id)
                s.start_time_unix_nano += shift
                s.end_time_unix_nano += shift
                for event in s.events:
                    event.time_unix_nano += shift
                for kv in s.attributes:
                    if kv.key in SESSION_KEYS and kv.value.string_value:
                        kv.value.string_value = f"{kv.value.string_value}-{self.tag}"
                        self.candidates.add(kv.value.string_value)
                self.trace_ids.add(s.trace_id.hex())
        self.candidates |= {f"trace:{t}" for t in self.trace_ids}
        bodies = [r.SerializeToString() for r in parsed]
        if self.order == "reversed":
            bodies.reverse()
        elif self.order == "shuffled":
            random.Random(self.tag).shuffle(bodies)
        self.requests = bodies

    @property
    def id(self) -> str:
        return f"{self.fixture.name}-{self.order}"


def truth_shape(truth: dict[str, Any]) -> dict[str, Any]:
    """What a fixture's graph must look like, in the form :func:`observed` reads it back."""
    return {
        "sessions": truth["sessions"],
        "roots": [truth["root"]],
        "agents": sorted(truth["agents"]),
        "edges": sorted((e["parent"], e["child"]) for e in truth["edges"]),
        "tools": sorted(
            (t["agent"], t["tool"], t["calls"], tuple(sorted(t["commands"])), t["delegation"])
            for t in truth["tools"]
        ),
    }


def graph_shape(graphs: list[dict[str, Any]], audits: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """The same shape from the API's graph and audit answers of a replay's sessions."""
    names: dict[str, str] = {}
    roots, agents, edges = [], [], []
    for g in graphs:
        names.update({n["id"]: n["name"] for n in g["nodes"]})
        roots += [n["name"] for n in g["nodes"] if not n["parent_id"]]
        agents += [n["name"] for n in g["nodes"]]
    for g in graphs:
        edges += [(names.get(e["source"], "?"), names.get(e["target"], "?")) for e in g["edges"]]
    tools: dict[tuple[str, str], list[Any]] = {}
    for rows in audits:
        for r in rows:
            cell = tools.setdefault((names.get(r["agent_id"], "?"), r["tool"]), [0, [], False])
            cell[0] += 1
            if r["command"]:
                cell[1].append(r["command"])
            cell[2] = cell[2] or bool(r["delegation"])
    return {
        "sessions": len(graphs),
        "roots": sorted(roots),
        "agents": sorted(agents),
        "edges": sorted(edges),
        "tools": sorted(
            (agent, tool, n, tuple(sorted(cmds)), deleg)
            for (agent, tool), (n, cmds, deleg) in tools.items()
        ),
    }
