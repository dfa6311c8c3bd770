"""OpenAI-compatible chat completions (OpenAI, LM Studio, Ollama, vLLM, llama.cpp).

Retries, Retry-After and timeouts are the openai client's own: it retries connection errors,
timeouts, 408, 409, 429 and 5xx up to `retries` times with backoff and honours Retry-After.
"""

from __future__ import annotations

import openai

from ...config import Craftsman
from . import BackendError, Reply, Request, usage


class OpenAIChatBackend:
    """One AsyncOpenAI client per craftsman, pointed at its base_url."""

    def __init__(self, craftsman: Craftsman) -> None:
        self.craftsman = craftsman
        self.client = openai.AsyncOpenAI(base_url=craftsman.base_url, api_key=craftsman.api_key(),
                                         max_retries=craftsman.retries,
                                         timeout=craftsman.timeout_s)

    async def complete(self, request: Request) -> Reply:
        """One chat completion; BackendError says whether another attempt may help."""
        params = {"model": request.model, "messages": request.messages,
                  # Always sent: without it some local servers generate until the context is full.
                  self.craftsman.token_limit_param: request.max_tokens}
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.reasoning_effort:
            params["reasoning_effort"] = request.reasoning_effort
        try:
            response = await self.client.chat.completions.create(**params,
                                                                 timeout=request.timeout_s)
        except openai.APITimeoutError:
            raise BackendError(f"no answer from {self.craftsman.base_url} within "
                               f"{request.timeout_s:g} s", kind="timeout", retryable=True) from None
        except openai.APIConnectionError as exc:
            raise BackendError(f"cannot reach {self.craftsman.base_url}: {exc}",
                               retryable=True) from None
        except openai.APIStatusError as exc:
            status = exc.status_code
            raise BackendError(f"HTTP {status} from {self.craftsman.base_url}: {_message(exc)}",
                               retryable=status in (408, 409, 429) or status >= 500) from None
        if not response.choices:
            raise BackendError(f"{self.craftsman.base_url} answered with no choices", retryable=True)
        content = response.choices[0].message.content or ""
        used = response.usage
        return Reply(content=content, model=response.model or request.model,
                     usage=usage(used.prompt_tokens or 0, used.completion_tokens or 0) if used
                     else usage(0, 0))

    async def close(self) -> None:
        """Close the HTTP connection pool."""
        await self.client.close()


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:500]
        if isinstance(inner, str):
            return inner[:500]
    return (exc.message or "")[:500]
