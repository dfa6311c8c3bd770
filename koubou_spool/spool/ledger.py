"""The ledger: every SQL statement of koubou lives in this module (PRODUCT.md §7).

SQLite in WAL mode. Workers write through one background thread per process that batches
records into transactions and keeps them while the database is locked or missing, so a locked
ledger never stops local work: the spool is the source of truth and the records follow.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Callable

from .task import parse_iso

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 2000
MAX_BACKOFF_S = 2.0

MIGRATIONS: list[tuple[str, str]] = [
    ("0001_initial", """
        CREATE TABLE workers (
            id TEXT PRIMARY KEY, host TEXT, pid INTEGER, craftsmen TEXT,
            started_at REAL, heartbeat_at REAL, state TEXT,
            in_flight INTEGER NOT NULL DEFAULT 0, done INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE attempts (
            task_id TEXT NOT NULL, attempt INTEGER NOT NULL, worker_id TEXT, craftsman TEXT,
            model TEXT, claimed_at REAL, finished_at REAL, outcome TEXT, error_kind TEXT,
            error_message TEXT, prompt_tokens INTEGER, completion_tokens INTEGER,
            total_tokens INTEGER, cost_usd REAL,
            PRIMARY KEY (task_id, attempt));
        CREATE INDEX attempts_finished_at ON attempts (finished_at);
        CREATE TABLE tasks (
            id TEXT PRIMARY KEY, type TEXT, priority INTEGER, craftsman TEXT, model TEXT,
            status TEXT, error_kind TEXT, attempts INTEGER, queued_at REAL, started_at REAL,
            finished_at REAL, prompt_tokens INTEGER, completion_tokens INTEGER,
            total_tokens INTEGER, cost_usd REAL, created_by TEXT);
        CREATE INDEX tasks_finished_at ON tasks (finished_at);
        CREATE TABLE rejects (file TEXT PRIMARY KEY, reason TEXT, at REAL);
    """),
    ("0002_budget_and_rates", """
        CREATE TABLE reservations (
            id INTEGER PRIMARY KEY, task_id TEXT, attempt INTEGER, craftsman TEXT,
            day TEXT, month TEXT, reserved_usd REAL NOT NULL, cost_usd REAL,
            settled INTEGER NOT NULL DEFAULT 0, at REAL);
        CREATE INDEX reservations_day ON reservations (day);
        CREATE INDEX reservations_month ON reservations (month);
        CREATE TABLE budget_alerts (
            period TEXT NOT NULL, threshold INTEGER NOT NULL, spent_usd REAL, limit_usd REAL,
            at REAL, PRIMARY KEY (period, threshold));
        CREATE TABLE requests (craftsman TEXT NOT NULL, at REAL NOT NULL, tokens INTEGER);
        CREATE INDEX requests_at ON requests (craftsman, at);
    """),
]


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (we issue BEGIN ourselves), WAL, with a busy timeout."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        conn.close()  # not a database (corrupt), or locked while switching to WAL
        raise
    conn.row_factory = sqlite3.Row
    return conn


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply the migrations not yet recorded, each in its own transaction; returns their names."""
    conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL)")
    done = {row[0] for row in conn.execute("SELECT name FROM migrations")}
    applied = []
    for name, script in MIGRATIONS:
        if name in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("SELECT 1 FROM migrations WHERE name = ?", (name,)).fetchone():
                conn.execute("ROLLBACK")  # another process applied it while we waited
                continue
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied


def open_ledger(path: Path) -> sqlite3.Connection:
    """A migrated connection."""
    conn = connect(path)
    try:
        migrate(conn)
    except BaseException:
        conn.close()  # a locked or broken ledger: callers try again later, without a leak
        raise
    return conn


def run(path: Path, operation: Callable[..., Any], *args: Any) -> Any:
    """Run one operation on a fresh connection and close it; sqlite3.Error propagates."""
    conn = connect(path)
    try:
        return operation(conn, *args)
    finally:
        conn.close()


def read(path: Path, query: Callable[..., Any], *args: Any, default: Any = None) -> Any:
    """A read for status and reports: `default` when the ledger is missing, locked or broken,
    since reports degrade rather than fail (PRODUCT.md §4.5)."""
    if not path.exists():
        return default
    try:
        return run(path, query, *args)
    except sqlite3.Error as exc:
        log.warning("ledger %s unreadable (%s); figures from it are left out", path, exc)
        return default


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction; rolled back on any error, so the connection stays usable (a
    connection left inside a failed transaction refuses every later BEGIN)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        _rollback_quietly(conn)
        raise


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:  # the error being raised matters more than this one
            log.debug("rollback failed: %s", exc)


