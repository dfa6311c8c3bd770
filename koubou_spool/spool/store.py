"""The store contract: what the rest of koubou asks of the place tasks live.

Only docstrings and stubs, in the way huey's `BaseStorage` lists what a storage must do. The file
spool (spool.files.Spool: directories and renames on one host) is the first implementation; a
store shared by several hosts is the second one this contract is written for. A caller that keeps
to these methods works on either; a caller that reads the directories itself is tied to one host.
(The cluster queue, spool.cluster, is not that second store: it carries only the tasks that
cross hosts, claimed by craftsman rather than by name, and each host's file spool stays the
store of its own tasks; spool.bridge moves tasks between the two. See docs/CLUSTER.md.)

The guarantees every implementation keeps (the README's "Guarantees"): a task is in exactly one
state at a time; a claim has one owner; a revoked claim can publish nothing (the fence); nothing
a user submitted is deleted except by retention or an explicit command.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from .task import Task


class Store:
    """Tasks through their states: pending → in_progress → completed | failed."""

    # --- the task's path ---------------------------------------------------------------------

    def submit(self, tasks: Iterable[Task]) -> list[tuple[Task, str, bool]]:
        """Queue tasks atomically; (task, state, new) for each. An id that exists in any state
        queues nothing (new is False) and reports where it is."""
        raise NotImplementedError

    def claim(self, name: str, worker_id: str) -> Any:
        """Take one pending task for a worker; None when another worker took it first."""
        raise NotImplementedError

    def take_over(self, entry: str, worker_id: str) -> Any:
        """Take a claim from its owner (dead, or cancelled under it); None when someone moved it
        first. The old owner can publish nothing afterwards: it is fenced out."""
        raise NotImplementedError

    def read_claim(self, claim: Any) -> tuple[bytes, Any]:
        """The bytes of a claimed task, as they are now."""
        raise NotImplementedError

    def publish(self, claim: Any, task_id: str, record: dict[str, Any]) -> bool:
        """Publish a claim's outcome record (completed or failed); False, and nothing published,
        when the claim was revoked meanwhile. This is the fence."""
        raise NotImplementedError

    def requeue(self, claim_file: str, attempts: int | None) -> bool:
        """Give a claimed task back to pending (`attempts`: the count to record; None keeps it);
        False when the claim is no longer ours."""
        raise NotImplementedError

    def reject(self, where: Any, entry: str, reason: str) -> str | None:
        """Move input that is no valid task to failed, unchanged, with the reason beside it;
        the name it got there, or None when someone else moved it first."""
        raise NotImplementedError

    # --- lookups ------------------------------------------------------------------------------

    def find(self, key: str) -> Any:
        """Where the task with this id (or the entry with this name) is; TaskNotFound if nowhere."""
        raise NotImplementedError

    def outcome(self, task_id: str) -> dict[str, Any] | None:
        """The outcome record of a finished task; None while it is not finished."""
        raise NotImplementedError

    def names(self, state: str) -> list[str]:
        """The entries of one state (counts and listings are built on this)."""
        raise NotImplementedError

    def entries(self, states: Iterable[str]) -> list[tuple[float, str, str, bool]]:
        """(time, state, name, rejected) of each entry of these states: the listings."""
        raise NotImplementedError

    def counts(self) -> dict[str, int]:
        """Number of entries in each state: pending, in_progress, completed, failed."""
        raise NotImplementedError

    def outcome_states(self, names: Iterable[str]) -> dict[str, str]:
        """'completed' or 'failed' for each of these entry names (`<id>.json`) that is there."""
        raise NotImplementedError

    def finished(self) -> Iterator[tuple[str, Any, Any]]:
        """(entry, outcome record, rejection reason) of every finished entry: what a ledger
        rebuild reads back. The record is None for rejected input or an unreadable file."""
        raise NotImplementedError

    def reopen(self, found: Any, owner: str) -> Any:
        """Take a failed task back as a claim of `owner`, its outcome fields removed (to be
        requeued: `koubou retry`)."""
        raise NotImplementedError

    def unreject(self, found: Any) -> str:
        """Put rejected input back in pending as it was; the name it has there."""
        raise NotImplementedError

    # --- retention ----------------------------------------------------------------------------

    def purge(self, cutoff: float) -> tuple[list[str], list[str]]:
        """Delete outcomes (and rejected input) last changed before cutoff; the purged task
        ids and rejected names."""
        raise NotImplementedError

    def clean_tmp(self, cutoff: float) -> int:
        """Remove what writers that died mid-write left before cutoff; how many."""
        raise NotImplementedError

    # --- waiting for work ---------------------------------------------------------------------

    def wait_for_outcomes(self, names: set[str], timeout: float | None) -> set[str]:
        """Block until each entry name has an outcome, or timeout (None: forever); the names
        that have one, durable by then. A store wakes waiters itself (the file spool on
        inotify)."""
        raise NotImplementedError

    def sync_outcomes(self) -> None:
        """Make every outcome that can be seen durable (with durability on): a waiter that saw
        one calls this before it reports it."""
        raise NotImplementedError

    def watch(self, states: Iterable[str], mask: int, *, workers: int = 0) -> Any:
        """A change feed on these states (and the worker registrations): fileno() for an event
        loop, wait(timeout), events() and close(). Watch first, then look."""
        raise NotImplementedError

    # --- workers ------------------------------------------------------------------------------

    def register_worker(self, worker_id: str, info: dict[str, Any]) -> int:
        """Register a live worker; its registration dies with it, however it dies."""
        raise NotImplementedError

    def unregister_worker(self, worker_id: str, handle: int) -> None:
        """Remove a worker's registration on a clean exit."""
        raise NotImplementedError

    def orphaned_claims(self, lease_s: float) -> list[tuple[str, str]]:
        """(claim, worker state) of the claims whose worker is dead or missed its lease."""
        raise NotImplementedError

    def worker_state(self, worker_id: str, lease_s: float) -> str:
        """'alive', 'stale' (registered but no heartbeat within lease_s) or 'dead'."""
        raise NotImplementedError

    def worker_ids(self) -> list[str]:
        """The ids of every worker registration, live or not, sorted."""
        raise NotImplementedError

    def worker_info(self, worker_id: str) -> Any:
        """What a worker registered about itself (its craftsmen, pid, ...); None when gone."""
        raise NotImplementedError
