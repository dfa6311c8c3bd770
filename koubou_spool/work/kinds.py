"""Kinds of work: what an attempt asks of its task before and after the craftsman's call.

An attempt (work.attempt) is the same for every task: claim, route, reserve, call, settle,
publish. What differs is asked of the task's kind of work: `prepare` builds the request (and
whatever the call needs on disk), `finish` turns the reply into the result's own fields, and
`close` undoes what `prepare` made, on every path. A failure in either raises BackendError with
its kind (`invalid_output`, `verify`, ...) and whether another attempt may succeed.

Text tasks are the one kind here; repository tasks add a kind of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import Craftsman
from ..craft import router
from ..craft.attach import Attachment
from ..craft.backends import Reply, Request
from ..craft.prompt import messages_for
from ..spool.task import Task


@dataclass
class Attempt:
    """One attempt at a task: what every kind of work is given."""

    task: Task
    craftsman: Craftsman
    number: int
    route: router.Route
    home: str
    attachments: list[Attachment] = field(default_factory=list)


class Work(Protocol):
    """One kind of work, for one attempt."""

    async def prepare(self, attempt: Attempt) -> Request:
        """The request to send; may set up what the call needs (a working directory)."""

    async def finish(self, attempt: Attempt, reply: Reply) -> dict[str, Any]:
        """The result's fields of this kind (at least `content`), from the reply."""

    async def close(self, attempt: Attempt, succeeded: bool) -> None:
        """Undo what prepare made; called once on every path, even when cancelled."""


class TextWork:
    """A prompt in, an answer out: the chat messages, and the reply's text as the result."""

    async def prepare(self, attempt: Attempt) -> Request:
        """Messages from the task, its attachments and the craftsman's defaults."""
        return base_request(attempt, messages_for(attempt.task, attempt.craftsman.system,
                                                  attempt.attachments))

    async def finish(self, attempt: Attempt, reply: Reply) -> dict[str, Any]:
        """The answer's text."""
        return {"content": reply.content}

    async def close(self, attempt: Attempt, succeeded: bool) -> None:
        """Nothing to undo."""


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
        workdir=workdir or f"{attempt.home}/outputs/{task.id}")


def work_for(task: Task) -> Work:
    """The kind of work a task asks for."""
    return TextWork()
