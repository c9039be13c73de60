"""Resolution: sessions, agents, tool owners and delegation edges across a trace group.

What one span cannot say is decided here, over the spans of a *trace group* (a trace and
every trace joined to it by span links): the session of spans that carry none, which agent
each tool and model call belongs to, one node per agent however many spans and
conventions describe it, and who delegated to whom, with how each edge was derived.

:func:`resolve` is a pure function of the *set* of the group's local facts: spans are
visited in (start, span id) order and every tie is broken by a total order, so spans may
arrive in any order, children before parents, seconds apart, and the result converges to
the same graph once they are all there. A parent not stored yet ends a walk up the tree
(it comes later, and the group is resolved again then).
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from agentgov.collector.normalize.local import (
    LocalFacts,
    command_of,
    input_text,
    parse_args,
    resources_of,
)
from agentgov.collector.normalize.model import DELEGATION_TOOLS, UNTRUSTED_CLAIM_SCOPES, VIA, norm
from agentgov.instrumentation.lineage import check_id

Key = tuple[str, str]  # (session, node key)


def session_id(value: str) -> str:
    """A session id as the API can name it: kept when it is a valid id, else a digest."""
    try:
        return check_id(value, "session id")
    except ValueError:
        return "x:" + hashlib.sha256(value.encode()).hexdigest()[:32]


@dataclass
class Node:
    """One agent of a session, however many spans (and conventions) describe it."""

    key: str  # 'id:<agent id>' or 'name:<normalised name>'
    session: str
    name: str
    agent_id: str  # what the AgentId column says: the id, else the normalised name
    first_seen: int
    invocations: list[str] = field(default_factory=list)  # span ids
    virtual: bool = False  # known only from a delegation tool's input
    native: bool = False  # agentgov's own spans describe it
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    parent: str = ""  # node key of its delegator ('' for a root)
    chain: tuple[str, ...] = ()  # node keys from the session's root to this node
    via: str = ""  # how the edge from its parent was derived
    evidence: list[str] = field(default_factory=list)
    task: str = ""


@dataclass
class ToolCall:
    span_id: str  # the span, or '<llm span>:<call id>' for a call no span records
    trace_id: str
    session: str
    owner: str  # node key ('' when nothing says whose it is)
    tool: str
    delegation: bool
    command: str
    resources: list[str]
    start: int
    duration: int = 0
    status: str = "Unset"
    synthesized: bool = False
    how: str = ""  # how its owner was found


@dataclass
class Edge:
    session: str
    parent: str  # node key
    child: str
    via: str
    evidence: list[str]
    #: the span the edge was first found at, and when it started
    site: str = ""
    at: int = 0


@dataclass
class SessionInfo:
    root: str = ""  # node key of the root agent
    intent: str = ""
    traces: list[str] = field(default_factory=list)


@dataclass
class Resolution:
    """The resolved graph of one trace group."""

    sessions: dict[str, SessionInfo]
    nodes: dict[Key, Node]
    edges: dict[tuple[str, str, str], Edge]
    tools: list[ToolCall]
    #: span id -> its session
    span_session: dict[str, str]
    #: span id -> the node it is (agent invocations) or belongs to (everything else)
    span_node: dict[str, Key]
    #: foreign tool spans that repeat an agentgov tool span (counted once)
    duplicates: set[str]
    #: claims and attributes not taken, with why
    rejected: list[str]


class _Resolver:
    def __init__(self, facts: Iterable[LocalFacts]) -> None:
        self.f: dict[str, LocalFacts] = {}
        for x in sorted(facts, key=lambda x: (x.trace_id, x.span_id)):
            self.f[x.span_id] = x
        self.order = sorted(self.f, key=lambda sid: (self.f[sid].start, sid))
        self.children: dict[str, list[str]] = defaultdict(list)
        for sid in self.order:
            p = self.f[sid].parent_id
            if p:
                self.children[p].append(sid)
        self.rejected: list[str] = []
        self.nodes: dict[Key, Node] = {}
        self.alias: dict[Key, Key] = {}  # merged node -> the node it is

    # -- the span tree ---------------------------------------------------------------------

    def parent(self, sid: str) -> str | None:
        """The span's parent; for a trace's root, the span its first stored link names (the
        message that started the trace, in AutoGen's runtime)."""
        x = self.f[sid]
        if x.parent_id:
            return x.parent_id if x.parent_id in self.f else None
        for _, linked in x.links:
            if linked in self.f:
                return linked
        return None

    def ancestors(self, sid: str) -> Iterator[tuple[str, bool]]:
        """(ancestor, crossed a link to reach it), nearest first."""
        seen = {sid}
        crossed = False
        cur = sid
        while True:
            nxt = self.parent(cur)
            if nxt is None or nxt in seen:
                return
            if not self.f[cur].parent_id:
                crossed = True
            seen.add(nxt)
            yield nxt, crossed
            cur = nxt

    # -- sessions --------------------------------------------------------------------------

    def sessions(self) -> dict[str, str]:
        """Each span's session.

        A span's own session is the topmost explicit one on its ancestry within its trace
        (a delegated run's own conversation id collapses into its delegator's); agentgov's
        own spans keep theirs. A span without one takes its trace's (agentgov's session in
        a trace that has agentgov spans: the governor's session is the authority), else its
        group's; a group with none is a session of its own, named after its earliest trace.
        """
        f = self.f
        by_trace: dict[str, list[str]] = defaultdict(list)
        for sid in self.order:
            by_trace[f[sid].trace_id].append(sid)
        native_session = {
            tid: next((f[s].session for s in sids if f[s].native and f[s].session), "")
            for tid, sids in by_trace.items()
        }
        own: dict[str, str] = {}
        for sid in self.order:
            if f[sid].native:
                own[sid] = f[sid].session
                continue
            cand, cur = f[sid].session, sid
            while f[cur].parent_id and f[cur].parent_id in f:
                cur = f[cur].parent_id
                if f[cur].session:
                    cand = f[cur].session
            own[sid] = cand
        trace_session: dict[str, str] = {}
        for tid, sids in sorted(by_trace.items()):
            if native_session[tid]:
                trace_session[tid] = native_session[tid]
                continue
            roots = [s for s in sids if not f[s].parent_id and own[s]]
            with_session = roots or [s for s in sids if own[s]]
            trace_session[tid] = own[with_session[0]] if with_session else ""
        by_start = sorted(by_trace, key=lambda t: (min(f[s].start for s in by_trace[t]), t))
        explicit = [trace_session[t] for t in by_start if trace_session[t]]
        group = explicit[0] if explicit else f"trace:{by_start[0]}"
        out = {sid: own[sid] or trace_session[f[sid].trace_id] or group for sid in self.order}
        return {sid: session_id(s) for sid, s in out.items()}

    # -- nodes -----------------------------------------------------------------------------

    def canon(self, key: Key | None) -> Key | None:
        while key is not None and key in self.alias:
            key = self.alias[key]
        return key

    def lookup(
        self, session: str, ref: str, create_at: int | None = None, as_id: bool = False
    ) -> Key | None:
        """An agent named by reference (handoff target, owner, coworker): by id, then by
        normalised name (earliest first); created as a virtual node when asked and unknown
        (keyed by ``ref`` itself when ``as_id``, else by its normalised name)."""
        if not ref:
            return None
        if (session, "id:" + ref) in self.nodes:
            return self.canon((session, "id:" + ref))
        wanted = norm(ref)
        hits = sorted(
            (k for k, n in self.nodes.items() if k[0] == session and norm(n.name) == wanted),
            key=lambda k: (self.nodes[k].first_seen, k),
        )
        if hits:
            return self.canon(hits[0])
        if create_at is None or not wanted:
            return None
        key = (session, "id:" + ref if as_id else "name:" + wanted)
        self.nodes[key] = Node(
            key[1], session, ref, ref if as_id else wanted, create_at, virtual=True
        )
        return key

    # -- the whole resolution ------------------------------------------------------------

    def resolve(self) -> Resolution:
        f = self.f
        sess = self.sessions()
        agent_spans = [s for s in self.order if f[s].type == "agent"]

        # nodes: one per (session, identity); an id that differently named agents share is
        # an instrumentation default, not an identity
        names_by_id: dict[str, set[str]] = defaultdict(set)
        for s in agent_spans:
            if f[s].agent_id and f[s].agent_name:
                names_by_id[f[s].agent_id].add(norm(f[s].agent_name))
        shared = {i for i, names in names_by_id.items() if len(names) > 1}
        node_of: dict[str, Key] = {}
        for s in agent_spans:
            x = f[s]
            aid = x.agent_id if x.agent_id not in shared else ""
            key = (sess[s], "id:" + aid if aid else "name:" + norm(x.agent_name))
            if key not in self.nodes:
                self.nodes[key] = Node(
                    key[1], sess[s], x.agent_name or aid, aid or norm(x.agent_name), x.start
                )
            node = self.nodes[key]
            node.invocations.append(s)
            node.native = node.native or x.native
            node.task = node.task or x.task
            node_of[s] = key

        # scopes: invocations, and delegation tools whose target runs inside them
        scope_of: dict[str, Key] = dict(node_of)
        for s in self.order:
            x = f[s]
            if x.type == "tool" and x.delegation_kind == "scoped" and x.delegation_target:
                created = self.lookup(sess[s], x.delegation_target, create_at=x.start)
                if created is not None:
                    scope_of[s] = created

        def enclosing(sid: str) -> tuple[str | None, list[str], bool]:
            """The nearest enclosing scope, the spans passed on the way, whether a link was
            crossed."""
            path: list[str] = []
            for a, crossed in self.ancestors(sid):
                if a in scope_of:
                    return a, path, crossed
                path.append(a)
            return None, path, False

        # one agent described by several conventions (agentgov's span and OpenInference's
        # around or inside it, no tool between): one node, named by agentgov's
        for s in agent_spans:
            sc, path, crossed = enclosing(s)
            if sc is None or crossed or any(f[a].type == "tool" for a in path):
                continue
            mine, theirs = self.canon(scope_of[s]), self.canon(scope_of[sc])
            if mine is None or theirs is None or mine == theirs:
                continue
            inner, outer = self.nodes[mine], self.nodes[theirs]
            # two ids are two agents, unless one is agentgov's and the other a framework's
            # own span of the same run (AutoGen's invoke_agent inside agentgov's)
            both_ids = inner.key.startswith("id:") and outer.key.startswith("id:")
            if norm(inner.name) != norm(outer.name) or (both_ids and inner.native == outer.native):
                continue
            keep, drop = (
                (mine, theirs)
                if inner.native or not outer.native and inner.key.startswith("id:")
                else (theirs, mine)
            )
            self.alias[drop] = keep
            kept = self.nodes[keep]
            kept.invocations += self.nodes[drop].invocations
            kept.first_seen = min(kept.first_seen, self.nodes[drop].first_seen)
        self._merge_twins(agent_spans, node_of)
        for s in list(scope_of):
            canon = self.canon(scope_of[s])
            assert canon is not None
            scope_of[s] = canon
        for s in list(node_of):
            node_of[s] = scope_of[s]

        # owners of everything that is not an agent: what the span says, else nesting
        owner: dict[str, Key | None] = {}
        how: dict[str, str] = {}
        for s in self.order:
            x = f[s]
            if x.type in ("agent", "agent_def"):
                continue
            hinted = self.lookup(sess[s], x.owner_id) or self.lookup(sess[s], x.owner_name)
            sc, _, crossed = enclosing(s)
            if hinted is not None:
                owner[s], how[s] = hinted, "attribute"
            elif sc is not None:
                owner[s], how[s] = scope_of[sc], "link" if crossed else "nesting"
            elif x.type == "tool" and (x.owner_id or x.owner_name):
                # nothing encloses it: the agent it names is all there is to go by
                owner[s] = self.lookup(
                    sess[s], x.owner_id or x.owner_name, create_at=x.start, as_id=bool(x.owner_id)
                )
                how[s] = "attribute"
                found = owner[s]
                if found is not None and x.native:
                    self.nodes[found].native = True  # agentgov's rows describe it
            else:
                owner[s], how[s] = None, "none"

        def tree_parent(s: str) -> Key | None:
            """The delegator the span tree shows for invocation s."""
            me, cur = scope_of[s], s
            while True:
                sc, _, _ = enclosing(cur)
                if sc is None:
                    return None
                if scope_of[sc] != me:
                    return scope_of[sc]
                if f[sc].type == "tool":
                    return owner.get(sc)
                cur = sc

        edges: dict[tuple[str, str, str], Edge] = {}

        def add_edge(
            parent: Key | None, child: Key | None, via: str, evidence: str, site: str
        ) -> None:
            parent, child = self.canon(parent), self.canon(child)
            if parent is None or child is None or parent == child or parent[0] != child[0]:
                return
            k = (parent[0], parent[1], child[1])
            edge = edges.setdefault(
                k, Edge(parent[0], parent[1], child[1], via, [], site, f[site].start)
            )
            edge.evidence.append(evidence)
            if VIA.index(via) < VIA.index(edge.via):
                edge.via = via

        tools: list[ToolCall] = []
        delegating: set[str] = set()

        # agentgov's own parent attribute
        for s in agent_spans:
            if f[s].parent_agent:
                parent = self.lookup(sess[s], f[s].parent_agent, f[s].start)
                add_edge(parent, node_of[s], "explicit", f"agentgov.agent.parent_id on {s}", s)

        # nesting: an agent run inside another agent's scope (through tools, steps, links)
        for s in sorted(scope_of, key=lambda s: (f[s].start, s)):
            me = scope_of[s]
            sc, path, crossed = enclosing(s)
            if f[s].type == "tool":  # a scoped delegation tool: its owner delegates
                add_edge(
                    owner.get(s),
                    me,
                    "tool",
                    f"delegation tool {f[s].tool_name!r} names {f[s].delegation_target!r} ({s})",
                    s,
                )
                delegating.add(s)
                continue
            if sc is None or scope_of[sc] == me:
                continue
            parent = scope_of[sc]
            through = [a for a in path if f[a].type == "tool"]
            via = "tool" if through else ("link" if crossed else "nested")
            evidence = f"invocation {s} inside {sc}" + (
                f" through tool {through[0]}" if through else ""
            )
            delegating.update(through)
            if not through and not crossed:
                # a child run under its parent's step with no tool span: the model's tool
                # call that started it was not spanned (smolagents managed agents)
                call = self._unspanned_call(f[s].parent_id, self.nodes[me].name)
                if call is not None:
                    llm, cid, cname = call
                    tools.append(
                        ToolCall(
                            f"{llm}:{cid}" if cid else f"{llm}:{cname}",
                            f[llm].trace_id,
                            sess[s],
                            parent[1],
                            cname,
                            True,
                            "",
                            [],
                            f[llm].end,
                            synthesized=True,
                            how="the delegator of the run it started",
                        )
                    )
                    via = "tool"
                    evidence += f", started by the model's tool call {cname!r} in {llm}"
            add_edge(parent, me, via, evidence, s)

        # handoffs: handoff spans and handoff tools
        for s in self.order:
            x = f[s]
            if x.type == "handoff":
                source = self.lookup(sess[s], x.handoff_from, create_at=x.start) or owner.get(s)
                target_name, tool_name = x.handoff_to, ""
                candidates = []
                for sib in self.children.get(x.parent_id, []):
                    for _, cname, _ in f[sib].model_calls:
                        for rule in DELEGATION_TOOLS:
                            m = re.search(rule["tool"], cname)
                            if m and rule["kind"] == "handoff":
                                candidates.append((cname, m.group(1)))
                if target_name:
                    candidates = [c for c in candidates if norm(c[1]) == norm(target_name)]
                if len({c[0] for c in candidates}) == 1:
                    tool_name = candidates[0][0]
                    target_name = target_name or candidates[0][1]
                target = (
                    self.lookup(sess[s], target_name, create_at=x.start) if target_name else None
                )
                if not tool_name:
                    tool_name = f"transfer_to_{norm(target_name)}" if target_name else x.name
                add_edge(source, target, "handoff", f"handoff span {x.name!r} ({s})", s)
                if source is not None and source != owner.get(s):
                    owner[s], how[s] = source, "handoff source"
                o = self.canon(owner.get(s))
                tools.append(
                    ToolCall(
                        s,
                        x.trace_id,
                        sess[s],
                        o[1] if o else "",
                        tool_name,
                        True,
                        "",
                        [],
                        x.start,
                        x.duration,
                        x.status,
                        how=how.get(s, ""),
                    )  # fmt: skip
                )
            elif x.type == "tool" and x.delegation_kind == "handoff" and x.delegation_target:
                # a stated destination may name an agent that emitted nothing; a target read
                # from a tool NAME must be a known agent (transfer_to_savings moves money)
                target = self.lookup(
                    sess[s],
                    x.delegation_target,
                    create_at=x.start if x.delegation_explicit else None,
                )
                if target is not None:
                    add_edge(
                        owner.get(s), target, "handoff", f"handoff tool {x.tool_name!r} ({s})", s
                    )
                    delegating.add(s)

        # agent as tool: a tool named like another agent of the session
        for s in self.order:
            x = f[s]
            if x.type == "tool" and x.tool_name:
                target = self.lookup(sess[s], x.tool_name)
                o = self.canon(owner.get(s))
                if target is not None and o is not None and target != o:
                    add_edge(
                        o, target, "tool", f"tool {x.tool_name!r} named after an agent ({s})", s
                    )
                    delegating.add(s)

        # OpenInference's graph.node.parent_id: taken only where the tree does not deny it
        for s in agent_spans:
            x = f[s]
            if not x.claimed_parent:
                continue
            me = node_of[s]
            claimed = self.lookup(sess[s], x.claimed_parent)
            found = tree_parent(s)
            untrusted = any(re.search(r, x.scope) for r in UNTRUSTED_CLAIM_SCOPES)
            if claimed is not None and (claimed[0], claimed[1], me[1]) in edges:
                edges[(claimed[0], claimed[1], me[1])].evidence.append(
                    f"graph.node.parent_id on {s}"
                )
            elif claimed is not None and not untrusted and found in (None, claimed):
                add_edge(claimed, me, "claimed", f"graph.node.parent_id on {s} (uncontradicted)", s)
            else:
                self.rejected.append(
                    f"graph.node.parent_id={x.claimed_parent!r} on {x.name!r}: "
                    + ("untrusted source, " if untrusted else "")
                    + f"the tree says {self.nodes[found].name if found else 'no parent'}"
                )

        # foreign tool spans repeating an agentgov tool span around or inside them
        duplicates: set[str] = set()
        native_tools: dict[tuple[str, str], list[str]] = defaultdict(list)
        for s in self.order:
            if f[s].type == "tool" and f[s].native:
                native_tools[(f[s].trace_id, norm(f[s].tool_name))].append(s)
        for s in self.order:
            x = f[s]
            if x.type != "tool" or x.native:
                continue
            for a, _ in self.ancestors(s):
                if f[a].type in ("tool", "agent"):
                    if (
                        f[a].type == "tool"
                        and f[a].native
                        and norm(f[a].tool_name) == norm(x.tool_name)
                    ):
                        duplicates.add(s)
                    break
            for c in self.children.get(s, []):
                if (
                    f[c].type == "tool"
                    and f[c].native
                    and norm(f[c].tool_name) == norm(x.tool_name)
                ):
                    duplicates.add(s)
            # or beside it: the same call of the same agent, told in a tree of its own
            whose = self.canon(owner.get(s))
            if s not in duplicates and whose is not None:
                for twin in native_tools.get((x.trace_id, norm(x.tool_name)), ()):
                    if _overlap(f[twin], x) and self.canon(owner.get(twin)) == whose:
                        duplicates.add(s)
                        break

        # usage: model calls (and agentgov's own spans) count for the agent they belong to
        for s in self.order:
            x = f[s]
            o = self.canon(node_of.get(s) or owner.get(s))
            if o is not None and (x.input_tokens or x.output_tokens or x.cost_usd):
                self.nodes[o].input_tokens += x.input_tokens
                self.nodes[o].output_tokens += x.output_tokens
                self.nodes[o].cost_usd += x.cost_usd

        # tool calls (arguments found by call id where only a model or runtime recorded them)
        known_args: dict[str, str] = {}
        for s in self.order:
            for cid, _, args in f[s].runtime_calls + f[s].model_calls:
                if cid and args and cid not in known_args:
                    known_args[cid] = args
        for s in self.order:
            x = f[s]
            if x.type != "tool" or s in duplicates:
                continue
            args = x.tool_args
            if args is None and x.tool_call_id in known_args:
                args = parse_args(known_args[x.tool_call_id])
            o = self.canon(owner.get(s))
            tools.append(
                ToolCall(
                    s,
                    x.trace_id,
                    sess[s],
                    o[1] if o else "",
                    x.tool_name,
                    s in delegating,
                    x.command or command_of(args),
                    x.resources or resources_of(args),
                    x.start,
                    x.duration,
                    x.status,
                    how=how.get(s, ""),
                )
            )

        # the nodes that remain, and per session: root, chains, parents, intent
        nodes = {k: n for k, n in self.nodes.items() if k not in self.alias}
        sessions: dict[str, SessionInfo] = {}
        for k in nodes:
            sessions.setdefault(k[0], SessionInfo())
        for t in tools:
            sessions.setdefault(t.session, SessionInfo())
        for sid_, info in sessions.items():
            self._shape(sid_, info, nodes, edges)
            info.traces = sorted({f[s].trace_id for s in self.order if sess[s] == sid_})
            info.intent = self._intent(sid_, sess, nodes, info)
        span_node: dict[str, Key] = dict(node_of)
        for s, o in owner.items():
            found = self.canon(o)
            if found is not None:
                span_node[s] = found
        return Resolution(sessions, nodes, edges, tools, sess, span_node, duplicates, self.rejected)

    def _merge_twins(self, agent_spans: list[str], node_of: dict[str, Key]) -> None:
        """One run told by agentgov and, beside it, by an instrumentation that builds a span
        tree of its own from the framework's callbacks (OpenInference's processor for the
        OpenAI Agents SDK parents its spans by the SDK's ids, not by the current span): a
        foreign agent whose every invocation overlaps in time, in the same trace, an
        invocation of the one agentgov agent of that name is that agent."""
        f = self.f
        runs: dict[tuple[str, str], list[tuple[str, Key]]] = defaultdict(list)
        for s in agent_spans:
            key = self.canon(node_of[s])
            if f[s].native and key is not None:
                runs[(key[0], norm(self.nodes[key].name))].append((s, key))
        foreign: dict[Key, list[str]] = defaultdict(list)
        for s in agent_spans:
            key = self.canon(node_of[s])
            if key is not None and not self.nodes[key].native:
                foreign[key].append(s)
        for key, spans in foreign.items():
            candidates = runs.get((key[0], norm(self.nodes[key].name)), [])
            # per foreign run, the agentgov agents whose runs it overlaps
            matches = [
                {
                    k
                    for t, k in candidates
                    if f[t].trace_id == f[s].trace_id and _overlap(f[t], f[s])
                }
                for s in spans
            ]
            twins = set().union(*matches)
            if len(twins) != 1 or not all(matches):
                continue  # no twin, several agentgov agents of that name, or a run beside none
            (twin,) = twins
            self.alias[key] = twin
            kept = self.nodes[twin]
            kept.invocations += self.nodes[key].invocations
            kept.first_seen = min(kept.first_seen, self.nodes[key].first_seen)
            kept.task = kept.task or self.nodes[key].task

    def _unspanned_call(self, call_site: str, agent_name: str) -> tuple[str, str, str] | None:
        """(llm span, call id, tool name) of a model tool call named after ``agent_name`` in
        an LLM span next to the child run (same parent span)."""
        for sib in self.children.get(call_site, []):
            for cid, cname, _ in self.f[sib].model_calls:
                if norm(cname) == norm(agent_name):
                    return sib, cid, cname
        return None

    def _shape(
        self,
        session: str,
        info: SessionInfo,
        nodes: dict[Key, Node],
        edges: dict[tuple[str, str, str], Edge],
    ) -> None:
        """Root, chains and parents of a session's nodes: the root is the earliest node
        nobody delegated to (else the earliest: a handoff cycle leads back to it); a chain
        is the shortest path from the root; a node off the root's tree takes its strongest
        incoming edge's parent."""
        keys = sorted((k for k in nodes if k[0] == session), key=lambda k: (nodes[k].first_seen, k))
        mine = [e for e in edges.values() if e.session == session]
        has_parent = {e.child for e in mine}
        roots = [k for k in keys if k[1] not in has_parent] or keys
        if not roots:
            return
        root = roots[0]
        info.root = root[1]
        chains: dict[str, tuple[str, ...]] = {root[1]: (root[1],)}
        queue = [root[1]]
        while queue:
            cur = queue.pop(0)
            kids = sorted(
                (e.child for e in mine if e.parent == cur),
                key=lambda c: (nodes[(session, c)].first_seen, c),
            )
            for c in kids:
                if c not in chains:
                    chains[c] = (*chains[cur], c)
                    queue.append(c)
        by_child: dict[str, list[Edge]] = defaultdict(list)
        for e in mine:
            by_child[e.child].append(e)
        for k in keys:
            node = nodes[k]
            node.chain = chains.get(k[1], (k[1],))
            incoming = sorted(
                by_child.get(k[1], []),
                key=lambda e: (VIA.index(e.via), nodes[(session, e.parent)].first_seen, e.parent),
            )
            if len(node.chain) > 1:
                node.parent = node.chain[-2]
                edge = next((e for e in incoming if e.parent == node.parent), None)
            elif k != root and incoming:
                edge = incoming[0]
                node.parent = edge.parent
            else:
                edge = None
            if edge is not None:
                node.via, node.evidence = edge.via, list(edge.evidence)

    def _intent(
        self, session: str, sess: dict[str, str], nodes: dict[Key, Node], info: SessionInfo
    ) -> str:
        """What the session was asked: agentgov's stated intent, else the input of its
        earliest trace root, else of its root agent's first run, else the earliest input
        of a model call or delivery (the user message the run began with)."""
        spans = [s for s in self.order if sess[s] == session]
        for s in spans:
            if self.f[s].intent:
                return self.f[s].intent
        root = nodes.get((session, info.root))
        candidates = (
            [s for s in spans if not self.f[s].parent_id]
            + (root.invocations if root else [])
            + spans
        )
        for s in candidates:
            # inputs are read lazily: most spans' are never needed
            text = input_text(self.f[s].input) if self.f[s].input else ""
            if text:
                return text
        return ""


def _overlap(a: LocalFacts, b: LocalFacts) -> bool:
    """Whether two spans ran at the same time (a span still open counts as running on)."""
    a_end = a.end if a.end > a.start else a.start + 1
    b_end = b.end if b.end > b.start else b.start + 1
    return a.start < b_end and b.start < a_end


def resolve(facts: Iterable[LocalFacts]) -> Resolution:
    """Resolve one trace group from the local facts of its spans."""
    return _Resolver(facts).resolve()
