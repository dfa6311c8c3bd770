#!/usr/bin/env python3
"""What a repository task costs before its craftsman starts: mirror fetch + worktree creation.

    python bench/repo_worktree.py                  # 5,000 files, 5 runs
    python bench/repo_worktree.py --files 20000 --runs 9 --dir /var/koubou-bench

It builds a source repository of small files, makes a home's mirror of it once, then for each
run commits one change to the source (so the fetch has something to fetch) and times
repo.prepare(): the policy check, the fetch, the base's resolution and `git worktree add` with
its checkout (timed with git alone too), which is the claim -> agent start cost of a repository
task. Clean-up is timed on its own. Last, 8 worktrees are made at once from 8 threads, against
the same 8 one after another.
Figures are medians; compare them with each other, not with another machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from koubou_spool import repo  # noqa: E402
from koubou_spool.repo import mirror as mirrors  # noqa: E402


def g(cwd: Path, *args: str) -> str:
    argv = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost",
            "-c", "init.defaultBranch=main", *args]
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_source(path: Path, files: int) -> None:
    path.mkdir(parents=True)
    g(path, "init", "-q")
    for i in range(files):
        directory = path / f"pkg{i // 100:03d}"
        directory.mkdir(exist_ok=True)
        (directory / f"mod{i % 100:02d}.py").write_text(f'"""Module {i}."""\n\nVALUE = {i}\n')
    g(path, "add", "-A")
    g(path, "commit", "-q", "-m", f"{files} files")


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def in_parallel(actions: list[Callable[[], object]]) -> float:
    start, errors = threading.Barrier(len(actions) + 1), []

    def run(action: Callable[[], object]) -> None:
        start.wait()
        try:
            action()
        except Exception as exc:  # reported: a bench must not hide a failure
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a,)) for a in actions]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def machine(directory: Path) -> str:
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(directory)], capture_output=True, text=True).stdout
    return (f"{platform.node()}: {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), "
            f"{subprocess.run(['git', '--version'], capture_output=True, text=True).stdout.strip()}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}, "
            f"{fs.strip()} at {directory}")


def ms(seconds: list[float]) -> str:
    low, high = min(seconds) * 1000, max(seconds) * 1000
    return f"{statistics.median(seconds) * 1000:7.1f} ms (min {low:.1f}, max {high:.1f})"


def bench(base: Path, files: int, runs: int) -> None:
    source, home = base / "src" / "app", base / "home"
    home.mkdir(parents=True)
    settings = repo.RepoSettings(allowed=(str(base / "src"),))
    print(f"source: {files} files ({timed(lambda: make_source(source, files)):.1f} s to make)")
    print(f"machine: {machine(base)}")
    first = timed(lambda: repo.prepare(home, "first", str(source), settings))
    repo.clean_up(home, "first")
    print(f"first task on the repository (mirror made, fetch, worktree): {first * 1000:.1f} ms")

    mirror = mirrors.mirror_path(home, repo.policy.source_location(str(source)))
    prepares, fetches, cleanups, plain = [], [], [], []
    for i in range(runs):
        (source / "pkg000" / "mod00.py").write_text(f"VALUE = {i}\n")
        g(source, "commit", "-q", "-am", f"change {i}")
        prepares.append(timed(lambda i=i: repo.prepare(home, f"run{i}", str(source), settings)))
        cleanups.append(timed(lambda i=i: repo.clean_up(home, f"run{i}")))
        fetches.append(timed(lambda: mirrors.update_mirror(home, repo.policy.source_location(str(source)))))
        bare = base / f"plain{i}"
        plain.append(timed(lambda bare=bare: g(mirror, "worktree", "add", "-q", "--detach", str(bare),
                                               mirrors.SOURCE_HEAD)))
        g(mirror, "worktree", "remove", "--force", str(bare))
    print(f"claim -> agent start (fetch of one new commit + worktree add), median of {runs}: {ms(prepares)}")
    print(f"  of which a fetch with nothing new:                           {ms(fetches)}")
    print(f"  git alone, for comparison (git worktree add --detach):       {ms(plain)}")
    print(f"clean-up (worktree remove, prune, branch delete):             {ms(cleanups)}")

    ids = [f"par{i}" for i in range(8)]
    serial = timed(lambda: [repo.prepare(home, i, str(source), settings) for i in ids])
    for task_id in ids:
        repo.clean_up(home, task_id)
    parallel = in_parallel([lambda i=i: repo.prepare(home, i, str(source), settings) for i in ids])
    for task_id in ids:
        repo.clean_up(home, task_id)
    print(f"8 worktrees one after another: {serial:.2f} s; 8 at once from 8 threads: {parallel:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to build (default: a temp dir)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="koubou-repo-bench-", dir=args.dir))
    try:
        bench(base, args.files, args.runs)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
