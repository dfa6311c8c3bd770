"""`koubou report`: figures against a hand-computed ledger, periods in the budget's timezone,
JSON/CSV output, and the HTML page rendered by headless Chromium."""

from __future__ import annotations

import csv
import io
import json
import shutil
import struct
import subprocess
import zlib
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import missing, write_config
from koubou_spool.spool import home as home_module
from koubou_spool.observe import gather as observe, report
from koubou_spool.cli.koubou import cli
from koubou_spool.spool.ledger import LedgerWriter
from koubou_spool.spool.files import Spool
from koubou_spool.spool.task import iso

TOKYO_BUDGET = {"daily_usd": 10, "monthly_usd": 100, "timezone": "Asia/Tokyo"}


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def completed(task_id: str, queued: float, wait: float, run: float, craftsman: str, model: str,
              tokens: tuple[int, int], cost: float, type_: str = "general") -> dict:
    return {"id": task_id, "content": "x", "type": type_, "status": "completed", "result": {
        "content": "ok", "craftsman": craftsman, "model": model, "attempts": 1,
        "usage": {"prompt_tokens": tokens[0], "completion_tokens": tokens[1],
                  "total_tokens": sum(tokens)}, "cost_usd": cost,
        "queued_at": iso(queued), "started_at": iso(queued + wait),
        "finished_at": iso(queued + wait + run), "duration_s": run}}


# 2026-11-21 in Tokyo (UTC+9) is [2026-11-20T15:00Z, 2026-11-21T15:00Z).
DAY0 = utc("2026-11-20T16:00:00")
RECORDS = [
    completed("t1", DAY0, 1, 2, "local", "fake-model", (10, 20), 0.0, "code_review"),
    completed("t2", DAY0 + 100, 2, 4, "cloud", "gpt-5", (100, 200), 0.5, "code_review"),
    completed("t3", DAY0 + 200, 3, 6, "cloud", "gpt-5", (50, 50), 0.25, "analysis"),
    completed("t4", DAY0 + 300, 10, 1, "local", "fake-model", (5, 5), 0.0),
    {"id": "t5", "content": "x", "status": "failed", "submitted_at": iso(DAY0 + 400),
     "error": {"kind": "backend", "message": "HTTP 400", "attempts": 1, "at": iso(DAY0 + 401)}},
    # 2026-11-01 00:30 in Tokyo, but still October in UTC: the month boundary.
    completed("nov1", utc("2026-10-31T15:29:00"), 30, 30, "cloud", "gpt-5", (1, 1), 2.0),
    # 2026-10-31 23:30 in Tokyo.
    completed("oct31", utc("2026-10-31T14:29:00"), 30, 30, "cloud", "gpt-5", (1, 1), 5.0),
    # 2026-11-22 00:10 in Tokyo: the day after.
    completed("nov22", utc("2026-11-21T15:09:00"), 30, 30, "cloud", "gpt-5", (1, 1), 1.0),
]


def build_ledger(home: Path) -> Path:
    """The records above, t2 with a retried attempt that cost money too, and one rejected file."""
    path = home / "db" / "koubou.db"
    writer = LedgerWriter(path)
    for record in RECORDS:
        if record["id"] == "t2":
            continue
        writer.task_finished(record)
    t2 = RECORDS[1]
    writer.attempt_started("t2", 1, "w1", "cloud", "gpt-5", DAY0 + 102)
    writer.attempt_finished("t2", 1, "retry", finished_at=DAY0 + 103, cost_usd=0.1)
    writer.attempt_started("t2", 2, "w1", "cloud", "gpt-5", DAY0 + 104)
    writer.attempt_finished("t2", 2, "completed", finished_at=DAY0 + 106, cost_usd=0.5, record=t2)
    writer.rejected("junk.json", "not valid JSON", DAY0 + 500)
    writer.close()
    return path


@pytest.fixture
def report_home(isolated_env: Path) -> Path:
    home_module.init(isolated_env)
    write_config(isolated_env, budget=TOKYO_BUDGET)
    build_ledger(isolated_env)
    return isolated_env


