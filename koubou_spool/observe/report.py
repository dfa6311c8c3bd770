"""Report arithmetic: periods in the budget's timezone, percentiles, grouping, budget left. No I/O.

The rows come from ledger.report_* (Unix times); `build` turns them into one plain dict that the
terminal, JSON, CSV and HTML renderings (report_render.py), `koubou top` and the MCP server share.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..errors import ConfigError, UsageError

DAY_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
MONTH_RE = re.compile(r"\d{4}-\d{2}")
STATES = ("pending", "in_progress", "completed", "failed")


@dataclass(frozen=True)
class Period:
    """A span of time [start, end) in Unix seconds, named as the user asked for it."""

    label: str
    start: float
    end: float
    timezone: str


# --- time zones and periods ----------------------------------------------------------------

def timezone_of(budget: dict[str, Any]) -> tzinfo | None:
    """The budget's zoneinfo zone; None means the machine's local time (DST-aware)."""
    name = (budget or {}).get("timezone")
    if not name:
        return None
    try:
        return ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"budget.timezone: unknown time zone {name!r}; use an IANA name "
                          "such as Asia/Tokyo or UTC") from None


def zone_name(tz: tzinfo | None) -> str:
    """A zone's name for people ('local' for the machine's time)."""
    return str(tz) if tz is not None else "local"


def day_start(day: date, tz: tzinfo | None) -> float:
    """The Unix time a calendar day begins in the zone."""
    return datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()


def local_day(ts: float, tz: tzinfo | None) -> date:
    """The calendar day a Unix time falls on in the zone."""
    return datetime.fromtimestamp(ts, tz).date()


def month_first(day: date) -> date:
    """The first day of a day's month."""
    return day.replace(day=1)


def next_month(day: date) -> date:
    """The first day of the month after a day's month."""
    return (day.replace(day=28) + timedelta(days=4)).replace(day=1)


def day_period(day: date, tz: tzinfo | None) -> Period:
    """One calendar day in the zone (23 or 25 hours on DST changes)."""
    return Period(day.isoformat(), day_start(day, tz), day_start(day + timedelta(days=1), tz),
                  zone_name(tz))


def month_period(first: date, tz: tzinfo | None) -> Period:
    """One calendar month in the zone."""
    return Period(first.strftime("%Y-%m"), day_start(first, tz),
                  day_start(next_month(first), tz), zone_name(tz))


def parse_period(day: str | None, month: str | None, since: str | None, tz: tzinfo | None,
                 now: float) -> Period:
    """The period of `--day`, `--month` or `--since` (at most one); today when none is given."""
    given = [name for name, value in (("--day", day), ("--month", month), ("--since", since))
             if value is not None]
    if len(given) > 1:
        raise UsageError(f"give one period, not {' and '.join(given)}")
    if day is not None:
        return day_period(_parse_date(day, DAY_RE, "%Y-%m-%d", "--day", "2026-11-21"), tz)
    if month is not None:
        return month_period(_parse_date(month, MONTH_RE, "%Y-%m", "--month", "2026-11"), tz)
    if since is not None:
        start = _parse_since(since, tz)
        return Period(f"since {since}", start, max(now, start), zone_name(tz))
    return day_period(local_day(now, tz), tz)


def _parse_date(text: str, pattern: re.Pattern, fmt: str, option: str, example: str) -> date:
    if text == "today" and option == "--day":
        raise UsageError("--day takes a date such as 2026-11-21; leave it out for today")
    try:
        if not pattern.fullmatch(text):
            raise ValueError(text)
        return datetime.strptime(text, fmt).date()
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected a date like {example}") from None


def _parse_since(text: str, tz: tzinfo | None) -> float:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {text!r}: expected an ISO-8601 time like 2026-11-21T09:00 "
                         "or 2026-11-21T00:00:00+09:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)  # a bare time is in the budget's zone
    return moment.timestamp()


# --- statistics ------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: list[float]) -> dict[str, Any]:
    """Count, mean, p50 and p95 of durations in seconds (None when there are none)."""
    mean = sum(values) / len(values) if values else None
    return {"count": len(values), "mean": mean, "p50": percentile(values, 50),
            "p95": percentile(values, 95)}


def _durations(tasks: list[dict], start_key: str, end_key: str) -> list[float]:
    return [t[end_key] - t[start_key] for t in tasks
            if t.get(start_key) is not None and t.get(end_key) is not None
            and t[end_key] >= t[start_key]]


def _count_by(rows: Iterable[dict], key: str, missing: str = "(none)") -> dict[str, int]:
    return dict(sorted(Counter(row.get(key) or missing for row in rows).items()))


