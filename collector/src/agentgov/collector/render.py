"""Text renderings for the terminal: session tables, delegation trees, causal chains."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any


def risk_label(score: int) -> str:
    if score >= 70:
        return f"{score} HIGH"
    if score >= 40:
        return f"{score} MEDIUM"
    return f"{score} low"


def sessions_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no sessions yet (agents send spans to the collector; see README 'Instrumenting agents')"
    header = f"{'SESSION':<40} {'STATUS':<9} {'AGENTS':>6} {'SPANS':>6} {'DEPTH':>5} {'HANDOFFS':>8} {'USD':>9} {'TOOLS':>6} {'RISK':>4}  INTENT"
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['session_id']:<40} {r['status']:<9} {r['agents']:>6} {r['spans']:>6} "
            f"{r['max_depth']:>5} {r['handoffs']:>8} {r['usd']:>9.4f} {r['tool_calls']:>6} "
            f"{r['session_risk']:>4}  {str(r['intent'])[:60]}"
        )
    return "\n".join(lines)


def delegation_tree(graph: dict[str, Any]) -> str:
    """The delegation graph as an indented tree, roots first."""
    nodes = {n["id"]: n for n in graph["nodes"]}
    children: dict[str, list[str]] = defaultdict(list)
    tasks: dict[tuple[str, str], str] = {}
    for e in graph["edges"]:
        children[e["source"]].append(e["target"])
        tasks[(e["source"], e["target"])] = e.get("task", "")
    roots = [n for n in nodes if not nodes[n]["parent_id"] or nodes[n]["parent_id"] not in nodes]
    lines: list[str] = []

    def label(agent_id: str, parent: str | None) -> str:
        n = nodes[agent_id]
        role = f" [{n['role']}]" if n.get("role") else ""
        task = tasks.get((parent, agent_id), "") if parent else ""
        task_txt = f"  task: {task!r}" if task else ""
        return f"{n['name'] or agent_id} ({agent_id}){role}  depth {n['depth']}  risk {risk_label(int(n['risk']))}{task_txt}"

    seen: set[str] = set()

    def walk(agent_id: str, parent: str | None, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└── " if last else "├── ")
        seen.add(agent_id)
        lines.append(prefix + branch + label(agent_id, parent))
        next_prefix = prefix if top else prefix + ("    " if last else "│   ")
        kids = sorted(k for k in children.get(agent_id, []) if k in nodes)
        for i, kid in enumerate(kids):
            end = i == len(kids) - 1
            if nodes[kid]["parent_id"] == agent_id and kid not in seen:
                walk(kid, agent_id, next_prefix, end, False)
            else:  # a further edge: work handed (back) to an agent shown elsewhere
                n = nodes[kid]
                lines.append(
                    next_prefix + ("└── " if end else "├── ") + f"↩ {n['name'] or kid} ({kid})"
                )

    for root in sorted(roots):
        walk(root, None, "", True, True)
    return "\n".join(lines)


def audit_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'TIME':<27} {'AGENT':<28} {'PARENT':<28} {'RISK':>4}  COMMAND"]
    for r in rows:
        lines.append(
            f"{str(r['time'])[:26]:<27} {r['agent_id']:<28} {r['parent_id'] or '-':<28} "
            f"{r['risk']:>4}  {r['command'] or r['tool']}"
        )
    return "\n".join(lines)


def _epoch(value: Any) -> float:
    """A time from the API (epoch seconds, or ISO text in UTC from ClickHouse) as epoch."""
    if isinstance(value, (int, float)):
        return float(value)
    parsed = datetime.fromisoformat(str(value))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _decision_word(record: dict[str, Any]) -> str:
    outcome, reason = record["outcome"], record.get("reason") or ""
    word = {"allow": "allowed", "stop": "stopped", "approval_required": "approval"}.get(
        outcome, outcome
    )
    return f"{word}: {reason}" if reason else word


def audit_commands(
    commands: list[dict[str, Any]], decisions: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Commands that ran (their spans) joined with the governor's decision on each, plus
    the commands it refused that never ran, in time order."""
    tool_records = [d for d in decisions if d["phase"] == "tool"]
    pending: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for d in tool_records:
        detail = d.get("detail") or {}
        key = (str(d["from_agent"]), str(detail.get("command") or detail.get("tool") or ""))
        pending[key].append(d)
    rows: list[dict[str, Any]] = []
    for c in commands:
        queue = pending.get((str(c["agent_id"]), str(c["command"] or c["tool"])))
        # the first decision on the same agent and command is the one the span ran under
        decided = queue.pop(0) if queue else None
        rows.append(
            {
                "time": _epoch(c["time"]),
                "agent_id": c["agent_id"],
                "parent_id": c.get("parent_id") or "",
                "risk": int(c["risk"]),
                "decision": _decision_word(decided) if decided else "-",
                "ran": decided is None or decided["outcome"] == "allow",
                "command": c["command"] or c["tool"],
            }
        )
    for queue in pending.values():
        for d in queue:
            if d["outcome"] == "allow":
                continue  # allowed, its span not stored (yet): the decisions list has it
            detail = d.get("detail") or {}
            rows.append(
                {
                    "time": _epoch(d["time"]),
                    "agent_id": d["from_agent"],
                    "parent_id": "",
                    "risk": int(detail.get("risk") or 0),
                    "decision": _decision_word(d),
                    "ran": False,
                    "command": detail.get("command") or detail.get("tool") or "",
                }
            )
    rows.sort(key=lambda r: r["time"])
    return rows


