"""Several craftsmen through real workers: secrets stay local, budgets hold, CLI agents run."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path
from collections.abc import Iterator

import pytest
import yaml

from conftest import Workers, assert_no_claims, finished_attempt, log_of, submit, wait_outcomes
from fake_openai import FakeOpenAI
from koubou_spool.spool import ledger
from koubou_spool.spool import task as task_format
from koubou_spool.spool.files import Spool

AGENT = str(Path(__file__).parent / "fake_agent.py")
PRICE = 100.0  # USD per million tokens, in and out: each token costs 0.0001


@pytest.fixture
def cloud() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI(model="gpt-5").start()
    yield fake
    fake.stop()


def configure(home: Path, local: FakeOpenAI, cloud: FakeOpenAI, **extra: object) -> None:
    config = {
        "craftsmen": {
            "local": {"backend": "openai", "base_url": local.base_url, "model": "fake-model",
                      "local": True, "max_concurrent": 8, "retries": 0},
            "cloud": {"backend": "openai", "base_url": cloud.base_url, "model": "gpt-5",
                      "api_key_env": "KOUBOU_TEST_CLOUD_KEY", "max_concurrent": 4,
                      "max_tokens": 20, "retries": 0,
                      "price": {"input_per_mtok": PRICE, "output_per_mtok": PRICE}},
            "claude": {"backend": "command", "argv": [sys.executable, AGENT, "claude"],
                       "output": "claude-json", "model": "claude-sonnet"},
            "codex": {"backend": "command", "argv": [sys.executable, AGENT, "codex"],
                      "output": "codex-jsonl", "model": "gpt-5-codex",
                      "price": {"input_per_mtok": 1.0, "output_per_mtok": 10.0,
                                "cache_read_per_mtok": 0.1}},
            "echo": {"backend": "echo", "max_concurrent": 8},
        },
        "routing": {"rules": [{"if": "confidential", "then": "local"},
                              {"if": {"difficulty": "high"}, "then": "cloud"},
                              {"then": "local"}]},
        "attach": {"allowed_dirs": [str(home.parent / "repo")]},
        "spool": {"heartbeat_s": 1, "grace_s": 0.5, "max_attempts": 1},
    }
    config.update(extra)
    (home / "config" / "koubou.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def cloud_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KOUBOU_TEST_CLOUD_KEY", "sk-test-not-a-real-key")
    return "sk-test-not-a-real-key"


def secret_tasks(repo: Path) -> list[dict]:
    """Confidential tasks in every shape §4.7 names, half of them asking for the cloud."""
    repo.mkdir(exist_ok=True)
    shapes = []
    for i in range(100):
        marker = f"MARK{i:03d}"
        kind = i % 6
        task = {"content": f"Design the distributed architecture {marker}", "difficulty": "high"}
        if kind == 0:
            task["content"] += f" password: hunter{i}"
        elif kind == 1:
            task["system"] = f"api_key = sk-{marker}"
        elif kind == 2:
            task["context"] = {"deploy": f"-----BEGIN RSA PRIVATE KEY-----{marker}"}
        elif kind == 3:
            path = repo / f"settings{i}.env"
            path.write_text(f"SECRET={marker}\nsecret: yes\n")
            task["files"] = [str(path)]
        elif kind == 4:
            task["sensitivity"] = "confidential"
        else:
            task = {"custom_id": f"batch-{i}", "body": {"messages": [
                {"role": "user", "content": f"architecture {marker}"},
                {"role": "user", "content": f"token = {marker}"}]}}
        if i % 2 and "body" not in task:
            task["craftsman"] = "cloud"
        shapes.append(task)
    return shapes


def test_confidential_tasks_never_reach_the_cloud(home: Path, spool: Spool, fake_openai: FakeOpenAI,
                                                  cloud: FakeOpenAI, workers: Workers,
                                                  cloud_key: str) -> None:
    configure(home, fake_openai, cloud)
    procs = [workers.start(home), workers.start(home)]
    secret = [task_format.validate(t) for t in secret_tasks(home.parent / "repo")]
    public = [task_format.validate({"content": f"design the distributed architecture {i}"})
              for i in range(20)]
    spool.submit(secret + public)
    outcomes = wait_outcomes(spool, [t.id for t in secret + public], timeout=120)
    assert all(o["status"] == "completed" for o in outcomes.values()), [
        o.get("error") for o in outcomes.values() if o["status"] != "completed"]
    assert {outcomes[t.id]["result"]["craftsman"] for t in secret} == {"local"}
    assert {outcomes[t.id]["result"]["craftsman"] for t in public} == {"cloud"}
    cloud_log = json.dumps(cloud.requests)
    assert "MARK" not in cloud_log and "hunter" not in cloud_log
    assert len(cloud.completions()) == 20
    assert {r["authorization"] for r in cloud.requests} == {f"Bearer {cloud_key}"}
    assert not any(r["authorization"] and cloud_key in r["authorization"]
                   for r in fake_openai.requests)  # the cloud key only goes to its endpoint
    for proc in procs:  # logs name tasks and patterns, never keys or confidential text
        assert cloud_key not in log_of(proc) and "MARK" not in log_of(proc)


def test_spend_never_passes_the_budget_with_four_workers_racing(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, cloud: FakeOpenAI, workers: Workers,
        cloud_key: str) -> None:
    budget = 0.03
    configure(home, fake_openai, cloud, budget={"daily_usd": budget, "monthly_usd": 1,
                                                 "when_exhausted": "local",
                                                 "alert_percent": [25, 80]})
    for _ in range(4):
        workers.start(home)
    tasks = [task_format.validate({"content": f"design a distributed architecture {i}"})
             for i in range(200)]
    spool.submit(tasks)
    outcomes = wait_outcomes(spool, [t.id for t in tasks], timeout=120)
    assert all(o["status"] == "completed" for o in outcomes.values())
    spent = sum(p * PRICE + c * PRICE for p, c in cloud.usage) / 1e6
    on_cloud = [o for o in outcomes.values() if o["result"]["craftsman"] == "cloud"]
    assert 0 < len(on_cloud) < 200 and spent <= budget
    assert len(on_cloud) == len(cloud.usage)
    recorded = sum(o["result"]["cost_usd"] for o in on_cloud)
    assert recorded == pytest.approx(spent)
    conn = sqlite3.connect(home / "db" / "koubou.db")
    alerts = {row[0] for row in conn.execute("SELECT threshold FROM budget_alerts WHERE "
                                            "period LIKE '____-__-__'")}
    # Spend stops short of the budget by what the calls in flight reserve (max_tokens each):
    # 48-77 % of it in eight runs measured, so the first threshold is set where it is passed.
    assert alerts == {p for p in (25, 80) if spent >= budget * p / 100} and 25 in alerts


@pytest.mark.parametrize("when_exhausted", ["local", "defer"])
def test_an_exhausted_budget_is_lifted_when_settled_costs_leave_room(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, cloud: FakeOpenAI, workers: Workers,
        cloud_key: str, when_exhausted: str) -> None:
    # A call's worst case is $0.0052 (32 prompt tokens estimated + 20 out); it really costs
    # ~$0.001. With $0.008 a day, a second call cannot reserve while the first is in flight.
    configure(home, fake_openai, cloud, budget={"daily_usd": 0.008,
                                                 "when_exhausted": when_exhausted})
    cloud.latency_s = 3  # the first call holds its reservation while the second is judged
    proc = workers.start(home)
    first = submit(spool, content="design the architecture")
    assert cloud.request_seen.wait(10)
    second = submit(spool, content="design the architecture")  # refused: budget exhausted
    if when_exhausted == "local":
        assert wait_outcomes(spool, [second])[second]["result"]["craftsman"] == "local"
    assert wait_outcomes(spool, [first])[first]["result"]["craftsman"] == "cloud"
    deadline = time.monotonic() + 10  # the next heartbeat (1 s) finds room again
    while "the budget has room again" not in log_of(proc):
        assert time.monotonic() < deadline, "the exhausted mark was not lifted"
        threading.Event().wait(0.1)
    cloud.latency_s = 0
    later = submit(spool, content="design the architecture") if when_exhausted == "local" \
        else second  # the deferred task, judged again without waiting for tomorrow
    assert wait_outcomes(spool, [later])[later]["result"]["craftsman"] == "cloud"
    assert sum(p + c for p, c in cloud.usage) * PRICE / 1e6 <= 0.008


def test_budget_exhausted_with_fail_fails_cloud_tasks_as_budget(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, cloud: FakeOpenAI, workers: Workers,
        cloud_key: str) -> None:
    configure(home, fake_openai, cloud, budget={"daily_usd": 0.0001, "when_exhausted": "fail"})
    workers.start(home)
    task_id = submit(spool, content="design the architecture")
    error = wait_outcomes(spool, [task_id])[task_id]["error"]
    assert error["kind"] == "budget" and cloud.completions() == []


def spend_today(home: Path, usd: float) -> None:
    """A settled call of `usd` in today's budget period, as an earlier worker left it."""
    from koubou_spool.craft.budget import BudgetSettings
    day, month = BudgetSettings().periods(time.time())
    conn = ledger.open_ledger(home / "db" / "koubou.db")
    conn.execute("INSERT INTO reservations (task_id, attempt, craftsman, day, month, "
                 "reserved_usd, cost_usd, settled, at) VALUES ('earlier', 1, 'cloud', ?, ?, ?, ?,"
                 " 1, ?)", (day, month, usd, usd, time.time()))
    conn.close()


