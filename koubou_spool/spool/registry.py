"""Worker registration and liveness: one lock file per live worker in run/workers/.

A worker holds an flock on run/workers/<id>.lock for as long as it lives; the kernel drops the
lock with the process, however it dies, so a lock that can be taken belongs to a dead worker.
The lock file's mtime is the worker's heartbeat (see Heartbeats for how it is compared).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import permissions
from .entries import BRIDGE_PREFIX

class Heartbeats:
    """When this process saw each live worker's heartbeat (its lock file's mtime) last change,
    on this process's own monotonic clock.

    Lock-file mtimes are set by each worker from its own wall clock: comparing them with ours
    lets a clock step (or a suspend longer than the lease) make every peer look stale at once,
    and a step back hide a hung one. So the mtime is only compared with itself: a worker is
    stale once its mtime has not changed for lease_s of our monotonic time, counted from when
    we first saw that value. Whether it is dead at all is its lock's business, not a clock's.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, float]] = {}  # worker id -> (mtime_ns, first seen)

    def stale(self, worker_id: str, mtime_ns: int, lease_s: float) -> bool:
        """Whether this heartbeat value has stood unchanged for longer than lease_s."""
        now = time.monotonic()
        seen = self._seen.get(worker_id)
        if seen is None or seen[0] != mtime_ns:
            self._seen[worker_id] = (mtime_ns, now)
            return False
        return now - seen[1] > lease_s

    def forget(self, worker_id: str) -> None:
        """A worker is gone."""
        self._seen.pop(worker_id, None)


class Workers:
    """The registrations of one home's workers: run/workers/<id>.lock, locked while alive.
    The file spool is one (spool.files.Spool): these are its Store methods for workers."""

    def __init__(self, workers: Path) -> None:
        self.workers = workers
        self.heartbeats = Heartbeats()

    def register_worker(self, worker_id: str, info: dict[str, Any]) -> int:
        """Create and lock run/workers/<id>.lock; the lock dies with the process, whatever kills it.

        The file is locked under a hidden name and renamed into place, so a lock file that can
        be locked is dead for good: probes never race a worker that is starting.
        """
        staging = self.workers / f".{worker_id}.lock.new"
        fd = permissions.open_file(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, permissions.RECORD)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps(info).encode())
        os.rename(staging, self.workers / f"{worker_id}.lock")
        return fd

    def unregister_worker(self, worker_id: str, fd: int) -> None:
        """Remove a worker's lock file on a clean exit."""
        try:
            os.unlink(self.workers / f"{worker_id}.lock")
        finally:
            os.close(fd)

    def remove_dead_workers(self, cutoff: float) -> int:
        """Delete the lock files of dead workers whose last heartbeat was before cutoff."""
        removed = 0
        for entry in os.listdir(self.workers):
            try:
                fd = os.open(self.workers / entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue  # gone, or not a plain file: not ours to judge
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its worker lives
                if os.fstat(fd).st_mtime < cutoff:
                    os.unlink(self.workers / entry)
                    removed += 1
            except (BlockingIOError, FileNotFoundError):
                pass
            finally:
                os.close(fd)
        return removed

    def orphans_of(self, claims: Iterable[tuple[str, re.Match]],
                   lease_s: float) -> list[tuple[str, str]]:
        """(claim file, worker state) of claims whose worker is dead or has missed its lease."""
        states: dict[str, str] = {}
        orphans = []
        for entry, match in claims:
            worker = match["worker"]
            if worker not in states:
                states[worker] = self.worker_state(worker, lease_s)
            if states[worker] != "alive":
                orphans.append((entry, states[worker]))
        return orphans

    def worker_state(self, worker_id: str, lease_s: float, *, observed: bool = True) -> str:
        """'alive', 'stale' (lock held, heartbeat unchanged for lease_s as this process saw
        it: see Heartbeats) or 'dead' (lock free: the kernel drops it with the process).

        observed=False judges staleness by the heartbeat's wall-clock age instead, for a
        one-shot look by a person (`koubou workers`), never for taking claims over."""
        path = self.workers / f"{worker_id}.lock"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.heartbeats.forget(worker_id)
            return "dead"
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            mtime = os.fstat(fd).st_mtime_ns
            if not observed:
                return "stale" if time.time() - mtime / 1e9 > lease_s else "alive"
            return "stale" if self.heartbeats.stale(worker_id, mtime, lease_s) else "alive"
        finally:
            os.close(fd)
        self.heartbeats.forget(worker_id)
        return "dead"

    def worker_ids(self) -> list[str]:
        """The ids of every lock file in run/workers/, live or not, sorted."""
        return [entry[:-5] for entry in sorted(os.listdir(self.workers))
                if entry.endswith(".lock")]

    def bridge_running(self) -> bool:
        """Whether a live `koubou cluster` bridge serves this home: tasks no worker here serves
        may run on another host of the cluster, and a dead bridge's claims are adopted."""
        return bool(self.live_bridges())

    def live_bridges(self) -> list[str]:
        """The ids of the live bridges registered in this home (one, once its lock is held)."""
        return [worker_id for worker_id in self.worker_ids()
                if worker_id.startswith(BRIDGE_PREFIX)
                and self.worker_state(worker_id, math.inf) != "dead"]

    def worker_info(self, worker_id: str) -> Any:
        """The JSON a worker wrote into its lock file; None when gone or unreadable."""
        try:
            return json.loads((self.workers / f"{worker_id}.lock").read_bytes())
        except (OSError, ValueError):
            return None