# --- rows --------------------------------------------------------------------------------------

def _time(record: dict, key: str) -> float | None:
    value = record.get(key)
    return parse_iso(value) if isinstance(value, str) else None


def task_row(record: dict[str, Any]) -> dict[str, Any]:
    """The tasks-table row an outcome record stands for (also used to rebuild the ledger)."""
    result = record.get("result") or {}
    error = record.get("error") or {}
    usage = result.get("usage") or {}
    return {
        "id": record["id"], "type": record.get("type", "general"),
        "priority": record.get("priority", 5), "craftsman": result.get("craftsman"),
        "model": result.get("model"), "status": record.get("status"),
        "error_kind": error.get("kind"),
        "attempts": result.get("attempts", error.get("attempts")),
        "queued_at": _time(result, "queued_at") or _time(record, "submitted_at"),
        "started_at": _time(result, "started_at"),
        "finished_at": _time(result, "finished_at") or _time(error, "at"),
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "total_tokens": usage.get("total_tokens"), "cost_usd": result.get("cost_usd"),
        "created_by": record.get("created_by"),
    }


def _upsert(conn: sqlite3.Connection, table: str, row: dict[str, Any]) -> None:
    names = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    conn.execute(f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})", tuple(row.values()))


# --- writing -----------------------------------------------------------------------------------

