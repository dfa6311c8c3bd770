"""`koubou cancel` and `koubou retry`: a person's hand on the spool, by the same renames.

The controller acts like a short-lived worker: it holds a worker lock (so recovery does not
take its claims for a dead worker's) and claims the task by rename. Cancelling a running task
renames the running worker's claim to the controller's: the worker sees its claim leave
in_progress/ (inotify), aborts the request, and its result, if any, is fenced off.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..spool import task as task_format
from ..errors import InvalidTask, KoubouError, UsageError
from ..spool.ledger import LedgerWriter
from ..spool.files import CLAIM_RE, Claim, Spool, Unavailable


class NotCancelled(KoubouError):
    """The task is finished or moved on; nothing was changed."""

    exit_code = 1


@contextmanager
def _controller(spool: Spool, what: str) -> Iterator[str]:
    owner = f"{what}-{os.getpid()}-{os.urandom(2).hex()}"
    lock = spool.register_worker(owner, {"id": owner, "pid": os.getpid(), "role": what})
    try:
        yield owner
    finally:
        spool.unregister_worker(owner, lock)


def _take(spool: Spool, owner: str, task_id: str, running: bool = True) -> tuple[Claim, str]:
    """Claim a pending task, or take over a running one; (claim, the state it was in)."""
    found = spool.find(task_id)
    if found.state == "pending":
        claim = spool.claim(found.path.name, owner)
        if claim is not None:
            return claim, "pending"
        found = spool.find(task_id)
    if found.state == "in_progress" and running:
        match = CLAIM_RE.fullmatch(found.path.name)
        if match and not match["fin"]:
            claim = spool.take_over(found.path.name, owner)
            if claim is not None:
                return claim, "in_progress"
        found = spool.find(task_id)
    raise NotCancelled(f"task {task_id} is {found.state}; nothing to cancel")


def cancel(spool: Spool, ledger_path: Path, task_id: str, *, kind: str = "cancelled",
           running: bool = True) -> dict[str, Any]:
    """Fail a pending (or, with `running`, a running) task as `kind` (cancelled, or expired for
    a batch line past its window); returns its failed outcome."""
    with _controller(spool, "cancel") as owner:
        claim, was = _take(spool, owner, task_id, running)
        try:
            task = task_format.parse(spool.read_claim(claim)[0],
                                     task_format.id_from_name(claim.name))
        except InvalidTask as exc:
            spool.reject(spool.in_progress, claim.file_name, str(exc))
            raise NotCancelled(f"{task_id} was not a valid task; moved to failed/: {exc}") \
                from None
        except Unavailable:
            spool.requeue(claim.file_name, None)  # not cancelled: it goes on; try again later
            raise
        attempts = task.attempts + (1 if was == "in_progress" else 0)
        message = f"cancelled while {was}" if kind == "cancelled" else \
            f"{kind} while {was}: not started in time"
        record = task_format.failed_record(task.raw, kind, message, attempts, time.time())
        spool.publish(claim, task.id, record)
    _record(ledger_path, record)
    return record


def retry(spool: Spool, task_id: str) -> str:
    """Queue a failed task again with its attempts reset; returns the name it has in pending/."""
    found = spool.find(task_id)
    if found.state != "failed":
        raise UsageError(f"task {task_id} is {found.state}; only failed tasks can be retried")
    if found.rejected:  # input that was not a task: back as it was, for a fixed config or file
        return spool.unreject(found)
    with _controller(spool, "retry") as owner:
        claim = spool.reopen(found, owner)
        spool.requeue(claim.file_name, None)
    return claim.name


def _record(ledger_path: Path, record: dict[str, Any]) -> None:
    if not ledger_path.parent.is_dir():
        return
    writer = LedgerWriter(ledger_path)
    writer.task_finished(record)
    writer.close(timeout=2.0)  # the outcome file is the truth; a locked ledger catches up later
