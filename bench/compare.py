#!/usr/bin/env python3
"""koubou-spool side by side with what users would pick instead, in one run: prints one table.

    python bench/compare.py            # the full run (about 12 minutes on 2 cores)
    python bench/compare.py --quick    # a smoke run: small counts, one run each

It first builds a throwaway virtualenv (with this machine's site packages, so koubou and
inotify_simple are there) and installs the peers, huey and dirq, from PyPI; then it re-runs
itself inside it. Systems: koubou-spool (echo craftsman, fsync on and off), Huey (SqliteHuey,
thread and process consumers), python-dirq (QueueSimple, polling consumer), the seed design
(SQLite task_master polled every 5 s, SELECT-then-UPDATE claim) and a bare rename+inotify loop
(the floor). Every consumer is a real process on this machine; nothing leaves it but the pip
install. Figures are medians of the runs; compare them with each other, not with another machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from peers import observe, systems  # noqa: E402  (huey and dirq are imported only in the venv)
from peers.systems import System  # noqa: E402

Arrivals = observe.DirArrivals | observe.LogArrivals

VENV_MARK = "KOUBOU_COMPARE_VENV"
PEER_PACKAGES = ["huey", "dirq"]
TIMEOUT_S = 600
HEARTBEAT_S = 10  # koubou's spool.heartbeat_s in the configs written by peers/systems.py


@dataclass(frozen=True)
class Plan:
    """How much work each measurement does."""

    runs: int
    tasks: int
    seed_tasks: int
    pickups: int
    seed_pickups: int
    idle_s: float
    scale: tuple[int, ...]
    scale_sample: int
    real_tasks: int


FULL = Plan(runs=3, tasks=5000, seed_tasks=200, pickups=200, seed_pickups=5, idle_s=30,
            scale=(500, 10_000, 100_000), scale_sample=500, real_tasks=200)
QUICK = Plan(runs=1, tasks=300, seed_tasks=40, pickups=20, seed_pickups=2, idle_s=5,
             scale=(500, 2_000), scale_sample=200, real_tasks=50)


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the table."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the throwaway virtualenv ----------------------------------------------------------------

def bootstrap(argv: list[str]) -> int:
    """Create the virtualenv, install the peers, re-run this script inside it; its exit code."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="koubou-compare-venv-") as tmp:
        venv = Path(tmp) / "venv"
        log(f"creating a virtualenv in {venv} and installing {', '.join(PEER_PACKAGES)}")
        # System site packages: koubou (editable) and inotify_simple come from this interpreter.
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                       check=True, timeout=300)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", *PEER_PACKAGES], check=True, timeout=600)
        code = subprocess.run([str(venv / "bin" / "python"), str(Path(__file__).resolve()),
                               *argv], env={**os.environ, VENV_MARK: tmp}).returncode
    print(f"total wall time, virtualenv included: {(time.monotonic() - started) / 60:.1f} min")
    return code


# --- the machine -----------------------------------------------------------------------------

def file_system(path: Path) -> str:
    """Type, device and mount point of the file system holding `path`."""
    best = ("?", "?", "/")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        mount = left.split()[4]
        if str(path).startswith(mount) and len(mount) >= len(best[2]):
            fstype, device = right.split()[:2]
            best = (fstype, device, mount)
    return f"{best[0]} ({best[1]} on {best[2]})"


def machine(base: Path) -> str:
    """Cores, CPU model, kernel, Python, and the bench directory's file system."""
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                 platform.processor())
    return (f"{os.cpu_count()} cores, {model}; Linux {platform.release()}; "
            f"Python {platform.python_version()}; bench dir {base} on {file_system(base)}")


# --- one system at a time ----------------------------------------------------------------------

