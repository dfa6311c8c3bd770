#!/usr/bin/env python3
"""Cluster benchmarks (#16): pickup and throughput across hosts against one host's spool, and
the NOTIFY wake-up delay. Prints a table.

    python bench/cluster.py            # about a minute on 2 cores
    python bench/cluster.py --quick    # smaller counts, for a smoke run
    python bench/cluster.py --source /tmp/before   # the processes from another checkout
                                                   # (`git worktree add /tmp/before main`)

Three homes on this machine: host-a and host-b share a real PostgreSQL started here
(tests/pgserver.py: initdb into a temporary directory, loopback only; its own fsync on unless
--pg-fsync off, as in the tests), each with its own `koubou worker` and `koubou cluster`
processes (this checkout) and cluster.host; `solo` has no cluster, only a worker: the
single-host spool. Host b and solo serve `remote` (an openai craftsman at the loopback fake
server in this process) and `echo`; host a serves neither, so everything dropped there crosses.
The spool's fsync is on everywhere.

- pickup: a task renamed into a pending/ -> its request at the fake, one at a time after a
  random 5-50 ms pause (as bench/run.py's pickups); across hosts also the round trip, to its
  outcome in host a's completed/;
- throughput: a backlog dropped at once (one submit), echo craftsman (max_concurrent 64): its
  size over the time from the drop to the last outcome in the origin's completed/; one host and
  across take turns three times, the median printed, with each process's CPU in that run and
  the database's write transactions (commits that wait for its WAL) per task;
- wake-up: `SELECT pg_notify(...)` on an autocommit connection -> a `Wakeups` listener in
  another process returns from its wait; from the statement's send, and from its reply.

Figures are this machine's, from one run; compare them with each other, not with another
machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import pgserver  # noqa: E402
import run as spool_bench  # noqa: E402
from fake_openai import FakeOpenAI  # noqa: E402
from koubou_spool.spool import home as home_module, task as task_format  # noqa: E402
from koubou_spool.spool.files import Spool  # noqa: E402
from koubou_spool.spool.watcher import wait_for_files  # noqa: E402

DSN_ENV = "KOUBOU_BENCH_CLUSTER_DSN"
SLOTS = 64
ROUNDS = 3  # throughput runs of each, taking turns
SOURCE = {"tree": ROOT}  # where the homes' processes run from (--source)


# --- the homes ---------------------------------------------------------------------------------

def make_home(base: Path, name: str, fake_url: str, cluster: bool) -> Spool:
    """A home with craftsmen `remote` (the fake), `echo` and `probe` (echo); in the cluster
    as host NAME when `cluster`."""
    home = base / name
    home_module.init(home)
    config = {
        "craftsmen": {
            "remote": {"backend": "openai", "base_url": fake_url, "model": "fake-model",
                       "local": True, "max_concurrent": 16, "retries": 0},
            "echo": {"backend": "echo", "max_concurrent": SLOTS},
            "probe": {"backend": "echo", "max_concurrent": 4}},
        "routing": {"rules": [{"then": "remote"}]},
        "spool": {"fsync": True, "heartbeat_s": 5}}
    if cluster:
        config["cluster"] = {"dsn_env": DSN_ENV, "host": name, "lease_s": 30}
    (home / "config" / "koubou.yaml").write_text(yaml.safe_dump(config))
    return Spool.open(home)


def start(spool: Spool, command: str, *args: str) -> subprocess.Popen:
    """`koubou COMMAND` on the home, from this checkout or the one --source names (its
    directory the working one too: `python -m` puts that first on sys.path)."""
    return subprocess.Popen([sys.executable, "-m", "koubou_spool.cli.koubou", command, "--home",
                             str(spool.home), "--log-level", "warning", *args],
                            stdin=subprocess.DEVNULL, cwd=SOURCE["tree"],
                            env={**os.environ, "PYTHONPATH": str(SOURCE["tree"])})


def serve(spool: Spool, craftsmen: list[str], bridge: bool) -> list[subprocess.Popen]:
    """A worker of these craftsmen (and the home's bridge), once registered."""
    procs = [start(spool, "worker", *[a for c in craftsmen for a in ("--craftsman", c)])]
    if bridge:
        procs.append(start(spool, "cluster"))
    deadline = time.monotonic() + 30
    while len(spool.worker_ids()) < len(procs):  # nothing announces a registration
        assert time.monotonic() < deadline, f"{spool.home}: not every process registered"
        time.sleep(0.02)
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(30)


# --- the measurements --------------------------------------------------------------------------

def wait_request(fake: FakeOpenAI) -> float:
    """When the next request reached the fake (epoch seconds)."""
    assert fake.request_seen.wait(30), "no request reached the fake in 30 s"
    fake.request_seen.clear()
    with fake.lock:
        return fake.requests[-1]["at"]


def drop(spool: Spool, task: task_format.Task) -> float:
    """Rename a task into pending/ as a dropped file arrives; when (epoch seconds)."""
    tmp = spool._write_tmp(task.id, task_format.encode(task.raw))
    before = time.time()
    os.rename(tmp, spool.pending / f"{task.id}.json")
    return before


def measure_pickup(origin: Spool, fake: FakeOpenAI, count: int) -> dict:
    """ms from the rename into origin's pending/ to the request at the fake, and to the
    outcome in origin's completed/, one task at a time."""
    pickups, trips = [], []
    for n in range(count + 3):  # the first ones open connections and finish lazy imports
        task = task_format.validate({"content": f"pickup {n}", "craftsman": "remote"})
        dropped = drop(origin, task)
        arrived = wait_request(fake)
        assert wait_for_files([origin.completed], {f"{task.id}.json"}, 30)
        if n >= 3:
            pickups.append((arrived - dropped) * 1000)
            trips.append((time.time() - dropped) * 1000)
        time.sleep(random.uniform(0.005, 0.05))
    return {"p50_ms": spool_bench.percentile(pickups, 50),
            "p99_ms": spool_bench.percentile(pickups, 99),
            "trip_p50_ms": spool_bench.percentile(trips, 50),
            "trip_p99_ms": spool_bench.percentile(trips, 99), "n": count}


def measure_throughput(origin: Spool, count: int, procs: dict[str, int],
                       dsn: str | None = None) -> dict:
    """A backlog of echo tasks dropped at once: tasks/s until the last outcome is in
    origin's completed/, the CPU seconds per 1,000 tasks of each of `procs` (name: pid), and
    with a `dsn` the database's write transactions per task."""
    batch = [task_format.validate({"content": f"task {n}", "craftsman": "echo"})
             for n in range(count)]
    before = {name: cpu_seconds(pid) for name, pid in procs.items()}
    xid = dsn and transaction_id(dsn)
    started = time.monotonic()
    origin.submit(batch)
    names = {f"{t.id}.json" for t in batch}
    assert wait_for_files([origin.completed], names, 300) == names
    elapsed = time.monotonic() - started
    cpu = {name: (cpu_seconds(pid) - before[name]) * 1000 / count for name, pid in procs.items()}
    writes = (transaction_id(dsn) - xid - 1) / count if dsn else None
    return {"tasks_per_s": count / elapsed, "n": count, "cpu_1k": cpu, "writes": writes}


def transaction_id(dsn: str) -> int:
    """The database's next transaction id: only a transaction that writes takes one, so the
    difference between two is the number of write transactions (one commit each) between."""
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0])


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process and its children (PostgreSQL's postmaster and its
    backends: each backend leads a session of its own, so the group would not do)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == pid or stat.parent.name == str(pid):  # it, or a child of it
            total += (int(fields[11]) + int(fields[12])) / spool_bench.CLK_TCK
    return total


