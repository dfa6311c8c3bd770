"""The worker: wakes on inotify, claims by rename, calls the craftsman, records, publishes.

One asyncio loop per process, over four collaborators with one job each: intake (pending files
judged into a ready queue), dispatch (a slot, then the claim), the attempt (the call, with the
budget reserved and settled) and publish (the ledger record, then the outcome, then the hook).
File moves are synchronous in the loop (they are a few syscalls); requests to craftsmen are
concurrent, capped per craftsman (`max_concurrent`) and in all (`--concurrency`). Nothing here
polls: the loop sleeps until inotify, a timer (heartbeat, a deferred file), a finished request
or a signal wakes it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from inotify_simple import flags

from ..config import ClusterSettings, Config, Craftsman
from ..craft import router
from ..craft.backends import Backend, make_backend
from ..craft.budget import BudgetSettings
from ..craft.endpoints import CraftSlots
from ..craft.limits import Budget, Slots
from ..craft.spending import Spending
from ..errors import KoubouError, UsageError
from ..ops.notify import Notifier
from ..repo.policy import RepoSettings
from ..spool import task as task_format
from ..spool.commit import IdleAwareLoop
from ..spool.files import Claim, Spool, new_worker_id
from ..spool.ledger import LedgerWriter
from ..spool.recovery import recover_orphans
from ..spool.watcher import CLAIMS_MASK, OUTCOME_MASK, OVERFLOW, PENDING_MASK, Watcher
from .attempt import Attempts
from .dispatch import WORKTREES, Dispatch
from .intake import Intake
from .publish import Publisher

log = logging.getLogger(__name__)


class Worker:
    """One worker process serving some or all craftsmen of a home."""

    def __init__(self, home: Path, config: Config, *, craftsmen: list[str] | None = None,
                 concurrency: int = 16, drain: bool = False) -> None:
        _check_serves(config, craftsmen)
        self.config = config
        self.settings = config.spool
        self.spool = Spool.open(home, config.spool)
        self.serves = list(craftsmen or config.craftsmen)
        self.drain = drain
        self.id = new_worker_id()
        self.budget = Budget(home / "db" / "koubou.db", BudgetSettings.parse(config.budget),
                             shared=_shared_budget(config))
        self.ledger = LedgerWriter(home / "db" / "koubou.db")
        self.notifier = Notifier()
        self.stopping = False
        self.backends: dict[str, Backend] = {}
        self.backend_errors: dict[str, str] = {}
        served = [config.craftsmen[n] for n in self.serves]
        self.cluster_slots = _cluster_slots(config, served)
        self.slots = CraftSlots(home / "run", served, self.wake, self.cluster_slots)
        self.intake = Intake(self.spool, config, self.serves, self.budget, self.ledger, self.wake)
        self.worktrees = _worktree_slots(home, config)
        self.dispatch = Dispatch(self.spool, self.id, self.intake.ready, self.slots, self.serves,
                                 concurrency, self._start, self._unroutable, self.wake,
                                 self.intake.claim_failed, self.worktrees)
        self.publisher = Publisher(self.spool, self.ledger, config.hooks, self.dispatch.let_go)
        self.intake.give_back = lambda claim: self.publisher.requeue(claim, None)
        self.publisher.settled = self.wake
        self.dispatch.committing = lambda: self.publisher.committing
        self.attempts = Attempts(config, self.id, self.intake, self.publisher,
                                 Spending(self.budget, home), self.ledger, self.backends,
                                 self.backend_errors, self.dispatch.is_revoked)
        self.attempts.slot_of = self.dispatch.slot
        self._finished = asyncio.Event()
        self._lock_fd = -1
        self._recovering: asyncio.Future | None = None
        self._next_beat: asyncio.TimerHandle | None = None

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or, with --drain, until the queue is empty); returns 0."""
        loop = asyncio.get_running_loop()
        self._register()
        self._open_backends()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        if self.cluster_slots is not None:  # a cluster slot was granted: claim its task
            self.cluster_slots.on_grant = lambda: loop.call_soon_threadsafe(self.wake)
        if self.budget.shared is not None:  # the cluster's budget is back: recheck now
            self.budget.shared.on_reachable = lambda: loop.call_soon_threadsafe(
                self._recheck_budget, loop)
        watcher = self._watch()
        loop.add_reader(watcher.fileno(), self._on_events, watcher)
        log.info("worker %s serving %s in %s (concurrency %d)", self.id, ", ".join(self.serves),
                 self.spool.home, self.dispatch.concurrency)
        try:
            self.intake.rescan()
            self._heartbeat()  # its first beat takes over what dead workers left
            self.wake()
            self.notifier.send("READY=1", self._status_line())
            if self.notifier.watchdog_s:
                self._watchdog()
            await self._finished.wait()
        finally:
            loop.remove_reader(watcher.fileno())
            watcher.close()
            await self._close(loop)
        log.info("worker %s stopped: %d completed, %d failed", self.id, self.publisher.done,
                 self.publisher.failed)
        return 0

    def _watch(self) -> Watcher:
        watcher = Watcher()
        watcher.watch(self.spool.pending, PENDING_MASK)
        # Outcomes free slots other workers held: the wake-up for a starved craftsman.
        watcher.watch(self.spool.completed, OUTCOME_MASK)
        watcher.watch(self.spool.failed, OUTCOME_MASK)
        # A claim of ours moved by someone else was cancelled or taken over: stop its request.
        watcher.watch(self.spool.in_progress, CLAIMS_MASK)
        return watcher

    def _on_events(self, watcher: Watcher) -> None:
        pump = False
        for directory, name, mask in watcher.events():
            if name == OVERFLOW:
                log.warning("inotify queue overflowed; rescanning %s", self.spool.pending)
                self.intake.rescan()
                pump = True
            elif directory == self.spool.in_progress:
                self.dispatch.claim_moved(name)
            elif directory != self.spool.pending:
                # A task that waited for it may be ready; or a slot another worker held is free.
                pump = self.intake.outcome_arrived(name) or pump or self.dispatch.starved
            elif mask & flags.CREATE:
                self.intake.created(name)
            else:
                self.intake.consider(name)
                pump = True
        if pump:
            self.wake()

    def wake(self) -> None:
        """Claim what can be claimed now, then see whether the worker is done."""
        if not self.stopping:
            self.dispatch.pump()
        self._check_finished()

    # Dispatch is made before the attempts it starts (they publish through its claims).
    def _start(self, claim: Claim, craftsman: str) -> Coroutine[Any, Any, None]:
        return self.attempts.run(claim, craftsman)

    def _unroutable(self, claim: Claim) -> None:
        self.attempts.unroutable(claim)

    def stop(self) -> None:
        """Stop claiming; finish what is in flight, or requeue it after spool.stop_grace_s."""
        if self.stopping:
            return
        self.stopping = True
        log.info("worker %s stopping with %d in flight", self.id, len(self.dispatch.in_flight))
        self.notifier.send("STOPPING=1", self._status_line())
        asyncio.get_running_loop().call_later(self.settings.stop_grace_s, self.dispatch.abandon)
        self._check_finished()

    def _check_finished(self) -> None:
        if self.dispatch.in_flight or self.publisher.committing:
            return  # attempts running, or outcomes not durable yet
        if self.stopping:
            self.publisher.give_back_held()
        elif self.publisher.held:
            return  # outcomes wait for disk space: the worker is not done until they land
        if self.stopping or (self.drain and not len(self.intake.ready)
                             and not self.intake.settling):
            self._finished.set()

    # --- life cycle ---------------------------------------------------------------------------

    def _register(self) -> None:
        now = time.time()
        self._lock_fd = self.spool.register_worker(self.id, {
            "id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
            "craftsmen": self.serves, "started_at": task_format.iso(now)})
        self.ledger.worker_started(self.id, socket.gethostname(), os.getpid(), self.serves, now)

    def _open_backends(self) -> None:
        patterns = router.sensitive_patterns(self.config)
        for name in self.serves:
            try:
                self.backends[name] = make_backend(self.config.craftsmen[name], patterns,
                                                   self.slots.pools.get(name))
            except KoubouError as exc:
                # A missing key or backend fails that craftsman's tasks, not the whole worker.
                self.backend_errors[name] = str(exc)
                log.error("%s", exc)

    async def _close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._next_beat is not None:  # no beat may touch the ledger or the lock once closed
            self._next_beat.cancel()
            self._next_beat = None
        self.intake.close()
        self.publisher.close()
        for backend in self.backends.values():
            await backend.close()
        self.ledger.worker_stopped(self.id, time.time())
        await loop.run_in_executor(None, self.ledger.close)
        if self.budget.shared is not None:
            self.budget.shared.close()
        self.slots.close()
        if self.cluster_slots is not None:
            self.cluster_slots.close()
        if self.worktrees is not None:
            self.worktrees.close()
        self.spool.unregister_worker(self.id, self._lock_fd)

    def _status_line(self) -> str:
        state = "stopping" if self.stopping else "serving " + ",".join(self.serves)
        return (f"STATUS={state}: {len(self.dispatch.in_flight)} in flight, "
                f"{len(self.intake.ready)} ready, {self.publisher.done} done, "
                f"{self.publisher.failed} failed")

    def _watchdog(self) -> None:
        """Tell systemd the loop is alive, at half its WatchdogSec."""
        self.notifier.send("WATCHDOG=1", self._status_line())
        asyncio.get_running_loop().call_later(self.notifier.watchdog_s / 2, self._watchdog)

    def _heartbeat(self) -> None:
        """Prove liveness (lock file mtime, ledger), take over claims of dead workers and
        recheck the budget. Rescheduled whatever happens: a heartbeat that stops for good
        lets peers take this worker's claims while the watchdog still gets its pings."""
        loop = asyncio.get_running_loop()
        try:
            self._beat(loop)
        except Exception:
            log.exception("heartbeat failed; the next one is in %g s", self.settings.heartbeat_s)
        finally:
            self._next_beat = loop.call_later(self.settings.heartbeat_s, self._heartbeat)

    def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.time()
        os.utime(self._lock_fd, (now, now))
        state = "stopping" if self.stopping else "running"
        self.ledger.heartbeat(self.id, state, len(self.dispatch.in_flight), self.publisher.done,
                              self.publisher.failed, now, self.slots.endpoints(),
                              self.slots.cluster_state())
        self._recover()
        self._recheck_budget(loop)

    def _recheck_budget(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.budget.settings.enabled:  # the mark is the home's: another may have lifted it
            loop.run_in_executor(None, self.budget.recheck).add_done_callback(
                self._budget_rechecked)

    def _budget_rechecked(self, recheck: asyncio.Future) -> None:
        """Room in the budget again: deferred tasks are judged again now (tasks queued for a
        local craftsman meanwhile are routed again at their claim)."""
        if recheck.cancelled():
            return
        if recheck.exception() is not None:
            log.error("budget recheck failed: %s", recheck.exception())
            return
        if recheck.result():
            log.info("the budget has room again; cloud tasks go to the cloud")
            self.intake.budget_room()

    def _recover(self) -> None:
        """Take over claims of dead (or lease-expired) workers: requeue, or fail as lost.

        In a thread, one run at a time: recovery waits on the ledger (seconds per orphan when
        it is locked) and must not stall the loop. It only renames other workers' claims,
        which the loop never touches, and reports back here."""
        if self._recovering is not None and not self._recovering.done():
            return
        self._recovering = asyncio.get_running_loop().run_in_executor(
            None, functools.partial(
                recover_orphans, self.spool, self.settings, self.id, self.ledger,
                self.budget.settle_lost if self.budget.settings.enabled else None,
                keep_faces=ClusterSettings.parse(self.config.cluster).enabled))
        self._recovering.add_done_callback(self._recovered)

    def _recovered(self, future: asyncio.Future) -> None:
        if future.cancelled():
            return
        if future.exception() is not None:
            log.error("recovery of orphaned claims failed: %s", future.exception())
            return
        self.publisher.failed += sum(r.action == "lost" for r in future.result())


def _check_serves(config: Config, craftsmen: list[str] | None) -> None:
    """UsageError unless every craftsman asked for is configured, and some are."""
    unknown = sorted(set(craftsmen or ()) - set(config.craftsmen))
    if unknown:
        raise UsageError(f"no craftsman named {unknown[0]!r} in {config.path}; "
                         f"configured: {', '.join(sorted(config.craftsmen)) or 'none'}")
    if not config.craftsmen:
        raise UsageError(f"{config.path} configures no craftsmen; add one under `craftsmen:`")


def _worktree_slots(home: Path, config: Config) -> Slots | None:
    """Home-wide slots for repos.max_worktrees, or None when there is no cap."""
    cap = RepoSettings.parse(config.repos).max_worktrees
    return Slots(home / "run" / "worktree-slots", {WORKTREES: cap}) if cap else None


def _shared_budget(config: Config) -> Any:
    """The cluster's budget when the home is in a cluster; psycopg is imported only then."""
    if not ClusterSettings.parse(config.cluster).enabled:
        return None
    from ..craft.shared_budget import SharedBudget
    return SharedBudget.from_config(config)


def _cluster_slots(config: Config, served: list[Craftsman]) -> Any:
    """The cluster's slots of shared servers when the home is in a cluster; psycopg is
    imported only then."""
    if not ClusterSettings.parse(config.cluster).enabled:
        return None
    from ..craft.shared_slots import SharedSlots
    return SharedSlots.for_worker(config, served)


def run_worker(home: Path, config: Config, **options: object) -> int:
    """Build and run a worker in a fresh event loop (one that wakes the group commit once it
    is idle: spool/commit.py)."""
    with asyncio.Runner(loop_factory=IdleAwareLoop) as runner:
        return runner.run(_run(home, config, options))


async def _run(home: Path, config: Config, options: dict) -> int:
    return await Worker(home, config, **options).run()
