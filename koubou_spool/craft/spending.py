"""Spending for the worker: reserve a call's worst case before it, settle the real cost after,
wait for room in a rate window, and send budget alerts. The shared state is limits.Budget (the
ledger); this is its asynchronous face for the event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from . import budget as budget_module
from .backends import BackendError, Request
from ..config import Craftsman
from ..errors import KoubouError
from .. import hooks
from .limits import UNVOUCHED, Budget
from .pricing import price_of

log = logging.getLogger(__name__)


class BudgetExhausted(KoubouError):
    """A cloud call's worst case does not fit what the budget has left; `final` when it
    could not fit even an untouched period (no use waiting or requeueing for it)."""

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


class _Reserving:
    """A reservation being made in a thread, which its coroutine may abandon (a cancel or a
    stop landing meanwhile): whichever side comes second gives the reservation back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._made: int | None = None

    def made(self, reservation: int) -> bool:
        """The thread made it; False when the coroutine is gone and it must be given back."""
        with self._lock:
            self._made = reservation
            return not self._abandoned

    def abandon(self) -> int | None:
        """The coroutine is gone; the reservation already made, for it to give back."""
        with self._lock:
            self._abandoned = True
            return self._made


SETTLE_RETRY_S = (1.0, 60.0)  # the first and the longest wait between tries of a late settle


