"""Control events (kills, approval changes) fanned out to server-sent-event streams."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

_CLOSE = "__close__"


class ControlHub:
    """Per-session subscribers; publishing is safe from any thread."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: dict[str, set[asyncio.Queue[tuple[str, dict[str, Any]]]]] = {}
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def publish(self, kind: str, payload: dict[str, Any]) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._deliver(kind, payload)
        else:
            loop.call_soon_threadsafe(self._deliver, kind, payload)

    def _deliver(self, kind: str, payload: dict[str, Any]) -> None:
        session_id = str(payload.get("session_id", ""))
        with self._lock:
            queues = list(self._subscribers.get(session_id, ()))
        for q in queues:
            q.put_nowait((kind, payload))

    def close(self) -> None:
        """End every stream (on shutdown), so open connections do not hold it up."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def end_all() -> None:
            with self._lock:
                queues = [q for subs in self._subscribers.values() for q in subs]
            for q in queues:
                q.put_nowait((_CLOSE, {}))

        loop.call_soon_threadsafe(end_all)

    async def stream(
        self, session_id: str, first: list[tuple[str, dict[str, Any]]], heartbeat_s: float = 15.0
    ) -> AsyncIterator[bytes]:
        """Server-sent events for one session: ``first`` events, then live ones."""
        q: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        with self._lock:
            self._subscribers.setdefault(session_id, set()).add(q)
        try:
            for kind, payload in first:
                yield _sse(kind, payload)
            while True:
                try:
                    kind, payload = await asyncio.wait_for(q.get(), heartbeat_s)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                yield _sse(kind, payload)
        finally:
            with self._lock:
                subs = self._subscribers.get(session_id)
                if subs is not None:
                    subs.discard(q)
                    if not subs:
                        del self._subscribers[session_id]

    def subscribers(self, session_id: str) -> int:
        with self._lock:
            return len(self._subscribers.get(session_id, ()))


def _sse(kind: str, payload: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