def percentile(values: list[float], p: float) -> float:
    """The p-th percentile, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def run_twice(system: System, ids: set[str]) -> int:
    """Executions beyond the first, over the given tasks."""
    return sum(count - 1 for task_id, count in system.executions().items() if task_id in ids)


def probe(system: System, arrivals: Arrivals) -> None:
    """One task through, so the consumer is up (the seed's may sleep 5 s first)."""
    system.submit(system.prepare("probe"))
    try:
        observe.wait_one(arrivals, "probe", 60)
    except TimeoutError:
        raise TimeoutError(f"the probe task did not finish: {system.diagnosis()}") from None


def throughput_run(system: System, n: int) -> dict:
    """A backlog of n loaded while the consumer is frozen (SIGSTOP), then drained.

    The consumer is started and probed first, so its start-up is neither timed nor in its CPU.
    """
    arrivals = system.arrivals()
    ids = [f"t{i:06d}" for i in range(n)]
    try:
        system.start()
        probe(system, arrivals)
        # Freeze only once the consumer is back asleep: a seed worker frozen inside a
        # transaction would hold the database lock against the submissions.
        time.sleep(0.5)
        pids = system.pids()
        observe.freeze(pids)
        cpu_before = observe.cpu_seconds(pids)
        first_submit = time.time()
        system.submit_backlog(ids)
        released = time.time()
        observe.thaw(pids)
        last = observe.wait_all(arrivals, ids, TIMEOUT_S)
        cpu = observe.cpu_seconds(system.pids()) - cpu_before
    finally:
        system.stop()
        arrivals.close()
    return {"e2e": n / (last - first_submit), "drain": n / (last - released),
            "cpu_1k": cpu / n * 1000, "twice": run_twice(system, set(ids))}


def pickup_samples(system: System, arrivals: Arrivals, n: int, prefix: str) -> dict:
    """n single submissions to an idle consumer, each after a random pause.

    The seed's pause spans its 5 s poll, so a submission lands at a random phase of it; a pause
    shorter than that would always land just after the poll that ran the previous task.
    """
    rng = random.Random(n)
    longest = getattr(system, "poll_s", 0) or 0.05
    latency, claim = [], []
    for i in range(n):
        task_id = f"{prefix}{i:04d}"
        prepared = system.prepare(task_id)
        time.sleep(rng.uniform(0.005, longest))
        submitted = time.time()
        system.submit(prepared)
        latency.append((observe.wait_one(arrivals, task_id, 60) - submitted) * 1000)
        if task_id in getattr(arrivals, "claimed", {}):
            claim.append((arrivals.claimed[task_id] - submitted) * 1000)
    out = {"p50": percentile(latency, 50), "p99": percentile(latency, 99), "n": n}
    if claim:
        out.update(claim_p50=percentile(claim, 50), claim_p99=percentile(claim, 99))
    return out


def pickup_run(system: System, n: int) -> dict:
    """Pickup latency of n single submissions, and how many ran twice."""
    arrivals = system.arrivals()
    try:
        system.start()
        probe(system, arrivals)
        figures = pickup_samples(system, arrivals, n, "p")
    finally:
        system.stop()
        arrivals.close()
    figures["twice"] = run_twice(system, {f"p{i:04d}" for i in range(n)})
    return figures


def median_of(runs: list[dict]) -> dict:
    """The median of each figure over the runs (sums for tasks run twice)."""
    keys = runs[0].keys()
    return {k: sum(r[k] for r in runs) if k == "twice" else statistics.median(r[k] for r in runs)
            for k in keys}


def repeat(make: Callable[[Path], System], base: Path, label: str, runs: int,
           one_run: Callable[[System], dict]) -> dict:
    """Run a measurement `runs` times on fresh state; the medians."""
    results = []
    for run in range(runs):
        for attempt in (1, 2):
            directory = base / f"{label}-{run}-{attempt}"
            system = make(directory)
            log(f"{label}: {system.name}, run {run + 1}/{runs}")
            try:
                results.append(one_run(system))
                break
            except (TimeoutError, OSError) as exc:
                # koubou_spool/ may be mid-edit by someone else: one retry, then give up.
                log(f"{label}: run {run + 1} failed ({exc})")
                if attempt == 2:
                    raise
            finally:
                shutil.rmtree(directory, ignore_errors=True)
    return median_of(results)


# --- idle, all systems at once ---------------------------------------------------------------

def idle_all(makers: dict[str, Callable[[Path], System]], base: Path, seconds: float) -> dict:
    """CPU % and wake-ups of every idle consumer, all measured over the same window."""
    systems = {key: make(base / f"idle-{key}") for key, make in makers.items()}
    started, watched, figures = [], {}, {}
    try:
        for key, system in systems.items():
            watched[key] = system.arrivals()
            started.append(system)
            system.start()
            probe(system, watched[key])
        time.sleep(1)  # let the probe's after-work settle before the window opens
        before = {k: (observe.cpu_seconds(s.pids()), observe.wakeups(s.pids()))
                  for k, s in systems.items()}
        time.sleep(seconds)
        for key, system in systems.items():
            pids = system.pids()
            figures[key] = {
                "cpu_percent": 100 * (observe.cpu_seconds(pids) - before[key][0]) / seconds,
                "wakeups": observe.wakeups(pids) - before[key][1],
                "threads": sum(len(os.listdir(f"/proc/{p}/task")) for p in pids)}
        for key, system in systems.items():
            figures[key]["after_idle_ms"] = first_pickup(system, watched[key])
    finally:
        for system in started:
            system.stop()
        for arrivals in watched.values():
            arrivals.close()
    return figures


def first_pickup(system: System, arrivals: Arrivals) -> float:
    """Latency of one task submitted after the idle window: a polling consumer has backed off."""
    prepared = system.prepare("after-idle")
    submitted = time.time()
    system.submit(prepared)
    return (observe.wait_one(arrivals, "after-idle", 60) - submitted) * 1000


# --- koubou at scale ---------------------------------------------------------------------------

def outcome_span(system: System, ids: list[str]) -> float:
    """Seconds from the first claim to the last finish, from koubou's outcome files."""
    from koubou_spool.spool import task as task_format
    starts, ends = [], []
    for task_id in ids:
        result = json.loads((system.spool.completed / f"{task_id}.json").read_bytes())["result"]
        starts.append(task_format.parse_iso(result["started_at"]))
        ends.append(task_format.parse_iso(result["finished_at"]))
    return max(ends) - min(starts)


def scale_one(system: System, run: int, plan: Plan) -> dict:
    """Submit rate, claim rate, pickup and RSS with the backlog queued and staying queued.

    The backlog asks for craftsman `parked`, which this worker does not serve: it scans and
    reads every backlog file at start, then they sit in pending/ during every measurement.
    """
    sample = [f"s{run}{i:04d}" for i in range(plan.scale_sample)]
    started = time.perf_counter()
    for task_id in sample:
        system.submit_backlog([task_id])
    submit_rate = len(sample) / (time.perf_counter() - started)
    arrivals = system.arrivals()
    try:
        system.start("--craftsman", "echo")
        observe.wait_all(arrivals, sample, TIMEOUT_S)
        figures = pickup_samples(system, arrivals, plan.pickups, f"p{run}")
        rss = observe.rss_mib(system.pids())
    finally:
        system.stop()
        arrivals.close()
    return {"submit": submit_rate, "claim": len(sample) / outcome_span(system, sample),
            "p50": figures["p50"], "p99": figures["p99"], "rss": rss}


def scale_all(make: Callable[[Path], System], base: Path, plan: Plan) -> dict:
    """scale_one at each pending count: one backlog, a fresh worker each run; medians."""
    figures = {}
    for pending in plan.scale:
        directory = base / f"scale-{pending}"
        try:
            log(f"scale: loading {pending:,} pending tasks")
            system = make(directory)
            system.submit_backlog([f"b{i:06d}" for i in range(pending)], craftsman="parked")
            runs = []
            for run in range(plan.runs):
                log(f"scale: koubou fsync off with {pending:,} pending, run {run + 1}/{plan.runs}")
                runs.append(scale_one(system, run, plan))
            figures[pending] = median_of(runs)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return figures


# --- the whole comparison ----------------------------------------------------------------------

def makers(consumers: int, baseline: Path | None) -> dict[str, Callable[[Path], System]]:
    """Each system by key, built fresh in a directory; `consumers` processes (or workers) each.

    With `baseline`, koubou is measured a second time from that source tree: the code before a
    change, in the same run."""
    python, bin_dir, n = sys.executable, Path(sys.executable).parent, consumers
    every = {
        "koubou_on": lambda d: systems.Koubou(d, True, python, n),
        "koubou_off": lambda d: systems.Koubou(d, False, python, n),
    }
    if baseline is not None:
        every["before_on"] = lambda d: systems.Koubou(d, True, python, n, baseline, " before")
        every["before_off"] = lambda d: systems.Koubou(d, False, python, n, baseline, " before")
    return {**every,
            "huey_thread": lambda d: systems.Huey(d, "thread", bin_dir, n),
            "huey_process": lambda d: systems.Huey(d, "process", bin_dir, n),
            "dirq": lambda d: systems.Dirq(d, python, n),
            "seed": lambda d: systems.Seed(d, python),
            "bare": lambda d: systems.Bare(d, python, True, n),
            "bare_nofsync": lambda d: systems.Bare(d, python, False, n)}


def measure(base: Path, plan: Plan, args: argparse.Namespace) -> dict:
    """Every figure of every system, in one run."""
    baseline = Path(args.baseline).resolve() if args.baseline else None
    every = makers(args.consumers, baseline)
    figures: dict = {"systems": {}, "plan": plan.__dict__, "consumers": args.consumers}
    for key, make in every.items():
        n = plan.seed_tasks if key == "seed" else plan.tasks
        pickups = plan.seed_pickups if key == "seed" else plan.pickups
        row = {"name": make(base / f"name-{key}").name, "tasks": n, "pickups": pickups}
        shutil.rmtree(base / f"name-{key}")
        row["throughput"] = repeat(make, base, f"throughput-{key}", plan.runs,
                                   lambda s, n=n: throughput_run(s, n))
        row["pickup"] = repeat(make, base, f"pickup-{key}", plan.runs,
                               lambda s, p=pickups: pickup_run(s, p))
        figures["systems"][key] = row
    log(f"idle: all {len(every)} systems at once for {plan.idle_s:g} s")
    for key, idle in idle_all(every, base, plan.idle_s).items():
        figures["systems"][key]["idle"] = idle
    sources = {"after": None, **({"before": baseline} if baseline else {})}
    figures["http_pickup"] = {label: http_pickup(base, plan, source)
                              for label, source in sources.items()}
    figures["scale"] = scale_all(lambda d: systems.Koubou(d, False, sys.executable), base, plan)
    figures["real"] = {label: real_engine(base, plan, source) for label, source in sources.items()}
    return figures


# --- pickup to an HTTP backend, next to the bare client -----------------------------------------

def http_pickup(base: Path, plan: Plan, source: Path | None) -> dict:
    """Rename into pending/ -> request at a loopback fake, next to the bare openai client's own
    call -> arrival at the same fake; one koubou pickup, then one client call, alternately."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_openai import FakeOpenAI
    fake = FakeOpenAI().start()
    system = systems.Koubou(base / f"http-{source is not None}", True, sys.executable,
                            source=source, base_url=fake.base_url)
    client = subprocess.Popen([sys.executable, str(ROOT / "bench" / "peers" / "bare_client.py"),
                               fake.base_url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    arrivals = system.arrivals()
    rng = random.Random(7)
    spool_ms, client_ms = [], []
    label = "before" if source else "after"
    try:
        system.start()
        probe(system, arrivals)
        client.stdin.write("warm\n")
        client.stdin.flush()
        client.stdout.readline()
        log(f"http pickup ({label}): {plan.pickups} koubou pickups and as many bare-client calls")
        for i in range(plan.pickups * plan.runs):
            prepared = system.prepare(f"h{i:05d}")
            time.sleep(rng.uniform(0.005, 0.05))
            fake.request_seen.clear()
            renamed = time.time()
            system.submit(prepared)
            spool_ms.append((arrival(fake) - renamed) * 1000)
            observe.wait_one(arrivals, f"h{i:05d}", 60)
            time.sleep(rng.uniform(0.005, 0.05))
            fake.request_seen.clear()
            client.stdin.write(f"{i}\n")
            client.stdin.flush()
            arrived = arrival(fake)
            called = float(client.stdout.readline().split()[1])
            client_ms.append((arrived - called) * 1000)
    finally:
        client.stdin.close()
        client.wait(10)
        system.stop()
        arrivals.close()
        fake.stop()
        shutil.rmtree(system.dir, ignore_errors=True)
    return {"koubou_p50": percentile(spool_ms, 50), "koubou_p99": percentile(spool_ms, 99),
            "client_p50": percentile(client_ms, 50), "client_p99": percentile(client_ms, 99),
            "n": len(spool_ms)}


def arrival(fake: Any) -> float:
    """When the next request reached the fake server."""
    if not fake.request_seen.wait(30):
        raise TimeoutError("no request reached the fake server in 30 s")
    with fake.lock:
        return fake.requests[-1]["at"]


# --- one request at a time on the real engine ---------------------------------------------------

def real_engine(base: Path, plan: Plan, source: Path | None) -> dict | None:
    """bench/real_server.py's max_concurrent 1 row: the spool against the bare client on the
    tests' llama.cpp engine, median of the runs; None when the engine is not built."""
    sys.path.insert(0, str(ROOT / "tests"))
    import realengine
    import real_server
    if not realengine.is_built():
        log("real engine: not built (python3 tests/realengine.py --build); row left out")
        return None
    (base / "server").mkdir(exist_ok=True)
    ratios, direct_rates, spool_rates = [], [], []
    with realengine.serving(base / "server") as base_url:
        asyncio.run(real_server.direct(base_url, 20, 1))
        for run in range(plan.runs):
            log(f"real engine ({'before' if source else 'after'}), run {run + 1}/{plan.runs}")
            plain = asyncio.run(real_server.direct(base_url, plan.real_tasks, 1))
            spooled = real_server.through_spool(base / f"real-{run}-{source is not None}",
                                                base_url, plan.real_tasks, 1, source)
            direct_rates.append(plain["tasks_per_s"])
            spool_rates.append(spooled["tasks_per_s"])
            ratios.append(spooled["tasks_per_s"] / plain["tasks_per_s"])
    return {"direct": statistics.median(direct_rates), "spool": statistics.median(spool_rates),
            "ratio": statistics.median(ratios), "tasks": plan.real_tasks}


# --- the table ---------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    """How a target reads in the table."""
    return "met" if ok else "MISSED"


def ratio_rows(f: dict, key: str) -> list[tuple[str, str, str, str]]:
    """The issue's targets for one koubou (key "koubou" or "before"), each a ratio of this run."""
    s, rows = f["systems"], []
    on, off = f"{key}_on", f"{key}_off"
    if on not in s:
        return rows
    tag = " (before)" if key == "before" else ""
    bare_on, bare_off = s["bare"]["throughput"]["drain"], s["bare_nofsync"]["throughput"]["drain"]
    ratio = s[on]["throughput"]["drain"] / bare_on
    rows.append((f"fsync on: drain / bare loop fsync every step{tag}", f"{ratio:.2f}x", ">= 1.2x",
                 verdict(ratio >= 1.2)))
    ratio = s[off]["throughput"]["drain"] / bare_off
    rows.append((f"fsync off: drain / bare loop no fsync{tag}", f"{ratio:.2f}x", ">= 0.75x",
                 verdict(ratio >= 0.75)))
    huey_cpu = min(s["huey_thread"]["throughput"]["cpu_1k"], s["huey_process"]["throughput"]["cpu_1k"])
    cpu = s[off]["throughput"]["cpu_1k"]
    rows.append((f"fsync off: CPU s / 1k tasks, koubou / Huey's lower{tag}",
                 f"{cpu:.2f} / {huey_cpu:.2f}", "<= 1x", verdict(cpu <= huey_cpu)))
    label = "before" if key == "before" else "after"
    http = f.get("http_pickup", {}).get(label)
    if http:
        for p, limit in (("p50", 0.5), ("p99", 2.0)):
            over = http[f"koubou_{p}"] - http[f"client_{p}"]
            rows.append((f"pickup {p}: rename -> request at the fake, above the bare client{tag}",
                         f"{http[f'koubou_{p}']:.2f} - {http[f'client_{p}']:.2f} = {over:+.2f} ms",
                         f"<= {limit:g} ms", verdict(over <= limit)))
    real = f.get("real", {}).get(label)
    if real:
        rows.append((f"real engine, max_concurrent 1: spool / bare client{tag}",
                     f"{real['spool']:.1f} / {real['direct']:.1f} = {real['ratio']:.2f}x", ">= 0.95x",
                     verdict(real["ratio"] >= 0.95)))
    return rows


def targets(f: dict) -> list[tuple[str, str, str, str]]:
    """(target, measured, wanted, verdict) for each target, koubou now and (if measured) before."""
    s, rows = f["systems"], [*ratio_rows(f, "koubou"), *ratio_rows(f, "before")]
    idle_s = f["plan"]["idle_s"]
    heartbeats = idle_s / HEARTBEAT_S
    for key in ("koubou_on", "koubou_off"):
        idle = s[key]["idle"]
        rows.append((f"{s[key]['name']}: idle CPU over {idle_s:g} s",
                     f"{idle['cpu_percent']:.3f} %", "<= 0.5 %", verdict(idle["cpu_percent"] <= 0.5)))
        # Measured on a lone idle worker: each heartbeat wakes the ledger writer once and the
        # event loop once or twice (the timer, then the writer's hand-back), and nothing else
        # does. The window can also catch the tail of a heartbeat begun just before it. Each
        # consumer process has its own heartbeats.
        beats = math.ceil(heartbeats) + 1
        allowed = 3 * beats * f["consumers"]
        rows.append((f"{s[key]['name']}: wake-ups while idle", f"{idle['wakeups']}",
                     f"<= {allowed} ({beats} heartbeats x 3 wake-ups x {f['consumers']})",
                     verdict(idle["wakeups"] <= allowed)))
    scale = f["scale"]
    small, large = min(scale, key=int), max(scale, key=int)
    ratio = scale[large]["claim"] / scale[small]["claim"]
    rows.append((f"claim rate {int(large):,} / {int(small):,} pending", f"{ratio:.2f}",
                 ">= 0.67", verdict(ratio >= 2 / 3)))
    return rows


def print_grid(header: list[str], rows: list[list[str]]) -> None:
    """Left-aligned first column, right-aligned figures."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [f"{row[0]:<{widths[0]}}"] + [f"{c:>{w}}" for c, w in zip(row[1:], widths[1:], strict=True)]
        print("  ".join(cells).rstrip())


def system_rows(f: dict) -> list[list[str]]:
    """One row per system, then the koubou targets under the figures they apply to."""
    rows = []
    for row in f["systems"].values():
        t, p, i = row["throughput"], row["pickup"], row["idle"]
        rows.append([row["name"], f"{row['tasks']:,}", f"{t['e2e']:.0f}", f"{t['drain']:.0f}",
                     f"{p['p50']:.2f}", f"{p['p99']:.2f}", f"{p['n']}", f"{t['cpu_1k']:.2f}",
                     f"{i['cpu_percent']:.3f}", f"{i['wakeups']}", f"{i['after_idle_ms']:.1f}",
                     f"{t['twice'] + p['twice']}"])
    return rows


def print_table(f: dict, wall_s: float) -> None:
    """The one table, with the machine, the method notes and the targets."""
    plan = f["plan"]
    print(f"machine: {f['machine']}")
    print(f"load average at the start / end: {f['load_start']} / {f['load_end']}")
    print(f"runs: median of {plan['runs']}; {f['consumers']} consumer processes (Huey: workers) "
          f"per system; peers: {f['peers']}\n")
    print_grid(["system", "tasks", "e2e tasks/s", "drain tasks/s", "pickup p50 ms", "p99 ms",
                "pickups", "CPU s/1k tasks", f"idle CPU % ({plan['idle_s']:g} s)", "idle wake-ups",
                "1st pickup after idle ms", "run twice"], system_rows(f))
    for key in ("koubou_on", "koubou_off", "before_on", "before_off"):
        p = f["systems"].get(key, {}).get("pickup", {})
        if "claim_p50" in p:
            print(f"  {f['systems'][key]['name']}: rename -> claim (IN_MOVED_TO in in_progress/) "
                  f"p50 {p['claim_p50']:.2f} ms, p99 {p['claim_p99']:.2f} ms")
    print("\nkoubou at scale (fsync off; backlog addressed to a craftsman this worker does not "
          "serve, so it stays pending)")
    rows = [[f"{int(n):,}", f"{s['submit']:.0f}", f"{s['claim']:.0f}", f"{s['p50']:.2f}",
             f"{s['p99']:.2f}", f"{s['rss']:.1f}"] for n, s in f["scale"].items()]
    print_grid(["pending", "submit tasks/s", "claim tasks/s", "pickup p50 ms", "p99 ms",
                "worker RSS MiB"], rows)
    print("\npickup to an HTTP backend (loopback fake; koubou fsync on, openai craftsman), next "
          "to the bare openai client's call -> arrival, alternating")
    rows = [[label, f"{h['koubou_p50']:.2f}", f"{h['koubou_p99']:.2f}", f"{h['client_p50']:.2f}",
             f"{h['client_p99']:.2f}", f"{h['n']}"] for label, h in f["http_pickup"].items()]
    print_grid(["koubou", "rename -> request p50 ms", "p99 ms", "client call -> arrival p50 ms",
                "p99 ms", "samples"], rows)
    real = {label: r for label, r in f["real"].items() if r}
    if real:
        print("\nreal llama.cpp engine (tests' tiny model), max_concurrent 1, "
              f"{next(iter(real.values()))['tasks']} tasks, median of {plan['runs']}")
        print_grid(["koubou", "bare client tasks/s", "spool tasks/s", "ratio"],
                   [[label, f"{r['direct']:.1f}", f"{r['spool']:.1f}", f"{r['ratio']:.2f}"]
                    for label, r in real.items()])
    print("\ntargets")
    print_grid(["target", "measured", "wanted", "verdict"], [list(r) for r in targets(f)])
    print(NOTES.format(**plan, consumers=f["consumers"]))
    print(f"wall time: {wall_s / 60:.1f} min")


NOTES = """
how it was measured
- e2e: {tasks:,} no-op tasks (the seed: {seed_tasks:,}, its per-statement commits are slow) from
  the first submit to the last result persisted, the backlog loaded while the consumer was frozen
  (SIGSTOP, started and probed beforehand); drain: from its release (SIGCONT) to the last result.
- result persisted: koubou's outcome file in completed/, the bare loop's file in done/ (inotify
  on the directory); Huey, dirq and the seed append the task id to a log after their result is
  stored (inotify on the log). Each system logs at its default level, to a file.
- pickup: {pickups} single submissions per run (the seed: {seed_pickups}, it polls every 5 s), each
  after a random 5-50 ms pause (the seed: 5 ms-5 s, a random phase of its poll). koubou and the
  bare loop: from the rename into pending/ of a file already written and fsynced in tmp/, to
  the outcome file (koubou: completed/, echo craftsman, no HTTP request).
  Peers: from the enqueue call to the logged result.
- CPU s/1k tasks: utime+stime of the consumer processes and their children (/proc) during the drain.
- idle: all systems started together and measured over the SAME {idle_s:g} s window (concurrently,
  to fit the time budget); wake-ups are voluntary context switches of all their threads. Then one task
  each, one system after another: "1st pickup after idle" (Huey backs off to polling every 10 s).
- run twice: executions beyond the first (koubou: completed attempts in the ledger; Huey, dirq,
  seed: lines in the execution log; bare: a rename happens once) over throughput and pickup runs.
- consumers: {consumers} processes per system (koubou workers, bare loops, dirq loops; Huey: -w
  {consumers} workers in one consumer); the seed: 2 worker processes. Huey: SqliteHuey defaults;
  dirq: polls every 0.1 s when a pass finds nothing (our choice: its docs show one pass).
- the throughput targets compare drains (the consumer's own work, not the submissions'); bare
  loop "fsync every step": rename, fsync of the file, fsync of done/ per task; "no fsync": the
  rename alone.
- pickup to an HTTP backend: one koubou worker (fsync on, an openai craftsman) and the bare
  openai client (bench/peers/bare_client.py, AsyncOpenAI, a process of its own) against the
  same loopback fake in this process, alternating, each after a random 5-50 ms pause: koubou
  from the rename into pending/, the client from its call, to the request's arrival.
- real engine: bench/real_server.py's max_concurrent 1 row (one worker, --concurrency 1,
  fsync on) next to the bare client, {real_tasks} tasks a run, when the tests' engine is built.
