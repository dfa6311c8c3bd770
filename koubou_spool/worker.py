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
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path

from inotify_simple import flags

from . import router
from . import task as task_format
from .backends import Backend, BackendError, Reply, Request, make_backend
from .config import Config, Craftsman
from .errors import InvalidTask, KoubouError, UsageError
from .ledger import LedgerWriter
from .prompt import messages_for
from .spool import CLAIM_RE, Claim, Refused, Spool, new_worker_id
from .task import Task, UnreadableTask
from .watcher import OVERFLOW, PENDING_MASK, ReadyQueue, Watcher, scan_order

log = logging.getLogger(__name__)

FAIL_NOW = ""  # ReadyQueue key for tasks that can only be failed (no craftsman can take them)
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
        self.busy: Counter[str] = Counter()
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
        loop.add_reader(watcher.fileno(), self._on_events, watcher)
        log.info("worker %s serving %s in %s (concurrency %d)", self.id, ", ".join(self.serves),
                 self.spool.home, self.concurrency)
        try:
            self._recover()
            self._rescan()
            self._heartbeat()
            self._pump()
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
        asyncio.get_running_loop().call_later(self.settings.stop_grace_s, self._abandon)
        self._check_finished()

    def _abandon(self) -> None:
        for running in list(self.in_flight.values()):
            running.cancel()

    def _open_backends(self) -> None:
        for name in self.serves:
            try:
                self.backends[name] = make_backend(self.config.craftsmen[name])
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
        self.spool.unregister_worker(self.id, self._lock_fd)

    def _check_finished(self) -> None:
        if self.in_flight:
            return
        if self.stopping or (self.drain and not len(self.ready) and not self.young):
            self._finished.set()

    def _heartbeat(self) -> None:
        """Prove liveness (lock file mtime, ledger) and take over claims of dead workers."""
        now = time.time()
        os.utime(self._lock_fd, (now, now))
        state = "stopping" if self.stopping else "running"
        self.ledger.heartbeat(self.id, state, len(self.in_flight), self.done, self.failed, now)
        self._recover()
        asyncio.get_running_loop().call_later(self.settings.heartbeat_s, self._heartbeat)

    # --- watching pending/ -----------------------------------------------------------------------

    def _on_events(self, watcher: Watcher) -> None:
        for _, name, mask in watcher.events():
            if name == OVERFLOW:
                log.warning("inotify queue overflowed; rescanning %s", self.spool.pending)
                self._rescan()
            elif mask & flags.CREATE:
                # A regular file is read at its IN_CLOSE_WRITE; anything else never gets one.
                if self.spool.kind_of(self.spool.pending, name) == "other":
                    self._consider(name)
            else:
                self._consider(name)
        self._pump()

    def _rescan(self) -> None:
        self.ready.clear()
        for name in scan_order(self.spool.pending):
            self._consider(name)

    def _consider(self, name: str) -> None:
        """Read a pending file, judge it, and queue it for its craftsman (or reject it)."""
        if name.startswith("."):
            return  # hidden files are other programs' temporaries (rsync, editors)
        self._forget_timer(self.young, name)
        self._forget_timer(self.scheduled, name)
        try:
            data, mtime = self.spool.read_entry(self.spool.pending, name)
        except Refused as exc:
            self.ready.discard(name)
            if not exc.gone:
                self._reject(self.spool.pending, name, f"{name} is {exc}")
            return
        try:
            task = task_format.parse(data, task_format.id_from_name(name))
        except UnreadableTask as exc:
            age = time.time() - mtime
            if age < self.settings.grace_s:
                # Maybe still being written (seen by a scan, or closed between chunks): wait.
                self._defer(self.young, name, self.settings.grace_s - age)
            else:
                self._reject(self.spool.pending, name, str(exc))
            return
        except InvalidTask as exc:
            self._reject(self.spool.pending, name, str(exc))
            return
        if task.not_before and task.not_before > time.time():
            self._defer(self.scheduled, name, task.not_before - time.time())
            return
        decision = router.route(task, self.config)
        if decision.craftsman is None:
            self.ready.push(FAIL_NOW, task.priority, name)
        elif decision.craftsman in self.serves:
            self.ready.push(decision.craftsman, task.priority, name)
        else:
            self.ready.discard(name)  # another worker serves that craftsman

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

    def _has_slot(self, craftsman: str) -> bool:
        return self.busy[craftsman] < self.config.craftsmen[craftsman].max_concurrent

    def _next_craftsman(self) -> str | None:
        """The craftsman whose next task comes first among those with a free slot."""
        best, best_key = None, None
        for name in (FAIL_NOW, *self.serves):
            if name != FAIL_NOW and not self._has_slot(name):
                continue
            head = self.ready.head(name)
            if head is not None and (best is None or head < best):
                best, best_key = head, name
        return best_key

    def _pump(self) -> None:
        """Claim tasks while there are free slots and claimable tasks."""
        while not self.stopping and len(self.in_flight) < self.concurrency:
            craftsman = self._next_craftsman()
            if craftsman is None:
                break
            name = self.ready.pop(craftsman)
            claim = self.spool.claim(name, self.id)
            if claim is None:
                continue  # another worker was first
            if craftsman == FAIL_NOW:
                self._judge_unroutable(claim)
                continue
            self.busy[craftsman] += 1
            running = asyncio.get_running_loop().create_task(self._attempt(claim, craftsman))
            self.in_flight[claim.file_name] = running
            running.add_done_callback(lambda _, c=claim, n=craftsman: self._attempt_done(c, n))
        self._check_finished()

    def _attempt_done(self, claim: Claim, craftsman: str) -> None:
        self.busy[craftsman] -= 1
        self.in_flight.pop(claim.file_name, None)
        self._pump()

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
        decision = router.route(task, self.config)
        if decision.craftsman is not None:
            self.spool.requeue(claim.file_name, None)  # config changed its mind: queue it again
            return
        self._fail_now(claim, task, decision.kind or "policy", decision.reason, task.attempts)

    # --- one attempt -----------------------------------------------------------------------------

    async def _attempt(self, claim: Claim, craftsman_name: str) -> None:
        task = self._read_claimed(claim)
        if task is None:
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
            reply = await self._call(craftsman, task)
        except asyncio.CancelledError:
            # Stopping and out of grace: give the task back uncounted; it was not its fault.
            self.spool.requeue(claim.file_name, None)
            raise
        except BackendError as exc:
            await self._failed_attempt(claim, task, attempt, exc)
            return
        await self._complete(claim, task, craftsman, attempt, reply)

    async def _call(self, craftsman: Craftsman, task: Task) -> Reply:
        if craftsman.name in self.backend_errors:
            raise BackendError(self.backend_errors[craftsman.name])
        if task.files:
            raise BackendError("attached files are not supported by this version of koubou "
                               "yet; put the text in content", kind="invalid")
        request = Request(
            messages=messages_for(task, craftsman.system),
            model=task.model or craftsman.model,
            max_tokens=task.max_tokens or craftsman.max_tokens,
            timeout_s=task.timeout_s or craftsman.timeout_s,
            temperature=task.temperature if task.temperature is not None
            else craftsman.temperature,
            reasoning_effort=task.reasoning_effort or craftsman.reasoning_effort)
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

    async def _complete(self, claim: Claim, task: Task, craftsman: Craftsman, attempt: int,
                        reply: Reply) -> None:
        finished = time.time()
        prompt, completion = reply.usage.get("prompt_tokens", 0), reply.usage.get(
            "completion_tokens", 0)
        cost = reply.cost_usd if reply.cost_usd is not None else craftsman.cost(prompt, completion)
        queued = task.submitted_at or claim.claimed_at
        result = {
            "content": reply.content, "craftsman": craftsman.name, "model": reply.model,
            "worker_id": self.id, "usage": reply.usage, "cost_usd": round(cost, 8),
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
            self.spool.requeue(claim.file_name, attempt)
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

    def _publish(self, claim: Claim, task: Task, record: dict) -> None:
        if not self.spool.publish(claim, task.id, record):
            log.warning("claim on %s was revoked; its outcome is discarded", task.id)
        elif record["status"] == "completed":
            self.done += 1
            log.info("completed %s by %s in %.2f s", task.id, record["result"]["craftsman"],
                     record["result"]["duration_s"])
        else:
            self.failed += 1
            log.warning("failed %s (%s): %s", task.id, record["error"]["kind"],
                        record["error"]["message"])

    async def _recorded(self, future: Future) -> None:
        """Let the ledger record land before the outcome is published, unless it is locked."""
        if self.ledger.backlog:
            return
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), LEDGER_WAIT_S)
        except Exception:  # locked or broken ledger: local work goes on (PRODUCT.md §4.5)
            log.debug("ledger record deferred")

    # --- recovery --------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Take over claims of dead (or lease-expired) workers: requeue, or fail as lost."""
        for entry, state in self.spool.orphaned_claims(self.settings.lease_s):
            match = CLAIM_RE.fullmatch(entry)
            mine = Claim(match["name"], self.id, time.time())
            try:  # taking the claim over is the fence against its old owner
                os.rename(self.spool.in_progress / entry,
                          self.spool.in_progress / (mine.file_name + (match["fin"] or "")))
            except FileNotFoundError:
                continue
            log.warning("took over %s from %s worker %s", match["name"], state, match["worker"])
            if match["fin"]:
                self._recover_finishing(mine)
            else:
                self._recover_claim(mine)

    def _recover_finishing(self, claim: Claim) -> None:
        """A worker died while publishing: keep its outcome if it landed, else run again."""
        path = self.spool.in_progress / (claim.file_name + ".fin")
        try:
            task = task_format.parse(path.read_bytes(), task_format.id_from_name(claim.name))
        except (OSError, InvalidTask):
            task = None
        if task is not None and self.spool.outcome(task.id) is not None:
            path.unlink()
            return
        os.rename(path, self.spool.in_progress / claim.file_name)
        self._recover_claim(claim)

    def _recover_claim(self, claim: Claim) -> None:
        try:
            data, _ = self.spool.read_claim(claim)
            task = task_format.parse(data, task_format.id_from_name(claim.name))
        except (Refused, InvalidTask):
            self.spool.requeue(claim.file_name, None)  # judged again from pending/
            return
        attempt = task.attempts + 1
        self.ledger.attempt_finished(task.id, attempt, "lost", finished_at=time.time(),
                                     error_kind="lost", message="worker died during the attempt")
        if attempt >= (task.max_attempts or self.settings.max_attempts):
            record = task_format.failed_record(task.raw, "lost", f"its worker died {attempt} "
                                               "times while running it", attempt, time.time())
            self.ledger.task_finished(record)
            self._publish(claim, task, record)
            return
        self.spool.requeue(claim.file_name, attempt)


def run_worker(home: Path, config: Config, **options: object) -> int:
    """Build and run a worker in a fresh event loop."""
    return asyncio.run(_run(home, config, options))


async def _run(home: Path, config: Config, options: dict) -> int:
    return await Worker(home, config, **options).run()
