"""Kinds of work: what an attempt asks of its task before and after the craftsman's call.

An attempt (work.attempt) is the same for every task: claim, route, reserve, call, settle,
publish. What differs is asked of the task's kind of work: `prepare` builds the request (and
whatever the call needs on disk), `finish` turns the reply into the result's own fields, and
`close` undoes what `prepare` made, on every path. A failure in either raises BackendError with
its kind (`invalid_output`, `verify`, ...) and whether another attempt may succeed.

Text tasks are the kind here; repository tasks are work/repository.py's.

A failed attempt can leave word for the next one (`remember_feedback`): the reason its answer
was refused, kept in outputs/<id>/feedback.json and added to the next attempt's prompt. It
lives beside the task rather than in its file, so the task file stays what was submitted, and
it goes when an attempt succeeds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..config import Craftsman
from ..craft import router
from ..craft.attach import Attachment
from ..craft.backends import BackendError, Reply, Request
from ..craft.prompt import messages_for
from ..errors import InvalidTask
from ..spool import task as task_format
from ..spool.files import Spool
from ..spool.task import Task

FEEDBACK = "feedback.json"
FEEDBACK_CHARS = 2000  # of a refused answer's reason, in the next prompt


@dataclass
class Attempt:
    """One attempt at a task: what every kind of work is given."""

    task: Task
    craftsman: Craftsman
    number: int
    route: router.Route
    home: str
    attachments: list[Attachment] = field(default_factory=list)
    claim: str = ""  # the claim's file name: a CLI agent's processes carry it (KOUBOU_CLAIM)


class Work(Protocol):
    """One kind of work, for one attempt."""

    async def prepare(self, attempt: Attempt) -> Request:
        """The request to send; may set up what the call needs (a working directory)."""

    async def finish(self, attempt: Attempt, reply: Reply) -> dict[str, Any]:
        """The result's fields of this kind (at least `content`), from the reply."""

    async def close(self, attempt: Attempt, succeeded: bool) -> None:
        """Undo what prepare made; called once on every path, even when cancelled."""


class TextWork:
    """A prompt in, an answer out: the chat messages, and what the server said as the result."""

    async def prepare(self, attempt: Attempt) -> Request:
        """Messages from the task (its references filled in), its attachments, the craftsman's
        defaults and the word a refused attempt left."""
        task, confidential = with_references(attempt)
        messages = with_feedback(attempt, messages_for(task, attempt.craftsman.system,
                                                       attempt.attachments))
        request = base_request(attempt, messages)
        request.confidential = request.confidential or confidential
        return request

    async def finish(self, attempt: Attempt, reply: Reply) -> dict[str, Any]:
        """The answer's text and what else the server said; with JSON asked for, the parsed
        answer, or BackendError `invalid_output` when it does not parse or fit the schema."""
        fields = reply_fields(reply)
        params = attempt.task.params
        if task_format.asks_for_json(params) and not (reply.tool_calls or reply.refusal):
            try:
                fields["json"] = parse_json_answer(reply, task_format.json_schema_of(params))
            except BackendError as exc:
                remember_feedback(attempt, str(exc))
                raise
        if reply.response is not None:
            fields["response"] = reply.response
        return fields

    async def close(self, attempt: Attempt, succeeded: bool) -> None:
        """A success makes earlier feedback moot."""
        if succeeded:
            forget_feedback(attempt)


def base_request(attempt: Attempt, messages: list[dict[str, Any]],
                 workdir: str | None = None) -> Request:
    """A request with the task's settings over the craftsman's."""
    task, craftsman = attempt.task, attempt.craftsman
    return Request(
        messages=messages,
        model=task.model or craftsman.model,
        max_tokens=task.max_tokens or craftsman.max_tokens,
        timeout_s=task.timeout_s or craftsman.timeout_s,
        temperature=task.temperature if task.temperature is not None else craftsman.temperature,
        reasoning_effort=task.reasoning_effort or craftsman.reasoning_effort,
        confidential=attempt.route.confidential,
        workdir=workdir or f"{attempt.home}/outputs/{task.id}",
        params=dict(task.params),
        # A CLI agent's children carry it, so that whoever takes the claim over can find and
        # stop what outlives a worker killed with -9 (spool.recovery.reap).
        env={"KOUBOU_CLAIM": attempt.claim} if attempt.claim else {})