def full_audit(
    session_id: str,
    commands: list[dict[str, Any]],
    decisions: list[dict[str, Any]] | None,
    messages: list[dict[str, Any]],
    sections: tuple[str, ...] = ("commands", "decisions", "messages"),
) -> str:
    """A session's whole audit: commands (ran or refused), the governor's decisions and
    the inter-agent messages. ``decisions`` None: the governor never saw the session."""
    out: list[str] = []
    intent = next((c["intent"] for c in commands if c.get("intent")), "")
    out.append(f"session {session_id}" + (f"  intent {intent!r}" if intent else ""))
    if "commands" in sections:
        rows = audit_commands(commands, decisions or [])
        refused = sum(1 for r in rows if not r["ran"])
        out.append(f"\nCommands ({len(rows) - refused} ran, {refused} refused):")
        if not rows:
            out.append("  no commands")
        else:
            out.append(
                f"{'TIME':<29} {'AGENT':<28} {'PARENT':<28} {'RISK':>4}  {'DECISION':<32} COMMAND"
            )
            for r in rows:
                out.append(
                    f"{iso_time(r['time']):<29} {r['agent_id']:<28} {r['parent_id'] or '-':<28} "
                    f"{r['risk']:>4}  {r['decision'] if r['ran'] else 'REFUSED ' + r['decision']:<32}"
                    f" {r['command']}"
                )
    if "decisions" in sections:
        if decisions is None:
            out.append("\nDecisions: none recorded (the session ran without the governor)")
        else:
            out.append(f"\nDecisions of the governor ({len(decisions)} records):")
            out.append(
                f"{'TIME':<29} {'#':>4} {'PHASE':<13} {'OUTCOME':<18} {'REASON':<26} "
                f"{'OWNER':<14} WHO"
            )
            for d in decisions:
                detail = d.get("detail") or {}
                chain = detail.get("chain")
                if chain:
                    who = " → ".join(str(x) for x in chain)
                elif d.get("to_agent"):
                    who = f"{d['from_agent'] or 'human'} → {d['to_agent']}"
                else:
                    who = d.get("from_agent") or d.get("actor") or "-"
                what = detail.get("command") or detail.get("tool") or d.get("task") or ""
                if d["phase"] == "approval" and detail.get("approval_id"):
                    what = str(detail["approval_id"])
                    if d.get("actor") and d["outcome"] != "requested":
                        what += f" by {d['actor']}"
                out.append(
                    f"{iso_time(d['time']):<29} {d['seq']:>4} {d['phase']:<13} "
                    f"{d['outcome']:<18} {d.get('reason') or '-':<26} {d.get('owner') or '-':<14} "
                    f"{who}" + (f"  ({what})" if what else "")
                )
    if "messages" in sections:
        out.append(f"\nInter-agent messages ({len(messages)}):")
        if not messages:
            out.append("  no messages")
        else:
            out.append(f"{'TIME':<29} {'INJECTION':>9} {'BYTES':>7}  FROM → TO  DIGEST")
            for m in messages:
                out.append(
                    f"{iso_time(m['time']):<29} {int(m['injection']):>9} {int(m['size']):>7}  "
                    f"{m['from_agent']} → {m['to_agent']}  {m['digest']}"
                )
    return "\n".join(out)


