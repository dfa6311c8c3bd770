#!/usr/bin/env python3
"""Spool benchmarks: pickup latency, throughput, concurrency, scale, idle cost. Prints a table.

    python bench/run.py            # everything, about 6 minutes on 2 cores
    python bench/run.py --quick    # smaller counts, for a smoke run

Figures are measured here, on this machine, in one run; compare them with each other rather
than with another machine's. Workers are real `koubou worker` processes; the backend is the
loopback fake OpenAI server from tests/ in its own process, or the built-in echo craftsman.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from koubou_spool.spool import home as home_module  # noqa: E402
from koubou_spool.spool import task as task_format  # noqa: E402
from koubou_spool.spool.files import Spool  # noqa: E402
from koubou_spool.spool.watcher import wait_for_files  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


class FakeServer:
    """tests/fake_openai.py in its own process, so its work does not share our GIL."""

    def __init__(self, latency_ms: float = 0) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai.py"),
                                      "--latency-ms", str(latency_ms)], stdout=subprocess.PIPE,
                                     text=True)
        self.port = int(self.proc.stdout.readline())
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def make_home(base: Path, name: str, *, fsync: bool, base_url: str = "http://127.0.0.1:9/v1",
              max_concurrent: int = 16) -> Spool:
    home = base / name
    home_module.init(home)
    config = {"craftsmen": {
        "local": {"backend": "openai", "base_url": base_url, "model": "fake-model",
                  "local": True, "max_concurrent": max_concurrent, "retries": 0},
        "echo": {"backend": "echo", "max_concurrent": max_concurrent}},
        "routing": {"rules": [{"then": "local"}]},
        "spool": {"fsync": fsync, "heartbeat_s": 10}}
    (home / "config" / "koubou.yaml").write_text(yaml.safe_dump(config))
    return Spool.open(home, type("S", (), {"fsync": fsync, "max_task_bytes": 1 << 20})())


def start_worker(spool: Spool, *args: str, source: Path | None = None) -> subprocess.Popen:
    """A `koubou worker` from this checkout (or from the source tree `source`)."""
    env = {**os.environ, "PYTHONPATH": str(source or ROOT)}
    # Not from the caller's directory: `-m` puts it first on sys.path, and from a checkout
    # that directory's koubou_spool would be imported instead of `source`'s.
    return subprocess.Popen([sys.executable, "-m", "koubou_spool.cli.koubou", "worker",
                             "--home", str(spool.home), "--log-level", "warning", *args],
                            stdin=subprocess.DEVNULL, env=env, cwd=spool.home)


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def wait_ready(spool: Spool) -> None:
    """A worker is up once its lock file exists and a probe task went through."""
    probe = task_format.validate({"content": "probe", "craftsman": "echo"})
    spool.submit([probe])
    assert wait_for_files([spool.completed], {f"{probe.id}.json"}, 30)


def tasks(n: int, **fields: object) -> list[task_format.Task]:
    return [task_format.validate({"content": f"task {i}", **fields}) for i in range(n)]


def result_of(spool: Spool, task_id: str) -> dict:
    """The `result` of a completed task."""
    return json.loads((spool.completed / f"{task_id}.json").read_bytes())["result"]


def outcome_span(spool: Spool, ids: list[str]) -> float:
    """Seconds from the first claim to the last finish, from the outcome files."""
    starts, ends = [], []
    for task_id in ids:
        result = json.loads((spool.completed / f"{task_id}.json").read_bytes())["result"]
        starts.append(task_format.parse_iso(result["started_at"]))
        ends.append(task_format.parse_iso(result["finished_at"]))
    return max(ends) - min(starts)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- the measurements ------------------------------------------------------------------------

def measure_pickup(base: Path, count: int) -> dict:
    """Pickup latency: from the rename into pending/ to the request reaching the backend."""
    fake_latency = _RequestClock()
    spool = make_home(base, "pickup", fsync=True, base_url=fake_latency.base_url)
    worker = start_worker(spool)
    samples = []
    try:
        wait_ready(spool)
        # The first request opens the connection and finishes lazy imports: noted apart.
        warm = task_format.validate({"content": "first request"})
        before = time.time()
        spool.submit([warm])
        cold_ms = (fake_latency.wait_request() - before) * 1000
        assert wait_for_files([spool.completed], {f"{warm.id}.json"}, 30)
        for i in range(count):
            task = task_format.validate({"content": f"pickup {i}"})
            tmp = spool._write_tmp(task.id, task_format.encode(task.raw))
            before = time.time()
            os.rename(tmp, spool.pending / f"{task.id}.json")
            arrived = fake_latency.wait_request()
            samples.append((arrived - before) * 1000)
            assert wait_for_files([spool.completed], {f"{task.id}.json"}, 30)
            time.sleep(0.005)  # bench pacing: let the worker go idle again
    finally:
        stop_worker(worker)
        fake_latency.stop()
    return {"p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99),
            "n": len(samples), "first_ms": cold_ms}


class _RequestClock:
    """A minimal in-process HTTP backend that notes when each request arrives."""

    def __init__(self) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        from fake_openai import FakeOpenAI
        self.fake = FakeOpenAI().start()
        self.base_url = self.fake.base_url

    def wait_request(self) -> float:
        assert self.fake.request_seen.wait(30)
        self.fake.request_seen.clear()
        with self.fake.lock:
            return self.fake.requests[-1]["at"]

    def stop(self) -> None:
        self.fake.stop()


def measure_throughput(base: Path, count: int, fsync: bool) -> dict:
    """A pre-loaded backlog through one worker against a zero-latency loopback backend."""
    fake = FakeServer()
    spool = make_home(base, f"throughput-{fsync}", fsync=fsync, base_url=fake.base_url)
    batch = tasks(count)
    spool.submit(batch)
    worker = start_worker(spool, "--drain")
    try:
        assert worker.wait(600) == 0
    finally:
        stop_worker(worker)
        fake.stop()
    span = outcome_span(spool, [t.id for t in batch])
    return {"tasks_per_s": count / span, "n": count}


def measure_concurrency(base: Path, count: int) -> dict:
    """One worker, max_concurrent 16, backend latency 200 ms: share of the ideal 80 tasks/s."""
    fake = FakeServer(latency_ms=200)
    spool = make_home(base, "concurrency", fsync=True, base_url=fake.base_url, max_concurrent=16)
    batch = tasks(count)
    spool.submit(batch)
    worker = start_worker(spool, "--drain", "--concurrency", "16")
    try:
        assert worker.wait(600) == 0
    finally:
        stop_worker(worker)
        fake.stop()
    rate = count / outcome_span(spool, [t.id for t in batch])
    return {"tasks_per_s": rate, "ideal": 16 / 0.2, "share": rate / (16 / 0.2)}


def measure_scale(base: Path, pending: int, sample: int) -> dict:
    """Submit and claim rates with `pending` tasks already queued (echo craftsman, fsync off)."""
    base.mkdir(parents=True, exist_ok=True)
    spool = make_home(base, f"scale-{pending}", fsync=False)
    spool.submit(tasks(pending, craftsman="echo", priority=1))
    extra = tasks(sample, craftsman="echo", priority=10)  # claimed first: the heap's top
    started = time.perf_counter()
    for task in extra:
        spool.submit([task])
    submit_rate = sample / (time.perf_counter() - started)
    worker = start_worker(spool, "--concurrency", "16")
    try:
        names = {f"{t.id}.json" for t in extra}
        assert wait_for_files([spool.completed], names, 600) == names
        rss = rss_mib(worker.pid)
    finally:
        stop_worker(worker)
    claim_rate = sample / outcome_span(spool, [t.id for t in extra])
    return {"submit_per_s": submit_rate, "claim_per_s": claim_rate, "rss_mib": rss}


def median_of(runs: list[dict]) -> dict:
    """Each figure's median over runs: a disk busy for one run does not skew the ratio."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def measure_idle(base: Path, seconds: float) -> dict:
    spool = make_home(base, "idle", fsync=True)
    worker = start_worker(spool)
    try:
        wait_ready(spool)
        time.sleep(1)
        before = cpu_seconds(worker.pid)
        time.sleep(seconds)
        used = cpu_seconds(worker.pid) - before
        rss = rss_mib(worker.pid)
    finally:
        stop_worker(worker)
    return {"cpu_percent": 100 * used / seconds, "rss_mib": rss, "seconds": seconds}


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                 platform.processor())
    return (f"{os.cpu_count()} cores, {model}; Linux {platform.release()}; "
            f"Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    q = args.quick
    figures = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="koubou-bench-") as tmp:
        base = Path(tmp)
        figures["pickup"] = measure_pickup(base, 50 if q else 200)
        for fsync in (True, False):
            figures[f"throughput_fsync_{'on' if fsync else 'off'}"] = measure_throughput(
                base, 1000 if q else 5000, fsync)
        figures["concurrency"] = measure_concurrency(base, 80 if q else 320)
        for pending in (500, 5000 if q else 50_000):
            figures[f"scale_{pending}"] = median_of(
                [measure_scale(base / f"run{n}", pending, 500) for n in range(3)])
        figures["idle"] = measure_idle(base, 5 if q else 30)
    print_table(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


def print_table(f: dict) -> None:
    small = "scale_500"
    large = max((k for k in f if k.startswith("scale_")), key=lambda k: int(k[6:]))
    rows = [
        ("pickup latency p50 (rename -> backend request)", f"{f['pickup']['p50_ms']:.2f} ms",
         "<= 5 ms"),
        ("pickup latency p99", f"{f['pickup']['p99_ms']:.2f} ms", "<= 25 ms"),
        ("pickup of the first task (opens the connection)", f"{f['pickup']['first_ms']:.1f} ms", ""),
        (f"throughput, {f['throughput_fsync_on']['n']} tasks, fsync on",
         f"{f['throughput_fsync_on']['tasks_per_s']:.0f} tasks/s", ""),
        (f"throughput, {f['throughput_fsync_off']['n']} tasks, fsync off",
         f"{f['throughput_fsync_off']['tasks_per_s']:.0f} tasks/s", ""),
        ("max_concurrent 16, 200 ms backend", f"{f['concurrency']['tasks_per_s']:.1f} tasks/s "
         f"({100 * f['concurrency']['share']:.0f}% of 80)", ">= 90%"),
    ]
    for key in (small, large):
        n = key[6:]
        rows.append((f"submit rate, {n} pending", f"{f[key]['submit_per_s']:.0f} tasks/s", ""))
        rows.append((f"claim rate, {n} pending", f"{f[key]['claim_per_s']:.0f} tasks/s", ""))
        rows.append((f"worker RSS, {n} pending", f"{f[key]['rss_mib']:.1f} MiB", ""))
    rows.append((f"submit rate ratio {small[6:]} / {large[6:]} pending",
                 f"{f[small]['submit_per_s'] / f[large]['submit_per_s']:.2f}x", "<= 1.5x"))
    rows.append((f"claim rate ratio {small[6:]} / {large[6:]} pending",
                 f"{f[small]['claim_per_s'] / f[large]['claim_per_s']:.2f}x", "<= 1.5x"))
    rows.append((f"idle worker CPU over {f['idle']['seconds']:g} s",
                 f"{f['idle']['cpu_percent']:.3f} %", "< 0.5 %"))
    rows.append(("idle worker RSS", f"{f['idle']['rss_mib']:.1f} MiB", ""))
    print(f"machine: {f['machine']}")
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':{width}}  {'measured':>26}  target")
    for name, value, target in rows:
        print(f"{name:{width}}  {value:>26}  {target}")


if __name__ == "__main__":
    main()