class LedgerWriter:
    """One thread that owns the write connection; records wait in memory while SQLite is busy."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.backlog = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._conn: sqlite3.Connection | None = None
        self._thread = threading.Thread(target=self._run, name="ledger", daemon=True)
        self._thread.start()

    def _submit(self, op: Callable[[sqlite3.Connection], None]) -> Future:
        future: Future = Future()
        self._queue.put((op, future))
        return future

    # Each public method is one record; the SQL stays here.

    def worker_started(self, worker_id: str, host: str, pid: int, craftsmen: list[str],
                       at: float) -> Future:
        """A worker came up."""
        row = {"id": worker_id, "host": host, "pid": pid, "craftsmen": ",".join(craftsmen),
               "started_at": at, "heartbeat_at": at, "state": "running"}
        return self._submit(lambda c: _upsert(c, "workers", row))

    def heartbeat(self, worker_id: str, state: str, in_flight: int, done: int, failed: int,
                  at: float) -> Future:
        """A worker is alive: its state and counters."""
        return self._submit(lambda c: c.execute(
            "UPDATE workers SET heartbeat_at = ?, state = ?, in_flight = ?, done = ?, failed = ?"
            " WHERE id = ?", (at, state, in_flight, done, failed, worker_id)))

    def attempt_started(self, task_id: str, attempt: int, worker_id: str, craftsman: str,
                        model: str, claimed_at: float) -> Future:
        """A claim: one attempt begins."""
        row = {"task_id": task_id, "attempt": attempt, "worker_id": worker_id,
               "craftsman": craftsman, "model": model, "claimed_at": claimed_at}
        return self._submit(lambda c: _upsert(c, "attempts", row))

    def attempt_finished(self, task_id: str, attempt: int, outcome: str, *, finished_at: float,
                         error_kind: str | None = None, message: str | None = None,
                         usage: dict[str, int] | None = None, cost_usd: float | None = None,
                         model: str | None = None, record: dict[str, Any] | None = None) -> Future:
        """An attempt ended (completed, failed, or retry); with `record` the task's outcome too."""
        usage = usage or {}
        params = (finished_at, outcome, error_kind, message, usage.get("prompt_tokens"),
                  usage.get("completion_tokens"), usage.get("total_tokens"), cost_usd, model,
                  task_id, attempt)

        def write(conn: sqlite3.Connection) -> None:
            # An upsert: the start of the attempt may never have reached the ledger (its worker
            # was killed before its writer thread ran), and the end must still be recorded.
            conn.execute(
                "INSERT INTO attempts (finished_at, outcome, error_kind, error_message,"
                " prompt_tokens, completion_tokens, total_tokens, cost_usd, model, task_id,"
                " attempt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (task_id, attempt) DO UPDATE SET finished_at = excluded.finished_at,"
                " outcome = excluded.outcome, error_kind = excluded.error_kind,"
                " error_message = excluded.error_message,"
                " prompt_tokens = excluded.prompt_tokens,"
                " completion_tokens = excluded.completion_tokens,"
                " total_tokens = excluded.total_tokens, cost_usd = excluded.cost_usd,"
                " model = COALESCE(excluded.model, attempts.model)", params)
            if record is not None:
                _upsert(conn, "tasks", task_row(record))
        return self._submit(write)

    def task_finished(self, record: dict[str, Any]) -> Future:
        """A task reached completed/ or failed/ without an attempt of its own (e.g. lost)."""
        return self._submit(lambda c: _upsert(c, "tasks", task_row(record)))

    def rejected(self, file: str, reason: str, at: float) -> Future:
        """Input that was not a task went to failed/."""
        row = {"file": file, "reason": reason, "at": at}
        return self._submit(lambda c: _upsert(c, "rejects", row))

    def worker_stopped(self, worker_id: str, at: float) -> Future:
        """A worker exited cleanly."""
        return self._submit(lambda c: c.execute(
            "UPDATE workers SET state = 'stopped', heartbeat_at = ?, in_flight = 0 WHERE id = ?",
            (at, worker_id)))

    # The thread.

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (waiting up to `timeout` for a locked ledger), then stop."""
        self._queue.put(None)
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("ledger %s stayed locked; %d records not written (the outcome files keep "
                        "them: `koubou ledger rebuild`)", self.path, self._queue.qsize())

    def _run(self) -> None:
        pending: list[tuple[Callable, Future]] = []
        stopping = False
        backoff = 0.05
        while True:
            if not pending:
                item = self._queue.get()
                if item is None:
                    break
                pending.append(item)
            while len(pending) < 1000:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                pending.append(item)
            if self._write(pending):
                pending, backoff, self.backlog = [], 0.05, False
                if stopping:
                    break
                continue
            self.backlog = True
            self._wake.wait(backoff)  # retry backoff while the ledger is locked or missing
            self._wake.clear()
            backoff = min(backoff * 2, MAX_BACKOFF_S)
        if self._conn is not None:
            self._conn.close()

    def _write(self, batch: list[tuple[Callable, Future]]) -> bool:
        try:
            if self._conn is None:
                self._conn = open_ledger(self.path)
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            log.debug("ledger busy or unavailable: %s", exc)
            self._drop_connection()
            return False
        try:
            for op, _ in batch:
                op(self._conn)
            self._conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            log.debug("ledger write deferred: %s", exc)
            self._rollback()
            return False
        except Exception as exc:  # a bad record (or a broken file) must not stop the thread
            log.error("ledger write failed, %d records dropped: %s", len(batch), exc)
            self._rollback()
            for _, future in batch:
                if not future.cancelled():
                    future.set_exception(exc)
            return True
        for _, future in batch:
            if not future.cancelled():  # a waiter that gave up may have cancelled it
                future.set_result(None)
        return True

    def _rollback(self) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            self._drop_connection()

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None


# --- reading -----------------------------------------------------------------------------------

def workers(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every worker the ledger knows, newest first."""
    return [dict(r) for r in conn.execute("SELECT * FROM workers ORDER BY started_at DESC")]


def attempts(conn: sqlite3.Connection, task_id: str) -> list[dict[str, Any]]:
    """The attempts of one task, in order."""
    return [dict(r) for r in conn.execute(
        "SELECT * FROM attempts WHERE task_id = ? ORDER BY attempt", (task_id,))]


# --- budgets and rate limits: shared by every worker of the home, one transaction each ------

def _spent(conn: sqlite3.Connection, column: str, period: str, held: bool) -> float:
    unsettled = "reserved_usd" if held else "0"
    row = conn.execute(
        f"SELECT COALESCE(SUM(CASE WHEN settled THEN COALESCE(cost_usd, reserved_usd)"
        f" ELSE {unsettled} END), 0) FROM reservations WHERE {column} = ?", (period,)).fetchone()
    return float(row[0])


def spent(conn: sqlite3.Connection, day: str, month: str,
          held: bool = True) -> tuple[float, float]:
    """USD spent in a day and a month; with `held`, reservations of calls in flight count too."""
    return _spent(conn, "day", day, held), _spent(conn, "month", month, held)


