"""Backends: how a request reaches one kind of craftsman. Each returns a Reply or raises BackendError."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import Craftsman
from ..errors import KoubouError


@dataclass
class Request:
    """What is sent to a craftsman for one attempt."""

    messages: list[dict[str, Any]]
    model: str
    max_tokens: int
    timeout_s: float
    temperature: float | None = None
    reasoning_effort: str | None = None


@dataclass
class Reply:
    """What a craftsman answered."""

    content: str
    model: str
    usage: dict[str, int] = field(default_factory=dict)
    cost_usd: float | None = None  # set by backends that know their own cost (CLI agents)


class BackendError(KoubouError):
    """An attempt failed; `retryable` says whether another attempt may succeed."""

    def __init__(self, message: str, *, kind: str = "backend", retryable: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable


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


def make_backend(craftsman: Craftsman) -> Backend:
    """The backend for a craftsman; ConfigError when it cannot be set up (e.g. a missing key)."""
    if craftsman.backend == "echo":
        from .echo import EchoBackend
        return EchoBackend(craftsman)
    if craftsman.backend == "openai":
        from .openai_chat import OpenAIChatBackend
        return OpenAIChatBackend(craftsman)
    raise BackendError(f"craftsman {craftsman.name}: backend {craftsman.backend!r} is not "
                       "available in this version")
