"""The OpenAI chat-completions protocol over the workshop: model names, request bodies as tasks,
outcomes as chat.completion objects and stream chunks, and error kinds as OpenAI error types.

No I/O. A request becomes a task in the Batch-line form of the task format (`custom_id`,
`body`), so everything the body carries besides `messages` reaches the backend as the task's
parameters, as it would for a line of a batch.
"""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..errors import InvalidTask, KoubouError
from ..spool.task import BATCH_URL
from .batch import chat_completion

AUTO = "auto"
KOUBOU_FIELDS = ("model", "stream", "stream_options")  # koubou's, not the backend's (§3.1)
# Body fields the task format has a field of its own for; the rest are the task's `params`.
TASK_FIELDS = ("messages", "max_tokens", "max_completion_tokens", "temperature",
               "reasoning_effort", "metadata", "n")

# What each kind of task error means to an OpenAI client: (HTTP status, error type).
ERROR_KINDS: dict[str, tuple[int, str]] = {
    "invalid": (400, "invalid_request_error"),
    "invalid_output": (502, "invalid_output"),
    "policy": (403, "permission_error"),
    "budget": (429, "insufficient_quota"),
    "cancelled": (409, "cancelled"),
    "expired": (504, "expired"),
    "timeout": (504, "timeout"),
    "dependency": (424, "dependency_failed"),
    "backend": (502, "api_error"),
    "lost": (502, "api_error"),
    "verify": (422, "verify_failed"),
}


class ModelNotFound(KoubouError, LookupError):
    """A model name that is no craftsman, not `auto`, and no model id of exactly one craftsman."""

    exit_code = 2


class Refused(KoubouError):
    """The router would not send this request where it asked to go; `kind` is policy or budget."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def model_names(config: Config) -> list[str]:
    """The names /v1/models lists: the craftsmen, plus `auto`."""
    return [*sorted(config.craftsmen), AUTO]


def resolve_model(name: Any, config: Config) -> str:
    """The craftsman (or `auto`) a request's `model` names; ModelNotFound with the list if none."""
    if not isinstance(name, str) or not name:
        raise InvalidTask("model: expected a craftsman name, `auto` or a model id")
    if name == AUTO or name in config.craftsmen:
        return name
    serving = sorted(c.name for c in config.craftsmen.values() if c.model == name)
    if len(serving) == 1:
        return serving[0]
    known = ", ".join(model_names(config))
    if serving:
        raise ModelNotFound(f"model {name!r} is served by several craftsmen "
                            f"({', '.join(serving)}); name one of: {known}")
    raise ModelNotFound(f"the model {name!r} does not exist here; use one of: {known}")


def check_body(body: Any) -> dict[str, Any]:
    """The request body as an object with messages; InvalidTask naming what is wrong."""
    if not isinstance(body, dict):
        raise InvalidTask("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidTask("messages: expected a non-empty list of {role, content} objects")
    if body.get("n", 1) != 1:
        raise InvalidTask("n: only 1 choice per request is supported")
    return body


def task_fields(body: dict[str, Any], task_id: str, craftsman: str,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The task standing for one chat-completions request: a Batch line (whose body's fields
    reach the backend, §3.1) plus koubou's fields, with the fields the task format has no
    field of its own for also named as `params` (tools, response_format, seed, ...)."""
    kept = {k: v for k, v in body.items() if k not in KOUBOU_FIELDS}
    fields: dict[str, Any] = {
        "custom_id": task_id, "method": "POST", "url": BATCH_URL, "body": kept,
        "craftsman": craftsman, "created_by": "serve",
        "params": {k: v for k, v in kept.items() if k not in TASK_FIELDS}}
    if isinstance(body.get("metadata"), dict):
        fields["metadata"] = body["metadata"]
    return fields | (extra or {})


def refusal(route: Any, asked: str) -> Refused | None:
    """Why a request may not run where it asked, before it is queued; None when it may.

    A client naming a model expects that model or a refusal, never another model's answer:
    so a named cloud craftsman that the router would swap for a local one (confidential
    content, or an exhausted budget) is refused, where `auto` would just be routed.
    """
    if route.craftsman is None:
        if route.kind in ("policy", "budget"):
            return Refused(route.kind, route.reason)
        if route.kind == "defer":  # the task would wait for the next period: say so now
            return Refused("budget", route.reason)
        return None  # invalid: the task's own outcome says it
    if asked != AUTO and route.craftsman != asked:
        if route.confidential:
            return Refused("policy", f"the request is confidential ({route.pattern or 'declared'})"
                           f" and {asked} is not a local craftsman; use `auto` or a local one")
        return Refused("budget", f"the budget is spent; {asked} takes no more requests "
                                 "in this period")
    return None


def completion(task_id: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """The chat.completion of a completed task: the server's own body, under an id that names
    the task (so a client can find it in the spool and on the dashboard)."""
    return {**chat_completion(task_id, outcome.get("result") or {}), "id": f"chatcmpl-{task_id}"}


def chunks(done: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """A finished chat.completion as the chat.completion.chunk objects of a stream."""
    choice = done["choices"][0]
    base = {"id": done["id"], "object": "chat.completion.chunk", "created": done["created"],
            "model": done["model"], "system_fingerprint": None}
    delta = {k: v for k, v in choice["message"].items() if v is not None}
    if delta.get("tool_calls"):
        delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(delta["tool_calls"])]
    first = base | {"choices": [{"index": 0, "delta": delta, "finish_reason": None,
                                 "logprobs": choice.get("logprobs")}]}
    last = base | {"choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"],
                                "logprobs": None}]}
    found = [first, last]
    if include_usage:
        found.append(base | {"choices": [], "usage": done["usage"]})
    return found


def error_of(outcome: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error object of a failed task."""
    error = outcome.get("error") or {}
    kind = error.get("kind", "backend")
    status, kind_type = ERROR_KINDS.get(kind, (500, "api_error"))
    return status, error_body(f"task {outcome.get('id')} failed ({kind}): "
                              f"{error.get('message', '')}", kind_type, code=kind)


def error_body(message: str, kind: str, *, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
