"""Permission matching: whether one grant includes another.

Shared by the agent side (a handoff's receiver may only narrow what it was given) and the
governor (a child's permissions must be covered by its parent's and its role's).
"""

from __future__ import annotations

from collections.abc import Sequence


def covers(grant: str, want: str) -> bool:
    """Whether permission ``grant`` includes ``want``.

    Equal strings; ``*`` and trailing-``*`` wildcards; and ``scope:path`` grants cover the
    same scope on the same path or below it (``fs.write:/opt/app`` covers
    ``fs.write:/opt/app/logs``, not ``fs.write:/opt/application``).
    """
    if grant == want or grant == "*":
        return True
    if grant.endswith("*"):
        return want.startswith(grant[:-1])
    g_scope, g_sep, g_path = grant.partition(":")
    w_scope, w_sep, w_path = want.partition(":")
    if g_sep and w_sep and g_scope == w_scope and g_path:
        base = g_path.rstrip("/")
        return w_path == base or w_path.startswith(base + "/")
    return False


def uncovered(wanted: Sequence[str], grants: Sequence[str]) -> list[str]:
    """The permissions in ``wanted`` that no grant covers."""
    return [w for w in wanted if not any(covers(g, w) for g in grants)]