def causal_chain(command: dict[str, Any], graph: dict[str, Any]) -> str:
    """From a command back through every delegation to the human instruction."""
    nodes = {n["id"]: n for n in graph["nodes"]}
    lines = [
        f"command   {command['command']!r}  (risk {risk_label(int(command['risk']))}: {', '.join(command['risk_rules']) or 'no rule'})"
    ]
    for i, agent_id in enumerate(reversed(command["chain"])):
        n = nodes.get(agent_id, {})
        task = n.get("task") or ""
        via = f" for task {task!r}" if task else ""
        verb = "run by" if i == 0 else "delegated by"
        lines.append(f"  ← {verb} {n.get('name') or '?'} ({agent_id}){via}")
    lines.append(f"  ← on the human instruction {command['intent']!r}")
    return "\n".join(lines)


def decisions_table(rows: list[dict[str, Any]]) -> str:
    """The governor's decision records of a session, one line each."""
    lines = [f"  {'#':>3} {'PHASE':<13} {'OUTCOME':<18} {'REASON':<25} {'FROM → TO':<50}"]
    for r in rows:
        route = (
            f"{r['from_agent'] or 'human'} → {r['to_agent']}" if r["to_agent"] else r["from_agent"]
        )
        lines.append(
            f"  {r['seq']:>3} {r['phase']:<13} {r['outcome']:<18} {r['reason'] or '':<25} {route:<50}"
        )
    return "\n".join(lines)


def alerts_table(events: list[dict[str, Any]]) -> str:
    """One line per alert that fired, with what each of its actions did."""
    outcomes: dict[str, list[str]] = defaultdict(list)
    for e in events:
        if e["event"] in ("stopped", "approval_requested", "slack_sent", "slack_dropped"):
            what = e["event"].replace("_", " ")
            outcomes[e["alert_id"]].append(f"{what}: {e['status']}" if e["status"] else what)
    fired = sorted((e for e in events if e["event"] == "fired"), key=lambda e: e["time"])
    if not fired:
        return "  (no rule fired)"
    lines = []
    for e in fired:
        lines.append(f"  {e['rule']} ({e['severity']}): {e['message']}")
        for outcome in outcomes.get(e["alert_id"], []):
            lines.append(f"      → {outcome}")
    return "\n".join(lines)


def kill_report(result: dict[str, Any]) -> str:
    """What a kill did: each known agent of the session, and whether it stopped."""
    agents = result.get("agents") or []
    cancelled = len(result.get("cancelled_approvals") or [])
    lines = [
        f"killed {result['session_id']}: {result['acknowledged']} of "
        f"{result['running_at_kill']} running agents acknowledged the stop"
        + (f" within {result['waited_s']:g} s" if result.get("waited_s") else "")
        + f"; {cancelled} pending approvals cancelled"
    ]
    if not agents:
        lines.append(
            "no governed agent is known: agents of this session are refused at their "
            "next governed step and at start"
        )
    else:
        lines.append(f"{'AGENT':<44} {'AT THE KILL':<12} STOPPED")
        for a in agents:
            state = "running" if a["running_at_kill"] else "finished"
            if a["acknowledged"]:
                after = float(a["stopped_at"]) - float(result.get("killed_at") or a["stopped_at"])
                stopped = f"yes, {max(after, 0.0) * 1000:.0f} ms after the kill"
            else:
                stopped = "not yet" if a["running_at_kill"] else "-"
            lines.append(f"{a['agent_id']:<44} {state:<12} {stopped}")
    return "\n".join(lines)


