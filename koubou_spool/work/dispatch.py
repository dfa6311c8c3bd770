"""Dispatch: a slot, then the claim, then the attempt; both given back when the attempt ends.

A slot is taken (home-wide, see craft.limits.Slots; for a craftsman with several endpoints, a
slot at one of them, craft.endpoints) before the claim, so a task is only claimed
when its craftsman can start it: a busy local model never holds up cloud tasks. The claims this
process holds are tracked here, and so is who moved one: we (publish, requeue) or someone else
(cancel, a lease takeover), which revokes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from ..craft.endpoints import CraftSlots
from ..craft.limits import Slots
from ..spool.files import Claim, Spool
from ..spool.watcher import ReadyQueue, craftsman_of, lane
from .intake import FAIL_NOW

Start = Callable[[Claim, str], Coroutine[Any, Any, None]]
WORKTREES = "worktrees"  # the one name of the worktree slots (repos.max_worktrees)
ClaimFailed = Callable[[str, OSError], None]
COMMIT_BACKLOG = 4  # outcomes awaiting the disk, per unit of concurrency, before claims pause


class Dispatch:
    """Claims ready tasks while this process has room and their craftsmen have free slots."""

    def __init__(self, spool: Spool, worker_id: str, ready: ReadyQueue, slots: CraftSlots,
                 serves: list[str], concurrency: int, start: Start,
                 unroutable: Callable[[Claim], None], after_attempt: Callable[[], None],
                 claim_failed: ClaimFailed, worktrees: Slots | None = None) -> None:
        self.spool = spool
        self.worker_id = worker_id
        self.ready = ready
        self.slots = slots
        self.serves = serves
        self.concurrency = max(1, concurrency)
        self.start = start
        self.unroutable = unroutable
        self.after_attempt = after_attempt
        self.claim_failed = claim_failed
        self.worktrees = worktrees  # None: no cap on the home's live worktrees
        # Where ready tasks wait: what failed judging, then each craftsman's lanes.
        self.lanes = [FAIL_NOW, *(lane(c, repo) for c in serves for repo in (False, True))]
        self.in_flight: dict[str, asyncio.Task] = {}  # claim file -> its attempt
        self.slot_of: dict[str, tuple[str, int, int | None]] = {}  # claim -> craftsman, slots
        self.starved = False  # tasks wait for a slot another process holds
        # Outcomes of ended attempts not yet durable: they hold no slot, but past a few rounds'
        # worth the disk is behind, and claiming more would only queue more for it.
        self.committing: Callable[[], int] = lambda: 0
        self.letting_go: set[str] = set()  # our claims we are moving ourselves (publish, requeue)
        self.revoked: set[str] = set()  # our claims someone else moved (cancel, lease takeover)

    def pump(self) -> None:
        """Claim and start tasks until this process, or every lane with tasks ready, is full."""
        full: set[str] = set()
        while self._has_room():
            key = self._next_lane(full)
            if key is None:
                break
            craftsman = craftsman_of(key)
            slot = None
            if key != FAIL_NOW:
                slot = self.slots.acquire(craftsman)
                if slot is None:  # the craftsman is full: both its lanes wait
                    full.update((lane(craftsman, False), lane(craftsman, True)))
                    continue
            if not self._claim_next(key, craftsman, slot):
                full.add(key)  # no worktree free: only the repository lane waits
        self.starved = any(self.ready.head(key) is not None for key in full)
        if self.slots.cluster is not None:
            self._let_idle_cluster_slots_go()

    def _has_room(self) -> bool:
        return (len(self.in_flight) < self.concurrency
                and self.committing() < COMMIT_BACKLOG * self.concurrency)

    def _let_idle_cluster_slots_go(self) -> None:
        """Cluster slots this process holds unused go back: those granted for tasks that are
        gone (another worker took them), and, while the process can start nothing more, every
        one (other hosts wait for them; the next pump asks again)."""
        room = self._has_room()
        for craftsman in self.serves:
            if (not room or (self.ready.head(lane(craftsman, False)) is None
                             and self.ready.head(lane(craftsman, True)) is None)):
                self.slots.idle(craftsman)

    def _next_lane(self, full: set[str]) -> str | None:
        """The lane whose next task comes first, among those not known to be full."""
        best, best_key = None, None
        for key in self.lanes:
            if key in full:
                continue
            head = self.ready.head(key)
            if head is not None and (best is None or head < best):
                best, best_key = head, key
        return best_key

    def _claim_next(self, key: str, craftsman: str, slot: Any) -> bool:
        """Claim a lane's next task; False when a repository task must wait for a worktree."""
        worktree = None
        if key != craftsman and self.worktrees is not None:
            worktree = self.worktrees.acquire(WORKTREES)
            if worktree is None:  # the home has max_worktrees: wait where it is, spending nothing
                self.slots.release(craftsman, slot)
                return False
        name = self.ready.pop(key)
        failure = None
        try:
            claim = self.spool.claim(name, self.worker_id)
        except OSError as exc:  # the slots go back; intake decides what becomes of the file
            claim, failure = None, exc
        if claim is None:  # another worker was first, or the rename failed
            self._release(craftsman, slot, worktree)
            if failure is not None:
                self.claim_failed(name, failure)
            return True
        if key == FAIL_NOW:
            self.unroutable(claim)
            return True
        self.slot_of[claim.file_name] = (craftsman, slot, worktree)
        running = asyncio.get_running_loop().create_task(self.start(claim, craftsman))
        self.in_flight[claim.file_name] = running
        running.add_done_callback(lambda _, c=claim: self._attempt_done(c))
        return True

    def _release(self, craftsman: str, slot: int | None, worktree: int | None) -> None:
        if slot is not None:
            self.slots.release(craftsman, slot)
        if worktree is not None:
            self.worktrees.release(WORKTREES, worktree)

    def _attempt_done(self, claim: Claim) -> None:
        self._release(*self.slot_of.pop(claim.file_name))
        self.in_flight.pop(claim.file_name, None)
        self.letting_go.discard(claim.file_name)
        self.revoked.discard(claim.file_name)
        self.after_attempt()

    def slot(self, claim: Claim) -> object:
        """The slot held for a claim's attempt (an endpoint's Lease, for a craftsman with
        endpoints), or None."""
        held = self.slot_of.get(claim.file_name)
        return None if held is None else held[1]

    def claim_moved(self, name: str) -> None:
        """One of our claims left in_progress/ and we did not move it: abort its request."""
        if name in self.letting_go:
            self.letting_go.discard(name)
            return
        running = self.in_flight.get(name)
        if running is None:
            return
        self.revoked.add(name)
        running.cancel()

    def let_go(self, claim: Claim) -> None:
        """We are about to move this claim ourselves: its IN_MOVED_FROM is not a revocation."""
        self.letting_go.add(claim.file_name)

    def is_revoked(self, claim: Claim) -> bool:
        """Whether someone else moved this claim away (cancel, takeover)."""
        return claim.file_name in self.revoked

    def abandon(self) -> None:
        """Cancel every attempt in flight (stopping, out of grace)."""
        for running in list(self.in_flight.values()):
            running.cancel()
