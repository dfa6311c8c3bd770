#!/usr/bin/env python3
"""Where a pickup's time goes: rename into pending/ -> request at the backend, stage by stage.

    python bench/pickup_stages.py [--pickups 300] [--fsync off]

One `koubou worker` (this checkout) with its openai craftsman at a loopback fake server in this
process; the worker's own methods are wrapped (in the worker process, by this script's `--child`
mode) to note the wall time each stage ends, and the fake notes each request's arrival. Tasks
are renamed into pending/ one at a time, each after a random 5-50 ms pause, like
bench/compare.py's pickups. Prints p50, p90 and p99 of each stage, and the ten slowest pickups
stage by stage: what the tail is made of.
"""

from __future__ import annotations

import argparse
import atexit
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

# (stage, what ends it), in the order a pickup passes them.
STAGES = [
    ("wake", "the worker's loop reads the inotify event (Worker._on_events)"),
    ("judge", "read, parse and route (Intake.consider)"),
    ("claim", "a slot and the claim's rename (Dispatch: Spool.claim returns)"),
    ("schedule", "the attempt's asyncio task starts (Attempts.run)"),
    ("begin", "the kept parse recalled, the ledger's attempt_started queued (Attempts._work)"),
    ("prepare", "the request built, the budget reserved (the backend's complete is called)"),
    ("client", "the openai client sends it: arrival at the fake server"),
]


def child(marks: str, argv: list[str]) -> None:
    """In the worker process: wrap the stage ends, run the worker, write the marks at exit."""
    from koubou_spool.craft.backends import openai_chat
    from koubou_spool.spool.files import Spool
    from koubou_spool.work import attempt, intake, worker
    seen: list[tuple[str, float]] = []

    def mark(stage: str, function, before: bool = False):
        def wrapped(*args, **kwargs):
            if before:
                seen.append((stage, time.time()))
            result = function(*args, **kwargs)
            if not before:
                seen.append((stage, time.time()))
            return result
        return wrapped

    worker.Worker._on_events = mark("wake", worker.Worker._on_events, before=True)
    intake.Intake.consider = mark("judge", intake.Intake.consider)
    Spool.claim = mark("claim", Spool.claim)
    attempt.Attempts.run = mark("schedule", attempt.Attempts.run, before=True)
    attempt.Attempts._work = mark("begin", attempt.Attempts._work, before=True)
    openai_chat.OpenAIChatBackend.complete = mark("prepare", openai_chat.OpenAIChatBackend.complete,
                                                  before=True)
    atexit.register(lambda: Path(marks).write_text(json.dumps(seen)))
    from koubou_spool.cli.koubou import main
    sys.argv = ["koubou", *argv]
    main()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure(pickups: int, fsync: bool) -> tuple[list[dict[str, float]], list[float]]:
    """Per pickup, the ms each stage took; and the bare openai client's call -> arrival."""
    from fake_openai import FakeOpenAI
    from peers import observe, systems
    fake = FakeOpenAI().start()
    rng = random.Random(3)
    with tempfile.TemporaryDirectory(prefix="koubou-stages-") as tmp:
        system = systems.Koubou(Path(tmp) / "k", fsync, sys.executable, base_url=fake.base_url)
        marks = Path(tmp) / "marks.json"
        system.spawn([sys.executable, __file__, "--child", str(marks), "worker", "--home",
                      str(system.spool.home), "--log-level", "warning"],
                     env={"PYTHONPATH": str(ROOT)})
        arrivals = system.arrivals()
        renamed = []
        try:
            system.submit(system.prepare("probe"))
            observe.wait_one(arrivals, "probe", 60)
            fake.request_seen.clear()
            with fake.lock:
                fake.requests.clear()
            for i in range(pickups):
                prepared = system.prepare(f"s{i:05d}")
                time.sleep(rng.uniform(0.005, 0.05))
                renamed.append(time.time())
                system.submit(prepared)
                observe.wait_one(arrivals, f"s{i:05d}", 60)
        finally:
            system.stop()
            arrivals.close()
            fake.stop()
        seen = json.loads(marks.read_text())
    with fake.lock:
        arrived = [r["at"] for r in fake.requests]
    return split(seen, renamed, arrived), []


def split(seen: list, renamed: list[float], arrived: list[float]) -> list[dict[str, float]]:
    """The marks of each pickup, in order (one pickup at a time), as ms per stage."""
    rows = []
    for n, (start, end) in enumerate(zip(renamed, arrived, strict=True)):
        nxt = renamed[n + 1] if n + 1 < len(renamed) else float("inf")
        marks: dict[str, float] = {}
        for stage, at in seen:
            if start <= at < nxt and stage not in marks:
                marks[stage] = at
        row, before = {}, start
        for stage, _ in STAGES[:-1]:
            at = marks.get(stage, before)
            row[stage] = (at - before) * 1000
            before = at
        row["client"] = (end - before) * 1000
        row["total"] = (end - start) * 1000
        rows.append(row)
    return rows


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pickups", type=int, default=300)
    parser.add_argument("--fsync", choices=("on", "off"), default="on")
    args = parser.parse_args()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    rows, _ = measure(args.pickups, args.fsync == "on")
    print(f"{len(rows)} pickups, fsync {args.fsync}, load average {load}")
    print(f"{'stage':<10} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7}  ends when")
    for stage, what in [*STAGES, ("total", "rename -> request at the fake")]:
        values = [r[stage] for r in rows]
        print(f"{stage:<10} {percentile(values, 50):>7.3f} {percentile(values, 90):>7.3f} "
              f"{percentile(values, 99):>7.3f}  {what}")
    print("\nthe ten slowest pickups, ms per stage:")
    print("  ".join(f"{s:>8}" for s in [*(s for s, _ in STAGES), "total"]))
    for row in sorted(rows, key=lambda r: r["total"])[-10:]:
        print("  ".join(f"{row[s]:>8.3f}" for s in [*(s for s, _ in STAGES), "total"]))


if __name__ == "__main__":
    main()
