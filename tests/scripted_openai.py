"""A scripted OpenAI-compatible model server on 127.0.0.1, for recording offline.

Frameworks talk to it through their ordinary OpenAI clients (``base_url`` pointed here).
A recorder supplies ``reply(request) -> Reply``: given the chat-completions request (its
``messages`` and ``tools``), say what the model answers: text, or tool calls. Both plain
and streamed (``"stream": true``) chat completions are served; ``/v1/responses`` (the
Responses API) is served too, for clients that use it.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reply:
    """What the model says: ``text``, or ``tool_calls`` (then ``text`` is usually empty)."""

    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    prompt_tokens: int = 50
    completion_tokens: int = 10


Script = Callable[[dict[str, Any]], Reply]


def last_user_text(request: dict[str, Any]) -> str:
    """The text of the last user message of a chat-completions request."""
    for message in reversed(request.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


def system_text(request: dict[str, Any]) -> str:
    """The system (or developer) prompt of a chat-completions request."""
    parts = []
    for message in request.get("messages", []):
        if message.get("role") in ("system", "developer"):
            content = message.get("content")
            if isinstance(content, list):
                parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
            else:
                parts.append(str(content or ""))
    return "\n".join(parts)


def tool_names(request: dict[str, Any]) -> list[str]:
    """The names of the tools a request offers the model."""
    out = []
    for tool in request.get("tools") or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        name = (fn or tool).get("name") if isinstance(tool, dict) else None
        if name:
            out.append(str(name))
    return out


def tool_results(request: dict[str, Any]) -> list[str]:
    """Contents of the tool-result messages so far (what earlier tool calls returned)."""
    return [
        str(m.get("content") or "") for m in request.get("messages", []) if m.get("role") == "tool"
    ]


def _completion(model: str, reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": f"call_{secrets.token_hex(8)}",
                "type": "function",
                "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
            }
            for c in reply.tool_calls
        ]
    return {
        "id": f"chatcmpl-{secrets.token_hex(8)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if reply.tool_calls else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        },
    }


def _chunks(completion: dict[str, Any]) -> list[dict[str, Any]]:
    """The same completion as streamed chunks: role, content, tool calls, finish, usage."""
    choice = completion["choices"][0]
    message = choice["message"]
    base = {k: completion[k] for k in ("id", "created", "model")}
    base["object"] = "chat.completion.chunk"
    out = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    if message.get("content"):
        out.append({**base, "choices": [{"index": 0, "delta": {"content": message["content"]}}]})
    for i, call in enumerate(message.get("tool_calls") or []):
        delta = {"tool_calls": [{"index": i, **call}]}
        out.append({**base, "choices": [{"index": 0, "delta": delta}]})
    out.append(
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]}
    )
    out.append({**base, "choices": [], "usage": completion["usage"]})
    return out


def _as_chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses API request seen as a chat-completions request (for the script)."""
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    for item in items or []:
        kind = item.get("type")
        if kind == "function_call_output":
            messages.append({"role": "tool", "content": str(item.get("output", ""))})
        elif kind == "function_call":
            messages.append({"role": "assistant", "content": None, "tool_calls": [item]})
        elif item.get("role"):
            content = item.get("content")
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            messages.append({"role": item["role"], "content": content})
    tools = [{"type": "function", "function": t} for t in body.get("tools") or []]
    return {"model": body.get("model", ""), "messages": messages, "tools": tools}


def _response(model: str, reply: Reply) -> dict[str, Any]:
    output: list[dict[str, Any]] = []
    for c in reply.tool_calls:
        output.append(
            {
                "type": "function_call",
                "id": f"fc_{secrets.token_hex(8)}",
                "call_id": f"call_{secrets.token_hex(8)}",
                "name": c.name,
                "arguments": json.dumps(c.arguments),
                "status": "completed",
            }
        )
    if reply.text or not output:
        output.append(
            {
                "type": "message",
                "id": f"msg_{secrets.token_hex(8)}",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": reply.text, "annotations": []}],
            }
        )
    return {
        "id": f"resp_{secrets.token_hex(8)}",
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": "completed",
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": reply.prompt_tokens,
            "output_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


class ScriptedOpenAI:
    """The server. ``base_url`` is what an OpenAI client takes (it ends in ``/v1``)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        #: every chat request the model was asked, in order (for the recorder's checks)
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                path = self.path.split("?", 1)[0].rstrip("/")
                if path.endswith("/responses"):
                    request = _as_chat_request(body)
                    server.requests.append(request)
                    self._json(_response(body.get("model", ""), server.script(request)))
                    return
                if not path.endswith("/chat/completions"):
                    self._json({"error": {"message": f"no route {path}"}}, 404)
                    return
                server.requests.append(body)
                completion = _completion(body.get("model", ""), server.script(body))
                if body.get("stream"):
                    self._stream(_chunks(completion))
                else:
                    self._json(completion)

            def do_GET(self) -> None:
                self._json({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

            def _json(self, data: dict[str, Any], status: int = 200) -> None:
                out = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def _stream(self, chunks: list[dict[str, Any]]) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for chunk in [*(f"data: {json.dumps(c)}\n\n" for c in chunks), "data: [DONE]\n\n"]:
                    data = chunk.encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> ScriptedOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
