"""`python bench/serve.py`: a chat completion through `koubou serve` and the spool, against the same
request sent straight to the loopback fake OpenAI server; p50 and p99 at 1 and 16 in flight; and
the delay from a spool change (a task renamed into pending/) to its server-sent event.

Everything runs on 127.0.0.1 in a temporary home: the fake (tests/fake_openai.py, no latency),
one `koubou worker`, one `koubou serve`. Prints a table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from fake_openai import FakeOpenAI  # noqa: E402
from koubou_spool.spool import home as home_module, task as task_format  # noqa: E402
from koubou_spool.spool.files import Spool  # noqa: E402
from serve_client import free_port  # noqa: E402

BODY = {"model": "local", "messages": [{"role": "user", "content": "hello bench"}]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def setup(home: Path, fake: FakeOpenAI, fsync: bool) -> None:
    home_module.init(home)
    config = {"craftsmen": {"local": {"backend": "openai", "base_url": fake.base_url,
                                      "model": "fake-model", "local": True, "max_concurrent": 16,
                                      "timeout_s": 30, "max_tokens": 64, "retries": 0}},
              "routing": {"rules": [{"then": "local"}]},
              "spool": {"fsync": fsync, "heartbeat_s": 5, "lease_s": 30}}
    (home / "config" / "koubou.yaml").write_text(yaml.safe_dump(config))


def start(home: Path, log: Path, *args: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "koubou_spool.cli.koubou", *args,
                             "--home", str(home), "--log-level", "warning"],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)


def wait_up(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise SystemExit("koubou serve did not start")


async def latencies(url: str, in_flight: int, total: int) -> list[float]:
    """Seconds per request, `in_flight` at a time, `total` in all."""
    found: list[float] = []
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        queue = iter(range(total))

        async def one_lane() -> None:
            for _ in queue:
                start = time.perf_counter()
                answer = await client.post(url + "/chat/completions", json=BODY)
                answer.raise_for_status()
                found.append(time.perf_counter() - start)

        await asyncio.gather(*(one_lane() for _ in range(in_flight)))
    return found


def event_delays(url: str, spool: Spool, count: int) -> list[float]:
    """Seconds from the rename of a task into pending/ to its event on /api/events."""
    seen: dict[str, float] = {}
    ready = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", url + "/api/events", timeout=None) as events:
            for line in events.iter_lines():
                if line.startswith("retry:"):
                    ready.set()
                if line.startswith("data:") and '"pending"' in line and '"added"' in line:
                    task_id = line.split('"id": "')[1].split('"')[0]
                    seen.setdefault(task_id, time.perf_counter())
                    if len(seen) >= count:
                        return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    ready.wait(10)
    sent = {}
    for n in range(count):
        task = task_format.validate({"content": "e", "id": f"ev-{n}", "craftsman": "nobody"})
        sent[task.id] = time.perf_counter()
        spool.submit([task])
        time.sleep(0.02)
    listener.join(30)
    return [seen[t] - sent[t] for t in sent if t in seen]


def row(name: str, values: list[float]) -> str:
    return (f"| {name} | {len(values)} | {statistics.median(values) * 1000:.2f} | "
            f"{percentile(values, 99) * 1000:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per case")
    parser.add_argument("--no-fsync", action="store_true", help="spool.fsync: false")
    args = parser.parse_args()
    fake = FakeOpenAI().start()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        setup(home, fake, not args.no_fsync)
        port = free_port()
        worker = start(home, Path(tmp) / "worker.log", "worker")
        server = start(home, Path(tmp) / "serve.log", "serve", "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_up(url)
            asyncio.run(latencies(url + "/v1", 4, 40))  # warm up worker and server
            print(f"fsync {'off' if args.no_fsync else 'on'}, {args.requests} requests per case")
            print("| case | n | p50 ms | p99 ms |\n|---|---|---|---|")
            for in_flight in (1, 16):
                direct = asyncio.run(latencies(fake.base_url, in_flight, args.requests))
                served = asyncio.run(latencies(url + "/v1", in_flight, args.requests))
                print(row(f"straight to the fake, {in_flight} in flight", direct))
                print(row(f"through serve + spool, {in_flight} in flight", served))
            print(row("spool change → server-sent event", event_delays(url, Spool.open(home),
                                                                          200)))
        finally:
            for proc in (server, worker):
                proc.send_signal(signal.SIGTERM)
            for proc in (server, worker):
                proc.wait(timeout=60)
            fake.stop()


if __name__ == "__main__":
    main()