def _sum_by(rows: Iterable[dict], key: str, value: str, missing: str = "(none)") -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    for row in rows:
        sums[row.get(key) or missing] += row.get(value) or 0
    return dict(sorted(sums.items()))


def usage_by_craftsman_model(tasks: list[dict], spend: list[dict]) -> list[dict[str, Any]]:
    """Tasks, tokens and spend per (craftsman, model) pair."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}

    def row(craftsman: str | None, model: str | None) -> dict[str, Any]:
        key = (craftsman or "(none)", model or "(none)")
        return rows.setdefault(key, {"craftsman": key[0], "model": key[1], "tasks": 0,
                                     "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0})
    for task in tasks:
        entry = row(task.get("craftsman"), task.get("model"))
        entry["tasks"] += 1
        entry["prompt_tokens"] += task.get("prompt_tokens") or 0
        entry["completion_tokens"] += task.get("completion_tokens") or 0
    for item in spend:
        row(item.get("craftsman"), item.get("model"))["cost_usd"] += item.get("cost_usd") or 0
    return [rows[key] for key in sorted(rows)]


# --- budget --------------------------------------------------------------------------------

def reference_time(period: Period, now: float) -> float:
    """The moment budget figures are taken at: now, or the end of a period already over."""
    return min(now, period.end - 0.001)


def budget_window(period: Period, now: float, tz: tzinfo | None) -> tuple[float, float]:
    """[start, end) of spend the budget figures need: the month of the reference day to its end."""
    day = local_day(reference_time(period, now), tz)
    return day_start(month_first(day), tz), day_start(day + timedelta(days=1), tz)


def _spent(spend: list[dict], start: float, end: float) -> float:
    return sum(item.get("cost_usd") or 0 for item in spend if start <= item["at"] < end)


def _limit(budget: dict[str, Any], key: str) -> float | None:
    value = budget.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _budget_line(limit: float | None, used: float, label: str) -> dict[str, Any]:
    left = None if limit is None else max(limit - used, 0.0)
    return {"period": label, "limit_usd": limit, "used_usd": used, "left_usd": left}


def budget_figures(budget: dict[str, Any], spend: list[dict], period: Period, now: float,
                   tz: tzinfo | None) -> dict[str, Any]:
    """Daily and month-to-date spend against `budget.daily_usd` / `monthly_usd`."""
    moment = reference_time(period, now)
    day = local_day(moment, tz)
    daily = _budget_line(_limit(budget or {}, "daily_usd"),
                         _spent(spend, day_start(day, tz), day_start(day + timedelta(days=1), tz)),
                         day.isoformat())
    monthly = _budget_line(_limit(budget or {}, "monthly_usd"),
                           _spent(spend, day_start(month_first(day), tz), moment + 0.001),
                           day.strftime("%Y-%m") + f" to {day.isoformat()}")
    configured = daily["limit_usd"] is not None or monthly["limit_usd"] is not None
    return {"configured": configured, "timezone": zone_name(tz), "daily": daily,
            "monthly": monthly}


def cost_per_day(spend: list[dict], start: float, end: float, tz: tzinfo | None) -> list[dict]:
    """Spend per calendar day from the day of `start` to the day before `end`, zeros included."""
    totals: dict[date, float] = defaultdict(float)
    for item in spend:
        if start <= item["at"] < end:
            totals[local_day(item["at"], tz)] += item.get("cost_usd") or 0
    days, day, last = [], local_day(start, tz), local_day(end - 0.001, tz)
    while day <= last:
        days.append({"day": day.isoformat(), "cost_usd": totals.get(day, 0.0)})
        day += timedelta(days=1)
    return days


# --- the report ----------------------------------------------------------------------------

def failures_by_kind(tasks: list[dict], rejects: list[dict]) -> dict[str, int]:
    """Failed tasks per error kind; rejected input counts as `invalid`."""
    kinds = Counter(t.get("error_kind") or "unknown" for t in tasks if t.get("status") == "failed")
    if rejects:
        kinds["invalid"] += len(rejects)
    return dict(sorted(kinds.items()))


def answers_by_craftsman(tasks: list[dict], attempt_kinds: list[dict]) -> list[dict[str, Any]]:
    """Per craftsman: answers completed, how many of them were cut off at max_tokens
    (`truncated`), and attempts whose answer was refused as `invalid_output`."""
    rows: dict[str, dict[str, Any]] = {}

    def row(craftsman: str | None) -> dict[str, Any]:
        name = craftsman or "(none)"
        return rows.setdefault(name, {"craftsman": name, "completed": 0, "truncated": 0,
                                      "invalid_output": 0})
    for task in tasks:
        if task.get("status") == "completed":
            entry = row(task.get("craftsman"))
            entry["completed"] += 1
            entry["truncated"] += 1 if task.get("truncated") else 0
    for item in attempt_kinds:
        if item.get("error_kind") == "invalid_output":
            row(item.get("craftsman"))["invalid_output"] += item.get("attempts") or 0
    return [rows[name] for name in sorted(rows)]


def endpoints(tasks: list[dict]) -> list[dict[str, Any]]:
    """Per endpoint of a craftsman with several (PRODUCT.md §12): the tasks it answered and
    their run time's p50 and p95 (from claim to outcome, so a failover's detour counts)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for task in tasks:
        if task.get("endpoint"):
            groups[(task.get("craftsman") or "(none)", task["endpoint"])].append(task)
    rows = []
    for (craftsman, endpoint), done in sorted(groups.items()):
        run = summary(_durations(done, "started_at", "finished_at"))
        rows.append({"craftsman": craftsman, "endpoint": endpoint, "tasks": len(done),
                     "run_p50_s": run["p50"], "run_p95_s": run["p95"]})
    return rows


