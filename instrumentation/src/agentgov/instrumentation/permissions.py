"""Permissions: their syntax, whether one grant includes another, and what counts as write.

One definition shared by the agent side (a handoff's receiver may only narrow what it was
given), the governor (a child's permissions must be covered by its parent's and its
role's; which delegations are high-risk) and the alert rules (whether a command ran under
a write grant). A permission is ``scope`` or ``scope:target``: ``fs.read:/opt/app``,
``db.write:orders``, ``http.get``, ``*``. Paths are compared in their normal form, and a
permission whose target climbs with ``..`` is refused outright: ``fs.read:/opt/app/../..``
must never pass as something below ``/opt/app``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import unquote

MAX_PERMISSION = 512

#: scope words that let the holder change or destroy things
WRITE_VERBS = frozenset({"write", "delete", "admin", "exec"})

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCOPE_WORDS = re.compile(r"[._/-]")
_PROD = re.compile(r"(^|[^a-z])prod(uction)?([^a-z]|$)", re.IGNORECASE)


class InvalidPermission(ValueError):
    """A permission string that cannot be judged safely (names the problem)."""


def _normal_path(path: str, permission: str) -> str:
    segments = path.replace("\\", "/").split("/")
    if any(unquote(s) == ".." for s in segments):
        raise InvalidPermission(
            f"permission {permission!r} climbs out of its path with '..': name the target "
            "directly (e.g. fs.read:/etc/shadow) so it is judged for what it is"
        )
    kept = [s for s in segments if s not in ("", ".")]
    return "/" + "/".join(kept) if path.startswith(("/", "\\")) else "/".join(kept)


def normalize(permission: str) -> str:
    """The normal form of ``permission``, or :class:`InvalidPermission` naming what is wrong.

    Refused: empty, longer than 512 characters, commas (lists travel comma-separated),
    control characters, and ``..`` segments in the target (also percent-encoded). Paths
    lose repeated and ``.`` segments and a trailing ``/``.
    """
    if not isinstance(permission, str) or not permission:
        raise InvalidPermission("a permission must be a non-empty string")
    if len(permission) > MAX_PERMISSION:
        raise InvalidPermission(f"permission longer than {MAX_PERMISSION} characters")
    if "," in permission or _CONTROL.search(permission):
        raise InvalidPermission(
            f"permission {permission!r} holds a comma or a control character: use one "
            "permission per list item, printable characters only"
        )
    scope, sep, target = permission.partition(":")
    if not sep:
        return permission
    if "/" in target or "\\" in target or unquote(target) == "..":
        target = _normal_path(target, permission)
    return f"{scope}:{target}"


def normalize_all(permissions: Sequence[str]) -> tuple[str, ...]:
    """Every permission in normal form (see :func:`normalize`)."""
    return tuple(normalize(p) for p in permissions)


def _glob(pattern: str, value: str) -> bool:
    return value.startswith(pattern[:-1]) if pattern.endswith("*") else pattern == value


def covers(grant: str, want: str) -> bool:
    """Whether permission ``grant`` includes ``want`` (both in any form; refused forms
    raise :class:`InvalidPermission`).

    Equal permissions; ``*`` and trailing-``*`` wildcards (``fs.*``, ``fs.read:/opt/*``);
    and ``scope:path`` grants cover the same scope on the same path or below it
    (``fs.write:/opt/app`` covers ``fs.write:/opt/app/logs``, not
    ``fs.write:/opt/application``).
    """
    grant, want = normalize(grant), normalize(want)
    if grant == want or grant == "*":
        return True
    g_scope, g_sep, g_target = grant.partition(":")
    w_scope, w_sep, w_target = want.partition(":")
    if not g_sep:
        return _glob(grant, want)
    if not w_sep or not _glob(g_scope, w_scope):
        return False
    if g_target.endswith("*"):
        return w_target.startswith(g_target[:-1])
    base = g_target.rstrip("/")
    return w_target == base or w_target.startswith(base + "/")


def uncovered(wanted: Sequence[str], grants: Sequence[str]) -> list[str]:
    """The permissions in ``wanted`` that no grant covers."""
    return [w for w in wanted if not any(covers(g, w) for g in grants)]


def is_write(permission: str) -> bool:
    """Whether ``permission`` lets its holder change things.

    A write verb among the scope's words (``fs.write``, ``db.delete``, ``admin``,
    ``shell.exec``) or as the bare target (``db:write``); and any wildcard in the scope
    (``*``, ``fs.*``, ``fs.write*``): a wildcard cannot be shown to stop short of write.
    """
    scope, _, target = permission.partition(":")
    if "*" in scope:
        return True
    words = {w.lower() for w in _SCOPE_WORDS.split(scope)}
    return bool(words & WRITE_VERBS) or target.lower() in WRITE_VERBS


def is_production(text: str) -> bool:
    """Whether ``text`` (a permission, a task, a resource) names production."""
    return bool(_PROD.search(text))


def write_granted(permissions: Sequence[str] | None, resources: Sequence[str]) -> bool:
    """Whether some write grant covers every resource (any write grant, if none is named).

    A grant ``fs.write:/opt/app`` covers ``/opt/app`` and what lies below it, also when
    the resource carries its own scheme (``file:/opt/app/x``); a grant without a target
    (``db.write``) or with a wildcard scope covers everything. No permissions: no grant.
    """
    if not permissions:
        return False
    grant_paths: list[str] = []
    for grant in permissions:
        if not is_write(grant):
            continue
        try:
            grant = normalize(grant)
        except InvalidPermission:
            continue  # a grant that climbs with '..' grants nothing
        scope, _, target = grant.partition(":")
        grant_paths.append("" if "*" in scope or target in WRITE_VERBS else target.rstrip("/*"))
    if not grant_paths:
        return False
    if not resources:
        return True

    def covered(resource: str) -> bool:
        candidates = []
        for r in (resource, resource.partition(":")[2]):
            try:
                candidates.append(normalize(f"r:{r}").partition(":")[2] if r else r)
            except InvalidPermission:
                return False  # a resource that climbs with '..' is never covered
        for path in grant_paths:
            if path == "":
                return True
            if any(r == path or r.startswith(path + "/") for r in candidates):
                return True
        return False

    return all(covered(r) for r in resources)