def reserve(conn: sqlite3.Connection, *, task_id: str, attempt: int, craftsman: str,
            amount: float, day: str, month: str, daily_limit: float | None,
            monthly_limit: float | None, max_rpm: int | None, max_tpm: int | None, tokens: int,
            now: float) -> tuple[str, float]:
    """Reserve a call's worst-case cost and its place in the rate window, atomically.

    Returns ("ok", reservation id), ("budget", 0) when it does not fit what is left, or
    ("rate", seconds to wait) when the craftsman's per-minute window is full.
    """
    with _immediate(conn):
        # Rows dated past the window's end were written before the clock stepped back (or by
        # a clock that ran ahead): they say nothing about this minute.
        conn.execute("DELETE FROM requests WHERE at > ?", (now + 60,))
        wait = _rate_wait(conn, craftsman, max_rpm, max_tpm, tokens, now)
        if wait > 0:
            return "rate", wait
        day_spent, month_spent = spent(conn, day, month)
        if (daily_limit is not None and day_spent + amount > daily_limit) or (
                monthly_limit is not None and month_spent + amount > monthly_limit):
            return "budget", 0.0
        cursor = conn.execute(
            "INSERT INTO reservations (task_id, attempt, craftsman, day, month, reserved_usd, at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)", (task_id, attempt, craftsman, day, month, amount, now))
        conn.execute("INSERT INTO requests VALUES (?, ?, ?)", (craftsman, now, tokens))
        conn.execute("DELETE FROM requests WHERE at < ?", (now - 120,))
        return "ok", float(cursor.lastrowid)


def _rate_wait(conn: sqlite3.Connection, craftsman: str, max_rpm: int | None,
               max_tpm: int | None, tokens: int, now: float) -> float:
    if max_rpm is None and max_tpm is None:
        return 0.0
    # A row dated ahead of now counts as now: a wait never runs past one window.
    rows = conn.execute("SELECT MIN(at, ?) AS at, tokens FROM requests WHERE craftsman = ?"
                        " AND at > ? ORDER BY at", (now, craftsman, now - 60)).fetchall()
    if max_rpm is not None and len(rows) >= max_rpm:
        return rows[len(rows) - max_rpm]["at"] + 60 - now
    if max_tpm is not None and sum(r["tokens"] or 0 for r in rows) + tokens > max_tpm and rows:
        return rows[0]["at"] + 60 - now
    return 0.0


def settle(conn: sqlite3.Connection, reservation_id: int, cost: float | None) -> None:
    """Replace a reservation by the real cost (unknown cost: the reservation stands)."""
    with _immediate(conn):
        conn.execute("UPDATE reservations SET settled = 1, cost_usd = COALESCE(?, reserved_usd)"
                     " WHERE id = ?", (cost, reservation_id))


def settle_lost(conn: sqlite3.Connection, task_id: str) -> None:
    """A task's worker died mid-call: its reservations count in full (the call may have run)."""
    with _immediate(conn):
        conn.execute("UPDATE reservations SET settled = 1, cost_usd = reserved_usd"
                     " WHERE task_id = ? AND settled = 0", (task_id,))


def record_alert(conn: sqlite3.Connection, period: str, threshold: int, spent_usd: float,
                 limit_usd: float, at: float) -> bool:
    """Note that a threshold alerted in a period; False when it already had."""
    with _immediate(conn):
        cursor = conn.execute("INSERT OR IGNORE INTO budget_alerts VALUES (?, ?, ?, ?, ?)",
                              (period, threshold, spent_usd, limit_usd, at))
    return cursor.rowcount == 1


# --- reports ---
# Read-only queries for `koubou report`, `koubou metrics`, `koubou top` and the MCP server.
# Times are Unix seconds; a period is [start, end). The arithmetic lives in report.py.

def report_tasks(conn: sqlite3.Connection, start: float, end: float) -> list[dict[str, Any]]:
    """Tasks that finished in the period (a task without finished_at counts at its queued_at)."""
    return [dict(r) for r in conn.execute(
        "SELECT * FROM tasks WHERE COALESCE(finished_at, queued_at) >= ?"
        " AND COALESCE(finished_at, queued_at) < ? ORDER BY finished_at", (start, end))]