def repositories(tasks: list[dict]) -> list[dict[str, Any]]:
    """Per repository: tasks, how many ran a verify and how many passed it, attempts, cost."""
    rows: dict[str, dict[str, Any]] = {}
    for task in tasks:
        if not task.get("repo"):
            continue
        entry = rows.setdefault(task["repo"], {"repo": task["repo"], "tasks": 0, "completed": 0,
                                               "verified": 0, "verify_passed": 0,
                                               "attempts": 0, "cost_usd": 0.0})
        entry["tasks"] += 1
        entry["completed"] += 1 if task.get("status") == "completed" else 0
        if task.get("verify_passed") is not None:
            entry["verified"] += 1
            entry["verify_passed"] += task["verify_passed"]
        entry["attempts"] += task.get("attempts") or 0
        entry["cost_usd"] += task.get("cost_usd") or 0.0
    for entry in rows.values():
        entry["verify_pass_rate"] = (entry["verify_passed"] / entry["verified"]
                                     if entry["verified"] else None)
    return [rows[name] for name in sorted(rows)]


def build(period: Period, tasks: list[dict], spend: list[dict], rejects: list[dict],
          queues: dict[str, int], budget: dict[str, Any], now: float,
          tz: tzinfo | None, attempt_kinds: list[dict] = ()) -> dict[str, Any]:
    """The whole report for a period, from ledger rows and the current queue depths."""
    in_period = [s for s in spend if period.start <= s["at"] < period.end]
    chart_start = min(period.start, budget_window(period, now, tz)[0])
    chart_end = min(period.end, max(now, chart_start + 1))
    return {
        "period": {"label": period.label, "timezone": period.timezone,
                   "start": _iso(period.start, tz), "end": _iso(period.end, tz)},
        "queues": {state: queues.get(state, 0) for state in STATES},
        "tasks": {"total": len(tasks), "by_state": _count_by(tasks, "status"),
                  "by_type": _count_by(tasks, "type"),
                  "by_craftsman": _count_by(tasks, "craftsman"),
                  "by_model": _count_by(tasks, "model")},
        "queue_wait_s": summary(_durations(tasks, "queued_at", "started_at")),
        "run_time_s": summary(_durations(tasks, "started_at", "finished_at")),
        "tokens": {"prompt": sum(t.get("prompt_tokens") or 0 for t in tasks),
                   "completion": sum(t.get("completion_tokens") or 0 for t in tasks)},
        "cost": {"total_usd": sum(s.get("cost_usd") or 0 for s in in_period),
                 "by_craftsman": _sum_by(in_period, "craftsman", "cost_usd"),
                 "by_model": _sum_by(in_period, "model", "cost_usd")},
        "usage": usage_by_craftsman_model(tasks, in_period),
        "budget": budget_figures(budget, spend, period, now, tz),
        "failures_by_kind": failures_by_kind(tasks, rejects),
        "answers": answers_by_craftsman(tasks, attempt_kinds),
        "repositories": repositories(tasks),
        "endpoints": endpoints(tasks),
        "cost_per_day": cost_per_day(spend, chart_start, chart_end, tz),
    }


def _iso(ts: float, tz: tzinfo | None) -> str:
    return datetime.fromtimestamp(ts, tz).astimezone(tz).isoformat(timespec="seconds")
