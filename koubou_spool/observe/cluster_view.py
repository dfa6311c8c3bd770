"""The cluster in a home's views (docs/CLUSTER.md, "What every host shows"): what a bridge
sends of its home at each heartbeat, and how `koubou status`, `workers`, `list`, `report` and
the dashboard add the other hosts to what they show of this one.

Without cluster.dsn_env none of this runs and psycopg is never imported. With it, a database
that cannot be read leaves each view its home's own figures and one sentence saying so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import date, timedelta, tzinfo
from pathlib import Path
from typing import Any

from ..config import ClusterSettings, Config
from ..errors import ClusterUnavailable, KoubouError
from ..spool import ledger
from ..spool import task as task_format
from ..spool.files import Spool
from . import gather, report

WORKER_KEYS = ("id", "liveness", "heartbeat_age_s", "craftsmen", "in_flight", "done", "failed")
USAGE_KEYS = ("tasks", "completed", "failed", "prompt_tokens", "completion_tokens", "cost_usd")
BEFORE_TODAY_KEPT_S = 3600.0  # a late ledger row of an earlier day shows within the hour


# --- what a bridge sends -----------------------------------------------------------------------

class Snapshots:
    """This home as its row in cluster_hosts holds it (queues, live workers, usage), taken by
    its bridge at each heartbeat, and the figures of each of its days and months, which
    cluster_usage keeps for reports of any period (`unwritten`: those not written yet). Today
    is summed at each heartbeat. The month's days before today are summed one by one once an
    hour, or when the day changes, and kept: they hardly change, and a month of a busy ledger
    takes a second to sum (measured: 0.5 s for 100,000 tasks). Last month's days and total are
    summed at the first look and when the month changes."""

    def __init__(self, spool: Spool, ledger_path: Path, config: Config) -> None:
        self.spool, self.ledger_path, self.config = spool, ledger_path, config
        self._earlier: tuple[date, float, dict[str, list[dict[str, Any]]]] | None = None
        self.unwritten: dict[str, list[dict[str, Any]]] = {}

    def take(self, now: float) -> dict[str, Any]:
        """The row's snapshot now."""
        found = gather.workers(self.spool, self.ledger_path, self.config, now)
        return {"heartbeat_s": self.config.spool.heartbeat_s,
                "stale_after_s": ClusterSettings.parse(self.config.cluster).lease_s,
                "queues": gather.queue_counts(self.spool),
                "workers": [{key: worker[key] for key in WORKER_KEYS if key in worker}
                            for worker in found],
                "usage": self.usage(now)}

    def written(self) -> None:
        """Say that the periods taken so far are in the database."""
        self.unwritten = {}

    def usage(self, now: float) -> dict[str, Any]:
        """Today's and this month's usage per craftsman (budget.timezone), from the ledger."""
        tz = report.timezone_of(self.config.budget)
        today = report.local_day(now, tz)
        day = report.day_period(today, tz)
        month = report.month_period(report.month_first(today), tz)
        figures = self._sum(day)
        this_month = add_usage(*self._days_before(today, tz, now).values(), figures)
        self.unwritten |= {day.label: figures, month.label: this_month}
        return {"timezone": day.timezone, "day": day.label, "month": month.label,
                "today": figures, "this_month": this_month}

    def _days_before(self, today: date, tz: tzinfo | None,
                     now: float) -> dict[str, list[dict[str, Any]]]:
        """This month's days before today, each its figures; summed again when kept an hour,
        and then also to be written (with last month's, at the first look or a new month)."""
        kept = self._earlier
        if kept is not None and kept[0] == today and now - kept[1] <= BEFORE_TODAY_KEPT_S:
            return kept[2]
        first = report.month_first(today)
        days = self._days(first, today, tz)
        if kept is None or report.month_first(kept[0]) != first:
            last_first = report.month_first(first - timedelta(days=1))
            last = self._days(last_first, first, tz)
            self.unwritten |= last | {report.month_period(last_first, tz).label:
                                      add_usage(*last.values())}
        self.unwritten |= days
        self._earlier = (today, now, days)
        return days

    def _days(self, first: date, end: date, tz: tzinfo | None) -> dict[str, list[dict[str, Any]]]:
        """The figures of each day from `first` to before `end`, by its label."""
        figures = {}
        while first < end:
            day = report.day_period(first, tz)
            figures[day.label] = self._sum(day)
            first += timedelta(days=1)
        return figures

    def _sum(self, period: report.Period) -> list[dict[str, Any]]:
        return ledger.read(self.ledger_path, ledger.report_usage, period.start, period.end,
                           default=[])


