#!/usr/bin/env python3
"""Drain a backlog with real `koubou worker` processes and say where the CPU went: the
profiling companion of bench/compare.py (issue #19).

    python bench/drain.py [-n 4000] [--workers 1] [--no-fsync] [--py-spy FILE]

N no-op tasks for the echo craftsman are queued first (koubou's own submit), then the workers
start and drain them. Printed: tasks/s from the workers' start to the last outcome (start-up
included, about 0.35 CPU-s per worker here), and the workers' user and system CPU per 1,000
tasks. With --py-spy, the first worker runs under `py-spy record -t -f raw` (on-CPU samples
per thread, collapsed stacks in FILE); py-spy must be on PATH (pip install py-spy).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from koubou_spool.spool import home as home_module, task as task_format  # noqa: E402
from koubou_spool.spool.files import Spool  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=4000, help="tasks (default 4000)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--no-fsync", action="store_true", help="spool.fsync: false")
    parser.add_argument("--py-spy", metavar="FILE", help="profile the first worker into FILE")
    args = parser.parse_args()
    fsync = not args.no_fsync
    with tempfile.TemporaryDirectory(prefix="koubou-drain-") as directory:
        home = Path(directory) / "home"
        home_module.init(home)
        (home / "config" / "koubou.yaml").write_text(yaml.safe_dump({
            "craftsmen": {"echo": {"backend": "echo", "max_concurrent": 16}},
            "routing": {"rules": [{"then": "echo"}]},
            "spool": {"fsync": fsync, "heartbeat_s": 10}}))
        spool = Spool(home, fsync=fsync)
        spool.submit([task_format.validate({"content": f"no-op {i}", "id": f"t{i:06d}"})
                      for i in range(args.n)])
        command = [sys.executable, "-m", "koubou_spool.cli.koubou", "worker", "--home", str(home)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        started = time.time()
        workers = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL) for _ in range(args.workers)]
        spy = None
        if args.py_spy:
            spy = subprocess.Popen(["py-spy", "record", "-t", "-r", "300", "-f", "raw", "-o",
                                    args.py_spy, "--pid", str(workers[0].pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while len(os.listdir(spool.completed)) < args.n:
            time.sleep(0.02)
        wall = time.time() - started
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait()
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
            worker.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers (and py-spy, if run)
    per_k = 1000 / args.n
    print(f"{args.n} tasks, {args.workers} worker(s), fsync {'on' if fsync else 'off'}: "
          f"{args.n / wall:.0f} tasks/s; CPU per 1,000 tasks: user {usage.ru_utime * per_k:.2f} s,"
          f" system {usage.ru_stime * per_k:.2f} s (load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
