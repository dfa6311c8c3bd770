"""Spending for the worker: reserve a call's worst case before it, settle the real cost after,
wait for room in a rate window, and send budget alerts. The shared state is limits.Budget (the
ledger); this is its asynchronous face for the event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from . import budget as budget_module
from .backends import BackendError, Request
from ..config import Craftsman
from ..errors import KoubouError
from .. import hooks
from .limits import Budget
from .pricing import price_of

log = logging.getLogger(__name__)


class BudgetExhausted(KoubouError):
    """A cloud call's worst case does not fit what the budget has left."""


class Spending:
    """Reservations and alerts for one worker."""

    def __init__(self, budget: Budget, home: Path) -> None:
        self.budget = budget
        self.home = home

    async def reserve(self, craftsman: Craftsman, task_id: str, attempt: int,
                      request: Request) -> int | None:
        """Reserve the worst-case cost and a place in the rate window; None when not needed."""
        if not self.budget.needed(craftsman):
            return None
        tokens = budget_module.estimate_prompt_tokens(request.messages)
        amount = self._worst_case(craftsman, request, tokens)
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + request.timeout_s
        while True:
            verdict, value = await loop.run_in_executor(
                None, self.budget.reserve, task_id, attempt, craftsman, amount,
                tokens + request.max_tokens)
            if verdict == "ok":
                return int(value)
            if verdict == "budget":
                raise BudgetExhausted(f"{craftsman.name} would need up to ${amount:.4f}, more "
                                      "than the budget has left")
            if time.monotonic() + value > deadline:
                raise BackendError(f"{craftsman.name} is at its max_rpm/max_tpm for longer than "
                                   "the attempt's timeout", kind="timeout", retryable=True)
            await asyncio.sleep(value)  # a timer until the rate window has room, not a poll

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
        """Replace a reservation by the real cost (None: unknown, the reservation stands)."""
        loop = asyncio.get_running_loop()
        for period, percent, spent, limit in await loop.run_in_executor(
                None, self.budget.settle, reservation, cost):
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
