"""Publishing an outcome in the file spool (a base of spool.files.Spool): the fence first (the
claim renamed to its finishing name), then the outcome staged, flushed, renamed into place and
its directory fsynced, for many outcomes at once in one round (spool.commit: group commit)."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

from . import task as task_format
from .disk import flush_files, rename_noreplace, stage
from .entries import DISK_ERRNOS, SIDECAR, Claim, NoSpace, Outcome, duplicate_reason

log = logging.getLogger(__name__)


class Outcomes:
    """The fence and the outcome files of one home's spool."""

    home: Path
    tmp: Path
    in_progress: Path
    completed: Path
    failed: Path
    fsync: bool

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
