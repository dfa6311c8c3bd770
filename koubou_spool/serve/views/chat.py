"""`POST /v1/chat/completions`: a request becomes a task in the spool, and its outcome the answer.

Durable: the task is queued before anything is answered, so it survives a restart of the
server and of the workers; a client that retries with the same `Idempotency-Key` header waits
for the same task instead of queueing another. A stream gets the same answer, as chunks, once
it is done, with SSE comments as keep-alives meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ...integrations import chat
from ...spool.task import new_id
from .common import error, read_json, workshop

log = logging.getLogger(__name__)


def task_id_for(request: Request) -> str:
    """A fresh id, or one derived from the client's Idempotency-Key (same key, same task)."""
    key = request.headers.get("idempotency-key")
    if key:
        return "chat-" + hashlib.sha256(key.encode()).hexdigest()[:40]
    return "chat-" + new_id()


async def create(request: Request) -> Response:
    """Queue the request, then answer with its outcome (or stream it)."""
    shop = workshop(request)
    body = chat.check_body(await read_json(request))
    config = await to_thread.run_sync(shop.config)
    craftsman = chat.resolve_model(body.get("model"), config)
    task_id = task_id_for(request)
    fields = chat.task_fields(body, task_id, craftsman)
    refused = chat.refusal(await to_thread.run_sync(shop.route, fields), craftsman)
    if refused is not None:
        raise refused
    await to_thread.run_sync(shop.submit, fields)
    headers = {"x-koubou-task-id": task_id}
    wait_s = request.app.state.settings.wait_s
    if body.get("stream"):
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_stream(request, task_id, wait_s, usage),
                                 media_type="text/event-stream",
                                 headers=headers | {"cache-control": "no-cache"})
    outcome = await request.app.state.events.outcome(task_id, wait_s)
    log.info("chat completion %s (%s): %s", task_id, craftsman,
             (outcome or {}).get("status", "not finished in time"))
    return _answer(task_id, outcome, wait_s, headers)


def _answer(task_id: str, outcome: dict[str, Any] | None, wait_s: float,
            headers: dict[str, str]) -> Response:
    if outcome is None:
        return error(504, _unfinished(task_id, wait_s), "timeout", code="timeout",
                     headers=headers)
    if outcome.get("status") == "completed":
        return JSONResponse(chat.completion(task_id, outcome), headers=headers)
    status, body = chat.error_of(outcome)
    return JSONResponse(body, status, headers=headers)


def _unfinished(task_id: str, wait_s: float) -> str:
    return (f"task {task_id} did not finish within serve.wait_s ({wait_s:g} s); it goes on: "
            f"GET /api/tasks/{task_id} or `koubou result {task_id}`")


def _event(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _stream(request: Request, task_id: str, wait_s: float,
                  usage: bool) -> AsyncIterator[bytes]:
    events, keepalive = request.app.state.events, request.app.state.settings.keepalive_s
    waited, outcome = 0.0, None
    yield b": queued " + task_id.encode() + b"\n\n"
    while outcome is None and waited < wait_s:
        step = min(keepalive, wait_s - waited)
        outcome = await events.outcome(task_id, step)
        waited += step
        if outcome is None:
            yield b": keep-alive\n\n"
    if outcome is None:
        yield _event(chat.error_body(_unfinished(task_id, wait_s), "timeout", code="timeout"))
    elif outcome.get("status") == "completed":
        for chunk in chat.chunks(chat.completion(task_id, outcome), usage):
            yield _event(chunk)
    else:
        yield _event(chat.error_of(outcome)[1])
    yield b"data: [DONE]\n\n"
