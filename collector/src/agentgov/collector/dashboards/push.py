"""Creates or updates the ClickHouse data source, the folder and the dashboards on a Grafana
server through the official ``grafana-client`` library.

Pushing twice changes nothing the second time but versions: everything is addressed by its
fixed uid, so existing objects are updated in place and nothing is created twice.
Credentials come from the environment only: ``GRAFANA_TOKEN`` (a service account token), or
``GRAFANA_USER`` and ``GRAFANA_PASSWORD``; the ClickHouse password from the variable the
provisioning file names (``CLICKHOUSE_PASSWORD``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from grafana_client import GrafanaApi
from grafana_client.client import (
    GrafanaClientError,
    GrafanaException,
    GrafanaServerError,
    GrafanaTimeoutError,
    GrafanaUnauthorizedError,
)

from agentgov.collector.dashboards.catalog import (
    CatalogError,
    DataSourceDefinition,
    dashboards_dir,
    load_dashboards,
    load_datasource,
)

T = TypeVar("T")

CREDENTIALS_HINT = (
    "set GRAFANA_TOKEN to a service account token (role Admin: creating data sources needs "
    "it), or GRAFANA_USER and GRAFANA_PASSWORD"
)


class PushError(RuntimeError):
    """A push step failed; the message says which step, what Grafana said and the fix."""


@dataclass(frozen=True)
class Change:
    """What one push did to one object: ``created``, ``updated`` or ``unchanged``."""

    kind: str  # data source, folder, dashboard
    uid: str
    action: str
    url: str = ""


@dataclass(frozen=True)
class ClickHouseTarget:
    """ClickHouse as Grafana reaches it (the data source's connection settings)."""

    protocol: str  # native or http
    host: str
    port: int
    secure: bool
    username: str
    database: str


_SCHEMES = {
    # scheme: (plugin protocol, TLS, default port)
    "clickhouse": ("native", False, 9000),
    "clickhouses": ("native", True, 9440),
    "http": ("http", False, 8123),
    "https": ("http", True, 8443),
}


def parse_clickhouse_url(url: str) -> ClickHouseTarget:
    """``clickhouse://user@host:9000/db`` (native; ``clickhouses://`` with TLS) or
    ``http(s)://user@host:8123/db``. The password never goes in the URL."""
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise PushError(
            f"--clickhouse-url {url!r}: use clickhouse://user@host:9000/database (native "
            "protocol), clickhouses:// for TLS, or http(s)://user@host:8123/database"
        )
    if parts.password is not None:
        raise PushError(
            "--clickhouse-url carries a password: remove it from the URL and export "
            "CLICKHOUSE_PASSWORD instead (command lines are visible to other users)"
        )
    protocol, secure, default_port = _SCHEMES[parts.scheme]
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise PushError(f"--clickhouse-url {url!r}: {exc}") from exc
    return ClickHouseTarget(
        protocol=protocol,
        host=parts.hostname,
        port=port,
        secure=secure,
        username=parts.username or "default",
        database=parts.path.strip("/") or "default",
    )


def datasource_payload(
    definition: DataSourceDefinition,
    environ: Mapping[str, str],
    target: ClickHouseTarget | None = None,
) -> dict[str, Any]:
    """The data source as Grafana's API takes it, with secrets read from ``environ``."""
    json_data = copy.deepcopy(definition.json_data)
    if target is not None:
        json_data.update(
            host=target.host,
            port=target.port,
            protocol=target.protocol,
            secure=target.secure,
            username=target.username,
            defaultDatabase=target.database,
        )
        traces = json_data.get("traces")
        if isinstance(traces, dict):
            traces["defaultDatabase"] = target.database
    try:
        secrets = definition.secrets(environ)
    except CatalogError as exc:
        raise PushError(str(exc)) from exc
    return {
        "name": definition.name,
        "uid": definition.uid,
        "type": definition.type,
        "access": "proxy",
        "isDefault": False,
        "jsonData": json_data,
        "secureJsonData": secrets,
    }


def grafana_credentials(environ: Mapping[str, str]) -> str | tuple[str, str]:
    """A token (``GRAFANA_TOKEN``) or a (user, password) pair for basic auth."""
    token = environ.get("GRAFANA_TOKEN")
    if token:
        return token
    user, password = environ.get("GRAFANA_USER"), environ.get("GRAFANA_PASSWORD")
    if user and password is not None:
        return (user, password)
    raise PushError(f"no Grafana credentials in the environment: {CREDENTIALS_HINT}")


def connect(grafana_url: str, credentials: str | tuple[str, str], timeout: float) -> GrafanaApi:
    """A ``grafana-client`` API object for ``grafana_url`` (credentials never in the URL)."""
    parts = urlsplit(grafana_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PushError(
            f"--grafana-url {grafana_url!r}: give Grafana's root URL, e.g. http://localhost:3000"
        )
    if parts.username or parts.password:
        raise PushError(
            "--grafana-url carries credentials: remove them and export GRAFANA_TOKEN, or "
            "GRAFANA_USER and GRAFANA_PASSWORD"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise PushError(f"--grafana-url {grafana_url!r}: {exc}") from exc
    prefix = parts.path.strip("/")
    return GrafanaApi(
        auth=credentials,
        host=parts.hostname,
        port=port,
        protocol=parts.scheme,
        # grafana-client appends "api" to the prefix as is: a sub-path needs its slash
        url_path_prefix=f"{prefix}/" if prefix else "",
        timeout=timeout,
    )


class Pusher:
    """Pushes to one Grafana; every call says what it did."""

    def __init__(self, api: GrafanaApi, base_url: str, timeout: float) -> None:
        self.api = api
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _call(
        self, step: str, fn: Callable[..., T], *args: Any, absent_ok: bool = False, **kwargs: Any
    ) -> T | None:
        """Run one API call; every failure becomes a :class:`PushError` naming the fix.

        ``absent_ok``: a 404 answers None (the object does not exist yet).
        """
        try:
            return fn(*args, **kwargs)
        except GrafanaClientError as exc:
            if absent_ok and exc.status_code == 404:
                return None
            raise self._explain(step, exc) from exc
        except (GrafanaException, OSError) as exc:
            raise self._explain(step, exc) from exc

    def _explain(self, step: str, exc: Exception) -> PushError:
        if isinstance(exc, GrafanaUnauthorizedError):
            return PushError(
                f"Grafana refused the credentials while {step} (401): {CREDENTIALS_HINT}"
            )
        if isinstance(exc, GrafanaTimeoutError):
            return PushError(
                f"Grafana did not answer within {self.timeout:g} s while {step}: check "
                "--grafana-url, or allow more time with --timeout"
            )
        if isinstance(exc, GrafanaServerError):
            return PushError(
                f"Grafana failed while {step} ({exc.status_code}: {_message(exc)}); its server "
                "log says why"
            )
        if isinstance(exc, GrafanaClientError):
            if exc.status_code == 403:
                return PushError(
                    f"Grafana does not let this account do it while {step} "
                    f"(403: {_message(exc)}); use an account or service account with the "
                    "Admin role (a data source provisioned from files cannot be changed "
                    "through the API: edit its provisioning file instead)"
                )
            if exc.status_code == 404:
                return PushError(
                    f"Grafana answered 404 while {step}: is --grafana-url Grafana's root URL "
                    "(with its sub-path, when it is served under one)?"
                )
            return PushError(
                f"Grafana refused the request while {step} ({exc.status_code}: {_message(exc)})"
            )
        return PushError(
            f"cannot reach Grafana at {self.base_url} while {step} ({exc}): check "
            "--grafana-url and that Grafana is running"
        )

    def datasource(self, payload: dict[str, Any]) -> Change:
        uid = payload["uid"]
        ds = self.api.datasource
        existing = self._call(
            f"looking up data source {uid}", ds.get_datasource_by_uid, uid, absent_ok=True
        )
        if existing is None:
            self._call(f"creating data source {uid}", ds.create_datasource, payload)
            return Change("data source", uid, "created")
        self._call(f"updating data source {uid}", ds.update_datasource_by_uid, uid, payload)
        return Change("data source", uid, "updated")

    def folder(self, uid: str, title: str) -> Change:
        folders = self.api.folder
        existing = self._call(f"looking up folder {uid}", folders.get_folder, uid, absent_ok=True)
        if existing is None:
            self._call(f"creating folder {uid}", folders.create_folder, title, uid=uid)
            return Change("folder", uid, "created")
        if isinstance(existing, dict) and existing.get("title") != title:
            self._call(
                f"renaming folder {uid}", folders.update_folder, uid, title=title, overwrite=True
            )
            return Change("folder", uid, "updated")
        return Change("folder", uid, "unchanged")

    def dashboard(self, model: dict[str, Any], folder_uid: str) -> Change:
        uid = str(model["uid"])
        boards = self.api.dashboard
        existing = self._call(
            f"looking up dashboard {uid}", boards.get_dashboard, uid, absent_ok=True
        )
        body = {
            # the numeric id is per Grafana instance: the uid addresses the dashboard
            "dashboard": {**model, "id": None},
            "folderUid": folder_uid,
            "overwrite": True,
            "message": "agentgov dashboards push",
        }
        saved = self._call(f"saving dashboard {uid}", boards.update_dashboard, body)
        url = saved.get("url", "") if isinstance(saved, dict) else ""
        return Change(
            "dashboard",
            uid,
            "created" if existing is None else "updated",
            f"{self.base_url}{url}" if url.startswith("/") else url,
        )


def push(
    grafana_url: str,
    environ: Mapping[str, str],
    clickhouse_url: str | None = None,
    folder_title: str = "agentgov",
    folder_uid: str = "agentgov",
    timeout: float = 10.0,
    folder: Path | None = None,
) -> list[Change]:
    """Create or update the data source, the folder and every dashboard; return what changed.

    Everything is checked (files, credentials, secrets) before the first request.
    """
    try:
        source = folder or dashboards_dir(environ)
        dashboards = load_dashboards(source)
        definition = load_datasource(source)
    except CatalogError as exc:
        raise PushError(str(exc)) from exc
    target = parse_clickhouse_url(clickhouse_url) if clickhouse_url else None
    payload = datasource_payload(definition, environ, target)
    api = connect(grafana_url, grafana_credentials(environ), timeout)
    pusher = Pusher(api, grafana_url, timeout)
    changes = [pusher.datasource(payload), pusher.folder(folder_uid, folder_title)]
    changes += [pusher.dashboard(d.model, folder_uid) for d in dashboards]
    return changes


def _message(exc: GrafanaException) -> str:
    response = exc.response
    if isinstance(response, dict) and response.get("message"):
        return str(response["message"])
    return str(response or exc.message)
