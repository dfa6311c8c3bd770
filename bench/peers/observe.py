"""Watching systems from the outside: completions through inotify, CPU and wake-ups from /proc.

The bench never asks a system whether a task is done: it watches what the system leaves behind
(an outcome file in a directory, a line in an append-only log), so every system is timed the same
way, at the moment its result is on disk.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Iterable
from pathlib import Path

from inotify_simple import INotify, flags

CLK_TCK = os.sysconf("SC_CLK_TCK")


class DirArrivals:
    """Files renamed or written into a directory (`<id>.json`), with the time the bench saw them.

    With `claims`, renames into that directory too (koubou's in_progress/`<id>.json@worker`):
    their times land in `claimed`, for a rename->claim figure taken in the same select loop.
    """

    def __init__(self, directory: Path, claims: Path | None = None) -> None:
        self._inotify = INotify(nonblocking=True)
        self._done_wd = self._inotify.add_watch(directory, flags.MOVED_TO | flags.CLOSE_WRITE)
        if claims is not None:
            self._inotify.add_watch(claims, flags.MOVED_TO)
        self.claimed: dict[str, float] = {}

    def poll(self, timeout: float) -> list[tuple[str, float]]:
        """Ids (names without .json) that arrived, blocking up to `timeout` seconds."""
        ready, _, _ = select.select([self._inotify.fileno()], [], [], max(timeout, 0))
        if not ready:
            return []
        seen, done = time.time(), []
        for event in self._inotify.read(timeout=0):
            if event.name.startswith("."):
                continue
            if event.wd == self._done_wd:
                if event.name.endswith(".json"):
                    done.append((event.name[:-5], seen))
            elif "@" in event.name:
                self.claimed.setdefault(event.name.split(".json@")[0], seen)
        return done

    def close(self) -> None:
        """Release the inotify descriptor."""
        self._inotify.close()


class LogArrivals:
    """Lines appended to a log file (one task id a line), each with the time the bench saw it."""

    def __init__(self, log: Path) -> None:
        log.touch()
        self._inotify = INotify(nonblocking=True)
        self._inotify.add_watch(log, flags.MODIFY)
        self._file = log.open("rb")
        self._partial = b""

    def poll(self, timeout: float) -> list[tuple[str, float]]:
        """Ids appended since the last call, blocking up to `timeout` seconds for the first."""
        ready, _, _ = select.select([self._inotify.fileno()], [], [], max(timeout, 0))
        if not ready:
            return []
        seen = time.time()
        self._inotify.read(timeout=0)
        data = self._partial + self._file.read()
        *lines, self._partial = data.split(b"\n")
        return [(line.decode().split()[0], seen) for line in lines if line]

    def close(self) -> None:
        """Release the descriptor and the file."""
        self._inotify.close()
        self._file.close()


def wait_all(arrivals: DirArrivals | LogArrivals, ids: Iterable[str], timeout: float) -> float:
    """Block until every id arrived; returns the time the last one was seen."""
    missing = set(ids)
    deadline = time.monotonic() + timeout
    last = time.time()
    while missing:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{len(missing)} tasks not done after {timeout:g} s")
        for task_id, seen in arrivals.poll(left):
            if task_id in missing:
                missing.discard(task_id)
                last = seen
    return last


def wait_one(arrivals: DirArrivals | LogArrivals, task_id: str, timeout: float) -> float:
    """Block until one id arrives; returns when it was seen."""
    return wait_all(arrivals, [task_id], timeout)


# --- /proc ---------------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited while we looked
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(roots: Iterable[int]) -> list[int]:
    """The roots and all their live descendants (huey's process workers are children)."""
    tree, found, stack = _children(), [], list(roots)
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(tree.get(pid, []))
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of live processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def wakeups(pids: Iterable[int]) -> int:
    """Voluntary context switches of every thread: each sleep after a wake-up counts one.

    Involuntary ones are left out: they are preemptions by other busy processes on the same
    cores (all systems idle side by side here), not the thread waking up.
    """
    total = 0
    for pid in pids:
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in threads:
            try:
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    total += int(line.split()[1])
    return total


def rss_mib(pids: Iterable[int]) -> float:
    """Resident memory of the processes, summed, in MiB."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in status.splitlines()
                      if line.startswith("VmRSS:"))
    return total / 1024


def signal_all(pids: Iterable[int], sig: int) -> None:
    """Send a signal to each process, ignoring those already gone."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def freeze(pids: list[int]) -> None:
    """SIGSTOP: the backlog is loaded while the consumer cannot touch it."""
    signal_all(pids, signal.SIGSTOP)


def thaw(pids: list[int]) -> None:
    """SIGCONT: let the consumer at the backlog."""
    signal_all(pids, signal.SIGCONT)
