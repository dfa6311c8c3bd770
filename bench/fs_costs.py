#!/usr/bin/env python3
"""What each file-system step a spool makes costs on this machine: the floor under any
file-per-task design, and why koubou cannot come near a bare rename loop (issue #19).

    python bench/fs_costs.py [--dir DIR] [-n 2000]

A bare rename loop creates no file: it renames the submitter's file twice. koubou writes one
new file per outcome (the task and its result, renamed into completed/), and later unlinks the
claim. Each step here is timed alone, n times, in DIR (default: a fresh directory under
$TMPDIR, which is on the disk of /tmp): wall and CPU (user + system) per call, medians of 3.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

DATA = b"x" * 400  # about an echo task's outcome


def timed(n: int, step: Callable[[int], object]) -> tuple[float, float]:
    """(wall, cpu) microseconds per call of step(0..n-1)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for i in range(n):
        step(i)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall / n * 1e6, cpu / n * 1e6


def write_file(path: str, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    os.write(fd, DATA)
    if fsync:
        os.fsync(fd)
    os.close(fd)


def one_run(base: str, n: int) -> dict[str, tuple[float, float]]:
    """Each step over n fresh names in its own subdirectory of base."""
    d = tempfile.mkdtemp(dir=base)
    p = lambda tag, i: f"{d}/{tag}{i}"  # noqa: E731
    for i in range(n):  # files to rename, link and unlink: flushed ones and unflushed ones
        write_file(p("f", i), fsync=True)
        write_file(p("u", i), fsync=False)
    dir_fd = os.open(d, os.O_RDONLY)
    steps: dict[str, Callable[[int], object]] = {
        "create + write 400 B + close": lambda i: write_file(p("c", i), fsync=False),
        "create + write + fsync + close": lambda i: write_file(p("s", i), fsync=True),
        "rename": lambda i: os.rename(p("f", i), p("r", i)),
        "link (a new name, no new inode)": lambda i: os.link(p("r", i), p("l", i)),
        "mkdir": lambda i: os.mkdir(p("d", i)),
        "lstat": lambda i: os.lstat(p("r", i)),
        "fsync of the directory": lambda i: os.fsync(dir_fd),
        "unlink, data flushed": lambda i: os.unlink(p("r", i)),
        "unlink, data not flushed": lambda i: os.unlink(p("u", i)),
    }
    figures = {name: timed(n, step) for name, step in steps.items()}
    os.close(dir_fd)
    shutil.rmtree(d)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="where to make the files (default: $TMPDIR)")
    parser.add_argument("-n", type=int, default=2000, help="calls per step (default 2000)")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="koubou-fs-", dir=args.dir)
    try:
        runs = [one_run(base, args.n) for _ in range(3)]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"machine: {platform.node()}, {os.cpu_count()} cpus, {platform.platform()}; "
          f"load {os.getloadavg()[0]:.1f}; directory on {base}")
    print(f"{'step':34} {'wall µs':>9} {'cpu µs':>8}   (median of 3 runs of {args.n})")
    for name in runs[0]:
        wall = statistics.median(run[name][0] for run in runs)
        cpu = statistics.median(run[name][1] for run in runs)
        print(f"{name:34} {wall:9.1f} {cpu:8.1f}")


if __name__ == "__main__":
    main()
