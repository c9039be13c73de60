"""Text renderings for the terminal: session tables, delegation trees, causal chains."""

from __future__ import annotations

from collections import defaultdict
from typing import Any


def risk_label(score: int) -> str:
    if score >= 70:
        return f"{score} HIGH"
    if score >= 40:
        return f"{score} MEDIUM"
    return f"{score} low"


def sessions_table(rows: list[dict[str, Any]]) -> str:
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
