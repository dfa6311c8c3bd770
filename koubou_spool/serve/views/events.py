"""`GET /api/events`: spool changes as server-sent events, from inotify (never polling).

Each event is `event: task` with `{state, change, id, file, at}`; `event: overflow` means some
changes were lost and a client should reload what it shows. A comment every keepalive_s keeps
proxies from closing an idle stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import StreamingResponse


async def stream(request: Request) -> StreamingResponse:
    """The event stream, until the client goes away."""
    return StreamingResponse(_events(request), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


async def _events(request: Request) -> AsyncIterator[bytes]:
    events, keepalive = request.app.state.events, request.app.state.settings.keepalive_s
    queue = events.subscribe()
    try:
        yield b"retry: 2000\n: connected\n\n"
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), keepalive)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if event is None:
                return
            kind = "overflow" if event["change"] == "overflow" else "task"
            yield f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode()
    finally:
        events.unsubscribe(queue)
