"""Intake: from pending/ to the ready queue. Each file an event or a scan names is judged once:
rejected (failed/ with the reason), held (a writer may still be writing it, `not_before`,
`after`, a deferred budget) on a timer, or queued for the craftsman it routes to.

The parse and route of a queued file are kept for its claim: a rename keeps the inode, so an
unchanged file is not read and routed twice on the hot path.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from collections.abc import Callable

from ..config import Config
from ..craft import router
from ..craft.limits import Budget
from ..errors import InvalidTask
from ..spool import task as task_format
from ..spool.files import (NAME_MAX, Claim, Refused, Spool, Unavailable, duplicate_reason,
                           printable)
from ..spool.ledger import LedgerWriter
from ..spool.task import Task, UnreadableTask
from ..spool.watcher import ReadyQueue, lane, scan_order, settle_delay
from .routing import Routes

log = logging.getLogger(__name__)

FAIL_NOW = ""  # ReadyQueue key for tasks that can only be failed (no craftsman can take them)
PARSED_KEPT = 4096  # queued files whose parse is kept for their claim


class Intake:
    """Judges pending files into the ready queue; `wake` is called when a held file is due."""

    def __init__(self, spool: Spool, config: Config, serves: list[str], budget: Budget,
                 ledger: LedgerWriter, wake: Callable[[], None]) -> None:
        self.spool = spool
        self.config = config
        self.serves = serves
        self.budget = budget
        self.ledger = ledger
        self.wake = wake
        # A claim that cannot be read now goes back to pending/ through this (the worker sets
        # it to its publisher's requeue, which knows the claim is moved by us).
        self.give_back: Callable[[Claim], None] = lambda claim: None
        self.grace_s = config.spool.grace_s
        self.routes = Routes(config, budget)
        self.ready = ReadyQueue()
        self.young: dict[str, asyncio.TimerHandle] = {}  # files that may still be being written
        self.scheduled: dict[str, asyncio.TimerHandle] = {}  # not_before, deferred budget
        self.waiting_on: dict[str, set[str]] = {}  # task id -> pending names waiting for it
        self.parsed: dict[str, tuple] = {}  # pending name -> (signature, task, route, exhausted)

    @property
    def settling(self) -> bool:
        """Files that may still be being written: a draining worker waits for them."""
        return bool(self.young)

    def close(self) -> None:
        """Cancel every timer."""
        for handle in [*self.young.values(), *self.scheduled.values()]:
            handle.cancel()

    def rescan(self) -> None:
        """Judge pending/ again from the directory, the truth (at start and after an overflow)."""
        self.ready.clear()
        for name in scan_order(self.spool.pending):
            self.consider(name)

    def created(self, name: str) -> None:
        """IN_CREATE: what arrives whole (not a regular file, or one linked in) is judged now;
        a file being written at its IN_CLOSE_WRITE, or after the grace if none comes."""
        self._defer(self.young, name, settle_delay(self.spool.pending, name, self.grace_s))

    def outcome_arrived(self, name: str) -> bool:
        """A task finished: tasks that waited for it (`after`) are judged again; True if any."""
        waiting = self.waiting_on.pop(name[:-5] if name.endswith(".json") else name, ())
        for pending_name in waiting:
            self.consider(pending_name)
        return bool(waiting)

    def budget_room(self) -> None:
        """The budget has room again: deferred tasks are judged again now."""
        for name in list(self.scheduled):
            self._reconsider(name)

    def consider(self, name: str) -> None:
        """Read a pending file and judge it: reject it, wait for its writer, or queue it.

        Nothing a file holds may stop the worker: an error no check foresaw rejects that one
        file with the error as its reason (and is logged once, with its traceback, as the bug
        it is)."""
        if name.startswith("."):
            return  # hidden files are other programs' temporaries (rsync, editors)
        try:
            self._judge(name)
        except Exception as exc:
            log.exception("could not judge %s; rejecting it", name)
            self.ready.discard(name)
            self.reject_safely(self.spool.pending, name, f"could not be judged: {exc}")

    def _judge(self, name: str) -> None:
        _forget_timer(self.young, name)
        _forget_timer(self.scheduled, name)
        try:
            data, info = self.spool.read_entry(self.spool.pending, name)
        except Unavailable as exc:  # EMFILE, EIO, ...: no verdict on the file; read it again
            log.warning("%s", exc)
            self.ready.discard(name)
            self._defer(self.young, name, self.grace_s)
            return
        except Refused as exc:
            self.ready.discard(name)
            if not exc.gone:
                self.reject(self.spool.pending, name, f"{name} is {exc}")
            return
        try:
            task = task_format.parse(data, task_format.id_from_name(name))
        except UnreadableTask as exc:
            age = time.time() - info.st_mtime
            if age < self.grace_s:
                # Maybe still being written (seen by a scan, or closed between chunks): wait.
                self._defer(self.young, name, self.grace_s - age)
            else:
                self.reject(self.spool.pending, name, str(exc))
            return
        except InvalidTask as exc:
            self.reject(self.spool.pending, name, str(exc))
            return
        self._queue(name, info, task)

    def _queue(self, name: str, info: os.stat_result, task: Task) -> None:
        """Hold a valid task (schedule, dependencies, budget) or queue it for its craftsman."""
        finished = self.finished(task)
        if finished:
            self.ready.discard(name)
            self.reject(self.spool.pending, name, duplicate_reason(task.id, finished))
            return
        if task.not_before and task.not_before > time.time():
            self._defer(self.scheduled, name, task.not_before - time.time())
            return
        if task.after and self._held_by_dependencies(name, task):
            return
        try:
            decision = self.routes.route(task)
        except InvalidTask:
            self.ready.push(FAIL_NOW, task.priority, name)  # failed with the reason at claim
            return
        if decision.kind == "defer":
            self._defer(self.scheduled, name, self._budget_wait())
        elif decision.craftsman is None:
            self.ready.push(FAIL_NOW, task.priority, name)
        elif decision.craftsman in self.serves:
            self.ready.push(lane(decision.craftsman, bool(task.repo)), task.priority, name)
            self._remember(name, info, task, None if task.files else decision)
        else:
            self.ready.discard(name)  # another worker serves that craftsman

    def _held_by_dependencies(self, name: str, task: Task) -> bool:
        """Queue a task whose dependency failed for failing; hold one that still waits."""
        blocked = self.dependencies(task)
        if blocked == "failed":
            self.ready.push(FAIL_NOW, task.priority, name)
            return True
        if blocked:
            self.ready.discard(name)
            for dependency in blocked:
                self.waiting_on.setdefault(dependency, set()).add(name)
            return True
        return False

    def finished(self, task: Task) -> str | None:
        """The state of the outcome this task's id already has (another file with the same
        id ran), or None. Two stats: the publish fence is the guarantee, this spares the
        call."""
        return None if task.fresh_id else self.spool.outcome_state(task.id)

    def dependencies(self, task: Task) -> list[str] | str:
        """'failed' if a task it runs after failed, else the ids it still waits for."""
        waiting = []
        for dependency in task.after:
            outcome = self.spool.outcome(dependency)
            if outcome is None:
                waiting.append(dependency)
            elif outcome.get("status") != "completed":
                return "failed"
        return waiting

    def _budget_wait(self) -> float:
        """Seconds until the exhausted budget period ends (deferred tasks wait that long)."""
        now = time.time()
        return max(self.budget.settings.next_day_start(now) - now, 1.0)

    def _defer(self, timers: dict[str, asyncio.TimerHandle], name: str, delay: float) -> None:
        loop = asyncio.get_running_loop()
        timers[name] = loop.call_later(max(delay, 0.01), self._reconsider, name)

    def _reconsider(self, name: str) -> None:
        self.young.pop(name, None)
        self.scheduled.pop(name, None)
        self.consider(name)
        self.wake()

    def reject(self, directory: os.PathLike, entry: str, reason: str) -> None:
        """Move a file that is no valid task to failed/, with the reason beside it."""
        target = self.spool.reject(directory, entry, reason)
        if target is not None:
            log.warning("rejected %s: %s (now failed/%s)", entry, reason, target)
            self.ledger.rejected(printable(target), printable(reason), time.time())

    def reject_safely(self, directory: os.PathLike, entry: str, reason: str) -> None:
        """Reject, at the edge: if even that fails the file stays where it is, logged."""
        try:
            self.reject(directory, entry, reason)
        except Exception:
            log.exception("could not move %s to failed/; it stays in %s", entry, directory)

    def claim_failed(self, name: str, error: OSError) -> None:
        """The claim's rename failed: a name too long for a claim is rejected; anything else
        (the disk, the kernel) is tried again after the grace period."""
        if error.errno == errno.ENAMETOOLONG:
            self.reject_safely(self.spool.pending, name, "its name is too long to be claimed "
                               f"({len(os.fsencode(name))} bytes; a claim adds the worker's id "
                               f"within the {NAME_MAX}-byte limit): use a shorter name")
            return
        log.error("cannot claim %s: %s; trying again in %g s", name, error.strerror,
                  self.grace_s)
        self._defer(self.scheduled, name, self.grace_s)

    # --- what a claim brings back ------------------------------------------------------------

    def _remember(self, name: str, info: os.stat_result, task: Task,
                  decision: router.Route | None) -> None:
        """Keep a queued file's parse (and route) for its claim; the rename keeps the inode."""
        self.parsed[name] = (_signature(info), task, decision, self.budget.exhausted())
        if len(self.parsed) > PARSED_KEPT:
            del self.parsed[next(iter(self.parsed))]  # the oldest: bounded memory at any backlog

    def recalled(self, claim: Claim) -> tuple[Task, router.Route | None] | None:
        """The parse (and route, if still valid) from when the file was queued, if unchanged."""
        kept = self.parsed.pop(claim.name, None)
        if kept is None:
            return None
        try:
            info = os.lstat(f"{self.spool.in_progress}/{claim.file_name}")
        except FileNotFoundError:
            return None
        if _signature(info) != kept[0] or not stat.S_ISREG(info.st_mode):
            return None  # replaced since: read it again
        decision = kept[2] if kept[3] == self.budget.exhausted() else None
        return kept[1], decision

    def read_claimed(self, claim: Claim) -> Task | None:
        """The claimed task, re-read: the file may have been replaced since it was queued."""
        try:
            data, _ = self.spool.read_claim(claim)
            return task_format.parse(data, task_format.id_from_name(claim.name))
        except Unavailable as exc:
            log.warning("%s", exc)
            self.give_back(claim)
        except Refused as exc:
            if not exc.gone:
                self.reject(self.spool.in_progress, claim.file_name, f"{claim.name} is {exc}")
        except InvalidTask as exc:
            self.reject(self.spool.in_progress, claim.file_name, str(exc))
        return None


def _forget_timer(timers: dict[str, asyncio.TimerHandle], name: str) -> None:
    handle = timers.pop(name, None)
    if handle is not None:
        handle.cancel()


def _signature(info: os.stat_result) -> tuple[int, int, int]:
    """What identifies a file's content for reuse: same inode, size and modification time."""
    return info.st_ino, info.st_size, info.st_mtime_ns