def _items(values: list[Any], none: str = "none") -> str:
    return ", ".join(str(v) for v in values) if values else none


def blast_radius(radius: dict[str, Any]) -> str:
    """A plan's blast radius: the union first, then every capability by role."""
    spend = radius.get("max_spend_usd")
    calls = radius.get("max_tool_calls")
    lines = [
        f"blast radius: risk {risk_label(int(radius['risk']))}"
        f" ({_items(radius.get('risk_rules') or [], 'no rule')})",
        f"  agents        {radius['agents']} ({_items(radius.get('roles') or [])}), depth "
        f"{radius['max_depth']}, fan-out {radius['max_fanout']}",
        f"  max spend     {spend:g} USD" + (f", {calls} tool calls" if calls is not None else ""),
        f"  write scopes  {_items(radius.get('write_scopes') or [])}",
        f"  production    {_items(radius.get('production_targets') or [], 'no')}",
        f"  destructive   {_items(radius.get('destructive_tools') or [])}",
        f"  egress        {_items(radius.get('network_egress') or [])}",
        "capabilities:",
    ]
    for role in radius.get("capabilities") or []:
        lines.append(
            f"  {role['role']} (up to {role['max_agents']}, risk {role['risk']}): "
            f"permissions {_items(role['permissions'])}; tools {_items(role['tools'])}; "
            f"resources {_items(role['resources'])}; environments "
            f"{_items(role['environments'])}; egress {_items(role['egress'])}"
        )
    return "\n".join(lines)


def plan_view(view: dict[str, Any]) -> str:
    """A session's plan: status, approval, blast radius and drift."""
    lines = [f"plan of {view['session_id']}: {view['status']}"]
    if view.get("needs_approval"):
        lines.append(f"  needs a reviewer: {'; '.join(view['needs_approval'])}")
    approval = view.get("approval")
    if approval:
        if approval.get("approved_by"):
            lines.append(
                f"  approval {approval['approval_id']} by {approval['approved_by']} for "
                f"{approval['ttl_s']:g} s"
            )
        else:
            lines.append(f"  approval {approval['approval_id']}")
    lines.append(blast_radius(view["blast_radius"]))
    drift = view.get("drift") or []
    lines.append(f"drift: {view.get('drift_count', len(drift))} steps outside the plan")
    for d in drift:
        lines.append(
            f"  #{d['seq']:<4} {d['phase']:<12} {d['agent_id']:<32} {d['outcome']:<18} "
            f"{'; '.join(d['items'])}"
        )
    return "\n".join(lines)


def approval_line(a: dict[str, Any]) -> str:
    """One approval request; a plan's shows what approving it grants."""
    head = f"{a['approval_id']}  {a['session_id']}  {a['kind']:<8}"
    if a["kind"] != "plan":
        return f"{head} by {a['requested_by']}: {json.dumps(a['request'])}"
    request = a["request"]
    return "\n".join(
        [
            f"{head} {request.get('intent') or ''!r}: {'; '.join(request.get('needs_approval', []))}",
            *("    " + line for line in blast_radius(request["blast_radius"]).splitlines()),
            f"    approve for a stated time: uv run agentgov approve {a['approval_id']} --ttl 1h",
        ]
    )


def iso_time(when: Any) -> str:
    """A time (epoch seconds or ISO text) as the CLI shows every time: ISO 8601 in UTC,
    to the millisecond."""
    if when is None or when == "":
        return "-"
    return datetime.fromtimestamp(_epoch(when), UTC).isoformat(timespec="milliseconds")