def listen(dsn: str) -> None:
    """In the child: print `ready`, then the epoch time of each wake-up, one a line."""
    from koubou_spool.spool.cluster import TASKS_CHANNEL, Wakeups
    wakeups = Wakeups(dsn, [TASKS_CHANNEL])
    assert wakeups.wait(10).recheck
    print("ready", flush=True)
    while True:
        if wakeups.wait(None).notices:
            print(time.time(), flush=True)


def measure_wakeup(dsn: str, count: int) -> dict:
    """ms from a pg_notify's send (and from its commit's reply) to the listener's wake."""
    import psycopg
    child = subprocess.Popen([sys.executable, __file__, "--listen", dsn], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    sends, replies = [], []
    try:
        assert child.stdout.readline().strip() == "ready"
        with psycopg.connect(dsn, autocommit=True) as conn:
            for _ in range(count):
                time.sleep(random.uniform(0.005, 0.05))
                sent = time.time()
                conn.execute("SELECT pg_notify('koubou_tasks', 'bench')")
                replied = time.time()
                woke = float(child.stdout.readline())
                sends.append((woke - sent) * 1000)
                replies.append((woke - replied) * 1000)
    finally:
        child.kill()
        child.wait(10)
    return {"p50_ms": spool_bench.percentile(sends, 50),
            "p99_ms": spool_bench.percentile(sends, 99),
            "reply_p50_ms": spool_bench.percentile(replies, 50), "n": count}


# --- the run -------------------------------------------------------------------------------------

def measure(base: Path, dsn: str, postgres: int, quick: bool) -> dict:
    """Every figure, with the homes and their processes up for the whole run."""
    fake = FakeOpenAI().start()
    os.environ[DSN_ENV] = dsn
    a, b = (make_home(base, name, fake.base_url, cluster=True) for name in ("host-a", "host-b"))
    solo = make_home(base, "solo", fake.base_url, cluster=False)
    a_procs, b_procs = serve(a, ["probe"], bridge=True), serve(b, ["remote", "echo"], bridge=True)
    solo_procs = serve(solo, ["remote", "echo"], bridge=False)
    cluster_pids = {"a's worker": a_procs[0].pid, "a's bridge": a_procs[1].pid,
                    "b's bridge": b_procs[1].pid, "b's worker": b_procs[0].pid,
                    "PostgreSQL": postgres}
    pickups, backlog = (40, 1000) if quick else (200, 2000)
    try:
        figures = {"pickup_solo": measure_pickup(solo, fake, pickups),
                   "pickup_cluster": measure_pickup(a, fake, pickups),
                   "wakeup": measure_wakeup(dsn, pickups)}
        runs = [(measure_throughput(solo, backlog, {"worker": solo_procs[0].pid}),
                 measure_throughput(a, backlog, cluster_pids, dsn)) for _ in range(ROUNDS)]
        figures["throughput_solo"] = median_run([s for s, _ in runs])
        figures["throughput_cluster"] = median_run([c for _, c in runs])
        return figures
    finally:
        stop(a_procs + b_procs + solo_procs)
        fake.stop()


def median_run(runs: list[dict]) -> dict:
    """The run of median throughput: one host and across take turns, ROUNDS times, so that a
    busy moment of the shared machine skews one run, not the comparison."""
    ordered = sorted(runs, key=lambda run: run["tasks_per_s"])
    return {**ordered[len(ordered) // 2], "all": [round(r["tasks_per_s"]) for r in runs]}


def print_table(f: dict) -> None:
    ps, pc, ts, tc, w = (f[k] for k in ("pickup_solo", "pickup_cluster", "throughput_solo",
                                        "throughput_cluster", "wakeup"))
    rows = [
        (f"pickup p50 / p99, one host ({ps['n']} tasks)",
         f"{ps['p50_ms']:.2f} / {ps['p99_ms']:.2f} ms"),
        ("pickup p50 / p99, host a -> host b's craftsman",
         f"{pc['p50_ms']:.2f} / {pc['p99_ms']:.2f} ms"),
        ("round trip p50 / p99, host a -> b -> outcome in a",
         f"{pc['trip_p50_ms']:.2f} / {pc['trip_p99_ms']:.2f} ms"),
        (f"throughput, one host ({ts['n']} echo tasks, median of {ts['all']})",
         f"{ts['tasks_per_s']:.0f} tasks/s"),
        (f"throughput, host a -> host b -> a (median of {tc['all']})",
         f"{tc['tasks_per_s']:.0f} tasks/s ({100 * tc['tasks_per_s'] / ts['tasks_per_s']:.0f}%)"),
        (f"NOTIFY wake-up p50 / p99, from the send ({w['n']})",
         f"{w['p50_ms']:.2f} / {w['p99_ms']:.2f} ms"),
        ("NOTIFY wake-up p50, from the commit's reply", f"{w['reply_p50_ms']:.2f} ms"),
        ("write transactions per task across (throughput)", f"{tc['writes']:.2f}"),
    ]
    print(f"machine: {f['machine']}; load {f['load_start']} -> {f['load_end']}; "
          f"PostgreSQL {f['postgres']}; {f['seconds']:.0f} s")
    print(f"processes from {f['source']}")
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:{width}}  {value:>24}")
    for label, key in (("one host", "throughput_solo"), ("across", "throughput_cluster")):
        print(f"CPU s per 1,000 tasks of the throughput, {label}: " + ", ".join(
            f"{name} {cpu:.2f}" for name, cpu in f[key]["cpu_1k"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--source", type=Path, help="run the workers and bridges from this "
                        "source tree (another checkout) instead of this one")
    parser.add_argument("--pg-fsync", choices=("on", "off"), default="on",
                        help="PostgreSQL's own fsync (on: commits wait for the disk, as on a "
                        "real server; off: as in the tests)")
    parser.add_argument("--listen", help=argparse.SUPPRESS)  # the wake-up's child
    args = parser.parse_args()
    if args.listen:
        listen(args.listen)
        return
    if not pgserver.is_available():
        sys.exit(f"PostgreSQL binaries missing: `{pgserver.ENABLES}` installs them")
    started = time.monotonic()
    SOURCE["tree"] = (args.source or ROOT).resolve()
    figures = {"machine": spool_bench.machine(), "load_start": load_average(),
               "source": str(SOURCE["tree"])}
    server = pgserver.PgServer(fsync=args.pg_fsync == "on").init().start()
    try:
        figures["postgres"] = f"{server.bin.parent.name}, fsync {args.pg_fsync}"
        with tempfile.TemporaryDirectory(prefix="koubou-cluster-bench-") as tmp:
            figures.update(measure(Path(tmp), server.create_database("bench"), server.proc.pid,
                                   args.quick))
    finally:
        server.destroy()
    figures["load_end"], figures["seconds"] = load_average(), time.monotonic() - started
    print_table(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on a shared machine skews a run."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


if __name__ == "__main__":
    main()