- "before": the same koubou measurements from the --baseline source tree, in the same run."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one run each")
    parser.add_argument("--dir", help="where to put the bench's files (default: the temp dir)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--consumers", type=int, default=2,
                        help="consumer processes per system (Huey: workers); default 2")
    parser.add_argument("--baseline", help="also measure koubou from this source tree (e.g. "
                        "`git worktree add /tmp/before main`): before and after in one run")
    return parser.parse_args(argv)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on a shared machine skews a run."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def peer_versions() -> str:
    """Versions of the installed peers."""
    from importlib.metadata import version
    return ", ".join(f"{name} {version(name)}" for name in PEER_PACKAGES)


def run(args: argparse.Namespace) -> None:
    """Measure everything and print the table (inside the virtualenv)."""
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="koubou-compare-", dir=args.dir)).resolve()
    try:
        load_start = load_average()
        figures = measure(base, QUICK if args.quick else FULL, args)
        figures["machine"], figures["peers"] = machine(base), peer_versions()
        figures["load_start"], figures["load_end"] = load_start, load_average()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print_table(figures, time.monotonic() - started)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))


def main() -> None:
    """Outside the virtualenv: build it and re-run there. Inside: measure."""
    args = parse_args(sys.argv[1:])
    if VENV_MARK not in os.environ:
        sys.exit(bootstrap(sys.argv[1:]))
    run(args)


if __name__ == "__main__":
    main()
