"""Budget arithmetic (README: Configuration, "Budgets"): periods in the budget's time zone, worst-case cost,
alert thresholds. Pure; the shared reservations live in the ledger (limits.py does the I/O)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..errors import ConfigError
from .pricing import Price

EXHAUSTED_ACTIONS = ("local", "defer", "fail")


@dataclass(frozen=True)
class BudgetSettings:
    """The `budget:` section."""

    daily_usd: float | None = None
    monthly_usd: float | None = None
    timezone: str | None = None  # None: the machine's local time
    alert_percent: tuple[int, ...] = ()
    alert_command: tuple[str, ...] = ()
    when_exhausted: str = "local"

    @property
    def enabled(self) -> bool:
        return self.daily_usd is not None or self.monthly_usd is not None

    @classmethod
    def parse(cls, spec: dict[str, Any]) -> BudgetSettings:
        """Check the section; ConfigError naming the key when it is wrong."""
        for key in ("daily_usd", "monthly_usd"):
            value = spec.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value < 0):
                raise ConfigError(f"budget.{key}: expected a number of USD, got {value!r}")
        action = spec.get("when_exhausted", "local")
        if action not in EXHAUSTED_ACTIONS:
            raise ConfigError(f"budget.when_exhausted: expected one of "
                              f"{', '.join(EXHAUSTED_ACTIONS)}, got {action!r}")
        zone = spec.get("timezone")
        if zone is not None:
            try:
                ZoneInfo(zone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ConfigError(f"budget.timezone: unknown time zone {zone!r}") from None
        command = spec.get("alert_command") or ()
        if not isinstance(command, (list, tuple)) or not all(isinstance(a, str) for a in command):
            raise ConfigError("budget.alert_command: expected an argv list of strings")
        return cls(daily_usd=spec.get("daily_usd"), monthly_usd=spec.get("monthly_usd"),
                   timezone=zone, alert_percent=tuple(sorted(spec.get("alert_percent") or ())),
                   alert_command=tuple(command), when_exhausted=action)

    def _local(self, ts: float) -> datetime:
        zone = ZoneInfo(self.timezone) if self.timezone else None
        return datetime.fromtimestamp(ts, zone) if zone else datetime.fromtimestamp(ts).astimezone()

    def periods(self, ts: float) -> tuple[str, str]:
        """The day (YYYY-MM-DD) and month (YYYY-MM) a moment falls in, in the budget's zone."""
        moment = self._local(ts)
        return moment.strftime("%Y-%m-%d"), moment.strftime("%Y-%m")

    def next_day_start(self, ts: float) -> float:
        """When the next budget day begins."""
        moment = self._local(ts)
        tomorrow = (moment + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        return tomorrow.timestamp()

    def next_month_start(self, ts: float) -> float:
        """When the next budget month begins."""
        moment = self._local(ts).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return (moment + timedelta(days=32)).replace(day=1).timestamp()


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """A deliberately high estimate: about 3 characters a token, plus per-message overhead."""
    chars = sum(len(json.dumps(m.get("content", ""), ensure_ascii=False)) for m in messages)
    return chars // 3 + 8 * len(messages) + 16


def worst_case(price: Price, prompt_tokens: int, max_tokens: int) -> float:
    """The most a call can cost: the whole prompt uncached and every output token used."""
    return (prompt_tokens * price.input_per_mtok + max_tokens * price.output_per_mtok) / 1e6


def reached(thresholds: tuple[int, ...], spent: float, limit: float | None) -> list[int]:
    """The alert percentages that spend has reached (each alerts once per period: the ledger
    keeps which were sent)."""
    if not limit:
        return []
    return [p for p in thresholds if spent >= limit * p / 100]
