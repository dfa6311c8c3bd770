#!/usr/bin/env python3
"""The spool's overhead on a real engine: tasks through `koubou worker` against the tests' llama.cpp
server (tests/realengine.py), next to the same load sent straight from the openai client.

    python bench/real_server.py [--tasks 200] [--rounds 3]

Needs the engine built (`python3 tests/realengine.py --build`). For each max_concurrent (1, 4, 8)
it prints throughput and p50 latency both ways, and the spool/direct throughput ratio: each the
median of `--rounds` rounds, a round being the client's run then the spool's, one after the
other, so that the machine's drift (on a shared 2-core VM the client alone varies 75-105 tasks/s
from one minute to the next) falls on both sides of each ratio. Latency is per request for the
client, and claim-to-finish per task for the spool (queue wait excluded, since the spool's
backlog is pre-loaded).

Throughput is the steady state on both sides: tasks 2 to N over the time from the first
answer to the last. The first task is left out of it because a new worker's first task of an
openai craftsman waits for the openai import (about 0.6 s of its CPU here, see
craft/backends/openai_chat.py), which a 200-task round would otherwise count as a fifth of its
time, and the client's first request opens its connection. The worker's first task is
printed apart ("first task"): what a worker just started costs once.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
import realengine  # noqa: E402
import run as spool_bench  # noqa: E402
from koubou_spool.spool import task as task_format  # noqa: E402

MAX_TOKENS = 16


async def direct(base_url: str, count: int, concurrency: int) -> dict:
    """The same prompts from the openai client, `concurrency` at a time."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0)
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    answered: list[float] = []

    async def one(i: int) -> None:
        async with gate:
            began = time.perf_counter()
            await client.chat.completions.create(
                model="tiny-chatml", max_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": f"task {i}"}])
            answered.append(time.perf_counter())
            latencies.append((answered[-1] - began) * 1000)

    await asyncio.gather(*(one(i) for i in range(count)))
    await client.close()
    return {"tasks_per_s": steady_rate(answered),
            "p50_ms": spool_bench.percentile(latencies, 50)}


def steady_rate(finished: list[float]) -> float:
    """Tasks per second after the first answer: tasks 2 to N over first to last answer."""
    return (len(finished) - 1) / (max(finished) - min(finished))


def through_spool(base: Path, base_url: str, count: int, concurrency: int,
                  source: Path | None = None) -> dict:
    """The same prompts as tasks through one `koubou worker` (from `source`, if given)."""
    spool = spool_bench.make_home(base, f"real-{concurrency}", fsync=True, base_url=base_url,
                                  max_concurrent=concurrency)
    config = spool.home / "config" / "koubou.yaml"
    config.write_text(config.read_text().replace("model: fake-model", "model: tiny-chatml")
                      .replace("retries: 0", f"retries: 0\n    max_tokens: {MAX_TOKENS}"))
    batch = spool_bench.tasks(count)
    spool.submit(batch)
    worker = spool_bench.start_worker(spool, "--drain", "--concurrency", str(concurrency),
                                      source=source)
    assert worker.wait(600) == 0
    results = [spool_bench.result_of(spool, t.id) for t in batch]
    finished = [task_format.parse_iso(r["finished_at"]) for r in results]
    first = min(results, key=lambda r: r["started_at"])
    return {"tasks_per_s": steady_rate(finished),
            "p50_ms": spool_bench.percentile([r["duration_s"] * 1000 for r in results], 50),
            "first_ms": first["duration_s"] * 1000}


def _median(rounds: list[tuple[dict, dict]], side: int, key: str) -> float:
    """The median of one figure over the rounds; side 0 the client's, 1 the spool's."""
    return statistics.median(r[side][key] for r in rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per max_concurrent")
    args = parser.parse_args()
    if not realengine.is_built():
        sys.exit(f"build the engine first: {realengine.BUILD_ENABLES}")
    print(f"machine: {spool_bench.machine()}")
    print(f"engine: llama-cpp-python (python -m llama_cpp.server), tiny-chatml, "
          f"max_tokens {MAX_TOKENS}, {args.tasks} tasks each")
    print(f"{'max_concurrent':>14}  {'direct tasks/s':>14}  {'spool tasks/s':>13}  "
          f"{'ratio':>6}  {'direct p50':>10}  {'spool p50':>9}  {'first task':>10}")
    with tempfile.TemporaryDirectory(prefix="koubou-real-") as tmp:
        base = Path(tmp)
        (base / "server").mkdir()
        with realengine.serving(base / "server") as base_url:
            asyncio.run(direct(base_url, 20, 1))  # warm the model and the server
            for concurrency in (1, 4, 8):
                rounds = []
                for n in range(args.rounds):
                    plain = asyncio.run(direct(base_url, args.tasks, concurrency))
                    spooled = through_spool(base / f"round-{n}", base_url, args.tasks,
                                            concurrency)
                    rounds.append((plain, spooled))
                ratio = statistics.median(s["tasks_per_s"] / p["tasks_per_s"] for p, s in rounds)
                print(f"{concurrency:>14}  {_median(rounds, 0, 'tasks_per_s'):>14.1f}  "
                      f"{_median(rounds, 1, 'tasks_per_s'):>13.1f}  {ratio:>6.2f}  "
                      f"{_median(rounds, 0, 'p50_ms'):>8.1f}ms  "
                      f"{_median(rounds, 1, 'p50_ms'):>7.1f}ms  "
                      f"{_median(rounds, 1, 'first_ms'):>8.0f}ms")


if __name__ == "__main__":
    main()
