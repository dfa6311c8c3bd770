"""The ledger: every SQL statement of koubou lives in this module (README: How it keeps its promises).

SQLite in WAL mode. Workers write through one background thread per process that batches
records into transactions and keeps them while the database is locked or missing, so a locked
ledger never stops local work: the spool is the source of truth and the records follow. What
waits is bounded: a heartbeat replaces its worker's previous one still queued, and past
MAX_QUEUED records new ones are dropped with a warning (`koubou ledger rebuild` restores tasks
and attempts from the outcome files).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Callable

from . import permissions
from .task import parse_iso

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 2000
MAX_BACKOFF_S = 2.0
MAX_QUEUED = 100_000  # records waiting for a locked ledger (rows, not outcome texts: ~1 KB each)
BATCH = 1000
# How long the writer lets records gather after the first wakes it (a heartbeat excepted: it
# comes alone): one transaction for the records of a burst instead of one each, and the thread
# stays off the GIL while the loop that just queued a record (an attempt starting) goes on to
# send its request.
LINGER_S = 0.002

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
    ("0003_truncated_answers", """
        ALTER TABLE tasks ADD COLUMN truncated INTEGER;
    """),
    ("0004_repository_tasks", """
        ALTER TABLE tasks ADD COLUMN repo TEXT;
        ALTER TABLE tasks ADD COLUMN verify_passed INTEGER;
    """),
    ("0005_endpoints", """
        ALTER TABLE tasks ADD COLUMN endpoint TEXT;
        ALTER TABLE workers ADD COLUMN endpoints TEXT;
    """),
    ("0006_cluster_slots", """
        ALTER TABLE workers ADD COLUMN cluster_slots TEXT;
    """),
]


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (we issue BEGIN ourselves), WAL, with a busy timeout."""
    if not os.path.exists(path):
        _create(path)
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