def age(seconds: float) -> str:
    """A duration as a person reads it at a glance: 42s, 3m10s, 2h05m, 3d02h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86_400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86_400}d{s % 86_400 // 3600:02d}h"


def approval_what(a: dict[str, Any]) -> str:
    """What an approval asks for, in words: the delegation with its permissions, the tool
    call with its command, the plan, or the requests a session-level approval folds."""
    r = a.get("request") or {}
    kind = a.get("kind")
    if kind == "handoff":
        perms = r.get("permissions")
        if perms is None:
            granted = "its parent's permissions"
        else:
            granted = ", ".join(str(p) for p in perms) or "no permissions"
        task = f" for {r['task']!r}" if r.get("task") else ""
        return f"delegate to {r.get('to_agent')}{task} with {granted}"
    if kind == "tool":
        command = f": {r['command']}" if r.get("command") else ""
        return f"tool {r.get('tool')}{command}"
    if kind == "session":
        return f"all {len(r.get('covers') or [])} pending requests of the session"
    if kind == "plan":
        return f"the session's plan {r.get('intent') or ''!r}"
    return json.dumps(r)[:120]


def approval_reason(a: dict[str, Any]) -> str:
    r = a.get("request") or {}
    if a.get("kind") == "plan":
        return "; ".join(r.get("needs_approval") or []) or "plan"
    reason = str(r.get("reason") or "")
    if r.get("out_of_scope"):
        reason = (reason + ": " if reason else "") + "; ".join(r["out_of_scope"])
    return reason or "-"


def approvals_table(rows: list[dict[str, Any]], now: float, status: str = "pending") -> str:
    """Approvals as reviewers read them: one row each, the plan's blast radius under it."""
    if not rows:
        return f"no {status} approvals"
    lines = [
        f"{'APPROVAL':<21} {'AGE':>7} {'SESSION':<40} {'KIND':<7} {'RISK':>4}  "
        "AGENT CHAIN / WHAT / REASON"
    ]
    for a in rows:
        chain = " → ".join(a.get("chain") or [a.get("requested_by") or "-"])
        lines.append(
            f"{a['approval_id']:<21} {age(now - float(a['created'])):>7} "
            f"{a['session_id']:<40} {a['kind']:<7} {int(a.get('session_risk') or 0):>4}  {chain}"
        )
        lines.append(f"{'':<21} {'':>7} what:   {approval_what(a)}")
        lines.append(f"{'':<21} {'':>7} reason: {approval_reason(a)}")
        if status != "pending":
            by = f" by {a['approver']}" if a.get("approver") else ""
            lines.append(f"{'':<21} {'':>7} {a['status']}{by} at {iso_time(a.get('decided_at'))}")
        if a["kind"] == "plan" and isinstance((a.get("request") or {}).get("blast_radius"), dict):
            lines.extend(f"{'':<29}" + line for line in approval_line(a).splitlines()[1:])
    return "\n".join(lines)


def simulation(report: dict[str, Any]) -> str:
    """What a candidate policy would have changed, in total and per session."""
    totals = report["totals"]

    def counts(values: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(values.items())) or "none"

    lines = [
        f"replayed {report['sessions']} sessions ({report['steps']} steps, "
        f"{report['records']} records) in {report['elapsed_s']:.2f} s under a candidate "
        f"policy (mode {report['mode']}); {report['changed_sessions']} sessions would change",
        f"  new stops         {counts(totals['new_stops'])}",
        f"  new approvals     {counts(totals['new_approvals'])}",
        f"  lifted stops      {counts(totals['lifted_stops'])}",
        f"  lifted approvals  {counts(totals['lifted_approvals'])}",
        f"  not reached       {totals['not_reached']} steps of agents that would not start",
    ]
    for s in report["sessions_changed"]:
        lines.append(
            f"{s['session_id']}: new stops {counts(s['new_stops'])}; new approvals "
            f"{counts(s['new_approvals'])}; lifted stops {counts(s['lifted_stops'])}; "
            f"lifted approvals {counts(s['lifted_approvals'])}; not reached {s['not_reached']}"
        )
        for c in s["changes"]:
            rec, cand = c["recorded"], c["candidate"]
            lines.append(
                f"  #{c['seq']:<4} {c['phase']:<12} {c['agent_id'] or 'human'} -> "
                f"{c['target'][:60]}: {rec['outcome']}"
                + (f" ({rec['reason']})" if rec["reason"] else "")
                + f" -> {cand['outcome']}"
                + (f" ({cand['reason']})" if cand["reason"] else "")
            )
    return "\n".join(lines)
