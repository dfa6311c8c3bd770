"""Limits that hold across every worker process of a home.

- Slots: `max_concurrent` per craftsman as lock files run/slots/<craftsman>/<n>; a worker holds
  an flock on one while a request is in flight. The kernel drops the lock when the process dies,
  however it dies, so a slot is never leaked. Workers notice freed slots through outcome events.
- Budget and rate windows: one SQLite transaction in the ledger per call (ledger.reserve). In a
  cluster the budget's limits are kept on the cluster's row in PostgreSQL (shared_budget.py)
  and the ledger records the home's own reservations beside it.
- The exhausted mark: run/budget-exhausted.json, the home's, not a process's: workers split
  per craftsman (koubou-worker@cloud, koubou-worker@local) must agree that cloud tasks go
  local, or each leaves them to the other.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Craftsman
from ..errors import ClusterUnavailable
from ..spool import ledger, permissions
from .budget import BudgetSettings, reached

if TYPE_CHECKING:  # psycopg, its dependency, is the optional `cluster` extra
    from .shared_budget import SharedBudget

log = logging.getLogger(__name__)

# What leaves a budgeted call unvouched for: the ledger locked or broken, the cluster away.
UNVOUCHED = (sqlite3.Error, ClusterUnavailable)


class Slots:
    """Slot lock files, `counts[name]` of them per name: the craftsmen one worker serves
    (`max_concurrent`), or the home's worktrees (`repos.max_worktrees`)."""

    def __init__(self, directory: Path, counts: dict[str, int]) -> None:
        self._fds: dict[str, list[int]] = {}
        self._held: dict[str, set[int]] = {}
        for name, count in counts.items():
            folder = directory / name
            permissions.make_dir(folder, permissions.OWNER_DIR, parents=True)
            # Private: a member who could open a slot could flock it and stall the craftsman.
            self._fds[name] = [
                permissions.open_file(folder / str(n), os.O_RDWR | os.O_CREAT, permissions.PRIVATE)
                for n in range(count)]
            self._held[name] = set()

    def acquire(self, craftsman: str) -> int | None:
        """Take a free slot of the craftsman (home-wide), or None when all are taken."""
        held = self._held[craftsman]
        for index, fd in enumerate(self._fds[craftsman]):
            if index in held:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            held.add(index)
            return index
        return None

    def release(self, craftsman: str, index: int) -> None:
        """Give a slot back."""
        fcntl.flock(self._fds[craftsman][index], fcntl.LOCK_UN)
        self._held[craftsman].discard(index)

    def close(self) -> None:
        """Release every lock."""
        for fds in self._fds.values():
            for fd in fds:
                os.close(fd)


