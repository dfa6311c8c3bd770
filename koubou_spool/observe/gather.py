"""Read-only gathering for reports, metrics, `koubou top` and the MCP server.

Reports read only the ledger and the spool directories (README: How it keeps its promises).
A missing or locked ledger gives empty figures, never an error: the spool still answers for the
queues.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..spool import ledger
from . import metrics, report
from ..config import Config
from ..spool import task as task_format
from ..spool.files import Spool
from .status import live_workers, queue_counts

log = logging.getLogger(__name__)


def build_report(spool: Spool, ledger_path: Path, config: Config, period: report.Period,
                 now: float) -> dict[str, Any]:
    """The report of a period (see report.build)."""
    tz = report.timezone_of(config.budget)
    window_start, window_end = report.budget_window(period, now, tz)
    spend_start, spend_end = min(period.start, window_start), max(period.end, window_end)
    return report.build(
        period,
        ledger.read(ledger_path, ledger.report_tasks, period.start, period.end, default=[]),
        ledger.read(ledger_path, ledger.report_spend, spend_start, spend_end, default=[]),
        ledger.read(ledger_path, ledger.report_rejects, period.start, period.end, default=[]),
        queue_counts(spool), config.budget, now, tz,
        ledger.read(ledger_path, ledger.report_attempt_kinds, period.start, period.end,
                    default=[]))


def report_for(spool: Spool, ledger_path: Path, config: Config, *, day: str | None = None,
               month: str | None = None, since: str | None = None) -> dict[str, Any]:
    """The report of `--day`, `--month` or `--since` (today when none is given)."""
    now = time.time()
    period = report.parse_period(day, month, since, report.timezone_of(config.budget), now)
    return build_report(spool, ledger_path, config, period, now)


def today_budget(ledger_path: Path, config: Config, now: float) -> dict[str, Any]:
    """Today's and month-to-date spend against the budget."""
    tz = report.timezone_of(config.budget)
    period = report.day_period(report.local_day(now, tz), tz)
    start, end = report.budget_window(period, now, tz)
    spend = ledger.read(ledger_path, ledger.report_spend, start, end, default=[])
    return report.budget_figures(config.budget, spend, period, now, tz)


def workers(spool: Spool, ledger_path: Path, config: Config, now: float) -> list[dict[str, Any]]:
    """Workers with a lock file, their liveness, heartbeat age and counters."""
    found = live_workers(spool, ledger_path, config.spool.lease_s)
    for worker in found:
        beat = worker.get("heartbeat_at")
        worker["heartbeat_age_s"] = None if beat is None else max(now - beat, 0.0)
        worker["craftsmen"] = [c for c in (worker.get("craftsmen") or "").split(",") if c]
        worker["endpoints"] = _json_of(worker.get("endpoints"), dict)
        worker["cluster_slots"] = _json_of(worker.get("cluster_slots"), list)
    return found


def _json_of(shown: str | None, kind: type) -> Any:
    """What a worker's last heartbeat wrote as JSON (its endpoints, {craftsman: [endpoint,
    ...]}; its cluster slots, [server, ...]); empty when it wrote none or nothing readable."""
    try:
        value = json.loads(shown) if shown else kind()
    except ValueError:
        return kind()
    return value if isinstance(value, kind) else kind()


def endpoint_figures(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each endpoint over the live workers: requests, failures and in flight summed, cooling
    when any worker saw it resting at its last heartbeat (the rest is the home's)."""
    figures: dict[tuple[str, str], dict[str, Any]] = {}
    for worker in workers:
        if worker.get("liveness") != "alive":
            continue
        for craftsman, shown in (worker.get("endpoints") or {}).items():
            for one in shown:
                row = figures.setdefault((craftsman, one["base_url"]), {
                    "craftsman": craftsman, "endpoint": one["base_url"], "requests": 0,
                    "failures": 0, "in_flight": 0, "cooling": False})
                for key in ("requests", "failures", "in_flight"):
                    row[key] += one.get(key) or 0
                row["cooling"] = row["cooling"] or bool(one.get("cooling"))
    return [figures[key] for key in sorted(figures)]


def in_flight_by_craftsman(spool: Spool, ledger_path: Path) -> dict[str, int]:
    """Tasks claimed right now per craftsman: open attempts whose claim file still exists."""
    claimed = {task_format.id_from_name(match["name"]) for _, match in spool.claims()
               if not match["fin"]}
    open_attempts = ledger.read(ledger_path, ledger.report_open_attempts, default=[])
    counts = Counter(a["craftsman"] or "(none)" for a in open_attempts if a["task_id"] in claimed)
    unknown = len(claimed) - sum(counts.values())
    if unknown > 0:  # claimed but not yet (or no longer) in the ledger
        counts["(unknown)"] += unknown
    return dict(sorted(counts.items()))


def task_totals(ledger_path: Path) -> list[dict[str, Any]]:
    """All-time task, token and cost totals by craftsman, model and outcome."""
    return ledger.read(ledger_path, ledger.report_task_totals, default=[])


def metrics_text(spool: Spool, ledger_path: Path, config: Config, now: float) -> str:
    """The Prometheus exposition of the home right now."""
    found = workers(spool, ledger_path, config, now)
    return metrics.render(metrics.families(
        queue_counts(spool), in_flight_by_craftsman(spool, ledger_path), task_totals(ledger_path),
        today_budget(ledger_path, config, now), found, endpoint_figures(found)))


def write_atomic(path: Path, text: str) -> None:
    """Replace a file whole (tmp in the same directory, then rename): readers never see half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
