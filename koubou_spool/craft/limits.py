"""Limits that hold across every worker process of a home.

- Slots: `max_concurrent` per craftsman as lock files run/slots/<craftsman>/<n>; a worker holds
  an flock on one while a request is in flight. The kernel drops the lock when the process dies,
  however it dies, so a slot is never leaked. Workers notice freed slots through outcome events.
- Budget and rate windows: one SQLite transaction in the ledger per call (ledger.reserve).
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import sqlite3
import threading
import time
from pathlib import Path

from ..spool import ledger, permissions
from .budget import BudgetSettings, reached
from ..config import Craftsman

log = logging.getLogger(__name__)


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


class Budget:
    """Budget reservations and rate windows in the ledger; called from worker threads."""

    def __init__(self, path: Path, settings: BudgetSettings) -> None:
        self.path = path
        self.settings = settings
        self._local = threading.local()
        self._exhausted_until = 0.0
        self._refused = math.inf  # the smallest reservation refused since the mark was set

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = ledger.open_ledger(self.path)
        return conn

    def needed(self, craftsman: Craftsman) -> bool:
        """Whether calls to this craftsman go through the ledger (cloud with a budget, or rates)."""
        return (self.settings.enabled and not craftsman.local) or bool(
            craftsman.max_rpm or craftsman.max_tpm)

    def reserve(self, task_id: str, attempt: int, craftsman: Craftsman, amount: float,
                tokens: int) -> tuple[str, float]:
        """ledger.reserve with this home's limits; local craftsmen reserve nothing."""
        now = time.time()
        day, month = self.settings.periods(now)
        budgeted = not craftsman.local
        result = ledger.reserve(
            self._conn(), task_id=task_id, attempt=attempt, craftsman=craftsman.name,
            amount=amount if budgeted else 0.0, day=day, month=month,
            daily_limit=self.settings.daily_usd if budgeted else None,
            monthly_limit=self.settings.monthly_usd if budgeted else None,
            max_rpm=craftsman.max_rpm, max_tpm=craftsman.max_tpm, tokens=tokens, now=now)
        if result[0] == "budget":
            self._refused = min(self._refused, amount)
            self._exhausted_until = self._period_end(now)
        return result

    def settle(self, reservation_id: int, cost: float | None) -> list[tuple[str, int, float, float]]:
        """Record the real cost; returns the alerts (period, percent, spent, limit) now due."""
        conn = self._conn()
        ledger.settle(conn, reservation_id, cost)
        now = time.time()
        day, month = self.settings.periods(now)
        day_spent, month_spent = ledger.spent(conn, day, month, held=False)  # alerts: real spend
        due = []
        for period, spent, limit in ((day, day_spent, self.settings.daily_usd),
                                     (month, month_spent, self.settings.monthly_usd)):
            for percent in reached(self.settings.alert_percent, spent, limit):
                if ledger.record_alert(conn, period, percent, spent, limit, now):
                    due.append((period, percent, spent, limit))
        return due

    def settle_lost(self, task_id: str) -> None:
        """Count a dead worker's reservation for a task in full."""
        try:
            ledger.settle_lost(self._conn(), task_id)
        except sqlite3.Error as exc:
            log.warning("could not settle reservations of %s: %s", task_id, exc)

    def exhausted(self) -> bool:
        """Whether the budget was found spent: until the period that ran out ends, or until
        `recheck` finds room again."""
        return time.time() < self._exhausted_until

    def recheck(self) -> bool:
        """Lift the exhausted mark when calls settled below their reservations have left room
        for the smallest reservation refused; True when it was lifted."""
        if not self.exhausted():
            return False
        day, month = self.settings.periods(time.time())
        try:
            day_spent, month_spent = ledger.spent(self._conn(), day, month)
        except sqlite3.Error as exc:
            log.debug("budget recheck skipped: %s", exc)
            return False
        rooms = [limit - spent for spent, limit in ((day_spent, self.settings.daily_usd),
                                                    (month_spent, self.settings.monthly_usd))
                 if limit is not None]
        if rooms and min(rooms) < self._refused:
            return False
        self._exhausted_until, self._refused = 0.0, math.inf
        return True

    def _period_end(self, now: float) -> float:
        day, month = self.settings.periods(now)
        try:
            day_spent, month_spent = ledger.spent(self._conn(), day, month)
        except sqlite3.Error:
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
