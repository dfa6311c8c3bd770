"""What is in the spool: queue depths, one task's state, listings, live workers. Read-only."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..spool import ledger
from ..spool import task as task_format
from ..spool.home import STATE_DIRS
from ..errors import KoubouError, WaitTimeout
from ..spool.files import CLAIM_RE, SIDECAR, Refused, Spool, Unavailable
from ..spool.retention import read_json


def queue_counts(spool: Spool) -> dict[str, int]:
    """Number of tasks in each state directory."""
    return spool.counts()


def live_workers(spool: Spool, ledger_path: Path, lease_s: float) -> list[dict[str, Any]]:
    """Workers with a lock file in run/workers/, with their ledger figures when available."""
    rows = {row["id"]: row for row in ledger.read(ledger_path, ledger.workers, default=[])}
    found = []
    for worker_id in spool.worker_ids():
        if not worker_id:
            continue
        info = dict(rows.get(worker_id) or _from_lock_file(spool, worker_id))
        info["liveness"] = spool.worker_state(worker_id, lease_s, observed=False)
        found.append(info)
    return found


def _from_lock_file(spool: Spool, worker_id: str) -> dict[str, Any]:
    """A worker the ledger has no row for yet (just started, or the ledger busy), in the
    ledger row's shape, from what it wrote into its lock file."""
    written = spool.worker_info(worker_id)
    written = written if isinstance(written, dict) else {}
    craftsmen = written.get("craftsmen")
    # Figures the ledger has not recorded are unknown (null), not absent: one shape for readers.
    return {"id": worker_id, "host": written.get("host"), "pid": written.get("pid"),
            "craftsmen": ",".join(craftsmen) if isinstance(craftsmen, list) else None,
            "started_at": None, "heartbeat_at": None, "state": None,
            "in_flight": None, "done": None, "failed": None}


def served_craftsmen(spool: Spool) -> set[str]:
    """The craftsmen that live workers serve: registered in run/workers/ with the lock held
    (a worker that missed heartbeats still counts: it holds its lock, so it is not dead)."""
    served: set[str] = set()
    for worker_id in spool.worker_ids():
        if not worker_id or worker_id.startswith("."):
            continue  # a worker still starting locks a hidden name first
        if spool.worker_state(worker_id, math.inf) == "dead":
            continue
        info = spool.worker_info(worker_id)
        if isinstance(info, dict) and isinstance(info.get("craftsmen"), list):
            served.update(str(name) for name in info["craftsmen"])
    return served


def unfinished_tasks(spool: Spool, task_ids: list[str]) -> list[task_format.Task]:
    """The tasks among these that are queued, or claimed by a worker that is dead; others
    (finished, unknown, unreadable, held by a live worker) are left out."""
    found = []
    for task_id in task_ids:
        try:
            where = spool.find(task_id)
            if where.state not in ("pending", "in_progress") or _held_by_live_worker(spool, where):
                continue
            data = spool.read_entry(where.path.parent, where.path.name)[0]
            found.append(task_format.parse(data, task_id))
        except (KoubouError, Refused):
            continue
    return found


def _held_by_live_worker(spool: Spool, where: Any) -> bool:
    match = CLAIM_RE.fullmatch(where.path.name) if where.state == "in_progress" else None
    return bool(match) and spool.worker_state(match["worker"], math.inf) != "dead"


def task_status(spool: Spool, ledger_path: Path, key: str) -> dict[str, Any]:
    """One task's state, attempts, and result or error; key is an id or a file name."""
    found = spool.find(key)
    status: dict[str, Any] = {"state": found.state, "file": str(found.path)}
    if found.rejected:
        sidecar = read_json(Path(str(found.path) + SIDECAR)) or {}
        status.update(id=None, rejected=True, error=sidecar.get("error"))
        return status
    record = None
    if found.state in ("completed", "failed"):
        record = read_json(found.path)
    else:
        try:
            record = task_format.decode(spool.read_entry(found.path.parent, found.path.name)[0])
        except (Refused, Unavailable, ValueError):
            record = None
    record = record if isinstance(record, dict) else {}
    task_id = record.get("id") or record.get("custom_id") or task_format.id_from_name(key)
    status["id"] = task_id
    if found.state == "in_progress":
        status["worker_id"] = CLAIM_RE.fullmatch(found.path.name)["worker"]
        if record.get("repo") and task_id:
            status["worktree"] = str(spool.home / "work" / task_id)
    if record.get("repo"):
        status["repo"] = record["repo"]
    for name in ("type", "priority", "craftsman", "result", "error"):
        if name in record:
            status[name] = record[name]
    attempts = ledger.read(ledger_path, ledger.attempts, task_id) if task_id else None
    status["attempts"] = attempts if attempts is not None else []
    return status


def read_record(spool: Spool, key: str) -> dict[str, Any] | None:
    """The task (or outcome) record as it is now, wherever it is; None when unreadable."""
    found = spool.find(key)
    if found.state in ("completed", "failed"):
        record = read_json(found.path)
    else:
        try:
            record = task_format.decode(spool.read_entry(found.path.parent, found.path.name)[0])
        except (Refused, ValueError):
            record = None
    return record if isinstance(record, dict) else None


def list_tasks(spool: Spool, states: list[str], limit: int) -> list[dict[str, Any]]:
    """Tasks in the given states, newest first (by file time), at most `limit`."""
    listed = []
    for mtime, state, name, rejected in sorted(spool.entries(states), reverse=True)[:limit]:
        item = {"id": task_format.id_from_name(name), "state": state, "file": name,
                "time": task_format.iso(mtime)}
        if state == "in_progress":
            match = CLAIM_RE.fullmatch(name)
            if match:
                item.update(id=task_format.id_from_name(match["name"]), worker_id=match["worker"])
        if rejected:
            item["rejected"] = True
        listed.append(item)
    return listed


def workflow_steps(spool: Spool, workflow_id: str) -> list[dict[str, Any]]:
    """The tasks of a workflow (ids `<workflow id>.<step>`) with their states, by id."""
    prefix = f"{workflow_id}."
    steps = [dict(item, step=item["id"][len(prefix):])
             for item in list_tasks(spool, list(STATE_DIRS), 1 << 30)
             if (item.get("id") or "").startswith(prefix) and not item.get("rejected")]
    return sorted(steps, key=lambda item: item["id"])


def wait_for_outcomes(spool: Spool, task_ids: list[str], timeout: float | None) -> dict[str, dict]:
    """Outcome records of the tasks, waiting on inotify; WaitTimeout naming those still open."""
    for task_id in task_ids:
        if spool.outcome(task_id) is None:
            spool.find(task_id)  # an unknown id is an error now, not a wait forever
    names = {f"{task_id}.json" for task_id in task_ids}
    found = spool.wait_for_outcomes(names, timeout)
    missing = [t for t in task_ids if f"{t}.json" not in found]
    if missing:
        raise WaitTimeout(f"timed out after {timeout:g} s; still queued: {', '.join(missing)}")
    return {task_id: spool.outcome(task_id) for task_id in task_ids}
