#!/usr/bin/env python3
"""Repository tasks end to end: the wall time of 8 tasks on one repository in parallel against
the same 8 one after another, through a real worker and the test agent of tests/repo_agent.py
(each writes a file; verify is `python -c pass`). Prints a table; figures are this machine's.

    python bench/repo_tasks.py [--files 500] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import platform
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

GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"}


def make_repo(path: Path, files: int) -> None:
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=path, check=True)
    for n in range(files):
        (path / f"f{n:05d}.txt").write_text(f"{n}\n")
    subprocess.run(["git", "add", "-A"], cwd=path, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "base"], cwd=path, check=True, env=GIT_ENV)


def run_batch(base: Path, source: Path, parallel: int, tasks: int) -> float:
    home = base / f"home-{parallel}-{time.monotonic_ns()}"
    home_module.init(home)
    config = {"craftsmen": {"agent": {
        "backend": "command", "argv": [sys.executable, str(ROOT / "tests" / "repo_agent.py")],
        "output": "text", "local": True, "max_concurrent": parallel, "timeout_s": 300}},
        "routing": {"rules": [{"then": "agent"}]},
        "repos": {"allowed": [str(source.parent)], "push": False}}
    (home / "config" / "koubou.yaml").write_text(yaml.safe_dump(config))
    spool = Spool.open(home)
    worker = subprocess.Popen([sys.executable, "-m", "koubou_spool.cli.koubou", "worker",
                               "--home", str(home)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        # Warm the mirror, as a running home has it: the clone is not what is measured.
        warm = task_format.validate({"content": "WRITE warm.txt=w", "repo": str(source)})
        spool.submit([warm])
        wait_for_files([spool.completed, spool.failed], {f"{warm.id}.json"}, 600)
        batch = [task_format.validate({"content": f"WRITE out{n}.txt={n}", "repo": str(source),
                                       "verify": [sys.executable, "-c", "pass"]})
                 for n in range(tasks)]
        started = time.monotonic()
        spool.submit(batch)
        names = {f"{t.id}.json" for t in batch}
        done = wait_for_files([spool.completed, spool.failed], names, 900)
        elapsed = time.monotonic() - started
        assert done == names and all(spool.outcome(t.id)["status"] == "completed" for t in batch)
        return elapsed
    finally:
        worker.terminate()
        worker.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", help="where to work (default: a temp dir on the disk)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        base = Path(tmp)
        source = base / "src" / "app"
        make_repo(source, args.files)
        rows = {1: [], 8: []}
        for _ in range(args.runs):
            for parallel in (8, 1):
                rows[parallel].append(run_batch(base, source, parallel, 8))
    git = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}, {git}; "
          f"repository of {args.files} files; medians of {args.runs} runs")
    seq, par = statistics.median(rows[1]), statistics.median(rows[8])
    print(f"8 tasks one after another (max_concurrent 1)   {seq:7.2f} s")
    print(f"8 tasks in parallel (max_concurrent 8)          {par:7.2f} s   ({seq / par:.2f}x)")


if __name__ == "__main__":
    main()
