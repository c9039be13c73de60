"""A small stand-in for the Grafana HTTP API: the endpoints ``agentgov dashboards push`` uses.

It keeps data sources, folders and dashboards in memory and answers the way Grafana does
(status codes, ``{"message": ...}`` bodies, dashboard versions), records every request
with its ``Authorization`` header, and can be told to fail the next request to a path.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    authorization: str
    body: Any


@dataclass
class GrafanaState:
    """What the fake Grafana holds and saw."""

    token: str
    user: str
    password: str
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    #: (method, path pattern) -> (status, message) for the next matching request
    failures: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)
    next_id: int = 1

    def writes(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests if r.method != "GET"]


class FakeGrafana:
    """The fake API on 127.0.0.1 in a background thread; use as a context manager."""

    def __init__(self, token: str, user: str, password: str) -> None:
        self.state = GrafanaState(token, user, password)
        self._lock = threading.Lock()
        handler = _handler(self.state, self._lock)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def fail_next(self, method: str, path_pattern: str, status: int, message: str) -> None:
        self.state.failures[(method, path_pattern)] = (status, message)

    def __enter__(self) -> FakeGrafana:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _handler(state: GrafanaState, lock: threading.Lock) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            pass

        def _reply(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self, header: str) -> bool:
            if header == f"Bearer {state.token}":
                return True
            basic = base64.b64encode(f"{state.user}:{state.password}".encode()).decode()
            return header == f"Basic {basic}"

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            path = self.path.split("?", 1)[0]
            header = self.headers.get("Authorization", "")
            with lock:
                state.requests.append(Request(method, path, header, body))
                if not self._authorized(header):
                    return self._reply(401, {"message": "Unauthorized"})
                for (m, pattern), (status, message) in list(state.failures.items()):
                    if m == method and re.fullmatch(pattern, path):
                        del state.failures[(m, pattern)]
                        return self._reply(status, {"message": message})
                status, answer = _route(state, method, path, body)
            self._reply(status, answer)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_PUT(self) -> None:
            self._serve("PUT")

    return Handler


def _route(state: GrafanaState, method: str, path: str, body: Any) -> tuple[int, Any]:
    m = re.fullmatch(r"/api/datasources/uid/([^/]+)", path)
    if m:
        uid = m.group(1)
        current = state.datasources.get(uid)
        if current is None:
            return 404, {"message": "Data source not found"}
        if method == "GET":
            shown = {k: v for k, v in current.items() if k != "secureJsonData"}
            return 200, {**shown, "secureJsonFields": {k: True for k in current["secureJsonData"]}}
        if method == "PUT":
            if body.get("uid") not in (None, uid) or body.get("type") != current["type"]:
                return 400, {"message": "uid and type of a data source cannot change"}
            secure = {**current["secureJsonData"], **(body.get("secureJsonData") or {})}
            current.update(body, secureJsonData=secure, version=current["version"] + 1)
            return 200, {"message": "Datasource updated", "id": current["id"], "name": body["name"]}
    if path == "/api/datasources" and method == "POST":
        if any(d["name"] == body["name"] for d in state.datasources.values()):
            return 409, {"message": "data source with the same name already exists"}
        ds = {**body, "id": state.next_id, "version": 1}
        ds.setdefault("secureJsonData", {})
        state.next_id += 1
        state.datasources[body["uid"]] = ds
        return 200, {"message": "Datasource added", "id": ds["id"], "datasource": ds}

    m = re.fullmatch(r"/api/folders/([^/]+)", path)
    if m:
        uid = m.group(1)
        folder = state.folders.get(uid)
        if folder is None:
            return 404, {"message": "folder not found"}
        if method == "GET":
            return 200, folder
        if method == "PUT":
            folder.update(title=body["title"], version=folder["version"] + 1)
            return 200, folder
    if path == "/api/folders" and method == "POST":
        uid = body.get("uid")
        if uid in state.folders:
            return 409, {"message": "a folder with the same uid already exists"}
        folder = {"uid": uid, "title": body["title"], "id": state.next_id, "version": 1}
        state.next_id += 1
        state.folders[uid] = folder
        return 200, folder

    m = re.fullmatch(r"/api/dashboards/uid/([^/]+)", path)
    if m and method == "GET":
        saved = state.dashboards.get(m.group(1))
        if saved is None:
            return 404, {"message": "Dashboard not found"}
        return 200, {"dashboard": saved["dashboard"], "meta": {"folderUid": saved["folderUid"]}}
    if path == "/api/dashboards/db" and method == "POST":
        model = body.get("dashboard") or {}
        uid = model.get("uid")
        if not uid or not model.get("title"):
            return 400, {"message": "Dashboard title cannot be empty"}
        if body.get("folderUid") not in state.folders:
            return 400, {"message": "folder not found"}
        previous = state.dashboards.get(uid)
        if previous is not None and not body.get("overwrite"):
            return 412, {"message": "The dashboard has been changed by someone else"}
        version = previous["version"] + 1 if previous else 1
        dash_id = previous["id"] if previous else state.next_id
        if previous is None:
            state.next_id += 1
        state.dashboards[uid] = {
            "dashboard": {**model, "id": dash_id, "version": version},
            "folderUid": body["folderUid"],
            "version": version,
            "id": dash_id,
        }
        slug = re.sub(r"[^a-z0-9]+", "-", model["title"].lower()).strip("-")
        return 200, {
            "id": dash_id,
            "uid": uid,
            "url": f"/d/{uid}/{slug}",
            "status": "success",
            "version": version,
        }
    return 404, {"message": "Not found"}
