"""Waiting for many outcomes on inotify, reporting each arrival (the batch progress bar)."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..spool.files import Spool
from ..spool.watcher import OUTCOME_MASK, OVERFLOW

Progress = Callable[[int, int, int], None]  # done, failed, total


def _arrivals(spool: Spool, names: set[str]) -> tuple[set[str], set[str]]:
    states = spool.outcome_states(names)
    done = {n for n, state in states.items() if state == "completed"}
    return done, set(states) - done


def wait_with_progress(spool: Spool, task_ids: list[str], timeout: float | None,
                       progress: Progress) -> set[str]:
    """Block until every task has an outcome (or timeout); returns the ids that finished.

    Watches first, then looks, so an outcome published in between is not missed; calls
    `progress` after the first look and after each batch of events that finished a task.
    """
    names = {f"{task_id}.json" for task_id in task_ids}
    deadline = None if timeout is None else time.monotonic() + timeout
    watcher = spool.watch(("completed", "failed"), OUTCOME_MASK)
    try:
        done, failed = _arrivals(spool, names)
        progress(len(done), len(failed), len(names))
        while len(done) + len(failed) < len(names):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            if not watcher.wait(left):
                continue
            before = len(done) + len(failed)
            for directory, name, _ in watcher.events():
                if name == OVERFLOW:
                    done, failed = _arrivals(spool, names)
                elif name in names and name not in done and name not in failed:
                    (done if directory == spool.state_dir("completed") else failed).add(name)
            if len(done) + len(failed) > before:
                progress(len(done), len(failed), len(names))
        return {name[:-5] for name in done | failed}
    finally:
        watcher.close()