def report_spend(conn: sqlite3.Connection, start: float, end: float) -> list[dict[str, Any]]:
    """Money spent in the period: each priced attempt, and the cost of tasks with no attempt rows.

    Attempts carry the spend of retries too; a ledger rebuilt from outcome files has only the
    tasks table, so a task without attempts counts with its own cost.
    """
    return [dict(r) for r in conn.execute(
        "SELECT finished_at AS at, craftsman, model, cost_usd FROM attempts"
        " WHERE finished_at >= ? AND finished_at < ? AND cost_usd IS NOT NULL"
        " UNION ALL SELECT t.finished_at, t.craftsman, t.model, t.cost_usd FROM tasks AS t"
        " WHERE t.finished_at >= ? AND t.finished_at < ? AND t.cost_usd IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM attempts AS a WHERE a.task_id = t.id)"
        " ORDER BY 1", (start, end, start, end))]


def report_rejects(conn: sqlite3.Connection, start: float, end: float) -> list[dict[str, Any]]:
    """Input rejected as not a task in the period."""
    return [dict(r) for r in conn.execute(
        "SELECT * FROM rejects WHERE at >= ? AND at < ? ORDER BY at", (start, end))]


def report_open_attempts(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Attempts claimed and not finished: what craftsmen have in flight (if their claim lives)."""
    return [dict(r) for r in conn.execute(
        "SELECT task_id, attempt, worker_id, craftsman, model, claimed_at FROM attempts"
        " WHERE finished_at IS NULL")]


def report_task_totals(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """All-time task, token and cost totals by craftsman, model and outcome (metrics counters)."""
    return [dict(r) for r in conn.execute(
        "SELECT COALESCE(craftsman, '') AS craftsman, COALESCE(model, '') AS model,"
        " COALESCE(status, '') AS outcome, COUNT(*) AS tasks,"
        " COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens,"
        " COALESCE(SUM(completion_tokens), 0) AS completion_tokens,"
        " COALESCE(SUM(cost_usd), 0) AS cost_usd FROM tasks GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")]


# --- rebuild and maintenance ---
# `koubou ledger rebuild` (rebuild.py), `koubou maintain` (maintain.py), `koubou doctor` (doctor.py).

def rebuild_insert(conn: sqlite3.Connection, tasks: list[dict[str, Any]],
                   attempt_rows: list[dict[str, Any]], rejects: list[dict[str, Any]],
                   reservations: list[dict[str, Any]] = ()) -> None:
    """Write the rows read back from outcome files, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, rows in (("tasks", tasks), ("attempts", attempt_rows), ("rejects", rejects),
                            ("reservations", reservations)):
            for row in rows:
                _upsert(conn, table, row)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def purge(conn: sqlite3.Connection, task_ids: list[str], reject_files: list[str]) -> int:
    """Delete the tasks, attempts and rejects rows of purged outcome files; returns rows deleted."""
    deleted = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement, keys in (("DELETE FROM tasks WHERE id = ?", task_ids),
                                ("DELETE FROM attempts WHERE task_id = ?", task_ids),
                                ("DELETE FROM rejects WHERE file = ?", reject_files)):
            for key in keys:
                deleted += conn.execute(statement, (key,)).rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return deleted


def vacuum(conn: sqlite3.Connection, max_s: float) -> bool:
    """Rewrite the database compactly, then truncate the WAL; False when it was given up.

    VACUUM holds the write lock from start to end, and every worker's write waits for it:
    one that would run past `max_s` (keep it under BUSY_TIMEOUT_MS) is interrupted and rolled
    back, so no writer's busy timeout runs out behind it. The checkpoint copies pages without
    blocking anyone first, and truncates with a short busy timeout of its own.
    """
    deadline = time.monotonic() + max_s
    conn.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
    try:
        conn.execute("VACUUM")
    except sqlite3.OperationalError as exc:
        if "interrupt" not in str(exc):
            raise
        return False
    finally:
        conn.set_progress_handler(None, 0)
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    conn.execute(f"PRAGMA busy_timeout = {int(min(max_s * 1000, BUSY_TIMEOUT_MS))}")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return True


def integrity_problems(conn: sqlite3.Connection) -> list[str]:
    """What `PRAGMA integrity_check` finds; [] when the database is sound."""
    rows = [r[0] for r in conn.execute("PRAGMA integrity_check")]
    return [] if rows == ["ok"] else rows


def missing_migrations(conn: sqlite3.Connection) -> list[str]:
    """Names of migrations this version knows that the database has not recorded."""
    has_table = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                             " AND name = 'migrations'").fetchone()
    done = {r[0] for r in conn.execute("SELECT name FROM migrations")} if has_table else set()
    return [name for name, _ in MIGRATIONS if name not in done]
