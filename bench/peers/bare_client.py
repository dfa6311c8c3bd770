"""The floor of a pickup that ends in an HTTP request: the bare openai client, nothing before it.

Reads one task number a line on stdin; for each, notes the time and sends one chat completion
(the AsyncOpenAI client koubou's openai backend uses, one client kept open) to BASE_URL, then
prints `NUMBER CALLED_AT` once the answer is back. The bench reads the arrival time at its fake
server, so call -> arrival is the client's own share of a pickup.

    python bare_client.py BASE_URL
"""

from __future__ import annotations

import asyncio
import sys
import time

import openai


async def main() -> None:
    """One request per line read, one at a time."""
    client = openai.AsyncOpenAI(base_url=sys.argv[1], api_key="none", max_retries=0)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line.strip():
            break
        called = time.time()
        await client.chat.completions.create(
            model="fake-model", max_tokens=64,
            messages=[{"role": "user", "content": f"pickup {line.strip()}"}])
        print(line.strip(), called, flush=True)
    await client.close()


if __name__ == "__main__":
    asyncio.run(main())
