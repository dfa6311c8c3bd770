"""`koubou maintain`: the periodic chores of a home, safe to run from cron and a timer at once.

Requeue the tasks of dead workers, fail pending tasks past their `expires_at`, purge outcomes
older than a retention period (with their outputs/<id>/ directories and ledger rows), remove
stale staging files and the lock
files of workers dead for a day, vacuum the ledger. A non-blocking file lock lets one run work
while concurrent ones exit at once.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..spool import ledger
from ..spool import task as task_format
from ..craft.budget import BudgetSettings
from ..config import ClusterSettings, Config
from ..errors import InvalidTask, KoubouError, UsageError
from ..spool.ledger import LedgerWriter
from ..craft.limits import Budget
from ..repo import worktree
from ..spool.recovery import recover_orphans
from ..spool.files import Refused, Spool, Unavailable, new_worker_id
from ..spool.retention import remove

log = logging.getLogger(__name__)

DURATION_RE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[smhdw])")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Maildir's rule: a file left in tmp/ for a day belongs to a writer that died before its rename.
STALE_TMP_S = 86400
# VACUUM holds the ledger's write lock throughout: give it up before the workers' writes,
# waiting behind it, run out of their busy timeout.
VACUUM_MAX_S = ledger.BUSY_TIMEOUT_MS / 2000


@dataclass
class Summary:
    """What one `koubou maintain` run did (skipped: another run held the lock)."""

    skipped: bool = False
    requeued: int = 0
    lost: int = 0
    expired: int = 0
    purged: int = 0
    outputs_purged: int = 0
    purged_ledger_rows: int = 0
    tmp_removed: int = 0
    workers_removed: int = 0
    worktrees_removed: int = 0
    cluster_purged: int | None = None  # the cluster's rows of this host purged (None: no cluster)
    vacuumed: bool = False
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The summary as plain data, for --json."""
        return asdict(self)

    def line(self) -> str:
        """The one-line summary printed for cron mail and the journal."""
        if self.skipped:
            return "maintain: another maintain is running; nothing done"
        return (f"maintain: requeued {self.requeued}, lost {self.lost}, expired {self.expired}, "
                f"purged {self.purged} outcome files ({self.outputs_purged} outputs "
                f"directories, {self.purged_ledger_rows} ledger rows), "
                f"removed {self.tmp_removed} stale tmp files and {self.workers_removed} "
                f"dead workers' lock files, {self.worktrees_removed} worktrees"
                + (f", {self.cluster_purged} cluster task rows"
                   if self.cluster_purged is not None else "")
                + (", vacuumed the ledger" if self.vacuumed else ""))


def parse_duration(text: str) -> float:
    """Seconds in a duration such as 30m, 12h, 7d or 2w; UsageError for anything else."""
    match = DURATION_RE.fullmatch(text.strip())
    if not match:
        raise UsageError(f"--purge-after {text!r}: expected a number and a unit (s, m, h, d, w), "
                         "such as 30m, 12h or 7d")
    return float(match["number"]) * UNIT_S[match["unit"]]


def run(spool: Spool, config: Config, ledger_path: Path, *, purge_after: float | None = None,
        purge_ledger: bool = False, vacuum: bool = False, now: float | None = None) -> Summary:
    """Do every chore once, unless another run holds run/maintain.lock (then skip, not wait)."""
    lock = FileLock(str(spool.home / "run" / "maintain.lock"), mode=0o600)  # not the umask's
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another maintain is running; this one exits")
        return Summary(skipped=True)
    try:
        return _chores(spool, config, ledger_path, purge_after, purge_ledger, vacuum,
                       now if now is not None else time.time())
    finally:
        lock.release()