def report_of(home: Path, now: float, budget: dict = TOKYO_BUDGET, **period: str) -> dict:
    config = home_module.load_config(home)
    config = type(config)(**{**vars(config), "budget": budget})
    tz = report.timezone_of(budget)
    chosen = report.parse_period(period.get("day"), period.get("month"), period.get("since"), tz, now)
    return observe.build_report(Spool.open(home), home / "db" / "koubou.db", config, chosen, now)


def test_percentile_interpolates_between_ranks() -> None:
    assert report.percentile([], 50) is None
    assert report.percentile([7.0], 95) == 7.0
    assert report.percentile([1, 2, 3, 10], 50) == 2.5
    assert report.percentile([10, 3, 2, 1], 95) == pytest.approx(8.95)
    assert report.percentile(list(range(1, 101)), 95) == pytest.approx(95.05)


def test_day_report_matches_hand_computed_figures(report_home: Path) -> None:
    figures = report_of(report_home, now=utc("2026-11-30T00:00:00"), day="2026-11-21")
    assert figures["period"]["start"] == "2026-11-21T00:00:00+09:00"
    tasks = figures["tasks"]
    assert tasks["total"] == 5
    assert tasks["by_state"] == {"completed": 4, "failed": 1}
    assert tasks["by_type"] == {"analysis": 1, "code_review": 2, "general": 2}
    assert tasks["by_craftsman"] == {"(none)": 1, "cloud": 2, "local": 2}
    assert tasks["by_model"] == {"(none)": 1, "fake-model": 2, "gpt-5": 2}
    # waits 1, 2, 3, 10; runs 2, 4, 6, 1 (the failed task never started)
    assert figures["queue_wait_s"] == pytest.approx({"count": 4, "mean": 4.0, "p50": 2.5,
                                                     "p95": 8.95})
    assert figures["run_time_s"] == pytest.approx({"count": 4, "mean": 3.25, "p50": 3.0,
                                                   "p95": 5.7})
    assert figures["tokens"] == {"prompt": 165, "completion": 275}
    # spend: t2's two attempts (0.1 + 0.5), t3 without attempt rows (0.25)
    assert figures["cost"]["total_usd"] == pytest.approx(0.85)
    assert figures["cost"]["by_craftsman"] == pytest.approx({"cloud": 0.85, "local": 0.0})
    usage = {(u["craftsman"], u["model"]): u for u in figures["usage"]}
    assert usage[("cloud", "gpt-5")]["tasks"] == 2
    assert usage[("cloud", "gpt-5")]["completion_tokens"] == 250
    assert figures["failures_by_kind"] == {"backend": 1, "invalid": 1}


def test_budget_is_used_day_and_month_to_date_in_the_budget_timezone(report_home: Path) -> None:
    budget = report_of(report_home, now=utc("2026-11-30T00:00:00"), day="2026-11-21")["budget"]
    assert budget["configured"] and budget["timezone"] == "Asia/Tokyo"
    assert budget["daily"]["used_usd"] == pytest.approx(0.85)
    assert budget["daily"]["left_usd"] == pytest.approx(9.15)
    # November 1-21 in Tokyo: nov1 (2.0) and the day's 0.85; not oct31, not nov22
    assert budget["monthly"]["used_usd"] == pytest.approx(2.85)
    assert budget["monthly"]["left_usd"] == pytest.approx(97.15)
    # No period: today in Tokyo, with the month to date.
    today = report_of(report_home, now=utc("2026-11-21T14:00:00"))
    assert today["period"]["label"] == "2026-11-21"
    assert today["budget"]["monthly"]["used_usd"] == pytest.approx(2.85)


def test_month_boundaries_follow_the_configured_timezone(report_home: Path) -> None:
    now = utc("2026-12-15T00:00:00")
    tokyo_nov = report_of(report_home, now, month="2026-11")
    assert tokyo_nov["tasks"]["total"] == 7  # the 5 of the 21st, nov1, nov22
    assert report_of(report_home, now, month="2026-10")["tasks"]["total"] == 1
    utc_budget = {**TOKYO_BUDGET, "timezone": "UTC"}
    assert report_of(report_home, now, utc_budget, month="2026-10")["tasks"]["total"] == 2
    assert report_of(report_home, now, utc_budget, month="2026-11")["tasks"]["total"] == 6
    days = tokyo_nov["cost_per_day"]
    assert len(days) == 30 and days[0] == {"day": "2026-11-01", "cost_usd": 2.0}