def test_an_exhausted_budget_is_the_homes_when_workers_are_split_per_craftsman(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, cloud: FakeOpenAI, workers: Workers,
        cloud_key: str) -> None:
    # The README's systemd layout: koubou-worker@cloud and koubou-worker@local. The cloud
    # worker finds the budget spent; the local worker must see that too, or the task that
    # routes to the cloud is left in pending/ by both.
    configure(home, fake_openai, cloud, budget={"daily_usd": 0.008, "when_exhausted": "local"})
    spend_today(home, 0.0079)  # a call's worst case is $0.0052: it does not fit what is left
    workers.start(home, "--craftsman", "cloud")
    workers.start(home, "--craftsman", "local")
    task_id = submit(spool, content="design the architecture")  # high: routes to the cloud
    outcome = wait_outcomes(spool, [task_id], timeout=20)[task_id]
    assert outcome["result"]["craftsman"] == "local" and cloud.completions() == []
    later = submit(spool, content="design the architecture")  # judged with the mark up
    assert wait_outcomes(spool, [later], timeout=20)[later]["result"]["craftsman"] == "local"


def test_a_missing_api_key_fails_that_craftsmans_tasks_not_the_worker(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, cloud: FakeOpenAI,
        workers: Workers) -> None:
    configure(home, fake_openai, cloud)
    proc = workers.start(home)
    failed = submit(spool, content="design the architecture")
    error = wait_outcomes(spool, [failed])[failed]["error"]
    assert error["kind"] == "backend" and "KOUBOU_TEST_CLOUD_KEY" in error["message"]
    fine = submit(spool, content="hello")
    assert wait_outcomes(spool, [fine])[fine]["status"] == "completed"
    assert proc.poll() is None and "Traceback" not in log_of(proc)


