"""`GET /v1/models`: the craftsmen, plus `auto`, as OpenAI model objects."""

from __future__ import annotations

from typing import Any

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse

from ...config import Config
from ...integrations.chat import AUTO, ModelNotFound, model_names
from .common import workshop


def model_object(name: str, config: Config) -> dict[str, Any]:
    """One model entry; koubou's own facts about the craftsman under `koubou`."""
    entry: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "koubou"}
    craftsman = config.craftsmen.get(name)
    if craftsman is not None:
        entry["koubou"] = {"backend": craftsman.backend, "model": craftsman.model,
                           "local": craftsman.local}
    elif name == AUTO:
        entry["koubou"] = {"routed": True}
    return entry


async def list_models(request: Request) -> JSONResponse:
    """Every name a request's `model` may use."""
    config = await to_thread.run_sync(workshop(request).config)
    return JSONResponse({"object": "list",
                         "data": [model_object(n, config) for n in model_names(config)]})


async def one_model(request: Request) -> JSONResponse:
    """One model by name; 404 listing the names when there is none."""
    config = await to_thread.run_sync(workshop(request).config)
    name = request.path_params["model"]
    if name not in model_names(config):
        raise ModelNotFound(f"the model {name!r} does not exist here; use one of: "
                            + ", ".join(model_names(config)))
    return JSONResponse(model_object(name, config))