def reply_fields(reply: Reply) -> dict[str, Any]:
    """The result fields of a reply: content, and what else the craftsman said (finish_reason,
    reasoning, tool_calls, refusal, truncated; a CLI agent's session_id, num_turns)."""
    fields: dict[str, Any] = {"content": reply.content}
    if reply.finish_reason is not None:
        fields["finish_reason"] = reply.finish_reason
    for key in ("reasoning", "tool_calls", "refusal"):
        if getattr(reply, key):
            fields[key] = getattr(reply, key)
    if reply.finish_reason == "length":
        fields["truncated"] = True
    return fields | reply.details


def parse_json_answer(reply: Reply, schema: dict[str, Any] | None) -> Any:
    """The answer as JSON, matched against the schema; BackendError `invalid_output` (another
    attempt may do better) saying what is wrong."""
    cut = " (the answer was cut off at max_tokens)" if reply.finish_reason == "length" else ""
    try:
        answer = json.loads(reply.content)
    except ValueError as exc:
        raise BackendError(f"the answer is not the JSON response_format asked for{cut}: {exc}",
                           kind="invalid_output", retryable=True) from None
    if schema is not None:
        import jsonschema  # only tasks with a schema pay for the import
        error = jsonschema.exceptions.best_match(
            jsonschema.validators.validator_for(schema)(schema).iter_errors(answer))
        if error is not None:
            where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}"
                            for p in error.absolute_path)
            raise BackendError(f"the answer does not match the response_format schema{cut}: "
                               f"at ${where}: {error.message}", kind="invalid_output",
                               retryable=True)
    return answer


# --- references to the results of the tasks a task runs after ------------------------------

def with_references(attempt: Attempt) -> tuple[Task, bool]:
    """The task with `{{ID}}` references in content and system filled in from its
    dependencies' outcomes, and whether one of them was confidential (then so is this).
    BackendError `invalid` naming a reference that is not there."""
    task = attempt.task
    texts = {name: getattr(task, name) for name in task_format.REFERENCED_FIELDS}
    if not task.after or task.messages is not None or not any(
            t and task_format.REFERENCE_RE.search(t) for t in texts.values()):
        return task, False
    spool = Spool(Path(attempt.home))
    outcomes = {i: spool.outcome(i) or {} for i in task.after}
    results = {i: o.get("result") or {} for i, o in outcomes.items()}
    diffs = {i: _diff(attempt.home, r) for i, r in results.items()}
    try:
        filled = {name: task_format.fill_references(text, task.after, results, diffs)
                  for name, text in texts.items() if text}
    except InvalidTask as exc:
        raise BackendError(str(exc), kind="invalid") from None
    confidential = any(o.get("sensitivity") == "confidential" for o in outcomes.values())
    return dataclasses.replace(task, **filled), confidential


def _diff(home: str, result: dict[str, Any]) -> str | None:
    """A repository task's patch (`result.repo.patch` names it under the home), or None."""
    patch = (result.get("repo") or {}).get("patch")
    if not isinstance(patch, str):
        return None
    try:
        return (Path(home) / patch).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


# --- feedback: what a refused attempt tells the next one -----------------------------------

def _feedback_path(attempt: Attempt) -> Path:
    return Path(_feedback_file(attempt))


def _feedback_file(attempt: Attempt) -> str:
    # A str, not a Path: looked for on every attempt, and almost never there.
    return f"{attempt.home}/outputs/{attempt.task.id}/{FEEDBACK}"


def remember_feedback(attempt: Attempt, message: str) -> None:
    """Keep why this attempt's answer was refused, for the next attempt's prompt."""
    path = _feedback_path(attempt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{FEEDBACK}.{os.getpid()}")
    tmp.write_text(json.dumps({"attempt": attempt.number, "message": message},
                              ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def with_feedback(attempt: Attempt, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages, plus a last user message with what a refused earlier attempt was told."""
    try:
        with open(_feedback_file(attempt), encoding="utf-8") as file:
            said = json.loads(file.read())
    except (OSError, ValueError):
        return messages
    return [*messages, {"role": "user", "content": (
        f"Your previous answer (attempt {said.get('attempt')}) was refused: "
        f"{str(said.get('message'))[:FEEDBACK_CHARS]}\nAnswer again, correcting that.")}]


def forget_feedback(attempt: Attempt) -> None:
    """Drop the feedback (and the task's outputs/ folder when nothing else is in it)."""
    path = _feedback_file(attempt)
    try:
        os.unlink(path)
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass  # usually there is none; or the folder holds a command craftsman's work
