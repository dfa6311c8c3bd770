"""OpenAI-compatible chat completions (OpenAI, LM Studio, Ollama, vLLM, llama.cpp).

Retries, Retry-After and timeouts are the openai client's own: it retries connection errors,
timeouts, 408, 409, 429 and 5xx up to `retries` times with backoff and honours Retry-After.

A task's `params` go into the body as they are (the client's `extra_body`), and the answer is
read from the body the server sent, not from the client's typed model: local servers add
fields OpenAI does not have (gpt-oss's `reasoning` from LM Studio, Ollama and vLLM,
`reasoning_content` from llama.cpp), and that body is what the result keeps.

The openai package is imported on the first request, not when the worker starts: it is about
a second of CPU and 35 MB, which a worker whose openai craftsmen get no task never pays.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import openai

from ...config import Craftsman, Endpoint
from . import BackendError, Reply, Request, usage

CONNECT_S = 5.0  # a host that drops packets is known dead after this, not after timeout_s

# OpenAI's finish reasons. Anything else (vLLM's `abort`, `error`, a missing one) means the
# server stopped for its own reasons: the answer cannot be trusted, another attempt may do.
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter", "function_call")


class OpenAIChatBackend:
    """One AsyncOpenAI client per craftsman, pointed at its base_url, or at one of its
    endpoints: then the client's own retries are off, since the other endpoints are the
    retries (craft/backends/endpoints.py) and its backoff would hold a request on a failing
    host."""

    def __init__(self, craftsman: Craftsman, endpoint: Endpoint | None = None) -> None:
        self.craftsman = craftsman
        self.base_url = endpoint.base_url if endpoint else craftsman.base_url
        self.endpoint = endpoint
        # Read now: a missing key fails the craftsman when the worker starts, not its first task.
        self._api_key = endpoint.api_key(craftsman.name) if endpoint else craftsman.api_key()
        self._client: openai.AsyncOpenAI | None = None

    @property
    def client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            self._client = _sdk().AsyncOpenAI(
                base_url=self.base_url, api_key=self._api_key,
                max_retries=0 if self.endpoint else self.craftsman.retries,
                timeout=self.craftsman.timeout_s)
        return self._client

    async def complete(self, request: Request) -> Reply:
        """One chat completion; BackendError says whether another attempt may help."""
        openai = _sdk()
        params = {"model": request.model, "messages": request.messages,
                  # Always sent: without it some local servers generate until the context is full.
                  self.craftsman.token_limit_param: request.max_tokens}
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.reasoning_effort:
            params["reasoning_effort"] = request.reasoning_effort
        try:
            raw = await self.client.chat.completions.with_raw_response.create(
                **params, extra_body=request.params or None, timeout=self._timeout(request))
            body = raw.http_response.json()
        except openai.APITimeoutError:
            raise BackendError(f"no answer from {self.base_url} within "
                               f"{request.timeout_s:g} s", kind="timeout", retryable=True,
                               endpoint_fault=True) from None
        except openai.APIConnectionError as exc:
            raise BackendError(f"cannot reach {self.base_url}: {exc}", retryable=True,
                               endpoint_fault=True, reached=False) from None
        except openai.APIStatusError as exc:
            raise self._status_error(exc) from None
        except ValueError:
            raise BackendError(f"{self.base_url} answered with a body that is not JSON",
                               retryable=True) from None
        return self.reply(body, request.model)

    def _timeout(self, request: Request) -> float | openai.Timeout:
        """The attempt's timeout; for an endpoint, a shorter one to connect, so a host that
        drops packets is left for another endpoint soon."""
        if self.endpoint is None:
            return request.timeout_s
        return _sdk().Timeout(request.timeout_s, connect=min(request.timeout_s, CONNECT_S))

    def _status_error(self, exc: openai.APIStatusError) -> BackendError:
        status = exc.status_code
        error = BackendError(f"HTTP {status} from {self.base_url}: {_message(exc)}",
                             retryable=status in (408, 409, 429) or status >= 500,
                             endpoint_fault=status == 429 or status >= 500,
                             reached=status != 429)  # a 429 turned the request away unread
        parse = getattr(self.client, "_parse_retry_after_header", None)
        if status == 429 and parse is not None:  # as the client's retries read it: s, ms, a date
            error.retry_after = parse(exc.response.headers)
        return error

    async def probe(self, timeout_s: float) -> bool:
        """Whether GET /models answers within timeout_s: the check before traffic returns."""
        try:
            await self.client.models.list(timeout=timeout_s)
        except _sdk().OpenAIError:
            return False
        return True

    def reply(self, body: Any, model: str) -> Reply:
        """The Reply a chat.completion body stands for; BackendError when it is no answer."""
        choices = body.get("choices") if isinstance(body, dict) else None
        if not choices or not isinstance(choices[0], dict):
            raise BackendError(f"{self.base_url} answered with no choices", retryable=True)
        choice = choices[0]
        finish_reason = choice.get("finish_reason")
        if finish_reason not in FINISH_REASONS:
            raise BackendError(f"{self.base_url} stopped with finish_reason "
                               f"{finish_reason!r}, not one of OpenAI's "
                               f"({', '.join(FINISH_REASONS)}); the answer is not trusted",
                               retryable=True)
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        used = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        return Reply(content=_text(message.get("content")), model=body.get("model") or model,
                     usage=usage(int(used.get("prompt_tokens") or 0),
                                 int(used.get("completion_tokens") or 0)),
                     finish_reason=finish_reason,
                     reasoning=message.get("reasoning") or message.get("reasoning_content"),
                     tool_calls=message.get("tool_calls") or None,
                     refusal=message.get("refusal") or None, response=body)

    async def close(self) -> None:
        """Close the HTTP connection pool, if a request ever opened one."""
        if self._client is not None:
            await self._client.close()


def _text(content: Any) -> str:
    """Message content as text: a string, or the text of content parts."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:500]
        if isinstance(inner, str):
            return inner[:500]
    return (exc.message or "")[:500]


def _sdk() -> Any:
    """The openai package, imported on first use (see the module's docstring)."""
    return importlib.import_module("openai")


async def load_sdk() -> None:
    """Import the openai package in a thread, so the loop goes on serving meanwhile (a module
    half imported by another thread is in sys.modules already: wait for the whole of it)."""
    global _loaded
    if not _loaded:
        await asyncio.get_running_loop().run_in_executor(None, _sdk)
        _loaded = True


_loaded = False