def add_usage(*parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Usage rows per craftsman summed over several periods."""
    rows: dict[str, dict[str, Any]] = {}
    for part in parts:
        for line in part:
            row = rows.setdefault(line["craftsman"], {"craftsman": line["craftsman"],
                                                      **dict.fromkeys(USAGE_KEYS, 0)})
            for key in USAGE_KEYS:
                row[key] += line.get(key) or 0
    return [rows[name] for name in sorted(rows)]


# --- reaching the cluster ----------------------------------------------------------------------

def board_for(settings: ClusterSettings) -> Any:
    """A cluster_hosts.Board on the cluster's database (psycopg is imported here, and only
    here, for the views); ClusterUnavailable in one sentence when none can be made."""
    dsn = os.environ.get(settings.dsn_env or "")
    if not dsn:
        raise ClusterUnavailable(f"cluster.dsn_env names {settings.dsn_env}, which is not set "
                                 "in this environment")
    try:
        from ..spool.cluster_hosts import Board
    except ImportError as exc:
        if (exc.name or "").startswith(__package__.split(".")[0]):
            raise  # a fault of ours, not a missing psycopg: its own traceback says where
        raise ClusterUnavailable(f"reading the cluster needs psycopg 3 ({exc})") from None
    return Board(dsn)


def unread(host: str, exc: KoubouError) -> str:
    """The one line a view adds when the cluster could not be read."""
    return f"the cluster could not be read, so this shows host {host}'s own home only: {exc}"


def budget_state(state: dict[str, Any], seen: dict[str, Any]) -> dict[str, Any]:
    """`koubou status`/`route`'s budget in a cluster: the cluster's figures against this
    home's limits (`daily_usd`, `monthly_usd` of `state`), as its workers check them, with
    this home's own spend beside them. While the cluster cannot be read the budget is
    exhausted, as a worker then makes no cloud call."""
    if "error" in seen:
        return state | {"scope": "cluster", "exhausted": True, "cluster_error": seen["error"]}
    day_spent, month_spent = seen["spent"]
    daily, monthly = state["daily_usd"], state["monthly_usd"]
    return state | {
        "scope": "cluster", "day_spent_usd": round(day_spent, 6),
        "month_spent_usd": round(month_spent, 6),
        "home_day_spent_usd": state.get("day_spent_usd"),
        "home_month_spent_usd": state.get("month_spent_usd"),
        "exhausted": (daily is not None and day_spent >= daily) or (
            monthly is not None and month_spent >= monthly)}


# --- the hosts --------------------------------------------------------------------------------

def hosts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each host's row with `stale` judged: older than its own cluster.lease_s, after which
    the cluster takes its leases over too (its bridge renews both at each heartbeat)."""
    found = []
    for row in rows:
        shot = row["snapshot"] if isinstance(row.get("snapshot"), dict) else {}
        found.append({"host": row["host"], "age_s": row["age_s"],
                      "stale": row["age_s"] > float(shot.get("stale_after_s") or 60.0),
                      "queues": shot.get("queues") or {}, "workers": shot.get("workers") or [],
                      "usage": shot.get("usage") or {}})
    return found


