"""`/v1/files`: upload (purpose `batch`), look up, download and delete files, as OpenAI's API."""

from __future__ import annotations

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse

from ...errors import UsageError
from .common import int_param

PURPOSES = ("batch",)


def _files(request: Request):  # noqa: ANN202 - integrations.batches.Files
    return request.app.state.batches.files


async def upload(request: Request) -> JSONResponse:
    """A multipart upload (`file`, `purpose`)."""
    async with request.form(max_files=1, max_fields=8) as form:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose not in PURPOSES:
            raise UsageError(f"purpose: only {', '.join(PURPOSES)} is accepted, not {purpose!r}")
        if upload is None or isinstance(upload, str):
            raise UsageError("file: a file part is required (multipart/form-data)")
        made = await to_thread.run_sync(_files(request).create, upload.filename or "upload.jsonl",
                                        purpose, upload.file)
    return JSONResponse(made)


async def list_files(request: Request) -> JSONResponse:
    """Files newest first, paginated with `limit` and `after`."""
    listed = await to_thread.run_sync(
        _files(request).list, request.query_params.get("purpose"),
        int_param(request, "limit", 100, 1, 10_000), request.query_params.get("after"))
    return JSONResponse(listed)


async def one_file(request: Request) -> JSONResponse:
    """One file object."""
    return JSONResponse(await to_thread.run_sync(_files(request).get,
                                                 request.path_params["file_id"]))


async def content(request: Request) -> FileResponse:
    """The file's bytes."""
    path = await to_thread.run_sync(_files(request).path, request.path_params["file_id"])
    return FileResponse(path, media_type="application/jsonl")


async def delete(request: Request) -> JSONResponse:
    """Delete a file."""
    return JSONResponse(await to_thread.run_sync(_files(request).delete,
                                                 request.path_params["file_id"]))
