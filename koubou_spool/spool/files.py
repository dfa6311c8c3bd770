"""The file spool: task files moved by rename(2) between state directories (README: Layout of a
home; How it keeps its promises).

Every state change is one rename, so a task is always wholly in one directory. A claim renames
pending/NAME to in_progress/NAME@WORKER; publishing an outcome first renames that claim to
NAME@WORKER.fin. Whoever renames a claim first owns what happens next: a worker whose claim was
moved away (requeued, cancelled) finds it gone and discards its result. That rename is the fence.
"""

from __future__ import annotations

import errno
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
    Outcome, Refused, Unavailable, _entry_name)
from .disk import (  # noqa: F401
    flush_files, kind_of, printable, read_regular, rename_noreplace, stage)
from .lookup import Lookups
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


class Spool(Lookups, Retention, Workers, Store):
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
        """Queue tasks atomically; returns (task, state, new) each. An existing id is left alone."""
        permissions.require_submit(self.home, self.tmp, self.pending)
        results = []
        now = time.time()
        for task in tasks:
            state = None if task.fresh_id else self._existing_state(task.id)
            new = False
            if state is None:
                state, new = "pending", self._link_pending(task, now)
            results.append((task, state, new))
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

    def _link_pending(self, task: Task, now: float) -> bool:
        raw = dict(task.raw)
        raw.setdefault("submitted_at", task_format.iso(now))
        tmp = self._write_tmp(task.id, task_format.encode(raw))
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

    def publish(self, claim: Claim, task_id: str, record: dict[str, Any]) -> bool:
        """Publish an outcome for a claim; False (and nothing written) when the claim was revoked,
        or when another task of the same id has its outcome already: then this claim goes to
        failed/ as rejected input, and the first outcome stands.

        The fence comes first, so a revoked claim costs one failed rename and no write. NoSpace
        when the disk refuses the outcome: the claim is unfenced (still ours, in in_progress/)
        and nothing is left in tmp/; publish it again when the disk has room."""
        outcome = self.fence(claim, task_id, record)
        if outcome is None:
            return False
        self.write_outcomes([outcome])
        if not self.settle(outcome):
            return False
        self.unmark(outcome)
        return True

    def fence(self, claim: Claim, task_id: str, record: dict[str, Any]) -> Outcome | None:
        """The first step of publishing: the claim renamed to its finishing name, and the
        outcome encoded; None when the claim was revoked (moved away by someone else)."""
        claimed = f"{self.in_progress}/{claim.file_name}"
        try:
            os.rename(claimed, claimed + ".fin")
        except FileNotFoundError:
            return None
        # A crash from here on leaves a .fin with or without its outcome: recovery keeps the
        # outcome, or runs the task again.
        directory = self.completed if record["status"] == "completed" else self.failed
        return Outcome(claim, task_id, task_format.encode(record), directory, claimed + ".fin")

    def write_outcomes(self, outcomes: list[Outcome]) -> None:
        """Write fenced outcomes to tmp/, rename them into place, and make them durable with
        one fsync of each directory they went to (group commit: one fsync of a directory covers
        every rename made in it before the call). Each outcome says how it went; nothing is
        raised. Their finishing claims stay until `unmark`: a worker removes one once the
        ledger has the outcome's record, so a crash in between leaves recovery the marker and
        the outcome to record."""
        for outcome in outcomes:
            try:
                outcome.tmp = stage(self.tmp, outcome.task_id, outcome.data, fsync=False,
                                    home=self.home)
            except OSError as exc:
                self._failed_outcome(outcome, exc)
        staged = [o for o in outcomes if o.tmp is not None]
        if self.fsync and staged:
            try:
                flush_files([o.tmp for o in staged])
            except OSError as exc:
                for outcome in staged:
                    self._failed_outcome(outcome, exc)
                staged = []
        for outcome in staged:
            self._place(outcome)
        placed = [o for o in staged if o.placed]
        for directory in {o.directory for o in placed}:
            try:
                self.sync_dir(directory)
            except OSError as exc:  # the renames stand; their durability is not known
                log.error("cannot fsync %s: %s", directory, exc.strerror)

    def unmark(self, outcome: Outcome) -> None:
        """Remove a published outcome's finishing claim. A crash before this leaves a .fin
        beside a published outcome: recovery records the outcome and removes the marker."""
        try:
            os.unlink(outcome.finishing)
        except FileNotFoundError:
            pass  # taken over by a recoverer that thought this worker dead: it keeps the outcome

    def settle(self, outcome: Outcome) -> bool:
        """After write_outcomes: True if the outcome is published. A duplicate's claim goes to
        failed/ as rejected input (False); NoSpace or the OSError when it was not written."""
        if outcome.duplicate:
            self.reject(self.in_progress, outcome.claim.file_name + ".fin", duplicate_reason(
                outcome.task_id, self.outcome_state(outcome.task_id) or "completed"))
            return False
        if outcome.error is not None:
            raise outcome.error
        return True

    def _place(self, outcome: Outcome) -> None:
        try:
            self._place_outcome(outcome.tmp, outcome.directory, outcome.task_id)
            outcome.placed = True
        except FileExistsError:
            os.unlink(outcome.tmp)
            outcome.duplicate = True
        except OSError as exc:
            os.unlink(outcome.tmp)
            self._failed_outcome(outcome, exc)

    def _failed_outcome(self, outcome: Outcome, exc: OSError) -> None:
        """Not written: tmp/ cleaned, the claim unfenced, the error kept (NoSpace for the disk)."""
        if outcome.tmp is not None and os.path.lexists(outcome.tmp):
            os.unlink(outcome.tmp)
        outcome.tmp = None
        self._unfence(outcome.finishing, outcome.finishing[:-len(".fin")])
        if exc.errno in DISK_ERRNOS and not isinstance(exc, NoSpace):
            exc = NoSpace.of(exc, self.home)
        outcome.error = exc

    def _unfence(self, finishing: str, claimed: str) -> None:
        """Give a fenced claim its claim name back: the outcome could not be written."""
        try:
            os.rename(finishing, claimed)
        except FileNotFoundError:
            pass  # taken over meanwhile (this worker was taken for dead): theirs now

    def _place_outcome(self, tmp: str, directory: Path, task_id: str) -> None:
        """Rename an outcome into place without replacing one; FileExistsError if the id has one.

        Two files with one id under different names both get claimed; the no-replace rename
        keeps the first outcome. Rejected input that bears the name is moved aside first."""
        name = f"{task_id}.json"
        if self.outcome_state(task_id) is not None:
            raise FileExistsError(errno.EEXIST, "an outcome exists", name)
        if os.path.lexists(f"{directory}/{name}{SIDECAR}"):
            aside = f"{name}.{task_format.new_id()}"
            os.rename(directory / name, directory / aside)
            os.rename(directory / (name + SIDECAR), directory / (aside + SIDECAR))
        rename_noreplace(tmp, directory / name)

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


def duplicate_reason(task_id: str, state: str) -> str:
    """Why a second task with an id already finished is refused."""
    return (f"an outcome for id {task_id} already exists ({state}/{task_id}.json); an id "
            "runs once: give this task another id, or `koubou retry` the first")
