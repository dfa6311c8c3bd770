"""`koubou ledger rebuild`: the ledger deleted and rebuilt from outcome files, reports unchanged."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from conftest import Workers, submit, wait_file, wait_outcomes, write_config
from fake_openai import FakeOpenAI
from koubou_spool import config as config_module
from koubou_spool.spool import ledger
from koubou_spool.ops import rebuild
from koubou_spool.spool import task as task_format
from koubou_spool.craft.budget import BudgetSettings
from koubou_spool.cli.koubou import cli
from koubou_spool.spool.files import Spool

PRICED = {"price": {"input_per_mtok": 1.5, "output_per_mtok": 6.0}}


def report(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["report", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def rounded(value: Any) -> Any:
    """Figures with floats to 9 places: an outcome file keeps the cost to 8 decimals."""
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def finish_some_tasks(home: Path, spool: Spool, fake_openai: FakeOpenAI,
                      workers: Workers) -> list[str]:
    """Completed (priced, two craftsmen), failed and rejected outcomes from a real worker."""
    write_config(home, fake_openai.base_url, craftsmen={
        "local": {"backend": "openai", "base_url": fake_openai.base_url, "model": "fake-model",
                  "local": True, "retries": 0, **PRICED},
        "echo": {"backend": "echo"}})
    proc = workers.start(home)
    ids = [submit(spool, content=f"task {n}", type="code_review" if n % 2 else "general")
           for n in range(4)]
    ids.append(submit(spool, content="echoed", craftsman="echo"))
    wait_outcomes(spool, ids)
    fake_openai.reject_next = 1  # a 400: fails at once, on its first attempt
    doomed = submit(spool, content="too long")
    (spool.pending / "garbage.json").write_bytes(b"{not json")
    wait_outcomes(spool, [doomed])
    wait_file(spool.failed, "garbage.json.error.json")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    return ids + [doomed]


def test_ledger_deleted_and_rebuilt_gives_the_same_reports(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    ids = finish_some_tasks(home, spool, fake_openai, workers)
    today, month = report(), report("--month", task_format.iso(0)[:7])
    this_month = report("--month", today["period"]["label"][:7])
    assert today["tasks"]["total"] == len(ids) and today["cost"]["total_usd"] > 0
    assert today["failures_by_kind"] == {"backend": 1, "invalid": 1}
    for suffix in ("", "-wal", "-shm"):
        Path(f"{home}/db/koubou.db{suffix}").unlink(missing_ok=True)
    result = CliRunner().invoke(cli, ["ledger", "rebuild", "--json"])
    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout)
    assert (done["tasks"], done["attempts"], done["rejects"]) == (len(ids), len(ids), 1)
    assert done["old"] is None
    assert rounded(report()) == rounded(today)
    assert rounded(report("--month", today["period"]["label"][:7])) == rounded(this_month)
    assert rounded(report("--month", task_format.iso(0)[:7])) == rounded(month)
    conn = sqlite3.connect(home / "db" / "koubou.db")
    usage = spool.outcome(ids[0])["result"]["usage"]
    assert conn.execute("SELECT attempt, outcome, craftsman, total_tokens FROM attempts"
                        " WHERE task_id = ?", (ids[0],)).fetchone() == (
        1, "completed", "local", usage["total_tokens"])


def test_rebuild_moves_the_old_ledger_aside(home: Path, spool: Spool) -> None:
    assert CliRunner().invoke(cli, ["init"]).exit_code == 0
    conn = sqlite3.connect(home / "db" / "koubou.db")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("INSERT INTO tasks (id) VALUES ('only-in-the-old-one')")
    conn.commit()  # in the WAL, which must move with the database
    result = CliRunner().invoke(cli, ["ledger", "rebuild"])
    conn.close()
    assert result.exit_code == 0, result.output
    [old_path] = [n for n in os.listdir(home / "db") if n.startswith("koubou.db.old-")
                  and not n.endswith(("-wal", "-shm"))]
    assert result.stdout.rstrip().endswith(f"the old ledger is {home / 'db' / old_path}")
    old = sqlite3.connect(home / "db" / old_path)
    assert old.execute("SELECT id FROM tasks").fetchall() == [("only-in-the-old-one",)]
    new = sqlite3.connect(home / "db" / "koubou.db")
    assert new.execute("SELECT COUNT(*) FROM tasks").fetchone() == (0,)


def test_rebuild_refuses_while_a_worker_runs(home: Path, spool: Spool, workers: Workers) -> None:
    workers.start(home)
    probe = submit(spool, craftsman="echo")
    wait_outcomes(spool, [probe])
    result = CliRunner().invoke(cli, ["ledger", "rebuild"])
    assert result.exit_code == 4
    assert "workers are running" in result.stderr and "stop them first" in result.stderr
    assert not [n for n in os.listdir(home / "db") if ".old-" in n]


def test_budgets_keep_counting_cloud_spend_after_a_rebuild(tmp_path: Path) -> None:
    config = config_module.parse({"craftsmen": {
        "cloud": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
        "box": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                "local": True}}, "budget": {"daily_usd": 5, "timezone": "UTC"}})
    at = 1_790_000_000.0
    attempts = [{"task_id": "a", "attempt": 1, "craftsman": "cloud", "cost_usd": 0.25,
                 "finished_at": at},
                {"task_id": "b", "attempt": 2, "craftsman": "box", "cost_usd": 0.5,
                 "finished_at": at},
                {"task_id": "c", "attempt": 1, "craftsman": "cloud", "cost_usd": None,
                 "finished_at": at}]
    conn = ledger.open_ledger(tmp_path / "koubou.db")
    ledger.rebuild_insert(conn, [], [], [], rebuild.budget_spend(attempts, config))
    day, month = BudgetSettings.parse(config.budget).periods(at)
    assert ledger.spent(conn, day, month) == (0.25, 0.25)
