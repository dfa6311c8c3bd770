"""The seed design's worker (../shared/seeds, LocalWorker): SQLite task_master, polled every 5 s.

Kept as the seed wrote it, minus the LLM call: a heartbeat UPDATE each loop; the claim is a
SELECT of a pending row, then an UPDATE to 'assigned' in a separate statement (two workers can
both select the same row: that is the race this bench counts); then status updates around the
execution, a result file, and one line in the execution log. Each statement opens its own
connection and commits, as the seed does (default journal mode, default busy timeout).

    python seed_worker.py DB COMPLETED_DIR LOG WORKER_ID
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time

POLL_S = 5


def execute(db: str, sql: str, params: tuple = ()) -> None:
    """One statement in its own connection and transaction, like the seed's helpers."""
    conn = sqlite3.connect(db)
    try:
        conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


def next_task(db: str) -> str | None:
    """The seed's get_next_task: SELECT, then UPDATE in a separate statement."""
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT task_id FROM task_master WHERE status = 'pending' "
                           "ORDER BY priority DESC, created_at ASC LIMIT 1").fetchone()
        if row:
            conn.execute("UPDATE task_master SET status = 'assigned', assigned_worker_type = "
                         "'local', updated_at = CURRENT_TIMESTAMP WHERE task_id = ?", (row[0],))
            conn.commit()
    finally:
        conn.close()
    return row[0] if row else None


def run_task(db: str, task_id: str, completed: str, log_fd: int, worker_id: str) -> None:
    """Execute a no-op: status updates, the result file, then the execution record."""
    set_status = ("UPDATE task_master SET status = ?, updated_at = CURRENT_TIMESTAMP "
                  "WHERE task_id = ?")
    execute(db, set_status, ("in_progress", task_id))
    with open(os.path.join(completed, f"{task_id}.json"), "w") as f:
        json.dump({"task_id": task_id, "worker_id": worker_id, "content": task_id}, f)
    execute(db, set_status, ("completed", task_id))
    os.write(log_fd, f"{task_id}\n".encode())


def main() -> None:
    """The seed's run loop."""
    db, completed, log, worker_id = sys.argv[1:5]
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    execute(db, "INSERT OR REPLACE INTO workers (worker_id, status) VALUES (?, 'idle')",
            (worker_id,))
    heartbeat = "UPDATE workers SET last_heartbeat = CURRENT_TIMESTAMP WHERE worker_id = ?"
    status = "UPDATE workers SET status = ? WHERE worker_id = ?"
    while True:
        execute(db, heartbeat, (worker_id,))
        task_id = next_task(db)
        if task_id is None:
            time.sleep(POLL_S)
            continue
        execute(db, status, ("busy", worker_id))
        run_task(db, task_id, completed, log_fd, worker_id)
        execute(db, status, ("idle", worker_id))


if __name__ == "__main__":
    main()
