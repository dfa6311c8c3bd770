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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
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


FULL = Plan(runs=3, tasks=5000, seed_tasks=200, pickups=200, seed_pickups=5, idle_s=30,
            scale=(500, 10_000, 100_000), scale_sample=500)
QUICK = Plan(runs=1, tasks=300, seed_tasks=40, pickups=20, seed_pickups=2, idle_s=5,
             scale=(500, 2_000), scale_sample=200)


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

def makers() -> dict[str, Callable[[Path], System]]:
    """Each system by key, built fresh in a directory."""
    python, bin_dir = sys.executable, Path(sys.executable).parent
    return {
        "koubou_on": lambda d: systems.Koubou(d, True, python),
        "koubou_off": lambda d: systems.Koubou(d, False, python),
        "huey_thread": lambda d: systems.Huey(d, "thread", bin_dir),
        "huey_process": lambda d: systems.Huey(d, "process", bin_dir),
        "dirq": lambda d: systems.Dirq(d, python),
        "seed": lambda d: systems.Seed(d, python),
        "bare": lambda d: systems.Bare(d, python),
    }


def measure(base: Path, plan: Plan) -> dict:
    """Every figure of every system, in one run."""
    every = makers()
    figures: dict = {"systems": {}, "plan": plan.__dict__}
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
    figures["scale"] = scale_all(every["koubou_off"], base, plan)
    return figures


# --- the table ---------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    """How a target reads in the table."""
    return "met" if ok else "MISSED"


def targets(f: dict) -> list[tuple[str, str, str, str]]:
    """(target, measured, wanted, verdict) for each of the issue's targets."""
    s, rows = f["systems"], []
    for key in ("koubou_on", "koubou_off"):
        p = s[key]["pickup"]
        rows.append((f"{s[key]['name']}: pickup p50 (rename -> outcome file)", f"{p['p50']:.2f} ms",
                     "<= 1 ms", verdict(p["p50"] <= 1)))
        rows.append((f"{s[key]['name']}: pickup p99", f"{p['p99']:.2f} ms", "<= 5 ms",
                     verdict(p["p99"] <= 5)))
    huey = max(s["huey_thread"]["throughput"]["e2e"], s["huey_process"]["throughput"]["e2e"])
    off = s["koubou_off"]["throughput"]["e2e"]
    rows.append(("throughput fsync off / Huey's best", f"{off / huey:.2f}x", ">= 2x",
                 verdict(off >= 2 * huey)))
    on, bare = s["koubou_on"]["throughput"]["e2e"], s["bare"]["throughput"]["e2e"]
    rows.append(("throughput fsync on / bare loop with fsync", f"{100 * on / bare:.0f} %", ">= 80 %",
                 verdict(on >= 0.8 * bare)))
    idle_s = f["plan"]["idle_s"]
    heartbeats = idle_s / HEARTBEAT_S
    for key in ("koubou_on", "koubou_off"):
        idle = s[key]["idle"]
        rows.append((f"{s[key]['name']}: idle CPU over {idle_s:g} s",
                     f"{idle['cpu_percent']:.3f} %", "<= 0.5 %", verdict(idle["cpu_percent"] <= 0.5)))
        # Measured on a lone idle worker: each heartbeat wakes the ledger writer once and the
        # event loop once or twice (the timer, then the writer's hand-back), and nothing else
        # does. The window can also catch the tail of a heartbeat begun just before it.
        beats = math.ceil(heartbeats) + 1
        allowed = 3 * beats
        rows.append((f"{s[key]['name']}: wake-ups while idle", f"{idle['wakeups']}",
                     f"<= {allowed} ({beats} heartbeats x 3 wake-ups)",
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
    rows.append(["target (koubou)", "", "2x huey/80% bare", "", "<= 1", "<= 5", "", "",
                 "<= 0.5", "heartbeats", "", "0"])
    return rows


def print_table(f: dict, wall_s: float) -> None:
    """The one table, with the machine, the method notes and the targets."""
    plan = f["plan"]
    print(f"machine: {f['machine']}")
    print(f"runs: median of {plan['runs']}; peers: {f['peers']}\n")
    print_grid(["system", "tasks", "e2e tasks/s", "drain tasks/s", "pickup p50 ms", "p99 ms",
                "pickups", "CPU s/1k tasks", f"idle CPU % ({plan['idle_s']:g} s)", "idle wake-ups",
                "1st pickup after idle ms", "run twice"], system_rows(f))
    for key in ("koubou_on", "koubou_off"):
        p = f["systems"][key]["pickup"]
        if "claim_p50" in p:
            print(f"  {f['systems'][key]['name']}: rename -> claim (IN_MOVED_TO in in_progress/) "
                  f"p50 {p['claim_p50']:.2f} ms, p99 {p['claim_p99']:.2f} ms")
    print("\nkoubou at scale (fsync off; backlog addressed to a craftsman this worker does not "
          "serve, so it stays pending)")
    rows = [[f"{int(n):,}", f"{s['submit']:.0f}", f"{s['claim']:.0f}", f"{s['p50']:.2f}",
             f"{s['p99']:.2f}", f"{s['rss']:.1f}"] for n, s in f["scale"].items()]
    print_grid(["pending", "submit tasks/s", "claim tasks/s", "pickup p50 ms", "p99 ms",
                "worker RSS MiB"], rows)
    print("\ntargets")
    print_grid(["target", "measured", "wanted", "verdict"], [list(r) for r in targets(f)])
    print(NOTES.format(**plan))
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
- Huey: SqliteHuey defaults, huey_consumer defaults (1 worker); dirq: polls every 0.1 s when a pass
  finds nothing (our choice: its docs show one pass); seed: 2 worker processes."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, one run each")
    parser.add_argument("--dir", help="where to put the bench's files (default: the temp dir)")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args(argv)


def peer_versions() -> str:
    """Versions of the installed peers."""
    from importlib.metadata import version
    return ", ".join(f"{name} {version(name)}" for name in PEER_PACKAGES)


def run(args: argparse.Namespace) -> None:
    """Measure everything and print the table (inside the virtualenv)."""
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="koubou-compare-", dir=args.dir)).resolve()
    try:
        figures = measure(base, QUICK if args.quick else FULL)
        figures["machine"], figures["peers"] = machine(base), peer_versions()
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
