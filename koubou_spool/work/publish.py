"""Publish: the end of a claim. The fence, then the outcome file through the group commit
(spool.commit), then, once it is durable, the report: the ledger record, the `on_finish` hook,
the counts and the log line. Or the claim goes back to pending/ for another attempt.

The attempt does not wait for any of it: its craftsman's slot is free as soon as the outcome is
fenced, so the next request never waits on the last one's files and ledger record.

An outcome the disk refuses (full, over quota, read-only) is held: its claim stays ours in
in_progress/, and the outcome is published again every HELD_RETRY_S until the disk has room,
with the condition logged at most once every DISK_LOG_S.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .. import hooks as hook_runner
from ..spool import task as task_format
from ..spool.commit import GroupCommit
from ..spool.files import Claim, NoSpace, Outcome, Spool
from ..spool.ledger import LedgerWriter
from ..spool.task import Task

log = logging.getLogger(__name__)

Record = Callable[[], Future]  # queues the attempt's ledger record, once its outcome is durable
LEDGER_WAIT_S = 1.0  # the longest an outcome's marker waits for its ledger record
HELD_RETRY_S = 2.0
DISK_LOG_S = 60.0


class Publisher:
    """Outcomes and requeues of one worker's claims, and its done/failed counts."""

    def __init__(self, spool: Spool, ledger: LedgerWriter, hooks: dict[str, Any],
                 let_go: Callable[[Claim], None]) -> None:
        self.spool = spool
        self.ledger = ledger
        self.hooks = hooks
        self.let_go = let_go
        self.done = 0
        self.failed = 0
        self.held: list[tuple[Claim, Task, dict, Record]] = []  # refused by the disk, oldest first
        self.settled: Callable[[], None] = lambda: None  # outcomes landed: the worker looks again
        self.commits: GroupCommit | None = None  # made on the loop, at the first publish
        self._retry: asyncio.TimerHandle | None = None
        self._disk_said = -DISK_LOG_S

    @property
    def committing(self) -> int:
        """Outcomes fenced and not yet durable and reported."""
        return self.commits.pending if self.commits is not None else 0

    def close(self) -> None:
        """Stop the group commit's thread (after the rounds queued)."""
        if self.commits is not None:
            self.commits.close()

    def complete(self, claim: Claim, task: Task, attempt: int, result: dict[str, Any],
                 cost: float | None) -> None:
        """Publish a completed attempt's outcome; its ledger record follows once it is durable."""
        record = task_format.completed_record(task, result)
        self.publish(claim, task, record, lambda: self.ledger.attempt_finished(
            task.id, attempt, "completed", finished_at=time.time(), usage=result["usage"],
            cost_usd=cost, model=result["model"], record=record))

    def fail(self, claim: Claim, task: Task, kind: str, message: str, attempt: int) -> None:
        """Publish a failed task's outcome; its ledger record follows once it is durable."""
        now = time.time()
        record = task_format.failed_record(task.raw, kind, message, attempt, now)
        self.publish(claim, task, record, lambda: self.ledger.attempt_finished(
            task.id, attempt, "failed", finished_at=now, error_kind=kind, message=message,
            record=record))

    fail_now = fail  # outside an attempt: the same, nothing there waits for it

    def retry(self, claim: Claim, task: Task, attempt: int, kind: str, message: str) -> None:
        """Record a failed attempt that will be tried again, and requeue its task."""
        self.ledger.attempt_finished(task.id, attempt, "retry", finished_at=time.time(),
                                     error_kind=kind, message=message)
        self.requeue(claim, attempt)

    def requeue(self, claim: Claim, attempts: int | None) -> None:
        """Give a claim back to pending/ (`attempts`: the count to record; None keeps it)."""
        self.let_go(claim)
        self.spool.requeue(claim.file_name, attempts)

    def publish(self, claim: Claim, task: Task, record: dict, recorded: Record) -> None:
        """The fence, then the outcome through the group commit, reported once durable. Held
        for a retry when the disk refuses it."""
        if self.held:  # the disk was full a moment ago: keep the order, try at the next retry
            self._hold(claim, task, record, recorded, None)
            return
        self.let_go(claim)
        outcome = self.spool.fence(claim, task.id, record)
        if outcome is None:
            self._discarded(task, recorded)
            return
        if self.commits is None:
            self.commits = GroupCommit(self.spool, asyncio.get_running_loop())
        self.commits.add(outcome, lambda o: self._committed(o, task, record, recorded))

    def _committed(self, outcome: Outcome, task: Task, record: dict, recorded: Record) -> None:
        """On the loop, after the outcome's round: report it, or hold or give back its claim."""
        try:
            if self.spool.settle(outcome):
                self._report(task, record, recorded, outcome)
            else:
                self._discarded(task, recorded)
        except NoSpace as exc:
            self._hold(outcome.claim, task, record, recorded, exc)
        except OSError as exc:  # not the disk's room: the task runs again rather than stay claimed
            log.error("cannot publish the outcome of %s (%s); it goes back to pending/",
                      task.id, exc)
            self._give_back(outcome.claim)
        self.settled()

    def _discarded(self, task: Task, recorded: Record) -> None:
        recorded()
        log.warning("outcome of %s discarded: its claim was revoked, or another task "
                    "with this id finished first", task.id)

    def _hold(self, claim: Claim, task: Task, record: dict, recorded: Record,
              exc: NoSpace | None) -> None:
        self.held.append((claim, task, record, recorded))
        now = time.monotonic()
        if exc is not None and now - self._disk_said >= DISK_LOG_S:
            self._disk_said = now
            log.error("%s; %d outcome(s) held, their tasks stay claimed, publishing again "
                      "every %g s", exc, len(self.held), HELD_RETRY_S)
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(HELD_RETRY_S, self._publish_held)

    def _publish_held(self) -> None:
        """Timer: publish the held outcomes in order, until the disk refuses one again."""
        self._retry = None
        while self.held:
            claim, task, record, recorded = self.held[0]
            try:
                self._publish(claim, task, record, recorded)
            except NoSpace as exc:
                self._hold_again(exc)
                return
            except OSError as exc:  # not the disk's room: no point holding it longer
                log.error("cannot publish the held outcome of %s (%s); it goes back to pending/",
                          task.id, exc)
                self.held.pop(0)
                self._give_back(claim)
                continue
            self.held.pop(0)
        log.info("the disk has room again; held outcomes published")
        self.settled()

    def _hold_again(self, exc: NoSpace) -> None:
        now = time.monotonic()
        if now - self._disk_said >= DISK_LOG_S:
            self._disk_said = now
            log.error("%s; %d outcome(s) still held", exc, len(self.held))
        self._retry = asyncio.get_running_loop().call_later(HELD_RETRY_S, self._publish_held)

    def give_back_held(self) -> None:
        """Stopping with outcomes the disk still refuses: their tasks go back to pending/ (a
        rename each, no write), to run again, rather than stay claimed by a gone worker."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        while self.held:
            claim, task, _, _ = self.held.pop(0)
            log.warning("%s goes back to pending/: its outcome could not be written", task.id)
            self._give_back(claim)

    def _give_back(self, claim: Claim) -> None:
        try:
            self.requeue(claim, None)
        except OSError as exc:  # left claimed: recovery requeues it once this worker is gone
            log.error("cannot requeue %s: %s", claim.name, exc)

    def _publish(self, claim: Claim, task: Task, record: dict, recorded: Record) -> None:
        """A held outcome, published at once (fsync in this thread: the disk is the trouble)."""
        self.let_go(claim)
        if not self.spool.publish(claim, task.id, record):
            self._discarded(task, recorded)
            return
        self._report(task, record, recorded)

    def _report(self, task: Task, record: dict, recorded: Record,
                outcome: Outcome | None = None) -> None:
        """A durable outcome: its ledger record, the hook, the counts and the log line. Its
        finishing claim goes once the ledger has the record (or gave up on it): until then a
        crash leaves recovery the marker, and it records the outcome."""
        written = recorded()
        if outcome is not None:
            self._unmark_when(written, outcome)
        self._on_finish(task.id, record)
        if record["status"] == "completed":
            self.done += 1
            log.info("completed %s by %s in %.2f s", task.id, record["result"]["craftsman"],
                     record["result"]["duration_s"])
        else:
            self.failed += 1
            log.warning("failed %s (%s): %s", task.id, record["error"]["kind"],
                        record["error"]["message"])

    def _unmark_when(self, written: Future, outcome: Outcome) -> None:
        """Remove the outcome's marker once its record is written, or after LEDGER_WAIT_S at
        most: a locked or broken ledger keeps the record in memory, and must not keep markers
        piling up in in_progress/ (a crash then loses the record: `koubou ledger rebuild`)."""
        if self.ledger.backlog:
            self.spool.unmark(outcome)
            return
        written.add_done_callback(lambda _: self.spool.unmark(outcome))  # in the ledger's thread
        asyncio.get_running_loop().call_later(LEDGER_WAIT_S, self.spool.unmark, outcome)

    def _on_finish(self, task_id: str, record: dict) -> None:
        """hooks.on_finish: an argv run after each task ends; its failure is only logged."""
        argv = self.hooks.get("on_finish")
        if not argv:
            return
        directory = self.spool.completed if record["status"] == "completed" else self.spool.failed
        env = dict(os.environ, KOUBOU_TASK_ID=task_id, KOUBOU_STATUS=record["status"],
                   KOUBOU_OUTCOME_FILE=str(directory / f"{task_id}.json"),
                   KOUBOU_HOME=str(self.spool.home))
        hook_runner.start(list(argv), env, "hooks.on_finish", hook_runner.hook_timeout(self.hooks))