def test_claude_and_codex_agents_record_tokens_and_cost(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, cloud: FakeOpenAI,
        workers: Workers) -> None:
    configure(home, fake_openai, cloud)
    workers.start(home)
    claude = submit(spool, content="write tests", craftsman="claude")
    codex = submit(spool, content="fix the bug", craftsman="codex")
    outcomes = wait_outcomes(spool, [claude, codex])
    by_claude = outcomes[claude]["result"]
    assert by_claude["content"].startswith("claude: ") and "write tests" in by_claude["content"]
    assert by_claude["cost_usd"] == 0.0123
    assert by_claude["usage"]["prompt_tokens"] == 15 and by_claude["usage"]["completion_tokens"] == 7
    assert by_claude["session_id"] == "0b7c-session" and by_claude["num_turns"] == 3
    by_codex = outcomes[codex]["result"]
    assert by_codex["content"].startswith("codex: ")
    assert by_codex["cost_usd"] == pytest.approx((600 * 1.0 + 400 * 0.1 + 200 * 10.0) / 1e6)
    # The ledger records an attempt once its outcome is durable: a moment after the file.
    assert finished_attempt(home, claude, "craftsman, cost_usd") == ("claude", 0.0123)
    assert finished_attempt(home, codex, "cost_usd")[0] == pytest.approx(by_codex["cost_usd"])
    assert (home / "outputs" / claude).is_dir()  # each task runs in its own directory


