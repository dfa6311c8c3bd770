"""The echo craftsman: answers with the prompt. Real plumbing (like Postfix's discard transport)."""

from __future__ import annotations

import asyncio

from ...config import Craftsman
from . import Reply, Request, usage


class EchoBackend:
    """Replies with the last user message after `latency_ms`; free and local."""

    def __init__(self, craftsman: Craftsman) -> None:
        self.craftsman = craftsman

    async def complete(self, request: Request) -> Reply:
        """Echo the prompt back."""
        if self.craftsman.latency_ms:
            await asyncio.sleep(self.craftsman.latency_ms / 1000)
        users = [m for m in request.messages if m.get("role") == "user"]
        text = users[-1].get("content", "") if users else ""
        text = text if isinstance(text, str) else str(text)
        prompt_words = sum(len(str(m.get("content", "")).split()) for m in request.messages)
        return Reply(content=text, model=request.model or "echo",
                     usage=usage(prompt_words, len(text.split())))

    async def close(self) -> None:
        """Nothing to release."""
