"""A local HTTP server speaking the two Slack APIs the collector uses.

Slack cannot be reached from the tests, so this stands in for it on 127.0.0.1:
incoming webhooks (``POST /services/...``, answers ``ok``) and ``chat.postMessage``
(``POST /api/chat.postMessage`` with a bot token, answers ``{"ok": true, ...}``).
Failures are scripted: queue ``(status, headers, delay_s)`` answers with :meth:`script`,
or answer by content with ``responder(body)`` (None: the default 200).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs


@dataclass
class SlackRequest:
    at: float  # when the request arrived
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int


@dataclass
class FakeSlack:
    token: str = "xoxb-test-token-0000"
    requests: list[SlackRequest] = field(default_factory=list)
    responder: Callable[[dict[str, Any]], tuple[int, dict[str, str], float] | None] | None = None
    _script: deque[tuple[int, dict[str, str], float]] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    def start(self) -> FakeSlack:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                arrived = time.time()
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
                ctype = self.headers.get("Content-Type", "")
                if "json" in ctype:
                    body = json.loads(raw or b"{}")
                else:
                    body = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
                    if isinstance(body.get("blocks"), str):
                        body["blocks"] = json.loads(body["blocks"])
                with fake._lock:
                    if fake._script:
                        status, headers, delay = fake._script.popleft()
                    else:
                        answer = fake.responder(body) if fake.responder else None
                        status, headers, delay = answer or (200, {}, 0.0)
                if delay:
                    time.sleep(delay)
                if self.path.startswith("/api/"):
                    if self.headers.get("Authorization") != f"Bearer {fake.token}":
                        status = 200
                        payload = {"ok": False, "error": "invalid_auth"}
                    elif status == 200:
                        payload = {"ok": True, "channel": body.get("channel"), "ts": "1.0"}
                    else:
                        payload = {
                            "ok": False,
                            "error": "ratelimited" if status == 429 else "fatal_error",
                        }
                    data = json.dumps(payload).encode()
                    content_type = "application/json"
                else:
                    data = b"ok" if status == 200 else b"error"
                    content_type = "text/plain"
                with fake._lock:
                    fake.requests.append(
                        SlackRequest(arrived, self.path, dict(self.headers), body, status)
                    )
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a scripted timeout)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def webhook_url(self) -> str:
        return f"{self.url}/services/T000/B000/XXXX"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/"

    def script(self, *answers: tuple[int, dict[str, str], float]) -> None:
        with self._lock:
            self._script.extend(answers)

    def delivered(self) -> list[SlackRequest]:
        """Requests answered with success, in order of arrival."""
        with self._lock:
            return sorted((r for r in self.requests if r.status == 200), key=lambda r: r.at)

    def texts(self) -> list[str]:
        return [str(r.body.get("text", "")) for r in self.delivered()]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
