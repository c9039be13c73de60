"""Where the dashboards and the ClickHouse data-source definition are found and loaded.

The repository's ``dashboards/`` folder is the one source: Grafana's file provisioning
reads it in the compose stack, and ``agentgov dashboards push`` reads the same files. It is
found through ``AGENTGOV_DASHBOARDS_DIR`` or, failing that, next to the package source (an
editable install in a checkout, as in the Docker image).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DASHBOARDS_DIR_ENV = "AGENTGOV_DASHBOARDS_DIR"
#: the data-source provisioning file, relative to the dashboards folder
DATASOURCE_FILE = Path("provisioning") / "datasources" / "clickhouse.yaml"
PLUGIN_TYPE = "grafana-clickhouse-datasource"

# Grafana expands $VAR and ${VAR} in provisioning files; push does the same with its own
# environment, so one file serves both.
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class CatalogError(RuntimeError):
    """The dashboards folder or one of its files is missing or invalid; says which."""


def dashboards_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The dashboards folder: ``AGENTGOV_DASHBOARDS_DIR``, else the checkout's ``dashboards/``."""
    env = os.environ if environ is None else environ
    configured = env.get(DASHBOARDS_DIR_ENV)
    if configured:
        folder = Path(configured).expanduser()
        if not (folder / DATASOURCE_FILE).is_file():
            raise CatalogError(
                f"{DASHBOARDS_DIR_ENV}={configured} has no {DATASOURCE_FILE}: point it at the "
                "repository's dashboards/ folder"
            )
        return folder
    # collector/src/agentgov/collector/dashboards/catalog.py -> the repository root
    checkout = Path(__file__).resolve().parents[5] / "dashboards"
    if (checkout / DATASOURCE_FILE).is_file():
        return checkout
    raise CatalogError(
        "cannot find the dashboards folder next to the installed package: run agentgov from a "
        f"checkout of the repository, or set {DASHBOARDS_DIR_ENV} to its dashboards/ folder"
    )


@dataclass(frozen=True)
class DashboardFile:
    """One dashboard JSON file and its model."""

    path: Path
    model: dict[str, Any]

    @property
    def uid(self) -> str:
        return str(self.model["uid"])

    @property
    def title(self) -> str:
        return str(self.model["title"])


def load_dashboards(folder: Path) -> list[DashboardFile]:
    """Every ``*.json`` dashboard in ``folder`` (not its subfolders), sorted by file name."""
    found: list[DashboardFile] = []
    uids: dict[str, Path] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            model = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise CatalogError(f"{path}: not a readable JSON dashboard ({exc})") from exc
        if not isinstance(model, dict) or not model.get("uid") or not model.get("title"):
            raise CatalogError(f"{path}: a dashboard needs a 'uid' and a 'title'")
        uid = str(model["uid"])
        if uid in uids:
            raise CatalogError(f"{path}: uid {uid!r} is already used by {uids[uid]}")
        uids[uid] = path
        found.append(DashboardFile(path, model))
    if not found:
        raise CatalogError(f"{folder}: no dashboard JSON files")
    return found


@dataclass(frozen=True)
class DataSourceDefinition:
    """The ClickHouse data source as the provisioning file defines it.

    ``secure_json_data`` keeps its environment references (``${CLICKHOUSE_PASSWORD}``):
    secrets are read from the environment only when a payload is built.
    """

    name: str
    uid: str
    type: str
    json_data: dict[str, Any]
    secure_json_data: dict[str, str] = field(default_factory=dict)

    def secrets(self, environ: Mapping[str, str]) -> dict[str, str]:
        """``secure_json_data`` with its environment references resolved."""
        return {
            k: expand_env(v, environ, f"secureJsonData.{k}")
            for k, v in self.secure_json_data.items()
        }


def expand_env(value: str, environ: Mapping[str, str], where: str) -> str:
    """``value`` with ``$VAR`` and ``${VAR}`` replaced from ``environ`` (as Grafana does)."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in environ:
            raise CatalogError(
                f"{name} is not set; the data source's {where} comes from it: export {name}"
            )
        return environ[name]

    return _ENV_REF.sub(sub, value)


def load_datasource(folder: Path) -> DataSourceDefinition:
    """The ClickHouse data source of ``folder``'s provisioning file."""
    path = folder / DATASOURCE_FILE
    try:
        doc = yaml.safe_load(path.read_text("utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CatalogError(
            f"{path}: cannot read the data-source provisioning file ({exc})"
        ) from exc
    sources = doc.get("datasources") if isinstance(doc, dict) else None
    for entry in sources or []:
        if isinstance(entry, dict) and entry.get("type") == PLUGIN_TYPE:
            if not entry.get("uid") or not entry.get("name"):
                raise CatalogError(f"{path}: the {PLUGIN_TYPE} data source needs a uid and a name")
            secure = entry.get("secureJsonData") or {}
            return DataSourceDefinition(
                name=str(entry["name"]),
                uid=str(entry["uid"]),
                type=PLUGIN_TYPE,
                json_data=dict(entry.get("jsonData") or {}),
                secure_json_data={str(k): str(v) for k, v in secure.items()},
            )
    raise CatalogError(f"{path}: no data source of type {PLUGIN_TYPE}")
