"""Backends: how a request reaches one kind of craftsman. Each returns a Reply or raises BackendError."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ...config import Craftsman
from ...errors import KoubouError


@dataclass
class Request:
    """What is sent to a craftsman for one attempt."""

    messages: list[dict[str, Any]]
    model: str
    max_tokens: int
    timeout_s: float
    temperature: float | None = None
    reasoning_effort: str | None = None
    confidential: bool = False  # declared or detected: only a local craftsman may receive it
    workdir: str | None = None  # command backends run here
    # Further chat-completions body fields (a task's `params`, a Batch line's body), sent as
    # they are by OpenAI-compatible backends; never one of RESERVED_PARAMS.
    params: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # and with these added to their environment
    writable: list[str] = field(default_factory=list)  # more paths a sandboxed agent may write
    read_only: list[str] = field(default_factory=list)  # and paths under those it may not
    # The endpoint slot dispatch took for this attempt (craft.endpoints.Lease), for a craftsman
    # with several endpoints: the request starts there and may move.
    lease: Any = None


@dataclass
class Reply:
    """What a craftsman answered."""

    content: str
    model: str
    usage: dict[str, int] = field(default_factory=dict)
    cost_usd: float | None = None  # set by backends that know their own cost (CLI agents)
    finish_reason: str | None = None
    reasoning: str | None = None  # the server's `reasoning` or `reasoning_content`
    tool_calls: list[dict[str, Any]] | None = None
    refusal: str | None = None
    response: dict[str, Any] | None = None  # the server's own response body, as it came
    details: dict[str, Any] = field(default_factory=dict)  # more result fields (session_id, ...)


class BackendError(KoubouError):
    """An attempt failed; `retryable` says whether another attempt may succeed.

    `endpoint_fault`: the server, not the request, failed (connection error, timeout, 5xx,
    429), so another endpoint of the craftsman may answer; `reached`: the request got to the
    server (not refused, not turned away by a 429); `retry_after`: seconds the server asked."""

    def __init__(self, message: str, *, kind: str = "backend", retryable: bool = False,
                 endpoint_fault: bool = False, reached: bool = True) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.endpoint_fault = endpoint_fault
        self.reached = reached
        self.retry_after: float | None = None


class Unavailable(BackendError):
    """No endpoint of the craftsman can take the request now (all cooling, full or refusing
    connections): the task goes back to pending/ without spending an attempt."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="unavailable", retryable=True, reached=False)


class Backend(Protocol):
    """One craftsman's transport."""

    async def complete(self, request: Request) -> Reply:
        """Run one attempt."""

    async def close(self) -> None:
        """Release connections."""


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """A usage record in the OpenAI shape."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class PolicyGuard:
    """Wraps every craftsman that is not local: the last check before a request leaves.

    Routing already keeps confidential tasks local; this refuses again right before the call,
    so no fallback, retry or requeue can leak them (fail closed).
    """

    def __init__(self, inner: Backend, craftsman: Craftsman, patterns: tuple) -> None:
        self.inner = inner
        self.craftsman = craftsman
        self.patterns = patterns

    async def complete(self, request: Request) -> Reply:
        """Refuse confidential content, else pass the request on."""
        from ..router import messages_sensitive
        if request.confidential:
            raise BackendError(f"confidential task refused: {self.craftsman.name} is not local",
                               kind="policy")
        label = messages_sensitive(request.messages, self.patterns)
        if label is not None:
            raise BackendError(f"content matches sensitive pattern {label}; refused to send it "
                               f"to {self.craftsman.name}, which is not local", kind="policy")
        return await self.inner.complete(request)

    async def close(self) -> None:
        """Close the wrapped backend."""
        await self.inner.close()


async def ready(craftsman: Craftsman) -> None:
    """Load what the craftsman's backend imports on first use (the openai SDK, about a second
    of CPU), in a thread: called before an attempt's timeout starts, so it is not spent on it."""
    if craftsman.backend == "openai":
        from .openai_chat import load_sdk
        await load_sdk()


def make_backend(craftsman: Craftsman, patterns: tuple = (), endpoints: Any = None) -> Backend:
    """The backend for a craftsman; ConfigError when it cannot be set up (e.g. a missing key).

    A craftsman with several endpoints needs their pool (craft.endpoints.EndpointPool): the
    home-wide slots and cooldowns its requests are spread by."""
    if craftsman.backend == "echo":
        from .echo import EchoBackend
        backend: Backend = EchoBackend(craftsman)
    elif craftsman.endpoints:
        from .endpoints import EndpointsBackend
        backend = EndpointsBackend(craftsman, endpoints)
    elif craftsman.backend == "openai":
        from .openai_chat import OpenAIChatBackend
        backend = OpenAIChatBackend(craftsman)
    else:
        from .command import CommandBackend
        backend = CommandBackend(craftsman)
    return backend if craftsman.local else PolicyGuard(backend, craftsman, patterns)
