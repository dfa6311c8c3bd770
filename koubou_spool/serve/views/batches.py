"""`/v1/batches`: create, look up, list and cancel batches, as OpenAI's Batch API."""

from __future__ import annotations

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse

from ...errors import UsageError
from ...spool.task import BATCH_URL
from .common import int_param, read_json


async def create(request: Request) -> JSONResponse:
    """A batch from an uploaded file; it runs in the background from `validating` on."""
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("input_file_id"), str):
        raise UsageError("input_file_id: required (the id of a file uploaded with purpose batch)")
    batch = await to_thread.run_sync(
        request.app.state.batches.create, body["input_file_id"],
        body.get("endpoint", BATCH_URL), body.get("completion_window", "24h"),
        body.get("metadata"))
    request.app.state.runner.drive(batch["id"])
    return JSONResponse(batch)


async def one_batch(request: Request) -> JSONResponse:
    """The batch with live request_counts."""
    return JSONResponse(await to_thread.run_sync(request.app.state.batches.get,
                                                 request.path_params["batch_id"]))


async def list_batches(request: Request) -> JSONResponse:
    """Batches newest first, paginated with `limit` (default 20) and `after`."""
    return JSONResponse(await to_thread.run_sync(
        request.app.state.batches.list, int_param(request, "limit", 20, 1, 100),
        request.query_params.get("after")))


async def cancel(request: Request) -> JSONResponse:
    """Cancel a batch: `cancelling`, then `cancelled` with the lines finished so far."""
    runner = request.app.state.runner
    batch = await to_thread.run_sync(request.app.state.batches.get,
                                     request.path_params["batch_id"])
    if batch["status"] in ("validating", "in_progress"):
        batch = runner.cancel(batch["id"])
    return JSONResponse(batch)
