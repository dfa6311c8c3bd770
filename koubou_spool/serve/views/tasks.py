"""REST for the spool (`/api/...`): submit, status, list, result, cancel, retry, workers,
report; and `/metrics` (Prometheus) and `/healthz`. JSON in and out; every call is one
Workshop method, run in a thread (they read files and the ledger)."""

from __future__ import annotations

from typing import Any

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse

from ...errors import InvalidTask
from .common import int_param, read_json, workshop


async def _call(request: Request, method: str, *args: Any) -> Any:
    return await to_thread.run_sync(getattr(workshop(request), method), *args)


async def submit(request: Request) -> JSONResponse:
    """Queue a task (the task format; `wait_s` to wait for it, as MCP's delegate_task)."""
    fields = await read_json(request)
    if not isinstance(fields, dict):
        raise InvalidTask("the body must be a task: a JSON object with at least `content`")
    wait_s = fields.pop("wait_s", 0)
    fields.setdefault("created_by", "serve")
    answer = await _call(request, "submit", fields)
    if isinstance(wait_s, (int, float)) and wait_s > 0 and answer["state"] == "pending":
        await request.app.state.events.outcome(answer["id"], min(float(wait_s),
                                                                 request.app.state.settings.wait_s))
        answer |= await _call(request, "result", answer["id"])
    return JSONResponse(answer, 201 if answer.get("new") else 200)


async def status(request: Request) -> JSONResponse:
    """One task: state, attempts, result or error, and the task itself (prompt, fields)."""
    found = await _call(request, "detail", request.path_params["task_id"])
    return JSONResponse(found)


async def result(request: Request) -> JSONResponse:
    """The outcome of a task, or its state; `?wait_s=` waits for it first."""
    task_id = request.path_params["task_id"]
    wait_s = int_param(request, "wait_s", 0, 0, int(request.app.state.settings.wait_s))
    if wait_s:
        await request.app.state.events.outcome(task_id, wait_s)
    return JSONResponse(await _call(request, "result", task_id))


async def list_tasks(request: Request) -> JSONResponse:
    """Tasks newest first; `state` and `limit` (default 50) filter. In a cluster, with the
    cluster's tasks of other origins and `cluster` (this host, or why it could not be read)."""
    found = await _call(request, "listing", request.query_params.get("state") or None,
                        int_param(request, "limit", 50, 1, 500))
    return JSONResponse(found)


async def cancel(request: Request) -> JSONResponse:
    """Cancel a pending or running task."""
    answer = await _call(request, "cancel", request.path_params["task_id"])
    return JSONResponse(answer, 200 if answer.get("cancelled") else 409)


async def retry(request: Request) -> JSONResponse:
    """Queue a failed task again."""
    return JSONResponse(await _call(request, "retry", request.path_params["task_id"]))


async def workers(request: Request) -> JSONResponse:
    """Queues, workers, in-flight tasks per craftsman, today's budget; in a cluster, every
    host's workers and `cluster` with each host's row."""
    return JSONResponse(await _call(request, "workers"))


async def report(request: Request) -> JSONResponse:
    """The report of `day`, `month` or `since` (default today)."""
    query = request.query_params
    return JSONResponse(await _call(request, "report", query.get("day"), query.get("month"),
                                    query.get("since")))


async def metrics(request: Request) -> PlainTextResponse:
    """The Prometheus text exposition."""
    return PlainTextResponse(await _call(request, "metrics"),
                             media_type="text/plain; version=0.0.4")


async def health(request: Request) -> JSONResponse:
    """Up; and which home (for `koubou doctor`), to a caller with the token."""
    if not request.scope.get("koubou.authorized"):
        return JSONResponse({"ok": True})
    return JSONResponse({"ok": True, "home": str(workshop(request).home)})