def _chores(spool: Spool, config: Config, ledger_path: Path, purge_after: float | None,
            purge_ledger: bool, vacuum: bool, now: float) -> Summary:
    summary = Summary()
    with _owner(spool, ledger_path) as (owner_id, writer):
        _recover(spool, config, ledger_path, owner_id, writer, summary)
        summary.expired = fail_expired(spool, owner_id, writer, now)
    if purge_after is not None:
        task_ids, reject_files = spool.purge(now - purge_after)
        summary.purged = len(task_ids) + len(reject_files)
        summary.outputs_purged = purge_outputs(spool, task_ids)
        if purge_ledger and ledger_path.exists():
            summary.purged_ledger_rows = _with_ledger(ledger_path, ledger.purge, task_ids,
                                                      reject_files, summary=summary) or 0
        if ClusterSettings.parse(config.cluster).enabled:
            summary.cluster_purged = _purge_cluster(config, purge_after, summary)
    summary.worktrees_removed = _prune_worktrees(spool, purge_after, now, summary)
    summary.tmp_removed = spool.clean_tmp(now - STALE_TMP_S)
    summary.workers_removed = spool.remove_dead_workers(now - STALE_TMP_S)
    if vacuum and ledger_path.exists():
        summary.vacuumed = _vacuum(spool, ledger_path, summary)
    return summary


def _purge_cluster(config: Config, purge_after: float, summary: Summary) -> int | None:
    """This host's task rows in the cluster whose outcome it was delivered more than
    purge_after ago; nothing else prunes them. Unreachable: noted, as a locked ledger is."""
    settings = ClusterSettings.parse(config.cluster)
    dsn = os.environ.get(settings.dsn_env or "")
    try:
        if not dsn:
            raise KoubouError(f"cluster.dsn_env names {settings.dsn_env}, which is not set")
        import psycopg
        from ..spool import cluster
        handle = cluster.Cluster(dsn, host=settings.host)
        try:
            return handle.purge(purge_after)
        except psycopg.Error as exc:  # no schema yet (no bridge ran), no permission
            raise KoubouError(str(exc).strip().splitlines()[0]) from None
        finally:
            handle.close_quietly()
    except (ImportError, KoubouError) as exc:
        log.warning("cluster: %s; its task rows of this host were not purged", exc)
        summary.errors.append(f"cluster: {exc}")
        return None


def _prune_worktrees(spool: Spool, purge_after: float | None, now: float,
                     summary: Summary) -> int:
    """Remove the worktrees no live claim owns (a failed task's stays until --purge-after),
    and prune every mirror's worktree list."""
    if not (spool.home / "work").is_dir():
        return 0
    try:
        return len(worktree.prune(spool.home, lambda: _claimed_ids(spool) | _failed_recently(
            spool, purge_after, now)))
    except KoubouError as exc:
        summary.errors.append(f"worktrees: {exc}")
        return 0


def _claimed_ids(spool: Spool) -> set[str]:
    """The ids of the tasks claimed now (read from the claim when its name is not its id)."""
    ids = set()
    for entry, match in spool.claims():
        task_id = task_format.id_from_name(match["name"])
        try:
            obj = task_format.decode(spool.read_entry(spool.in_progress, entry)[0])
            task_id = obj.get("id") or obj.get("custom_id") or task_id
        except (KoubouError, OSError, ValueError, AttributeError):
            pass
        if task_id:
            ids.add(task_id)
    return ids


def _failed_recently(spool: Spool, purge_after: float | None, now: float) -> set[str]:
    """Failed tasks whose worktree is kept for a look: all of them without --purge-after."""
    kept = set()
    for entry in os.listdir(spool.home / "work"):
        try:
            age = now - os.stat(spool.failed / f"{entry}.json").st_mtime
        except OSError:
            continue
        if purge_after is None or age < purge_after:
            kept.add(entry)
    return kept


def _vacuum(spool: Spool, path: Path, summary: Summary) -> bool:
    """VACUUM, within VACUUM_MAX_S while workers run: a busy or large ledger is left as it is
    rather than holding up their writes."""
    alive = any(spool.worker_state(worker_id, math.inf) != "dead"
                for worker_id in spool.worker_ids())
    errors = len(summary.errors)
    done = _with_ledger(path, ledger.vacuum, VACUUM_MAX_S if alive else math.inf,
                        summary=summary)
    if done is False and len(summary.errors) == errors:
        log.warning("vacuum given up after %g s so that the workers' writes need not wait; "
                    "run `koubou maintain --vacuum` while they are stopped", VACUUM_MAX_S)
        summary.errors.append(f"vacuum skipped: it would hold the ledger past {VACUUM_MAX_S:g} s")
    return done is True