def test_dst_day_is_23_hours_long() -> None:
    tz = report.timezone_of({"timezone": "Europe/Berlin"})
    period = report.day_period(date(2026, 3, 29), tz)
    assert period.end - period.start == 23 * 3600


def test_no_budget_configured_is_said(report_home: Path) -> None:
    figures = report_of(report_home, now=utc("2026-11-30T00:00:00"), budget={}, day="2026-11-21")
    assert figures["budget"]["configured"] is False
    assert figures["budget"]["daily"]["left_usd"] is None


def test_cli_report_json_and_csv_parse(report_home: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["report", "--day", "2026-11-21", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["tasks"]["total"] == 5 and figures["queue_wait_s"]["p50"] == 2.5
    result = runner.invoke(cli, ["report", "--day", "2026-11-21", "--csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert list(rows[0]) == ["section", "name", "metric", "value"]
    picked = {(r["section"], r["name"], r["metric"]): r["value"] for r in rows}
    assert float(picked[("queue_wait_s", "all", "p95")]) == pytest.approx(8.95)
    assert picked[("tasks_by_state", "failed", "tasks")] == "1"
    assert float(picked[("usage", "cloud/gpt-5", "cost_usd")]) == pytest.approx(0.85)
    text = runner.invoke(cli, ["report", "--day", "2026-11-21"])
    assert text.exit_code == 0 and "queue wait" in text.output and "p95" in text.output


def test_cli_report_rejects_two_periods_and_bad_dates(report_home: Path) -> None:
    runner = CliRunner()
    both = runner.invoke(cli, ["report", "--day", "2026-11-21", "--month", "2026-11"])
    assert both.exit_code == 2 and "one period" in both.output
    bad = runner.invoke(cli, ["report", "--month", "2026-13"])
    assert bad.exit_code == 2 and "2026-11" in bad.output


# --- the HTML page in headless Chromium ---------------------------------------------------

def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and unfiltered rows of an 8-bit RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color = header[:4]
    assert depth == 8 and color in (2, 6), f"unexpected PNG format {depth}/{color}"
    bpp = 3 if color == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        start = y * (stride + 1)
        kind, row = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            a = row[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                row[i] = (row[i] + a) & 255
            elif kind == 2:
                row[i] = (row[i] + b) & 255
            elif kind == 3:
                row[i] = (row[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(row))
        prev = row
    return width, height, [bytes(r[i:i + 3]) for r in rows for i in range(0, stride, bpp)]


def test_html_report_renders_in_headless_chromium(report_home: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or missing("Chromium", "sudo apt-get install chromium")
    page = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["report", "--month", "2026-11", "--html", str(page)])
    assert result.exit_code == 0, result.output
    markup = page.read_text()
    assert "<svg" in markup and "<script" not in markup and "href=" not in markup
    assert "src=" not in markup and "Cost per day" in markup
    shot = tmp_path / "shot.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=800,600", f"--screenshot={shot}", page.as_uri()],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=90, check=True)
    width, height, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == (800, 600)
    colours = set(pixels)
    assert len(colours) > 20, f"screenshot looks blank: {len(colours)} colours"
    bar_blue = bytes.fromhex("3b6ea5")
    assert sum(1 for p in pixels if p == bar_blue) > 500, "no chart bars on the screenshot"


def test_answers_count_truncated_and_invalid_outputs_per_craftsman() -> None:
    tasks = [{"craftsman": "local", "status": "completed", "truncated": 1},
             {"craftsman": "local", "status": "completed", "truncated": 0},
             {"craftsman": "cloud", "status": "completed", "truncated": None},
             {"craftsman": "cloud", "status": "failed", "error_kind": "invalid_output"}]
    kinds = [{"craftsman": "cloud", "error_kind": "invalid_output", "attempts": 3},
             {"craftsman": "local", "error_kind": "timeout", "attempts": 1}]
    assert report.answers_by_craftsman(tasks, kinds) == [
        {"craftsman": "cloud", "completed": 1, "truncated": 0, "invalid_output": 3},
        {"craftsman": "local", "completed": 2, "truncated": 1, "invalid_output": 0}]