def host_lines(found: list[dict[str, Any]], me: str) -> list[dict[str, Any]]:
    """The Hosts section of `koubou status`: each host's queues, its row's age, stale or not,
    its live workers."""
    return [{"host": h["host"], "this_host": h["host"] == me, "age_s": h["age_s"],
             "stale": h["stale"], "queues": h["queues"],
             "workers": sum(w.get("liveness") == "alive" for w in h["workers"])}
            for h in found]


def other_workers(found: list[dict[str, Any]], me: str) -> list[dict[str, Any]]:
    """The workers of the other hosts as their last rows said, aged by the rows' age; a stale
    host's workers are `stale`: nothing is known of them since."""
    shown = []
    for h in found:
        if h["host"] == me:
            continue  # this home's own workers are read live
        for worker in h["workers"]:
            age = worker.get("heartbeat_age_s")
            shown.append({**worker, "host": h["host"], "host_stale": h["stale"],
                          "liveness": "stale" if h["stale"] else worker.get("liveness"),
                          "heartbeat_age_s": None if age is None else age + h["age_s"],
                          "craftsmen": worker.get("craftsmen") or []})
    return shown


def report_rows(found: list[dict[str, Any]], label: str,
                written: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The cluster's figures per host for a report period: the tasks each host ran (its own
    ledger's), from its row when that holds the period (today or this month in its
    budget.timezone), else from what its bridge wrote of the period (`written`, cluster_usage:
    also of a host that has no row any more)."""
    kept = {row["host"]: row for row in written}
    lines = []
    for h in found:
        use = h["usage"]
        which = {use.get("day"): "today", use.get("month"): "this_month"}.get(label)
        row = kept.pop(h["host"], None)
        figures = (use.get(which) or []) if which else (row["figures"] if row else None)
        lines.append((h["host"], h["age_s"], h["stale"], figures))
    lines += [(row["host"], row["age_s"], True, row["figures"]) for row in kept.values()]
    rows, total = [], dict.fromkeys(USAGE_KEYS, 0)
    for host, age, stale, figures in sorted(lines):
        line = {"host": host, "age_s": age, "stale": stale, "covered": figures is not None,
                "by_craftsman": figures or []}
        for key in USAGE_KEYS:
            line[key] = sum(c.get(key) or 0 for c in line["by_craftsman"]) \
                if figures is not None else None
            total[key] += line[key] or 0
        rows.append(line)
    return {"period": label, "hosts": rows, "total": total}


# --- tasks of other origins ----------------------------------------------------------------------

def merge_tasks(local: list[dict[str, Any]], remote: list[dict[str, Any]],
                limit: int) -> list[dict[str, Any]]:
    """This home's listing with the cluster's tasks of other origins, newest first. A task
    taken in here from another host is listed once, as the cluster's (it names its origin)."""
    shown = [{"id": t["id"], "state": t["state"], "time": task_format.iso(t["at"]),
              "origin": t["origin"], "host": t["host"], "craftsman": t["craftsman"]}
             for t in remote]
    theirs = {t["id"] for t in shown}
    merged = [t for t in local if t.get("id") not in theirs] + shown
    return sorted(merged, key=lambda t: t["time"], reverse=True)[:limit]


def task_status(row: dict[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    """`koubou status ID` of a cluster task submitted on another host: where it is, its
    result or error, and `fields` of the task as submitted (`task`, as the dashboard shows)."""
    found = {key: row[key] for key in ("id", "state", "origin", "host", "craftsman", "attempt",
                                       "worker_id")}
    outcome = row.get("outcome") if isinstance(row.get("outcome"), dict) else {}
    for key in ("result", "error"):
        if key in outcome:
            found[key] = outcome[key]
    found["attempts"] = []  # they are in the ledger of the host that ran it
    body = row.get("body") if isinstance(row.get("body"), dict) else {}
    found["task"] = {key: body[key] for key in fields if key in body}
    return found


def where_it_runs(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """For a task of this host forwarded to the cluster: its state there and its host."""
    if row is None:
        return None
    return {key: row[key] for key in ("state", "host", "attempt")}
