"""The worker: wakes on inotify, claims by rename, calls the craftsman, records, publishes.

One asyncio loop per process. File moves are synchronous in the loop (they are a few syscalls);
requests to craftsmen are concurrent, capped per craftsman (`max_concurrent`) and in all
(`--concurrency`). Nothing here polls: the loop sleeps until inotify, a timer (heartbeat, a
deferred file), a finished request or a signal wakes it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import time
from concurrent.futures import Future
from pathlib import Path

from inotify_simple import flags

from ..craft import router
from ..spool import task as task_format
from ..craft.attach import Attachment, read_attachments
from ..craft.backends import Backend, BackendError, Reply, Request, make_backend
from ..craft.budget import BudgetSettings
from ..config import Config, Craftsman
from ..errors import InvalidTask, KoubouError, UsageError
from ..spool.ledger import LedgerWriter
from ..craft.limits import Budget, Slots
from ..ops.notify import Notifier
from ..hooks import run_argv
from ..craft.pricing import cost_of
from ..craft.prompt import messages_for
from ..spool.recovery import recover_orphans
from ..craft.spending import BudgetExhausted, Spending
from ..spool.files import Claim, Refused, Spool, new_worker_id
from ..spool.task import Task, UnreadableTask
from ..spool.watcher import (CLAIMS_MASK, OUTCOME_MASK, OVERFLOW, PENDING_MASK, ReadyQueue, Watcher,
                      scan_order)

log = logging.getLogger(__name__)

FAIL_NOW = ""  # ReadyQueue key for tasks that can only be failed (no craftsman can take them)
PARSED_KEPT = 4096  # queued files whose parse is kept for their claim
LEDGER_WAIT_S = 1.0


class Worker:
    """One worker process serving some or all craftsmen of a home."""

    def __init__(self, home: Path, config: Config, *, craftsmen: list[str] | None = None,
                 concurrency: int = 16, drain: bool = False) -> None:
        unknown = sorted(set(craftsmen or ()) - set(config.craftsmen))
        if unknown:
            raise UsageError(f"no craftsman named {unknown[0]!r} in {config.path}; "
                             f"configured: {', '.join(sorted(config.craftsmen)) or 'none'}")
        if not config.craftsmen:
            raise UsageError(f"{config.path} configures no craftsmen; add one under `craftsmen:`")
        self.config = config
        self.settings = config.spool
        self.spool = Spool.open(home, config.spool)
        self.serves = list(craftsmen or config.craftsmen)
        self.concurrency = max(1, concurrency)
        self.drain = drain
        self.id = new_worker_id()
        self.ready = ReadyQueue()
        self.in_flight: dict[str, asyncio.Task] = {}
        self.budget = Budget(home / "db" / "koubou.db", BudgetSettings.parse(config.budget))
        self.spending = Spending(self.budget, home)
        self.patterns = router.sensitive_patterns(config)
        self.slots = Slots(home / "run" / "slots", [config.craftsmen[n] for n in self.serves])
        self.slot_of: dict[str, tuple[str, int]] = {}  # claim file -> (craftsman, slot)
        self.starved = False  # tasks wait for a slot another process holds
        self.letting_go: set[str] = set()  # our claims we are moving ourselves (publish, requeue)
        self.revoked: set[str] = set()  # our claims someone else moved (cancel, lease takeover)
        self.waiting_on: dict[str, set[str]] = {}  # task id -> pending names waiting for it
        self.parsed: dict[str, tuple] = {}  # pending name -> (signature, task, route, exhausted)
        self.notifier = Notifier()
        self.young: dict[str, asyncio.TimerHandle] = {}  # files that may still be being written
        self.scheduled: dict[str, asyncio.TimerHandle] = {}  # not_before in the future
        self.done = 0
        self.failed = 0
        self.stopping = False
        self.backends: dict[str, Backend] = {}
        self.backend_errors: dict[str, str] = {}
        self.ledger = LedgerWriter(home / "db" / "koubou.db")
        self._finished = asyncio.Event()
        self._lock_fd = -1

    # --- life cycle ----------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or, with --drain, until the queue is empty); returns 0."""
        loop = asyncio.get_running_loop()
        now = time.time()
        self._lock_fd = self.spool.register_worker(self.id, {
            "id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
            "craftsmen": self.serves, "started_at": task_format.iso(now)})
        self.ledger.worker_started(self.id, socket.gethostname(), os.getpid(), self.serves, now)
        self._open_backends()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        watcher = Watcher()
        watcher.watch(self.spool.pending, PENDING_MASK)
        # Outcomes free slots other workers held: the wake-up for a starved craftsman.
        watcher.watch(self.spool.completed, OUTCOME_MASK)
        watcher.watch(self.spool.failed, OUTCOME_MASK)
        # A claim of ours moved by someone else was cancelled or taken over: stop its request.
        watcher.watch(self.spool.in_progress, CLAIMS_MASK)
        loop.add_reader(watcher.fileno(), self._on_events, watcher)
        log.info("worker %s serving %s in %s (concurrency %d)", self.id, ", ".join(self.serves),
                 self.spool.home, self.concurrency)
        try:
            self._recover()
            self._rescan()
            self._heartbeat()
            self._pump()
            self.notifier.send("READY=1", self._status_line())
            if self.notifier.watchdog_s:
                self._watchdog()
            await self._finished.wait()
        finally:
            loop.remove_reader(watcher.fileno())
            watcher.close()
            await self._close(loop)
        log.info("worker %s stopped: %d completed, %d failed", self.id, self.done, self.failed)
        return 0

    def stop(self) -> None:
        """Stop claiming; finish what is in flight, or requeue it after spool.stop_grace_s."""
        if self.stopping:
            return
        self.stopping = True
        log.info("worker %s stopping with %d in flight", self.id, len(self.in_flight))
        self.notifier.send("STOPPING=1", self._status_line())
        asyncio.get_running_loop().call_later(self.settings.stop_grace_s, self._abandon)
        self._check_finished()

    def _abandon(self) -> None:
        for running in list(self.in_flight.values()):
            running.cancel()

    def _open_backends(self) -> None:
        for name in self.serves:
            try:
                self.backends[name] = make_backend(self.config.craftsmen[name], self.patterns)
            except KoubouError as exc:
                # A missing key or backend fails that craftsman's tasks, not the whole worker.
                self.backend_errors[name] = str(exc)
                log.error("%s", exc)

    async def _close(self, loop: asyncio.AbstractEventLoop) -> None:
        for handle in [*self.young.values(), *self.scheduled.values()]:
            handle.cancel()
        for backend in self.backends.values():
            await backend.close()
        self.ledger.worker_stopped(self.id, time.time())
        await loop.run_in_executor(None, self.ledger.close)
        self.slots.close()
        self.spool.unregister_worker(self.id, self._lock_fd)

    def _check_finished(self) -> None:
        if self.in_flight:
            return
        if self.stopping or (self.drain and not len(self.ready) and not self.young):
            self._finished.set()

    def _status_line(self) -> str:
        state = "stopping" if self.stopping else "serving " + ",".join(self.serves)
        return (f"STATUS={state}: {len(self.in_flight)} in flight, {len(self.ready)} ready, "
                f"{self.done} done, {self.failed} failed")

    def _watchdog(self) -> None:
        """Tell systemd the loop is alive, at half its WatchdogSec."""
        self.notifier.send("WATCHDOG=1", self._status_line())
        asyncio.get_running_loop().call_later(self.notifier.watchdog_s / 2, self._watchdog)

    def _heartbeat(self) -> None:
        """Prove liveness (lock file mtime, ledger) and take over claims of dead workers."""
        now = time.time()
        os.utime(self._lock_fd, (now, now))
        state = "stopping" if self.stopping else "running"
        self.ledger.heartbeat(self.id, state, len(self.in_flight), self.done, self.failed, now)
        self._recover()
        loop = asyncio.get_running_loop()
        if self.budget.exhausted():
            loop.run_in_executor(None, self.budget.recheck).add_done_callback(
                self._budget_rechecked)
        loop.call_later(self.settings.heartbeat_s, self._heartbeat)

    def _budget_rechecked(self, recheck: asyncio.Future) -> None:
        """Room in the budget again: deferred tasks are judged again now (tasks queued for a
        local craftsman meanwhile are routed again at their claim)."""
        if recheck.cancelled():
            return
        if recheck.exception() is not None:
            log.error("budget recheck failed: %s", recheck.exception())
            return
        if not recheck.result():
            return
        log.info("the budget has room again; cloud tasks go to the cloud")
        for name in list(self.scheduled):
            self._reconsider(name)

    # --- watching pending/ -----------------------------------------------------------------------

    def _on_events(self, watcher: Watcher) -> None:
        pump = False
        for directory, name, mask in watcher.events():
            if name == OVERFLOW:
                log.warning("inotify queue overflowed; rescanning %s", self.spool.pending)
                self._rescan()
                pump = True
            elif directory == self.spool.in_progress:
                self._claim_moved(name)
            elif directory != self.spool.pending:
                self._outcome_arrived(name)
                pump = pump or self.starved  # an outcome: a slot another worker held is free
            elif mask & flags.CREATE:
                # A regular file is read at its IN_CLOSE_WRITE; anything else never gets one.
                if self.spool.kind_of(self.spool.pending, name) == "other":
                    self._consider(name)
            else:
                self._consider(name)
                pump = True
        if pump:
            self._pump()

    def _claim_moved(self, name: str) -> None:
        """One of our claims left in_progress/ and we did not move it: abort its request."""
        if name in self.letting_go:
            self.letting_go.discard(name)
            return
        running = self.in_flight.get(name)
        if running is None:
            return
        self.revoked.add(name)
        running.cancel()

    def _outcome_arrived(self, name: str) -> None:
        """A task finished: tasks that waited for it (`after`) are judged again."""
        waiting = self.waiting_on.pop(name[:-5] if name.endswith(".json") else name, ())
        for pending_name in waiting:
            self._consider(pending_name)

    def _rescan(self) -> None:
        self.ready.clear()
        for name in scan_order(self.spool.pending):
            self._consider(name)

    def _consider(self, name: str) -> None:
        """Read a pending file and judge it: reject it, wait for its writer, or queue it."""
        if name.startswith("."):
            return  # hidden files are other programs' temporaries (rsync, editors)
        self._forget_timer(self.young, name)
        self._forget_timer(self.scheduled, name)
        try:
            data, info = self.spool.read_entry(self.spool.pending, name)
        except Refused as exc:
            self.ready.discard(name)
            if not exc.gone:
                self._reject(self.spool.pending, name, f"{name} is {exc}")
            return
        try:
            task = task_format.parse(data, task_format.id_from_name(name))
        except UnreadableTask as exc:
            age = time.time() - info.st_mtime
            if age < self.settings.grace_s:
                # Maybe still being written (seen by a scan, or closed between chunks): wait.
                self._defer(self.young, name, self.settings.grace_s - age)
            else:
                self._reject(self.spool.pending, name, str(exc))
            return
        except InvalidTask as exc:
            self._reject(self.spool.pending, name, str(exc))
            return
        self._queue(name, info, task)

    def _queue(self, name: str, info: os.stat_result, task: Task) -> None:
        """Hold a valid task (schedule, dependencies, budget) or queue it for its craftsman."""
        if task.not_before and task.not_before > time.time():
            self._defer(self.scheduled, name, task.not_before - time.time())
            return
        if task.after:
            blocked = self._dependencies(task)
            if blocked == "failed":
                self.ready.push(FAIL_NOW, task.priority, name)
                return
            if blocked:
                self.ready.discard(name)
                for dependency in blocked:
                    self.waiting_on.setdefault(dependency, set()).add(name)
                return
        try:
            decision = self._route(task)
        except InvalidTask:
            self.ready.push(FAIL_NOW, task.priority, name)  # failed with the reason at claim
            return
        if decision.kind == "defer":
            self._defer(self.scheduled, name, self._budget_wait())
        elif decision.craftsman is None:
            self.ready.push(FAIL_NOW, task.priority, name)
        elif decision.craftsman in self.serves:
            self.ready.push(decision.craftsman, task.priority, name)
            self._remember(name, info, task, None if task.files else decision)
        else:
            self.ready.discard(name)  # another worker serves that craftsman

    def _dependencies(self, task: Task) -> list[str] | str:
        """'failed' if a task it runs after failed, else the ids it still waits for."""
        waiting = []
        for dependency in task.after:
            outcome = self.spool.outcome(dependency)
            if outcome is None:
                waiting.append(dependency)
            elif outcome.get("status") != "completed":
                return "failed"
        return waiting

    def _route(self, task: Task, attachments: list[Attachment] | None = None) -> router.Route:
        """Route with the attachments' text and the budget's state; InvalidTask for bad files."""
        if attachments is None:
            attachments = read_attachments(task.files, self.config.attach)
        return router.route(task, self.config, attachments=[a.text for a in attachments],
                            budget_exhausted=self.budget.exhausted())

    def _budget_wait(self) -> float:
        """Seconds until the exhausted budget period ends (deferred tasks wait that long)."""
        now = time.time()
        return max(self.budget.settings.next_day_start(now) - now, 1.0)

    def _defer(self, timers: dict[str, asyncio.TimerHandle], name: str, delay: float) -> None:
        loop = asyncio.get_running_loop()
        timers[name] = loop.call_later(max(delay, 0.01), self._reconsider, name)

    def _forget_timer(self, timers: dict[str, asyncio.TimerHandle], name: str) -> None:
        handle = timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    def _reconsider(self, name: str) -> None:
        self.young.pop(name, None)
        self.scheduled.pop(name, None)
        self._consider(name)
        self._pump()
        self._check_finished()

    def _reject(self, directory: Path, entry: str, reason: str) -> None:
        target = self.spool.reject(directory, entry, reason)
        if target is not None:
            log.warning("rejected %s: %s (now failed/%s)", entry, reason, target)
            self.ledger.rejected(target, reason, time.time())

    # --- claiming --------------------------------------------------------------------------------

    def _next_craftsman(self, full: set[str]) -> str | None:
        """The craftsman whose next task comes first, among those not known to be full."""
        best, best_key = None, None
        for name in (FAIL_NOW, *self.serves):
            if name in full:
                continue
            head = self.ready.head(name)
            if head is not None and (best is None or head < best):
                best, best_key = head, name
        return best_key

    def _pump(self) -> None:
        """Claim tasks while this process has room and their craftsmen have free slots.

        A slot is taken (home-wide, see limits.Slots) before the claim, so a task is only
        claimed when its craftsman can start it: a busy local model never holds up cloud tasks.
        """
        full: set[str] = set()
        while not self.stopping and len(self.in_flight) < self.concurrency:
            craftsman = self._next_craftsman(full)
            if craftsman is None:
                break
            slot = None
            if craftsman != FAIL_NOW:
                slot = self.slots.acquire(craftsman)
                if slot is None:
                    full.add(craftsman)
                    continue
            name = self.ready.pop(craftsman)
            claim = self.spool.claim(name, self.id)
            if claim is None:  # another worker was first
                if slot is not None:
                    self.slots.release(craftsman, slot)
                continue
            if craftsman == FAIL_NOW:
                self._judge_unroutable(claim)
                continue
            self.slot_of[claim.file_name] = (craftsman, slot)
            running = asyncio.get_running_loop().create_task(self._attempt(claim, craftsman))
            self.in_flight[claim.file_name] = running
            running.add_done_callback(lambda _, c=claim: self._attempt_done(c))
        self.starved = any(self.ready.head(name) is not None for name in full)
        self._check_finished()

    def _attempt_done(self, claim: Claim) -> None:
        craftsman, slot = self.slot_of.pop(claim.file_name)
        self.slots.release(craftsman, slot)
        self.in_flight.pop(claim.file_name, None)
        self.letting_go.discard(claim.file_name)
        self.revoked.discard(claim.file_name)
        self._pump()

    def _remember(self, name: str, info: os.stat_result, task: Task,
                  decision: router.Route | None) -> None:
        """Keep a queued file's parse (and route) for its claim; the rename keeps the inode."""
        self.parsed[name] = (_signature(info), task, decision, self.budget.exhausted())
        if len(self.parsed) > PARSED_KEPT:
            del self.parsed[next(iter(self.parsed))]  # the oldest: bounded memory at any backlog

    def _recalled(self, claim: Claim) -> tuple[Task, router.Route | None] | None:
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

    def _read_claimed(self, claim: Claim) -> Task | None:
        """The claimed task, re-read: the file may have been replaced since it was queued."""
        try:
            data, _ = self.spool.read_claim(claim)
            return task_format.parse(data, task_format.id_from_name(claim.name))
        except Refused as exc:
            if not exc.gone:
                self._reject(self.spool.in_progress, claim.file_name, f"{claim.name} is {exc}")
        except InvalidTask as exc:
            self._reject(self.spool.in_progress, claim.file_name, str(exc))
        return None

    def _judge_unroutable(self, claim: Claim) -> None:
        task = self._read_claimed(claim)
        if task is None:
            return
        if task.after and self._dependencies(task) == "failed":
            failed = [d for d in task.after
                      if (self.spool.outcome(d) or {}).get("status") not in (None, "completed")]
            self._fail_now(claim, task, "dependency",
                           f"it runs after {', '.join(failed)}, which failed", task.attempts)
            return
        try:
            decision = self._route(task)
        except InvalidTask as exc:
            self._fail_now(claim, task, "invalid", str(exc), task.attempts)
            return
        if decision.craftsman is not None or decision.kind == "defer":
            self.spool.requeue(claim.file_name, None)  # things changed: judge it again
            return
        self._fail_now(claim, task, decision.kind or "policy", decision.reason, task.attempts)

    # --- one attempt -----------------------------------------------------------------------------

    async def _attempt(self, claim: Claim, craftsman_name: str) -> None:
        recalled = self._recalled(claim)
        task, decision = recalled if recalled else (self._read_claimed(claim), None)
        if task is None:
            return
        attachments: list[Attachment] = []
        if decision is None:  # judged again: the file, its attachments or the budget changed
            try:
                attachments = read_attachments(task.files, self.config.attach)
                decision = self._route(task, attachments)
            except InvalidTask as exc:
                await self._fail(claim, task, "invalid", str(exc), task.attempts + 1)
                return
        if decision.craftsman != craftsman_name:
            self._requeue(claim, None)
            return
        craftsman = self.config.craftsmen[craftsman_name]
        attempt = task.attempts + 1
        self.ledger.attempt_started(task.id, attempt, self.id, craftsman.name,
                                    task.model or craftsman.model, claim.claimed_at)
        if task.expires_at is not None and task.expires_at <= time.time():
            await self._fail(claim, task, "expired",
                             f"not started before expires_at {task.raw.get('expires_at')}", attempt)
            return
        try:
            reply = await self._call(craftsman, task, attempt, decision, attachments)
        except BudgetExhausted as exc:
            await self._budget_exhausted(claim, task, attempt, str(exc))
            return
        except asyncio.CancelledError:
            if claim.file_name in self.revoked:
                log.warning("claim on %s was revoked (cancelled or taken over); its request "
                            "was aborted", task.id)
                return
            # Stopping and out of grace: give the task back uncounted; it was not its fault.
            self._requeue(claim, None)
            raise
        except BackendError as exc:
            await self._failed_attempt(claim, task, attempt, exc)
            return
        await self._complete(claim, task, craftsman, attempt, reply)

    async def _call(self, craftsman: Craftsman, task: Task, attempt: int,
                    decision: router.Route, attachments: list[Attachment]) -> Reply:
        if craftsman.name in self.backend_errors:
            raise BackendError(self.backend_errors[craftsman.name])
        request = Request(
            messages=messages_for(task, craftsman.system, attachments),
            model=task.model or craftsman.model,
            max_tokens=task.max_tokens or craftsman.max_tokens,
            timeout_s=task.timeout_s or craftsman.timeout_s,
            temperature=task.temperature if task.temperature is not None
            else craftsman.temperature,
            reasoning_effort=task.reasoning_effort or craftsman.reasoning_effort,
            confidential=decision.confidential,
            workdir=f"{self.spool.home}/outputs/{task.id}")
        reservation = await self.spending.reserve(craftsman, task.id, attempt, request)
        try:
            reply = await self._guarded_call(craftsman, request)
        except BaseException:
            if reservation is not None:  # the call may have been billed: keep the reservation
                await self.spending.settle(reservation, None)
            raise
        if reservation is not None:
            reply.cost_usd = cost_of(craftsman, reply.model, reply.usage, reply.cost_usd)
            await self.spending.settle(reservation, reply.cost_usd)
        return reply

    async def _guarded_call(self, craftsman: Craftsman, request: Request) -> Reply:
        try:
            return await asyncio.wait_for(self.backends[craftsman.name].complete(request),
                                          request.timeout_s)
        except TimeoutError:
            raise BackendError(f"{craftsman.name} did not answer within {request.timeout_s:g} s",
                               kind="timeout", retryable=True) from None
        except (BackendError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug in a backend must fail one task, not the worker
            log.exception("backend %s failed unexpectedly", craftsman.name)
            raise BackendError(f"internal error in backend {craftsman.backend}: {exc}") from None

    async def _budget_exhausted(self, claim: Claim, task: Task, attempt: int,
                                message: str) -> None:
        """The reservation did not fit: per when_exhausted, go local, wait, or fail."""
        if self.budget.settings.when_exhausted == "fail":
            await self._fail(claim, task, "budget", message, attempt)
            return
        log.info("budget exhausted for %s (%s); requeued", task.id, message)
        self._requeue(claim, None)  # routed again: local, or deferred

    async def _complete(self, claim: Claim, task: Task, craftsman: Craftsman, attempt: int,
                        reply: Reply) -> None:
        finished = time.time()
        cost = cost_of(craftsman, reply.model, reply.usage, reply.cost_usd)
        queued = task.submitted_at or claim.claimed_at
        result = {
            "content": reply.content, "craftsman": craftsman.name, "model": reply.model,
            "worker_id": self.id, "usage": reply.usage,
            "cost_usd": None if cost is None else round(cost, 8),
            "attempts": attempt, "queued_at": task_format.iso(queued),
            "started_at": task_format.iso(claim.claimed_at),
            "finished_at": task_format.iso(finished),
            "duration_s": round(finished - claim.claimed_at, 3)}
        record = task_format.completed_record(task, result)
        await self._recorded(self.ledger.attempt_finished(
            task.id, attempt, "completed", finished_at=finished, usage=reply.usage,
            cost_usd=cost, model=reply.model, record=record))
        self._publish(claim, task, record)

    async def _failed_attempt(self, claim: Claim, task: Task, attempt: int,
                              error: BackendError) -> None:
        limit = task.max_attempts or self.settings.max_attempts
        if error.retryable and attempt < limit:
            log.warning("attempt %d/%d of %s failed, requeued: %s", attempt, limit, task.id, error)
            self.ledger.attempt_finished(task.id, attempt, "retry", finished_at=time.time(),
                                         error_kind=error.kind, message=str(error))
            self._requeue(claim, attempt)
            return
        await self._fail(claim, task, error.kind, str(error), attempt)

    async def _fail(self, claim: Claim, task: Task, kind: str, message: str, attempt: int) -> None:
        record, recorded = self._record_failure(task, kind, message, attempt)
        await self._recorded(recorded)
        self._publish(claim, task, record)

    def _fail_now(self, claim: Claim, task: Task, kind: str, message: str, attempt: int) -> None:
        """Fail a task outside an attempt, without waiting for the ledger."""
        record, _ = self._record_failure(task, kind, message, attempt)
        self._publish(claim, task, record)

    def _record_failure(self, task: Task, kind: str, message: str,
                        attempt: int) -> tuple[dict, Future]:
        now = time.time()
        record = task_format.failed_record(task.raw, kind, message, attempt, now)
        return record, self.ledger.attempt_finished(task.id, attempt, "failed", finished_at=now,
                                                    error_kind=kind, message=message, record=record)

    def _requeue(self, claim: Claim, attempts: int | None) -> None:
        self.letting_go.add(claim.file_name)
        self.spool.requeue(claim.file_name, attempts)

    def _publish(self, claim: Claim, task: Task, record: dict) -> None:
        self.letting_go.add(claim.file_name)
        if not self.spool.publish(claim, task.id, record):
            log.warning("claim on %s was revoked; its outcome is discarded", task.id)
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
        argv = self.config.hooks.get("on_finish")
        if not argv:
            return
        directory = self.spool.completed if record["status"] == "completed" else self.spool.failed
        env = dict(os.environ, KOUBOU_TASK_ID=task_id, KOUBOU_STATUS=record["status"],
                   KOUBOU_OUTCOME_FILE=str(directory / f"{task_id}.json"),
                   KOUBOU_HOME=str(self.spool.home))
        asyncio.get_running_loop().create_task(run_argv(list(argv), env, "hooks.on_finish"))

    async def _recorded(self, future: Future) -> None:
        """Let the ledger record land before the outcome is published, unless it is locked."""
        if self.ledger.backlog:
            return
        # asyncio.wait, not wait_for: giving up must not cancel the record itself.
        await asyncio.wait([asyncio.wrap_future(future)], timeout=LEDGER_WAIT_S)

    # --- recovery --------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Take over claims of dead (or lease-expired) workers: requeue, or fail as lost."""
        for recovered in recover_orphans(self.spool, self.settings, self.id, self.ledger,
                                         self.budget):
            if recovered.action == "lost":
                self.failed += 1


def _signature(info: os.stat_result) -> tuple[int, int, int]:
    """What identifies a file's content for reuse: same inode, size and modification time."""
    return info.st_ino, info.st_size, info.st_mtime_ns


def run_worker(home: Path, config: Config, **options: object) -> int:
    """Build and run a worker in a fresh event loop."""
    return asyncio.run(_run(home, config, options))


async def _run(home: Path, config: Config, options: dict) -> int:
    return await Worker(home, config, **options).run()
