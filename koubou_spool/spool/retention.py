"""What the file spool keeps of finished tasks, and for how long: rejected input set aside with
its reason, the outcomes a ledger rebuild reads back, a failed task taken back to run again
(`koubou retry`), and the purge of old outcomes and stale staging files (`koubou maintain`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import task as task_format
from .disk import printable
from .entries import CLAIM_RE, NAME_MAX, SIDECAR, Claim, Found

log = logging.getLogger(__name__)


class Retention:
    """Finished entries of a file spool (a base of spool.files.Spool): completed/, failed/, tmp/."""

    pending: Path
    in_progress: Path
    completed: Path
    failed: Path
    tmp: Path

    def finished(self) -> Iterator[tuple[str, Any, Any]]:
        """(entry, record, sidecar) of every finished entry, in name order within completed/
        then failed/: record is the outcome (None when unreadable or not JSON), sidecar the
        reason beside rejected input (then record is None: the input is no outcome)."""
        for directory in (self.completed, self.failed):
            for entry in sorted(os.listdir(directory)):
                if entry.startswith(".") or entry.endswith(SIDECAR) or entry.endswith(".fin"):
                    continue
                sidecar = directory / (entry + SIDECAR)
                if os.path.lexists(sidecar):
                    yield entry, None, read_json(sidecar)
                else:
                    yield entry, read_json(directory / entry), None

    def purge(self, cutoff: float) -> tuple[list[str], list[str]]:
        """Delete outcome files (and rejected input with its sidecar) last changed before
        cutoff; the ids of purged tasks and the names of purged rejected files."""
        task_ids: list[str] = []
        reject_files: list[str] = []
        for directory in (self.completed, self.failed):
            for entry in os.listdir(directory):
                if entry.startswith(".") or entry.endswith(SIDECAR):
                    continue
                rejected = _purge_entry(directory, entry, cutoff)
                if rejected is None:
                    continue
                if rejected:
                    reject_files.append(entry)
                else:
                    task_ids.append(task_format.id_from_name(entry) or entry)
        _purge_orphan_sidecars(self.failed, cutoff)
        return task_ids, reject_files

    def reject(self, directory: Path, entry: str, reason: str) -> str | None:
        """Move input that is not a valid task to failed/ unchanged, with its reason beside it.

        Returns the name it got in failed/, or None when another process moved it first.
        """
        name = CLAIM_RE.fullmatch(entry)["name"] if directory == self.in_progress else entry
        target = self._failed_name(name)
        try:
            os.rename(directory / entry, self.failed / target)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot move %s to failed/: %s", directory / entry, exc.strerror)
            return None
        sidecar = {"file": printable(target), "original_name": printable(name),
                   "status": "failed",
                   "error": {"kind": "invalid", "message": printable(reason), "attempts": 0,
                             "at": task_format.iso(time.time())}}
        self.write_atomic(self.failed, target + SIDECAR, task_format.encode(sidecar))
        return target

    def _failed_name(self, name: str) -> str:
        """The name rejected input gets in failed/: its own, unless that is taken or leaves no
        room for the sidecar's suffix within NAME_MAX."""
        fits = len(os.fsencode(name)) + len(SIDECAR) <= NAME_MAX
        if fits and not os.path.lexists(self.failed / name) and not os.path.lexists(
                self.completed / name):
            return name
        room = NAME_MAX - len(SIDECAR) - 27  # "." and a new id
        return f"{os.fsdecode(os.fsencode(name)[:room])}.{task_format.new_id()}"

    def reopen(self, found: Found, owner: str) -> Claim:
        """Take a failed task back as a claim of `owner`, its outcome fields (status, error,
        result, attempts) removed: requeue it to run again. Through a claim, so a crash half
        way leaves a claim that recovery requeues."""
        claim = Claim(found.path.name, owner, time.time())
        os.rename(found.path, self.in_progress / claim.file_name)
        record = task_format.decode(self.read_claim(claim)[0])
        for key in ("status", "error", "result", "attempts"):
            record.pop(key, None)
        self.write_atomic(self.in_progress, claim.file_name, task_format.encode(record))
        return claim

    def rerun(self, found: Found, task: task_format.Task) -> bool:
        """Queue `task` in place of the outcome `found` of an earlier run of it (a cluster task
        retried on its origin, which holds that outcome); whether it was queued. The outcome is
        moved aside into tmp/ first, and back if the task cannot be queued (OSError, the
        outcome as it was): a crash in between leaves the id nowhere here, and its lease,
        running out, brings it back to be queued as new."""
        aside = f"{self.tmp}/.rerun.{task_format.new_id()}"
        os.rename(found.path, aside)
        try:
            queued = self.submit([task])[0][2]  # type: ignore[attr-defined]
        except BaseException:
            os.rename(aside, found.path)
            raise
        os.unlink(aside)  # delivered to its origin already: nothing of it is needed here
        return queued

    def unreject(self, found: Found) -> str:
        """Put rejected input back in pending/ as it was (for a fixed config or file), its
        reason dropped; the name it has there."""
        name = found.path.name
        os.rename(found.path, self.pending / name)
        Path(str(found.path) + SIDECAR).unlink(missing_ok=True)
        return name

    def clean_tmp(self, cutoff: float) -> int:
        """Remove staging files in tmp/ not changed since cutoff: their writers died mid-write."""
        removed = 0
        for entry in os.listdir(self.tmp):
            path = self.tmp / entry
            try:
                info = os.lstat(path)
                if info.st_mtime < cutoff and not stat.S_ISDIR(info.st_mode):
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


def remove(path: Path) -> None:
    """Remove a file, link, FIFO or (rejected) directory; never follows a link.
    rmtree works on descriptors: it removes an agent's links without following them."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _purge_entry(directory: Path, entry: str, cutoff: float) -> bool | None:
    """Delete one outcome if old enough; True: it was rejected input, False: a task, None: kept.

    Rejected input keeps the mtime the user gave it (rename does not change it), so its age is
    the age of its sidecar, written when it was rejected.
    """
    sidecar = directory / (entry + SIDECAR)
    rejected = os.path.lexists(sidecar)
    aged = sidecar if rejected else directory / entry
    try:
        if os.lstat(aged).st_mtime >= cutoff:
            return None
        remove(directory / entry)
        if rejected:
            os.unlink(sidecar)
    except FileNotFoundError:
        return None  # another process purged or moved it (`koubou retry`)
    return rejected


def _purge_orphan_sidecars(directory: Path, cutoff: float) -> None:
    """Sidecars whose rejected file is gone (deleted by hand) go once they are old."""
    for entry in os.listdir(directory):
        if entry.endswith(SIDECAR) and not os.path.lexists(directory / entry[:-len(SIDECAR)]):
            try:
                if os.lstat(directory / entry).st_mtime < cutoff:
                    os.unlink(directory / entry)
            except FileNotFoundError:
                pass


def read_json(path: Path) -> Any:
    """A JSON file's content; None when unreadable, not a regular file, or not JSON."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as stream:
            return json.loads(stream.read())
    except (OSError, ValueError):
        return None