def test_an_agent_that_fails_reports_its_stderr(home: Path, spool: Spool,
                                                fake_openai: FakeOpenAI, cloud: FakeOpenAI,
                                                workers: Workers) -> None:
    configure(home, fake_openai, cloud)
    config = yaml.safe_load((home / "config" / "koubou.yaml").read_text())
    config["craftsmen"]["claude"]["argv"] = [sys.executable, AGENT, "fail"]
    (home / "config" / "koubou.yaml").write_text(yaml.safe_dump(config))
    workers.start(home)
    task_id = submit(spool, content="x", craftsman="claude")
    error = wait_outcomes(spool, [task_id])[task_id]["error"]
    assert error["kind"] == "backend" and "status 3" in error["message"]
    assert "something went wrong in the agent" in error["message"]


def test_an_agent_timeout_kills_its_whole_process_group(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, cloud: FakeOpenAI,
        workers: Workers, tmp_path: Path) -> None:
    configure(home, fake_openai, cloud)
    pidfile = tmp_path / "child.pid"
    config = yaml.safe_load((home / "config" / "koubou.yaml").read_text())
    config["craftsmen"]["claude"].update(argv=[sys.executable, AGENT, "hang", str(pidfile)],
                                         timeout_s=1.5)
    (home / "config" / "koubou.yaml").write_text(yaml.safe_dump(config))
    workers.start(home)
    task_id = submit(spool, content="x", craftsman="claude")
    error = wait_outcomes(spool, [task_id])[task_id]["error"]
    assert error["kind"] == "timeout"
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5  # the signal is sent at once; dying takes a moment
    while _alive(child):
        assert time.monotonic() < deadline, "the agent's child outlived the timeout"
        threading.Event().wait(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return status != "Z"


def test_max_concurrent_holds_across_worker_processes(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, cloud: FakeOpenAI,
        workers: Workers) -> None:
    configure(home, fake_openai, cloud)
    config = yaml.safe_load((home / "config" / "koubou.yaml").read_text())
    config["craftsmen"]["local"]["max_concurrent"] = 2
    (home / "config" / "koubou.yaml").write_text(yaml.safe_dump(config))
    fake_openai.latency_s = 0.3
    for _ in range(3):
        workers.start(home)
    ids = [submit(spool, content=f"local {i}") for i in range(12)]
    outcomes = wait_outcomes(spool, ids)
    assert all(o["status"] == "completed" for o in outcomes.values())
    assert fake_openai.max_in_flight == 2  # three processes, two slots for the home


def test_the_rate_window_is_shared_through_the_ledger(tmp_path: Path) -> None:
    conn = ledger.open_ledger(tmp_path / "koubou.db")
    kwargs = {"attempt": 1, "craftsman": "cloud", "amount": 0.0, "day": "d", "month": "m",
              "daily_limit": None, "monthly_limit": None, "max_rpm": 2, "max_tpm": 1000,
              "tokens": 100}
    assert ledger.reserve(conn, task_id="a", now=1000.0, **kwargs)[0] == "ok"
    assert ledger.reserve(conn, task_id="b", now=1010.0, **kwargs)[0] == "ok"
    assert ledger.reserve(conn, task_id="c", now=1020.0, **kwargs) == ("rate", 40.0)
    assert ledger.reserve(conn, task_id="c", now=1061.0, **kwargs)[0] == "ok"
    big = dict(kwargs, tokens=900, max_rpm=None)
    assert ledger.reserve(conn, task_id="d", now=1062.0, **big)[0] == "rate"  # tpm


def test_rate_rows_dated_in_the_future_never_stretch_a_wait_past_the_window(
        tmp_path: Path) -> None:
    conn = ledger.open_ledger(tmp_path / "koubou.db")
    kwargs = {"attempt": 1, "craftsman": "cloud", "amount": 0.0, "day": "d", "month": "m",
              "daily_limit": None, "monthly_limit": None, "max_rpm": 1, "max_tpm": None,
              "tokens": 10}
    # Rows written before the clock stepped back an hour (or by a peer an hour ahead).
    assert ledger.reserve(conn, task_id="a", now=4600.0, **kwargs)[0] == "ok"
    assert ledger.reserve(conn, task_id="b", now=1000.0, **kwargs)[0] == "ok"
    verdict, wait = ledger.reserve(conn, task_id="c", now=1000.0, **kwargs)
    assert verdict == "rate" and 0 < wait <= 60
    other = dict(kwargs, craftsman="other")
    assert ledger.reserve(conn, task_id="d", now=1030.0, **other)[0] == "ok"  # 30 s ahead
    verdict, wait = ledger.reserve(conn, task_id="e", now=1000.0, **other)
    assert verdict == "rate" and wait <= 60


@pytest.mark.parametrize("write", [
    lambda conn: ledger.settle(conn, 1, 0.5),
    lambda conn: ledger.record_alert(conn, "2026-12", 50, 1.0, 2.0, 0.0),
    lambda conn: ledger.settle_lost(conn, "task")], ids=["settle", "record_alert", "settle_lost"])
def test_a_failed_budget_write_rolls_back_and_the_connection_stays_usable(
        tmp_path: Path, write: object) -> None:
    conn = ledger.connect(tmp_path / "koubou.db")  # no tables yet: the write fails mid-way
    with pytest.raises(sqlite3.OperationalError):
        write(conn)
    assert not conn.in_transaction
    ledger.migrate(conn)  # the same connection writes again
    write(conn)


@pytest.mark.parametrize("limit", [{"max_rpm": 1}, {"max_tpm": 80}])
def test_a_worker_keeps_to_max_rpm_and_max_tpm(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, cloud: FakeOpenAI, workers: Workers,
        cloud_key: str, limit: dict) -> None:
    # Each call reserves 52 tokens (32 prompt estimated + 20 out) in the craftsman's minute.
    configure(home, fake_openai, cloud)
    config = yaml.safe_load((home / "config" / "koubou.yaml").read_text())
    config["craftsmen"]["cloud"].update(limit, timeout_s=2)
    (home / "config" / "koubou.yaml").write_text(yaml.safe_dump(config))
    workers.start(home)
    first = submit(spool, content="design the architecture")
    assert wait_outcomes(spool, [first])[first]["status"] == "completed"
    second = submit(spool, content="design the architecture")  # no room this minute
    error = wait_outcomes(spool, [second])[second]["error"]
    assert error["kind"] == "timeout" and "max_rpm/max_tpm" in error["message"]
    assert len(cloud.completions()) == 1


def test_a_cli_agent_under_a_budget_reserves_max_cost_and_settles_its_own_cost(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, cloud: FakeOpenAI,
        workers: Workers) -> None:
    configure(home, fake_openai, cloud, budget={"daily_usd": 0.02, "when_exhausted": "fail"})
    config = yaml.safe_load((home / "config" / "koubou.yaml").read_text())
    config["craftsmen"]["claude"]["max_cost_usd"] = 0.015
    (home / "config" / "koubou.yaml").write_text(yaml.safe_dump(config))
    workers.start(home, "--concurrency", "1")
    first = submit(spool, content="one", craftsman="claude")
    assert wait_outcomes(spool, [first])[first]["result"]["cost_usd"] == 0.0123
    second = submit(spool, content="two", craftsman="claude")  # 0.0123 + 0.015 > 0.02
    assert wait_outcomes(spool, [second])[second]["error"]["kind"] == "budget"


def _command(argv: list[str], **settings: object) -> object:
    from koubou_spool.config import parse
    return parse({"craftsmen": {"agent": {"backend": "command", "local": True, "argv": argv,
                                          **settings}}}).craftsmen["agent"]


def _complete(craftsman: object, timeout_s: float = 30) -> object:
    import asyncio
    from koubou_spool.craft.backends import Request, make_backend
    request = Request(messages=[{"role": "user", "content": "x"}], model="m", max_tokens=10,
                      timeout_s=timeout_s)
    return asyncio.run(make_backend(craftsman).complete(request))


def test_an_agent_over_max_output_bytes_is_stopped_at_once_and_not_retried() -> None:
    from koubou_spool.craft.backends import BackendError
    craftsman = _command([sys.executable, AGENT, "flood", "stdout"], max_output_bytes=1 << 20)
    with pytest.raises(BackendError) as caught:
        _complete(craftsman)  # it waited for the 30 s timeout, a retryable failure
    assert caught.value.kind == "backend" and not caught.value.retryable
    assert "more than max_output_bytes (1048576)" in str(caught.value)


def test_an_agent_that_floods_stderr_still_answers() -> None:
    craftsman = _command([sys.executable, AGENT, "flood", "stderr"], max_output_bytes=1 << 20)
    assert _complete(craftsman).content == "done\n"


class LedgerHolder:
    """Another process's connection holding the ledger's write lock (BEGIN EXCLUSIVE)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, timeout=10, isolation_level=None)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self.conn.close()


@pytest.mark.parametrize("when_exhausted, craftsman, kind", [("local", "local", None),
                                                             ("fail", None, "budget")])
def test_a_locked_ledger_makes_no_cloud_call_and_leaves_no_claim_stuck(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, cloud: FakeOpenAI, workers: Workers,
        cloud_key: str, when_exhausted: str, craftsman: str | None, kind: str | None) -> None:
    configure(home, fake_openai, cloud, budget={"daily_usd": 1,
                                                 "when_exhausted": when_exhausted})
    workers.start(home)
    warm = submit(spool, craftsman="echo")
    wait_outcomes(spool, [warm])
    holder = LedgerHolder(home / "db" / "koubou.db")
    try:
        task_id = submit(spool, content="design the architecture")  # routes to the cloud
        outcome = wait_outcomes(spool, [task_id], timeout=20)[task_id]
    finally:
        holder.release()
    assert cloud.completions() == []  # the budget could not vouch for it
    if craftsman:
        assert outcome["result"]["craftsman"] == craftsman
    else:
        assert outcome["error"]["kind"] == kind and "ledger" in outcome["error"]["message"]
    assert_no_claims(spool)


def test_a_settle_that_fails_keeps_the_paid_answer_and_settles_later(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, cloud: FakeOpenAI, workers: Workers,
        cloud_key: str) -> None:
    configure(home, fake_openai, cloud, budget={"daily_usd": 1})
    proc = workers.start(home)
    warm = submit(spool, craftsman="echo")
    wait_outcomes(spool, [warm])
    cloud.latency_s = 1.0
    task_id = submit(spool, content="design the architecture")
    assert cloud.request_seen.wait(10)
    holder = LedgerHolder(home / "db" / "koubou.db")  # locked when the answer comes back
    try:
        outcome = wait_outcomes(spool, [task_id], timeout=20)[task_id]
    finally:
        holder.release()
    assert outcome["status"] == "completed" and outcome["result"]["craftsman"] == "cloud"
    cost = outcome["result"]["cost_usd"]
    assert cost > 0 and len(cloud.completions()) == 1
    conn = sqlite3.connect(home / "db" / "koubou.db", timeout=10)
    deadline = time.monotonic() + 20
    while conn.execute("SELECT settled, cost_usd FROM reservations WHERE task_id = ?",
                       (task_id,)).fetchone() != (1, pytest.approx(cost)):
        assert time.monotonic() < deadline, "the settle did not follow"
        threading.Event().wait(0.2)
    assert proc.poll() is None and "Traceback" not in log_of(proc)


def test_a_corrupt_ledger_makes_no_cloud_call_and_local_work_goes_on(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, cloud: FakeOpenAI, workers: Workers,
        cloud_key: str) -> None:
    configure(home, fake_openai, cloud, budget={"daily_usd": 1, "when_exhausted": "fail"})
    for suffix in ("", "-wal", "-shm"):
        Path(f"{home}/db/koubou.db{suffix}").unlink(missing_ok=True)
    (home / "db" / "koubou.db").write_bytes(b"this is not a database" * 1000)
    workers.start(home)
    cloud_task = submit(spool, content="design the architecture")
    local_task = submit(spool, content="hello")
    outcomes = wait_outcomes(spool, [cloud_task, local_task], timeout=20)
    assert outcomes[cloud_task]["error"]["kind"] == "budget" and cloud.completions() == []
    assert outcomes[local_task]["result"]["craftsman"] == "local"
    assert_no_claims(spool)


def _with_cloud(home: Path, **changes: object) -> None:
    config = yaml.safe_load((home / "config" / "koubou.yaml").read_text())
    config["craftsmen"]["cloud"].update(changes)
    (home / "config" / "koubou.yaml").write_text(yaml.safe_dump(config))


def test_a_model_override_is_priced_as_its_own_model_or_refused_under_a_budget(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, cloud: FakeOpenAI, workers: Workers,
        cloud_key: str) -> None:
    configure(home, fake_openai, cloud, budget={"daily_usd": 1, "when_exhausted": "fail"})
    _with_cloud(home, provider="openai")  # the price table knows gpt-4o-mini from OpenAI
    workers.start(home)
    known = submit(spool, content="design the architecture", model="gpt-4o-mini")
    unknown = submit(spool, content="design the architecture", model="my-finetune-xyz")
    outcomes = wait_outcomes(spool, [known, unknown])
    result = outcomes[known]["result"]
    usage = result["usage"]
    table = (usage["prompt_tokens"] * 0.15 + usage["completion_tokens"] * 0.6) / 1e6
    assert result["cost_usd"] == pytest.approx(table)  # not the craftsman's $100/Mtok
    error = outcomes[unknown]["error"]
    assert error["kind"] == "budget" and "my-finetune-xyz" in error["message"]
    assert [b["model"] for b in cloud.completions()] == ["gpt-4o-mini"]


def test_a_task_asking_more_tokens_than_its_craftsman_is_capped_not_holding_the_mark(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, cloud: FakeOpenAI, workers: Workers,
        cloud_key: str) -> None:
    # $0.008 a day; a call's worst case with the craftsman's 20 tokens is $0.0052. Asked with
    # max_tokens 10**9, it would be $100,000: refused, and the exhausted mark would stay up
    # for the whole day, since that refusal never fits.
    configure(home, fake_openai, cloud, budget={"daily_usd": 0.008, "when_exhausted": "local"})
    workers.start(home)
    greedy = submit(spool, content="design the architecture", max_tokens=10**9)
    outcome = wait_outcomes(spool, [greedy])[greedy]
    assert outcome["result"]["craftsman"] == "cloud"
    assert cloud.completions()[0]["max_tokens"] == 20
    later = submit(spool, content="design the architecture")
    assert wait_outcomes(spool, [later])[later]["result"]["craftsman"] == "cloud"


def test_a_call_that_can_never_fit_the_budget_fails_without_holding_the_mark(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, cloud: FakeOpenAI, workers: Workers,
        cloud_key: str) -> None:
    configure(home, fake_openai, cloud, budget={"daily_usd": 0.008, "when_exhausted": "local"})
    workers.start(home)
    huge = submit(spool, content="design the architecture " + "word " * 200)  # > $0.008
    error = wait_outcomes(spool, [huge])[huge]["error"]
    assert error["kind"] == "budget" and "never" in error["message"]
    later = submit(spool, content="design the architecture")
    assert wait_outcomes(spool, [later])[later]["result"]["craftsman"] == "cloud"


def test_a_cancel_landing_while_reserve_runs_settles_the_reservation(tmp_path: Path) -> None:
    import asyncio

    from koubou_spool.config import Craftsman
    from koubou_spool.craft.backends import Request
    from koubou_spool.craft.budget import BudgetSettings
    from koubou_spool.craft.limits import Budget
    from koubou_spool.craft.spending import Spending
    path = tmp_path / "db" / "koubou.db"
    path.parent.mkdir()
    (tmp_path / "run").mkdir()
    ledger.open_ledger(path).close()
    cloud = Craftsman(name="cloud", backend="openai", model="gpt-5",
                      price={"input_per_mtok": PRICE, "output_per_mtok": PRICE})
    request = Request(messages=[{"role": "user", "content": "hi"}], model="gpt-5",
                      max_tokens=20, timeout_s=10)
    spending = Spending(Budget(path, BudgetSettings(daily_usd=1.0)), tmp_path)

    async def scenario() -> None:
        holder = LedgerHolder(path)  # the reservation waits for the lock...
        reserving = asyncio.ensure_future(spending.reserve(cloud, "t1", 1, request))
        await asyncio.sleep(0.3)
        reserving.cancel()  # ...when a cancel or a stop lands
        holder.release()  # and then gets it, in its thread
        with pytest.raises(asyncio.CancelledError):
            await reserving
        await asyncio.sleep(1.0)

    asyncio.run(scenario())
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT settled, cost_usd FROM reservations").fetchall()
    assert rows == [(1, 0.0)]  # no call was made: nothing stays reserved