class Spending:
    """Reservations and alerts for one worker."""

    def __init__(self, budget: Budget, home: Path) -> None:
        self.budget = budget
        self.home = home
        self._late: set[asyncio.Task] = set()  # settles waiting for the ledger

    async def reserve(self, craftsman: Craftsman, task_id: str, attempt: int,
                      request: Request) -> int | None:
        """Reserve the worst-case cost and a place in the rate window; None when not needed."""
        if not self.budget.needed(craftsman):
            return None
        tokens = budget_module.estimate_prompt_tokens(request.messages)
        amount = self._worst_case(craftsman, request, tokens)
        self._check_possible(craftsman, amount)
        deadline = time.monotonic() + request.timeout_s
        while True:
            try:
                verdict, value = await self._reserve_once(task_id, attempt, craftsman, amount,
                                                          tokens + request.max_tokens)
            except UNVOUCHED as exc:
                return self._unvouched(craftsman, exc)
            if verdict == "ok":
                return int(value)
            if verdict == "budget":
                raise BudgetExhausted(f"{craftsman.name} would need up to ${amount:.4f}, more "
                                      "than the budget has left")
            if time.monotonic() + value > deadline:
                raise BackendError(f"{craftsman.name} is at its max_rpm/max_tpm for longer than "
                                   "the attempt's timeout", kind="timeout", retryable=True)
            await asyncio.sleep(value)  # a timer until the rate window has room, not a poll

    async def _reserve_once(self, task_id: str, attempt: int, craftsman: Craftsman,
                            amount: float, tokens: int) -> tuple[str, float]:
        """One try at the ledger, in a thread. A cancel landing meanwhile cannot stop the
        thread: the reservation it makes is given back (settled at 0: no call was made)."""
        reserving = _Reserving()

        def in_thread() -> tuple[str, float]:
            verdict, value = self.budget.reserve(task_id, attempt, craftsman, amount, tokens)
            if verdict == "ok" and not reserving.made(int(value)):
                self._give_back(int(value))
            return verdict, value

        loop = asyncio.get_running_loop()
        try:
            return await asyncio.shield(loop.run_in_executor(None, in_thread))
        except asyncio.CancelledError:
            made = reserving.abandon()
            if made is not None:
                loop.run_in_executor(None, self._give_back, made)
            raise

    def _give_back(self, reservation: int) -> None:
        try:
            self.budget.settle(reservation, 0.0)
        except sqlite3.Error as exc:  # it stands at its worst case: the budget's side
            log.warning("could not give back reservation %d: %s", reservation, exc)

    def _check_possible(self, craftsman: Craftsman, amount: float) -> None:
        """A worst case over the whole daily or monthly limit can never be reserved: fail it
        rather than mark the home exhausted for a call no room would ever fit."""
        if not self.budget.budgets(craftsman):
            return
        limits = [v for v in (self.budget.settings.daily_usd, self.budget.settings.monthly_usd)
                  if v is not None]
        if limits and amount > min(limits):
            raise BudgetExhausted(f"{craftsman.name} would need up to ${amount:.4f}, more than "
                                  f"the budget's whole limit (${min(limits):.4f}): it can never "
                                  "run within the budget; shorten the prompt or max_tokens",
                                  final=True)

    def _unvouched(self, craftsman: Craftsman, error: Exception) -> None:
        """No reservation could be made: a budgeted call is not made (BudgetExhausted, and
        when_exhausted decides); a call that only has a rate window goes on without it, since
        a locked ledger never stops work that spends nothing (PRODUCT.md §4.5)."""
        if self.budget.budgets(craftsman):
            where = "the ledger" if isinstance(error, sqlite3.Error) else "the cluster's budget"
            raise BudgetExhausted(f"{where} is unavailable ({error}), so the budget cannot "
                                  f"vouch for a call to {craftsman.name}")
        log.warning("ledger unavailable (%s); %s's max_rpm/max_tpm not kept for this call",
                    error, craftsman.name)
        return None

    def _worst_case(self, craftsman: Craftsman, request: Request, tokens: int) -> float:
        """What a call may cost at most: max_cost_usd when set (CLI agents), else by tokens."""
        if craftsman.max_cost_usd is not None:
            return craftsman.max_cost_usd
        price = price_of(craftsman, request.model)
        if price is not None:
            return budget_module.worst_case(price, tokens, request.max_tokens)
        if self.budget.settings.enabled and not craftsman.local:
            raise BackendError(f"no price is known for {craftsman.name} ({request.model}), so "
                               "its cost cannot be kept within the budget; set price: or "
                               "max_cost_usd: in the config", kind="budget")
        return 0.0

    async def settle(self, reservation: int, cost: float | None) -> None:
        """Replace a reservation by the real cost (None: unknown, the reservation stands).

        Never raises for the ledger: a call already made (and paid) must publish its answer.
        A settle the ledger refuses is tried again in the background; meanwhile the whole
        reservation counts, which errs on the side of the budget. Shielded: a cancel landing
        now does not stop the settle."""
        loop = asyncio.get_running_loop()
        try:
            alerts = await asyncio.shield(loop.run_in_executor(
                None, self.budget.settle, reservation, cost))
        except sqlite3.Error as exc:
            log.warning("could not settle reservation %d (%s); trying again in the background",
                        reservation, exc)
            late = loop.create_task(self._settle_later(reservation, cost))
            self._late.add(late)
            late.add_done_callback(self._late.discard)
            return
        self._alerts(alerts)

    async def _settle_later(self, reservation: int, cost: float | None) -> None:
        loop = asyncio.get_running_loop()
        wait, longest = SETTLE_RETRY_S
        while True:
            await asyncio.sleep(wait)  # a timer with backoff, while the ledger is unavailable
            try:
                alerts = await loop.run_in_executor(None, self.budget.settle, reservation, cost)
            except sqlite3.Error as exc:
                log.debug("settle of reservation %d deferred again: %s", reservation, exc)
                wait = min(wait * 2, longest)
                continue
            log.info("reservation %d settled", reservation)
            self._alerts(alerts)
            return

    def _alerts(self, alerts: list[tuple[str, int, float, float]]) -> None:
        for period, percent, spent, limit in alerts:
            log.warning("budget alert: %s spend $%.4f is %d%% of $%.2f", period, spent,
                        percent, limit)
            self._alert(period, percent, spent, limit)

    def _alert(self, period: str, percent: int, spent: float, limit: float) -> None:
        argv = self.budget.settings.alert_command
        if not argv:
            return
        env = dict(os.environ, KOUBOU_BUDGET_PERIOD=period, KOUBOU_BUDGET_PERCENT=str(percent),
                   KOUBOU_BUDGET_SPENT_USD=f"{spent:.6f}", KOUBOU_BUDGET_LIMIT_USD=f"{limit:.2f}",
                   KOUBOU_HOME=str(self.home))
        hooks.start(list(argv), env, "budget.alert_command")
