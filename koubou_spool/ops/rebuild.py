"""`koubou ledger rebuild`: a fresh ledger from the outcome files (README: Rebuilding the ledger).

The spool is the source of truth. Each outcome in completed/ and failed/ gives its tasks row
(ledger.task_row) and one attempts row for its final attempt, which carries the task's tokens
and cost so that `koubou report` gives the same figures as before for tasks without retries.
Rejected input (a file with its .error.json sidecar) gives a rejects row, and the cost of cloud
attempts settled budget reservations, so budgets go on counting the day's and month's spend.
The old database is moved aside, never deleted.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..spool import ledger
from ..craft.budget import BudgetSettings
from ..config import Config
from ..errors import SpoolError
from ..spool.files import Spool
from ..spool.task import parse_iso

log = logging.getLogger(__name__)


@dataclass
class Rebuilt:
    """What a rebuild wrote, and where the old database went (None: there was none)."""

    ledger: str
    old: str | None
    tasks: int
    attempts: int
    rejects: int
    skipped: int

    def as_dict(self) -> dict[str, Any]:
        """Plain data, for --json."""
        return asdict(self)


def rebuild(spool: Spool, ledger_path: Path, config: Config) -> Rebuilt:
    """Move the ledger aside and write a new one from completed/ and failed/."""
    _refuse_while_workers_run(spool, config.spool.lease_s)
    tasks, attempts, rejects, skipped = read_outcomes(spool)
    spend = budget_spend(attempts, config)
    old = move_aside(ledger_path, time.strftime("%Y%m%dT%H%M%S"))
    conn = ledger.open_ledger(ledger_path)
    try:
        ledger.rebuild_insert(conn, tasks, attempts, rejects, spend)
    finally:
        conn.close()
    log.info("rebuilt %s: %d tasks, %d attempts, %d rejects", ledger_path, len(tasks),
             len(attempts), len(rejects))
    return Rebuilt(str(ledger_path), None if old is None else str(old), len(tasks),
                   len(attempts), len(rejects), skipped)


def _refuse_while_workers_run(spool: Spool, lease_s: float) -> None:
    """Workers keep their ledger connection open: moving the file under them loses records."""
    live = [worker_id for worker_id in spool.worker_ids()
            if spool.worker_state(worker_id, lease_s) != "dead"]
    if live:
        raise SpoolError(f"{len(live)} workers are running ({', '.join(sorted(live))}); stop "
                         "them first (systemctl stop 'koubou-worker@*'), then rebuild")


def move_aside(path: Path, stamp: str) -> Path | None:
    """Rename the database and its -wal and -shm to <name>.old-<stamp>; None when there is none."""
    old = path.with_name(f"{path.name}.old-{stamp}")
    if not path.exists():
        return None
    for suffix in ("-wal", "-shm", ""):  # the database last: a crash leaves it whole in place
        source = Path(str(path) + suffix)
        if source.exists():
            os.rename(source, Path(str(old) + suffix))
    return old


# --- reading outcome files -------------------------------------------------------------------

def read_outcomes(spool: Spool) -> tuple[list[dict], list[dict], list[dict], int]:
    """tasks rows, attempts rows and rejects rows of every outcome, and the number skipped."""
    tasks: list[dict] = []
    attempts: list[dict] = []
    rejects: list[dict] = []
    skipped = 0
    for entry, record, sidecar in spool.finished():
        if sidecar is not None:
            row = reject_row(sidecar, entry)
            rejects += [row] if row else []
            skipped += 0 if row else 1
            continue
        if not _is_outcome(record):
            log.warning("skipped %s: not an outcome record", entry)
            skipped += 1
            continue
        tasks.append(ledger.task_row(record))
        attempt = attempt_row(record)
        attempts += [attempt] if attempt else []
    return tasks, attempts, rejects, skipped


def _is_outcome(record: Any) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("id"), str)
            and record.get("status") in ("completed", "failed"))


def _time(value: Any) -> float | None:
    try:
        return parse_iso(value) if isinstance(value, str) else None
    except ValueError:
        return None


def attempt_row(record: dict[str, Any]) -> dict[str, Any] | None:
    """The attempts row of an outcome's final attempt; None when it never got an attempt."""
    result = record.get("result") or {}
    error = record.get("error") or {}
    number = result.get("attempts", error.get("attempts"))
    if not isinstance(number, int) or number < 1:
        return None
    usage = result.get("usage") or {}
    kind = error.get("kind")
    outcome = "completed" if record["status"] == "completed" else (
        "lost" if kind == "lost" else "failed")
    return {"task_id": record["id"], "attempt": number, "worker_id": result.get("worker_id"),
            "craftsman": result.get("craftsman"), "model": result.get("model"),
            "claimed_at": _time(result.get("started_at")),
            "finished_at": _time(result.get("finished_at")) or _time(error.get("at")),
            "outcome": outcome, "error_kind": kind, "error_message": error.get("message"),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "total_tokens": usage.get("total_tokens"), "cost_usd": result.get("cost_usd")}


def budget_spend(attempts: list[dict[str, Any]], config: Config) -> list[dict[str, Any]]:
    """Settled reservations for the priced attempts of cloud craftsmen, so that budgets go on
    counting what was spent this day and month (workers reserve only for non-local craftsmen)."""
    settings = BudgetSettings.parse(config.budget)
    rows = []
    for attempt in attempts:
        cost, at = attempt.get("cost_usd"), attempt.get("finished_at")
        known = config.craftsmen.get(attempt.get("craftsman") or "")
        if not cost or at is None or (known is not None and known.local):
            continue
        day, month = settings.periods(at)
        rows.append({"task_id": attempt["task_id"], "attempt": attempt["attempt"],
                     "craftsman": attempt.get("craftsman"), "day": day, "month": month,
                     "reserved_usd": cost, "cost_usd": cost, "settled": 1, "at": at})
    return rows


def reject_row(sidecar: Any, entry: str) -> dict[str, Any] | None:
    """The rejects row a sidecar stands for; None when the sidecar is unreadable."""
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("error"), dict):
        return None
    error = sidecar["error"]
    return {"file": sidecar.get("file") or entry, "reason": error.get("message"),
            "at": _time(error.get("at"))}
