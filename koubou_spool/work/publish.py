"""Publish: the end of a claim. The ledger record first, then the outcome file (the fence), then
the `on_finish` hook; or the claim goes back to pending/ for another attempt.

The record lands before the outcome unless the ledger is locked: local work never waits on it
for more than LEDGER_WAIT_S (the record follows when the ledger is free).

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
from ..spool.files import Claim, NoSpace, Spool
from ..spool.ledger import LedgerWriter
from ..spool.task import Task

log = logging.getLogger(__name__)

LEDGER_WAIT_S = 1.0
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
        self.held: list[tuple[Claim, Task, dict]] = []  # outcomes the disk refused, oldest first
        self.settled: Callable[[], None] = lambda: None  # called when the last held one lands
        self._retry: asyncio.TimerHandle | None = None
        self._disk_said = -DISK_LOG_S

    async def complete(self, claim: Claim, task: Task, attempt: int, result: dict[str, Any],
                       cost: float | None) -> None:
        """Record a completed attempt, then publish its outcome."""
        record = task_format.completed_record(task, result)
        await self._recorded(self.ledger.attempt_finished(
            task.id, attempt, "completed", finished_at=time.time(), usage=result["usage"],
            cost_usd=cost, model=result["model"], record=record))
        self.publish(claim, task, record)

    async def fail(self, claim: Claim, task: Task, kind: str, message: str, attempt: int) -> None:
        """Record a failed task, then publish its outcome."""
        record, recorded = self._record_failure(task, kind, message, attempt)
        await self._recorded(recorded)
        self.publish(claim, task, record)

    def fail_now(self, claim: Claim, task: Task, kind: str, message: str, attempt: int) -> None:
        """Fail a task outside an attempt, without waiting for the ledger."""
        record, _ = self._record_failure(task, kind, message, attempt)
        self.publish(claim, task, record)

    def retry(self, claim: Claim, task: Task, attempt: int, kind: str, message: str) -> None:
        """Record a failed attempt that will be tried again, and requeue its task."""
        self.ledger.attempt_finished(task.id, attempt, "retry", finished_at=time.time(),
                                     error_kind=kind, message=message)
        self.requeue(claim, attempt)

    def requeue(self, claim: Claim, attempts: int | None) -> None:
        """Give a claim back to pending/ (`attempts`: the count to record; None keeps it)."""
        self.let_go(claim)
        self.spool.requeue(claim.file_name, attempts)

    def _record_failure(self, task: Task, kind: str, message: str,
                        attempt: int) -> tuple[dict, Future]:
        now = time.time()
        record = task_format.failed_record(task.raw, kind, message, attempt, now)
        return record, self.ledger.attempt_finished(task.id, attempt, "failed", finished_at=now,
                                                    error_kind=kind, message=message, record=record)

    async def _recorded(self, future: Future) -> None:
        """Let the ledger record land before the outcome is published, unless it is locked."""
        if self.ledger.backlog:
            return
        # asyncio.wait, not wait_for: giving up must not cancel the record itself.
        await asyncio.wait([asyncio.wrap_future(future)], timeout=LEDGER_WAIT_S)

    def publish(self, claim: Claim, task: Task, record: dict) -> None:
        """The outcome file, through the fence; then the hook and the log line. Held for a
        retry when the disk refuses it."""
        if self.held:  # the disk was full a moment ago: keep the order, try at the next retry
            self._hold(claim, task, record, None)
            return
        try:
            self._publish(claim, task, record)
        except NoSpace as exc:
            self._hold(claim, task, record, exc)

    def _hold(self, claim: Claim, task: Task, record: dict, exc: NoSpace | None) -> None:
        self.held.append((claim, task, record))
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
            claim, task, record = self.held[0]
            try:
                self._publish(claim, task, record)
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
            claim, task, _ = self.held.pop(0)
            log.warning("%s goes back to pending/: its outcome could not be written", task.id)
            self._give_back(claim)

    def _give_back(self, claim: Claim) -> None:
        try:
            self.requeue(claim, None)
        except OSError as exc:  # left claimed: recovery requeues it once this worker is gone
            log.error("cannot requeue %s: %s", claim.name, exc)

    def _publish(self, claim: Claim, task: Task, record: dict) -> None:
        self.let_go(claim)
        if not self.spool.publish(claim, task.id, record):
            log.warning("outcome of %s discarded: its claim was revoked, or another task "
                        "with this id finished first", task.id)
            return
        self._on_finish(task.id, record)
        if record["status"] == "completed":
            self.done += 1
            log.info("completed %s by %s in %.2f s", task.id, record["result"]["craftsman"],
                     record["result"]["duration_s"])
        else:
            self.failed += 1
            log.warning("failed %s (%s): %s", task.id, record["error"]["kind"],
                        record["error"]["message"])

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
