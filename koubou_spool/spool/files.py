"""The file spool: task files moved by rename(2) between state directories (README: Layout of a
home; How it keeps its promises).

Every state change is one rename, so a task is always wholly in one directory. A claim renames
pending/NAME to in_progress/NAME@WORKER; publishing an outcome first renames that claim to
NAME@WORKER.fin. Whoever renames a claim first owns what happens next: a worker whose claim was
moved away (requeued, cancelled) finds it gone and discards its result. That rename is the fence.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from . import durable, permissions, task as task_format
from ..errors import SpoolError
from .entries import (  # noqa: F401 (re-exported: the spool's names)
    CLAIM_RE, DISK_ERRNOS, NAME_MAX, SIDECAR, STATES, TRANSIENT_ERRNOS, Claim, Found, NoSpace,
    Outcome, Refused, Unavailable, _entry_name, duplicate_reason)
from .disk import (  # noqa: F401
    flush_files, kind_of, printable, read_regular, rename_noreplace, stage)
from .lookup import Lookups
from .outcomes import Outcomes
from .registry import Workers
from .retention import Retention
from .store import Store
from .task import Task

log = logging.getLogger(__name__)


def _hostname() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:40] or "host"


def new_worker_id() -> str:
    """An id naming host and pid, unique on this host: it appears in claim file names."""
    return f"{_hostname()}-{os.getpid()}-{os.urandom(2).hex()}"


class Spool(Lookups, Outcomes, Retention, Workers, Store):
    """The file store: the task directories of one home, moved between by rename(2)."""

    def __init__(self, home: Path, *, fsync: bool = True, max_task_bytes: int = 1_048_576) -> None:
        self.home = home
        self.fsync = fsync
        self.max_task_bytes = max_task_bytes
        tasks = home / "tasks"
        self.tmp = tasks / "tmp"
        self.pending = tasks / "pending"
        self.in_progress = tasks / "in_progress"
        self.completed = tasks / "completed"
        self.failed = tasks / "failed"
        Workers.__init__(self, home / "run" / "workers")

    @classmethod
    def open(cls, home: Path, settings: Any = None) -> Spool:
        """A Spool on an initialised home; SpoolError naming the fix when it is not one."""
        kwargs = {}
        if settings is not None:
            kwargs = {"fsync": settings.fsync, "max_task_bytes": settings.max_task_bytes}
        spool = cls(home, **kwargs)
        permissions.require_entry(home)
        for path in (spool.tmp, spool.pending, spool.in_progress, spool.completed, spool.failed):
            if not path.is_dir():
                raise SpoolError(f"{home} is not a koubou home ({path} is missing); "
                                 f"run `koubou init --home {home}`")
        permissions.make_dir(spool.workers, permissions.OWNER_DIR, parents=True)
        return spool

    def state_dir(self, state: str) -> Path:
        """The directory of one state."""
        return {"pending": self.pending, "in_progress": self.in_progress,
                "completed": self.completed, "failed": self.failed}[state]

    # --- durability ------------------------------------------------------------------------

    def sync_dir(self, path: Path) -> None:
        """fsync a directory so the renames in it survive a crash (when spool.fsync is on)."""
        if self.fsync:
            durable.sync_dir(path)

    def _write_tmp(self, label: str, data: bytes) -> str:
        """A new file in tmp/ holding data, fsynced; NoSpace (and no file) when the disk refuses."""
        return stage(self.tmp, label, data, fsync=self.fsync, home=self.home)

    def write_atomic(self, directory: Path, name: str, data: bytes) -> None:
        """Write a file whole or not at all: tmp, fsync, rename, fsync of the directory."""
        tmp = self._write_tmp(name, data)
        os.rename(tmp, directory / name)
        self.sync_dir(directory)

    # --- submit ----------------------------------------------------------------------------

    def submit(self, tasks: Iterable[Task]) -> list[tuple[Task, str, bool]]:
        """Queue tasks atomically; returns (task, state, new) each. An existing id is left alone.

        Each file is durable before its rename into pending/, all of them with one journal
        commit (flush_files: group commit), then the directory with one fsync."""
        permissions.require_submit(self.home, self.tmp, self.pending)
        results = []
        staged: dict[int, str] = {}  # index in results -> its file in tmp/
        now = time.time()
        try:
            for task in tasks:
                state = None if task.fresh_id else self._existing_state(task.id)
                if state is None:
                    staged[len(results)] = self._stage_pending(task, now)
                results.append((task, state or "pending", False))
            if self.fsync and staged:
                flush_files(list(staged.values()))
            for index in list(staged):
                task = results[index][0]
                results[index] = (task, "pending", self._link_pending(staged.pop(index), task))
        finally:
            for tmp in staged.values():  # not linked: nothing partial is left behind
                os.unlink(tmp)
        if any(new for _, _, new in results):
            self.sync_dir(self.pending)
        return results

    def _existing_state(self, task_id: str) -> str | None:
        """Where a task of this id is, or None.

        The directories are looked at in the order a task moves through them, so a task that
        moves on while we look is still seen; one requeued meanwhile is caught by the
        no-replace rename into pending/. A claim is looked past when its outcome is there:
        publish unlinks the claim (`.fin`) only after placing the outcome.
        """
        name = f"{task_id}.json"
        if os.path.lexists(f"{self.pending}/{name}"):
            return "pending"
        claimed = name + "@"
        if any(entry.startswith(claimed) for entry in os.listdir(self.in_progress)):
            return self.outcome_state(task_id) or "in_progress"
        return self.outcome_state(task_id)

    def _stage_pending(self, task: Task, now: float) -> str:
        """A task's file in tmp/, not yet flushed; NoSpace (and no file) when the disk refuses."""
        raw = dict(task.raw)
        raw.setdefault("submitted_at", task_format.iso(now))
        return stage(self.tmp, task.id, task_format.encode(raw), fsync=False, home=self.home)

    def _link_pending(self, tmp: str, task: Task) -> bool:
        """Rename a staged file into pending/ unless the name is taken; False (and the file
        gone) when it is."""
        try:
            rename_noreplace(tmp, self.pending / f"{task.id}.json")
            return True
        except FileExistsError:
            os.unlink(tmp)
            return False
        except BaseException as exc:
            os.unlink(tmp)  # nothing partial is left behind
            if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
                raise NoSpace.of(exc, self.home) from None
            raise

    # --- reading pending entries -----------------------------------------------------------

    def read_entry(self, directory: Path, name: str) -> tuple[bytes, os.stat_result]:
        """The bytes and stat of a regular file, never following a link or opening a FIFO."""
        return read_regular(f"{directory}/{name}", self.max_task_bytes)  # str: twice a task

    def kind_of(self, directory: Path, name: str) -> str | None:
        """'file' for a regular file, 'other' for anything else, None when gone; never follows."""
        return kind_of(directory / name)

    # --- claim and outcome -----------------------------------------------------------------

    def claim(self, name: str, worker_id: str) -> Claim | None:
        """Take pending/<name> by renaming it into in_progress/; None if another worker won.

        OSError when the rename cannot be made (a name too long for the claim's suffix)."""
        claim = Claim(name, worker_id, time.time())
        try:
            os.rename(f"{self.pending}/{name}", f"{self.in_progress}/{claim.file_name}")
        except FileNotFoundError:
            return None
        # No fsync here, on purpose: a claim lost in a crash leaves the task in pending/, where
        # it runs again. The outcome's fsync later makes this rename durable too (one journal).
        return claim

    def take_over(self, entry: str, worker_id: str) -> Claim | None:
        """Take another worker's claim in_progress/<entry> by renaming it to ours (a finishing
        marker kept); None when someone moved it first. The rename fences its old owner."""
        match = CLAIM_RE.fullmatch(entry)
        claim = Claim(match["name"], worker_id, time.time())
        taken = claim.file_name + (match["fin"] or "")
        try:
            os.rename(f"{self.in_progress}/{entry}", f"{self.in_progress}/{taken}")
        except FileNotFoundError:
            return None
        return claim

    def read_claim(self, claim: Claim) -> tuple[bytes, os.stat_result]:
        """The bytes of a claimed task file."""
        return self.read_entry(self.in_progress, claim.file_name)

    def requeue(self, claim_file: str, attempts: int | None) -> bool:
        """Put a claimed task back in pending/ with its attempt count; False if the claim is gone.

        The claim is fenced first, as publish does: renamed to its finishing name, so a cancel
        or a recoverer that moved it before has won, and one that comes later finds nothing to
        move. The rewrite then touches only the finishing file, which nobody else renames while
        this process lives (a crash leaves it to recovery, like any finishing claim)."""
        name = CLAIM_RE.fullmatch(claim_file)["name"]
        finishing = f"{claim_file}.fin"
        try:
            os.rename(self.in_progress / claim_file, self.in_progress / finishing)
        except FileNotFoundError:
            return False
        if attempts is not None:
            self._set_attempts(finishing, name, attempts)
        try:
            os.rename(self.in_progress / finishing, self.pending / name)
        except FileNotFoundError:
            return False  # this process was taken for dead and the claim taken over
        self.sync_dir(self.pending)
        return True

    def _set_attempts(self, entry: str, name: str, attempts: int) -> None:
        """Rewrite a fenced claim with its attempt count (tmp, then rename over it)."""
        try:
            obj = json.loads(self.read_entry(self.in_progress, entry)[0])
            obj["attempts"] = attempts
        except Unavailable as exc:
            # Back uncounted rather than stuck in in_progress/: one attempt may go unseen.
            log.warning("%s; %s goes back without its attempt count", exc, name)
            return
        except (Refused, ValueError, TypeError, AttributeError, RecursionError):
            return  # not a task object: it goes back as it is and is rejected when read again
        try:
            os.rename(self._write_tmp(name, task_format.encode(obj)), self.in_progress / entry)
        except NoSpace as exc:
            log.warning("%s; %s goes back without its attempt count", exc, name)

    # --- workers and their liveness: spool.registry.Workers, on run/workers/ ----------------

    def orphaned_claims(self, lease_s: float) -> list[tuple[str, str]]:
        """(claim file, worker state) of claims whose worker is dead or has missed its lease."""
        return self.orphans_of(self.claims(), lease_s)
