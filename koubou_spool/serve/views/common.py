"""What every view shares: the workshop of the app, JSON bodies in, errors out in OpenAI's shape."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from ...errors import (ConfigError, InvalidTask, KoubouError, SpoolError, TaskNotFound,
                       UsageError)
from ...integrations.chat import ERROR_KINDS, ModelNotFound, Refused, error_body
from ...service.control import NotCancelled
from ...service.workshop import Workshop
from ..guard import BodyTooLarge, too_large

# Each kind of KoubouError as (HTTP status, OpenAI error type); the first match wins.
STATUS_OF: tuple[tuple[type, int, str], ...] = (
    (ModelNotFound, 404, "invalid_request_error"),
    (TaskNotFound, 404, "not_found_error"),
    (NotCancelled, 409, "conflict_error"),
    (InvalidTask, 400, "invalid_request_error"),
    (UsageError, 400, "invalid_request_error"),
    (ConfigError, 500, "server_error"),
    (SpoolError, 503, "server_error"),
)


def workshop(request: Request) -> Workshop:
    """The workshop the app serves."""
    return request.app.state.workshop


def error(status: int, message: str, kind: str = "invalid_request_error", *,
          param: str | None = None, code: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    """An error response in OpenAI's shape."""
    return JSONResponse(error_body(message, kind, param=param, code=code), status,
                        headers=headers)


def koubou_error(request: Request, exc: Exception) -> JSONResponse:
    """A KoubouError as its HTTP status, with its one sentence as the message."""
    if isinstance(exc, Refused):
        status, kind = ERROR_KINDS[exc.kind]
        return error(status, str(exc), kind, code=exc.kind)
    for cls, status, kind in STATUS_OF:
        if isinstance(exc, cls):
            param = "model" if isinstance(exc, ModelNotFound) else None
            code = "model_not_found" if isinstance(exc, ModelNotFound) else None
            return error(status, str(exc), kind, param=param, code=code)
    return error(500, str(exc), "server_error")


async def read_json(request: Request) -> Any:
    """The request body as JSON; InvalidTask when it is not JSON."""
    data = await request.body()
    try:
        return json.loads(data or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidTask(f"the request body is not JSON: {exc}") from None


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter within bounds; UsageError naming it otherwise."""
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{name}: expected an integer, got {value!r}") from None
    return max(low, min(number, high))


def body_too_large(request: Request, exc: Exception) -> JSONResponse:
    """413, for a body that grew past its limit while the view read it."""
    return JSONResponse(too_large(exc.limit), 413)


EXCEPTION_HANDLERS = {KoubouError: koubou_error, BodyTooLarge: body_too_large}