class MarkFile:
    """A small JSON file of the home's that many processes read often: a stat per read, and
    a read of the file only when it changed (inode, mtime, size). `parse` turns the JSON into
    the value; what it cannot parse reads as None (as if unset: the next writer writes it
    whole)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[tuple[int, int, int], Any] | None = None

    def parse(self, obj: Any) -> Any:
        """The value a decoded file stands for (KeyError, TypeError, ValueError: unreadable)."""
        return obj

    def read(self) -> Any:
        """The value, or None when the file is absent or unreadable."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return None
        key = (info.st_ino, info.st_mtime_ns, info.st_size)
        seen = self._seen
        if seen is not None and seen[0] == key:
            return seen[1]
        try:
            value = self.parse(json.loads(self.path.read_bytes()))
        except (OSError, ValueError, KeyError, TypeError):
            value = None
        self._seen = (key, value)
        return value

    def clear(self) -> None:
        """Remove the file."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class ExhaustedMark(MarkFile):
    """The home's mark that the budget was found spent: until when, and the smallest
    reservation refused since it was set. A file, so it needs no ledger to be read: routing
    reads it for every task (a stat, and a read only when it changed)."""

    def parse(self, obj: Any) -> tuple[float, float]:
        """(until, smallest refused amount)."""
        return float(obj["until"]), float(obj["refused"])

    def set(self, until: float, refused: float) -> None:
        """Raise the mark, or widen it: the later end, the smaller refused amount."""
        current = self.read()
        if current is not None:
            until, refused = max(until, current[0]), min(refused, current[1])
        staging = f"{self.path}.{os.getpid()}.{threading.get_ident()}"
        try:
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, json.dumps({"until": until, "refused": refused}).encode())
            finally:
                os.close(fd)
            os.rename(staging, self.path)
        except OSError as exc:  # without the mark the refusal only repeats: never worse
            log.warning("cannot write %s: %s", self.path, exc.strerror)


class Budget:
    """Budget reservations and rate windows in the ledger, and on the cluster's row when the
    home is in a cluster (`shared`); called from worker threads."""

    def __init__(self, path: Path, settings: BudgetSettings, mark: Path | None = None,
                 shared: SharedBudget | None = None) -> None:
        self.path = path
        self.settings = settings
        self.shared = shared
        self._local = threading.local()
        # db/koubou.db -> run/budget-exhausted.json, beside the slots and worker locks
        self.mark = ExhaustedMark(mark or path.parent.parent / "run" / "budget-exhausted.json")
        self._saw_mark = False  # the mark was up when this process last looked

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = ledger.open_ledger(self.path)
        return conn

    def needed(self, craftsman: Craftsman) -> bool:
        """Whether calls to this craftsman go through the ledger (cloud with a budget, or rates)."""
        return self.budgets(craftsman) or bool(craftsman.max_rpm or craftsman.max_tpm)

    def reserve(self, task_id: str, attempt: int, craftsman: Craftsman, amount: float,
                tokens: int) -> tuple[str, float]:
        """ledger.reserve with this home's limits (in a cluster, the cluster's row holds them);
        local craftsmen reserve nothing.

        sqlite3.Error when the ledger is locked or broken, ClusterUnavailable when the cluster
        cannot be asked: then a budgeted call cannot be vouched for, and the home is marked
        exhausted (routing sends cloud tasks where when_exhausted says) until a recheck finds
        the budget readable and room in it."""
        now = time.time()
        day, month = self.settings.periods(now)
        budgeted = not craftsman.local
        # In a cluster a cloud craftsman's limits are the cluster's; a local one's, the home's.
        # The cluster's rate window is counted first (a place taken by a call the budget then
        # refuses stays counted: the window errs on the provider's side).
        shared = self.shared if budgeted else None
        limits = (None, None) if shared is not None or not budgeted else (
            self.settings.daily_usd, self.settings.monthly_usd)
        rates = (None, None) if shared is not None else (craftsman.max_rpm, craftsman.max_tpm)
        try:
            if shared is not None and (craftsman.max_rpm or craftsman.max_tpm):
                wait = shared.count_request(craftsman.name, craftsman.max_rpm,
                                            craftsman.max_tpm, tokens)
                if wait > 0:
                    return "rate", wait
            result = ledger.reserve(
                self._conn(), task_id=task_id, attempt=attempt, craftsman=craftsman.name,
                amount=amount if budgeted else 0.0, day=day, month=month,
                daily_limit=limits[0], monthly_limit=limits[1],
                max_rpm=rates[0], max_tpm=rates[1], tokens=tokens, now=now)
            if shared is not None and self.budgets(craftsman) and result[0] == "ok":
                result = self._reserve_shared(shared, int(result[1]), task_id, attempt,
                                              craftsman, amount, day, month)
        except UNVOUCHED:
            if self.budgets(craftsman):
                self.mark.set(self._period_end(now), amount)
            raise
        if result[0] == "budget":
            self.mark.set(self._period_end(now), amount)
        return result

    def _reserve_shared(self, shared: SharedBudget, ledger_id: int, task_id: str, attempt: int,
                        craftsman: Craftsman, amount: float, day: str,
                        month: str) -> tuple[str, float]:
        """The cluster's budget reservation beside the ledger's; the ledger's is given back
        (settled at 0: no call is made) when the cluster refuses it or cannot be asked."""
        try:
            fits = shared.reserve(ledger_id, task_id=task_id, attempt=attempt,
                                  craftsman=craftsman.name, amount=amount, day=day, month=month,
                                  daily_limit=self.settings.daily_usd,
                                  monthly_limit=self.settings.monthly_usd)
        except ClusterUnavailable:
            ledger.settle(self._conn(), ledger_id, 0.0)
            raise
        if not fits:
            ledger.settle(self._conn(), ledger_id, 0.0)
            return "budget", 0.0
        return "ok", float(ledger_id)

    def budgets(self, craftsman: Craftsman) -> bool:
        """Whether this craftsman's calls count against the budget."""
        return self.settings.enabled and not craftsman.local

    def settle(self, reservation_id: int, cost: float | None) -> list[tuple[str, int, float, float]]:
        """Record the real cost; returns the alerts (period, percent, spent, limit) now due."""
        # First: it never raises, and a retried settle skips it.
        in_cluster = self.shared is not None and self.shared.settle(int(reservation_id), cost)
        conn = self._conn()
        ledger.settle(conn, reservation_id, cost)
        now = time.time()
        day, month = self.settings.periods(now)
        if self.shared is not None:  # after a settle there (a local craftsman's asks nothing)
            return self._cluster_alerts(conn, day, month, now) if in_cluster else []
        limits = (self.settings.daily_usd, self.settings.monthly_usd)
        day_spent, month_spent = ledger.spent(conn, day, month, held=False)  # alerts: real spend
        due = []
        for period, spent, limit in zip((day, month), (day_spent, month_spent), limits,
                                        strict=True):
            for percent in reached(self.settings.alert_percent, spent, limit):
                if ledger.record_alert(conn, period, percent, spent, limit, now):
                    due.append((period, percent, spent, limit))
        return due

    def _cluster_alerts(self, conn: sqlite3.Connection, day: str, month: str,
                        now: float) -> list[tuple[str, int, float, float]]:
        """The cluster's spend is what the limits hold: its first host to see a threshold
        passed alerts, once for the cluster. Recorded in this home's ledger too, for its
        reports, where it can be."""
        if not self.settings.alert_percent:
            return []
        limits = (self.settings.daily_usd, self.settings.monthly_usd)
        due = self.shared.alerts_due(day, month, limits, self.settings.alert_percent) or []
        for period, percent, spent, limit in due:
            try:
                ledger.record_alert(conn, period, percent, spent, limit, now)
            except sqlite3.Error as exc:  # the cluster holds it: the alert still goes out
                log.warning("budget alert %s %d%% not recorded in the ledger: %s",
                            period, percent, exc)
        return due

    def settle_lost(self, task_id: str) -> None:
        """Count a dead worker's reservation for a task in full."""
        if self.shared is not None:
            self.shared.settle_lost(task_id)
        try:
            ledger.settle_lost(self._conn(), task_id)
        except sqlite3.Error as exc:
            log.warning("could not settle reservations of %s: %s", task_id, exc)

    def exhausted(self) -> bool:
        """Whether the budget was found spent (by any worker of the home): until the period
        that ran out ends, or until `recheck` finds room again."""
        mark = self.mark.read()
        up = mark is not None and time.time() < mark[0]
        self._saw_mark = self._saw_mark or up
        return up

    def recheck(self) -> bool:
        """Lift the exhausted mark when calls settled below their reservations have left room
        for the smallest reservation refused. True when the mark this process saw up is down
        now, whoever lifted it: its deferred tasks are judged again."""
        mark = self.mark.read()
        if mark is None or time.time() >= mark[0] or self._room_for(mark[1]):
            if mark is not None:
                self.mark.clear()
            lifted, self._saw_mark = self._saw_mark, False
            return lifted
        self._saw_mark = True
        return False

    def _room_for(self, amount: float) -> bool:
        day, month = self.settings.periods(time.time())
        try:
            day_spent, month_spent = self._spent(day, month)
        except UNVOUCHED as exc:
            log.debug("budget recheck skipped: %s", exc)
            return False
        rooms = [limit - spent for spent, limit in ((day_spent, self.settings.daily_usd),
                                                    (month_spent, self.settings.monthly_usd))
                 if limit is not None]
        return not rooms or min(rooms) >= amount

    def _spent(self, day: str, month: str) -> tuple[float, float]:
        """Reserved and spent in these periods where the limits are kept: the cluster's row,
        or the home's ledger."""
        if self.shared is None:
            return ledger.spent(self._conn(), day, month)
        spent = self.shared.spent(day, month)
        if spent is None:
            raise ClusterUnavailable("the cluster's budget cannot be reached")
        return spent

    def _period_end(self, now: float) -> float:
        day, month = self.settings.periods(now)
        try:
            day_spent, month_spent = self._spent(day, month)
        except UNVOUCHED:
            return self.settings.next_day_start(now)
        monthly = self.settings.monthly_usd
        if monthly is not None and month_spent >= monthly * 0.999:
            return self.settings.next_month_start(now)
        return self.settings.next_day_start(now)

    def state(self) -> dict[str, object]:
        """Spend so far in this day and month against the limits (for `koubou route`, status).

        Read-only, so it needs no write access to the ledger and never creates one.
        """
        day, month = self.settings.periods(time.time())
        nothing_yet = None if os.path.exists(self.path) else (0.0, 0.0)
        spent = ledger.read(self.path, ledger.spent, day, month, default=nothing_yet)
        if spent is None:
            return {"enabled": self.settings.enabled,
                    "error": "ledger unreadable (locked, damaged or closed to this user)"}
        day_spent, month_spent = spent
        daily, monthly = self.settings.daily_usd, self.settings.monthly_usd
        return {"enabled": self.settings.enabled, "day": day, "month": month,
                "day_spent_usd": round(day_spent, 6), "daily_usd": daily,
                "month_spent_usd": round(month_spent, 6), "monthly_usd": monthly,
                "exhausted": (daily is not None and day_spent >= daily) or (
                    monthly is not None and month_spent >= monthly),
                "when_exhausted": self.settings.when_exhausted}