def _create(path: Path) -> None:
    """An empty database file (SQLite takes it as a new database) that is group-readable
    whatever the umask: SQLite gives the -wal and -shm files it creates the same mode."""
    try:
        os.close(permissions.open_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        pass


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that cannot write, for readers without write access (PRODUCT.md §2).

    SQLite (3.22+) reads a WAL database read-only when its -wal and -shm files exist and are
    readable, keeping a private copy of the -shm (https://sqlite.org/wal.html, "Read-Only
    Databases"). They exist while a writer has the ledger open (a running worker always does).
    The last writer to close checkpoints and deletes them; a reader who may not create files in
    db/ then gets SQLITE_READONLY_DIRECTORY, and since no -wal means the database file alone is
    complete, it is read as `immutable` (no locks, no -shm). A writer that checkpoints during
    such a read can make it fail: readers treat that like a locked ledger.
    """
    uri = Path(path).absolute().as_uri()
    conn = _open_uri(f"{uri}?mode=ro")
    try:
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1")  # the -wal and -shm open here
    except sqlite3.OperationalError:
        conn.close()
        if os.path.exists(f"{path}-wal"):
            raise
        conn = _open_uri(f"{uri}?immutable=1")
    return conn


def _open_uri(uri: str) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=False)
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
    """A read for status and reports, on a read-only connection: `default` when the ledger is
    missing, locked, broken or closed to this user, since reports degrade rather than fail
    (README: Rebuilding the ledger); the spool still answers for the queues."""
    if not os.path.exists(path):
        return default
    try:
        conn = connect_readonly(path)
        try:
            return query(conn, *args)
        finally:
            conn.close()
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
        "truncated": 1 if result.get("truncated") else 0 if result else None,
        "repo": record.get("repo"), "verify_passed": _verify_passed(record),
        "endpoint": result.get("endpoint"),
    }


def _verify_passed(record: dict[str, Any]) -> int | None:
    """1 when a repository task's verify passed, 0 when it failed it, None when none ran."""
    verify = ((record.get("result") or {}).get("repo") or {}).get("verify")
    if verify is not None:
        return 1 if verify.get("exit_code") == 0 else 0
    return 0 if (record.get("error") or {}).get("kind") == "verify" else None


def _upsert(conn: sqlite3.Connection, table: str, row: dict[str, Any]) -> None:
    names = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    conn.execute(f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})", tuple(row.values()))


# --- writing -----------------------------------------------------------------------------------

class LedgerWriter:
    """One thread that owns the write connection; records wait in memory while SQLite is busy."""

    def __init__(self, path: Path, max_queued: int = MAX_QUEUED) -> None:
        self.path = path
        self.backlog = False
        self.max_queued = max_queued
        self.dropped = 0  # records refused since the ledger was last writable
        self._items: deque[list] = deque()  # [operation, future, key]
        self._keyed: dict[tuple, list] = {}  # key -> its item still in _items
        self._ready = threading.Condition()
        self._closing = False
        self._wake = threading.Event()
        self._conn: sqlite3.Connection | None = None
        self._thread = threading.Thread(target=self._run, name="ledger", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Records waiting to be taken by the writer thread."""
        with self._ready:
            return len(self._items)

    def _submit(self, op: Callable[[sqlite3.Connection], None],
                key: tuple | None = None) -> Future:
        """Queue a record; one with the key of a record still queued replaces that one."""
        with self._ready:
            item = self._keyed.get(key) if key is not None else None
            if item is not None:
                item[0] = op  # newer state, same place in the queue, same future
                return item[1]
            future: Future = Future()
            if len(self._items) >= self.max_queued:
                self._drop(future)
                return future
            item = [op, future, key]
            self._items.append(item)
            if key is not None:
                self._keyed[key] = item
            self._ready.notify()
        return future

    def _drop(self, future: Future) -> None:
        self.dropped += 1
        if self.dropped == 1:
            log.warning("ledger %s locked with %d records queued; further records are dropped "
                        "until it is free", self.path, len(self._items))
        future.set_exception(sqlite3.OperationalError(
            f"ledger {self.path} locked with {len(self._items)} records queued; record dropped"))

    # Each public method is one record; the SQL stays here.

    def worker_started(self, worker_id: str, host: str, pid: int, craftsmen: list[str],
                       at: float) -> Future:
        """A worker came up."""
        row = {"id": worker_id, "host": host, "pid": pid, "craftsmen": ",".join(craftsmen),
               "started_at": at, "heartbeat_at": at, "state": "running"}
        return self._submit(lambda c: _upsert(c, "workers", row))

    def heartbeat(self, worker_id: str, state: str, in_flight: int, done: int, failed: int,
                  at: float, endpoints: dict[str, list[dict]] | None = None,
                  cluster_slots: list[dict] | None = None) -> Future:
        """A worker is alive: its state and counters, its craftsmen's endpoints and the
        cluster slots it holds (JSON)."""
        shown = json.dumps(endpoints) if endpoints else None
        held = json.dumps(cluster_slots) if cluster_slots else None
        return self._submit(lambda c: c.execute(
            "UPDATE workers SET heartbeat_at = ?, state = ?, in_flight = ?, done = ?, failed = ?,"
            " endpoints = ?, cluster_slots = ? WHERE id = ?",
            (at, state, in_flight, done, failed, shown, held, worker_id)),
            key=("heartbeat", worker_id))

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
        row = task_row(record) if record is not None else None  # not the record: it is big
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
            if row is not None:
                _upsert(conn, "tasks", row)
        return self._submit(write)

    def task_finished(self, record: dict[str, Any]) -> Future:
        """A task reached completed/ or failed/ without an attempt of its own (e.g. lost)."""
        row = task_row(record)
        return self._submit(lambda c: _upsert(c, "tasks", row))

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
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("ledger %s stayed locked; %d records not written (the outcome files keep "
                        "them: `koubou ledger rebuild`)", self.path, self.queued)

    def _take(self) -> list[list] | None:
        """The next batch, waiting for one; None once closing with nothing left."""
        with self._ready:
            while not self._items and not self._closing:
                self._ready.wait()
            burst = not self._closing and self._items[0][2] is None  # a heartbeat comes alone
        if burst:
            time.sleep(LINGER_S)
        with self._ready:
            batch = []
            while self._items and len(batch) < BATCH:
                item = self._items.popleft()
                if item[2] is not None:
                    del self._keyed[item[2]]  # taken: a later record of its key queues anew
                batch.append(item)
            return batch or None

    def _run(self) -> None:
        batch: list[list] | None = None
        backoff = 0.05
        while True:
            if not batch:
                batch = self._take()
                if batch is None:
                    break
            if self._write(batch):
                batch, backoff, self.backlog = None, 0.05, False
                self._report_dropped()
                continue
            self.backlog = True
            self._wake.wait(backoff)  # retry backoff while the ledger is locked or missing
            self._wake.clear()
            backoff = min(backoff * 2, MAX_BACKOFF_S)
        if self._conn is not None:
            self._conn.close()

    def _report_dropped(self) -> None:
        with self._ready:
            dropped, self.dropped = self.dropped, 0
        if dropped:
            log.warning("ledger %s writable again; %d records dropped while it was locked "
                        "(`koubou ledger rebuild` restores them from the outcome files)",
                        self.path, dropped)

    def _write(self, batch: list[list]) -> bool:
        try:
            if self._conn is None:
                self._conn = open_ledger(self.path)
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            log.debug("ledger busy or unavailable: %s", exc)
            self._drop_connection()
            return False
        try:
            for op, _, _ in batch:
                op(self._conn)
            self._conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            log.debug("ledger write deferred: %s", exc)
            self._rollback()
            return False
        except Exception as exc:  # a bad record (or a broken file) must not stop the thread
            log.error("ledger write failed, %d records dropped: %s", len(batch), exc)
            self._rollback()
            for _, future, _ in batch:
                if not future.cancelled():
                    future.set_exception(exc)
            return True
        for _, future, _ in batch:
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


def report_attempt_kinds(conn: sqlite3.Connection, start: float,
                         end: float) -> list[dict[str, Any]]:
    """Failed attempts (retried or final) in the period, counted per craftsman and error kind."""
    return [dict(r) for r in conn.execute(
        "SELECT craftsman, error_kind, COUNT(*) AS attempts FROM attempts"
        " WHERE finished_at >= ? AND finished_at < ? AND error_kind IS NOT NULL"
        " GROUP BY 1, 2 ORDER BY 1, 2", (start, end))]


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


def report_usage(conn: sqlite3.Connection, start: float, end: float) -> list[dict[str, Any]]:
    """Per craftsman, tasks finished in the period (completed, failed), their tokens, and the
    spend of the period's attempts (report_spend's rule), summed here: a bridge sends these
    figures to the cluster at each heartbeat, so they must not cost a row per task."""
    rows: dict[str, dict[str, Any]] = {}
    for r in conn.execute(
            "SELECT COALESCE(craftsman, '(none)'), COUNT(*), SUM(status = 'completed'),"
            " SUM(status = 'failed'), COALESCE(SUM(prompt_tokens), 0),"
            " COALESCE(SUM(completion_tokens), 0) FROM tasks"
            " WHERE finished_at >= ? AND finished_at < ? GROUP BY 1", (start, end)):
        rows[r[0]] = {"craftsman": r[0], "tasks": r[1], "completed": r[2] or 0,
                      "failed": r[3] or 0, "prompt_tokens": r[4], "completion_tokens": r[5],
                      "cost_usd": 0.0}
    for craftsman, cost in conn.execute(
            "SELECT COALESCE(craftsman, '(none)'), SUM(cost_usd) FROM ("
            " SELECT craftsman, cost_usd FROM attempts WHERE finished_at >= ? AND finished_at < ?"
            " AND cost_usd IS NOT NULL UNION ALL SELECT t.craftsman, t.cost_usd FROM tasks AS t"
            " WHERE t.finished_at >= ? AND t.finished_at < ? AND t.cost_usd IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM attempts AS a WHERE a.task_id = t.id)) GROUP BY 1",
            (start, end, start, end)):
        rows.setdefault(craftsman, {"craftsman": craftsman, "tasks": 0, "completed": 0,
                                    "failed": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                    "cost_usd": 0.0})["cost_usd"] = cost or 0.0
    return [rows[name] for name in sorted(rows)]


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