@contextmanager
def _owner(spool: Spool, ledger_path: Path) -> Iterator[tuple[str, LedgerWriter]]:
    """A short-lived worker identity: claims taken over or made by maintain carry its id."""
    owner_id = f"maintain-{new_worker_id()}"
    fd = spool.register_worker(owner_id, {"pid": os.getpid(), "role": "maintain"})
    writer = LedgerWriter(ledger_path)
    try:
        yield owner_id, writer
    finally:
        writer.close()
        spool.unregister_worker(owner_id, fd)


def _recover(spool: Spool, config: Config, ledger_path: Path, owner_id: str,
             writer: LedgerWriter, summary: Summary) -> None:
    settings = BudgetSettings.parse(config.budget)
    budget = Budget(ledger_path, settings) if settings.enabled else None
    settle_lost = budget.settle_lost if budget is not None else None
    for recovered in recover_orphans(spool, config.spool, owner_id, writer, settle_lost,
                                     keep_faces=ClusterSettings.parse(config.cluster).enabled):
        if recovered.action == "requeued":
            summary.requeued += 1
        elif recovered.action == "lost":
            summary.lost += 1


def _with_ledger(path: Path, operation: Any, *args: Any, summary: Summary) -> Any:
    """Run one ledger operation; a locked or broken ledger is noted, never fatal (§4.5)."""
    try:
        return ledger.run(path, operation, *args)
    except sqlite3.Error as exc:
        log.warning("ledger %s: %s; run `koubou maintain` again later", path, exc)
        summary.errors.append(f"ledger: {exc}")
        return False


# --- expired tasks ---------------------------------------------------------------------------

def fail_expired(spool: Spool, owner_id: str, writer: LedgerWriter, now: float) -> int:
    """Claim each pending task whose expires_at has passed and publish it failed as `expired`."""
    failed = 0
    for name in spool.names("pending"):
        task = _pending_task(spool, name)
        if task is None or task.expires_at is None or task.expires_at > now:
            continue
        failed += _expire(spool, name, owner_id, writer, now)
    return failed


def _pending_task(spool: Spool, name: str) -> task_format.Task | None:
    """The task in pending/<name>, or None when it is not a readable task (workers judge it)."""
    try:
        data, _ = spool.read_entry(spool.pending, name)
        return task_format.parse(data, task_format.id_from_name(name))
    except (Refused, Unavailable, InvalidTask):
        return None


def _expire(spool: Spool, name: str, owner_id: str, writer: LedgerWriter, now: float) -> int:
    claim = spool.claim(name, owner_id)
    if claim is None:
        return 0  # a worker took it first; it will see expires_at itself
    try:
        task = task_format.parse(spool.read_claim(claim)[0], task_format.id_from_name(name))
    except (Refused, Unavailable, InvalidTask):
        spool.requeue(claim.file_name, None)  # changed under us: the workers judge it
        return 0
    record = task_format.failed_record(
        task.raw, "expired", f"not started before expires_at {task.raw.get('expires_at')}",
        task.attempts, now)
    writer.task_finished(record)
    if not spool.publish(claim, task.id, record):
        return 0
    log.warning("failed %s (expired): not started before %s", task.id, task.raw.get("expires_at"))
    return 1


# --- retention -------------------------------------------------------------------------------

def purge_outputs(spool: Spool, task_ids: list[str]) -> int:
    """Remove outputs/<id>/ of tasks whose outcome was purged; returns how many went.

    rmtree removes an agent's links without following them (it works on descriptors).
    """
    removed = 0
    for task_id in task_ids:
        if not task_format.ID_RE.fullmatch(task_id):
            continue  # not an id: names no directory of ours
        try:
            remove(spool.home / "outputs" / task_id)
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove outputs/%s: %s", task_id, exc.strerror)
    return removed
