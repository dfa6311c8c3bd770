"""The budget held across the cluster (PRODUCT.md §12): with cluster.dsn_env set, every priced
call of every host reserves on the cluster's one budget row in a real PostgreSQL
(tests/pgserver.py), and no cloud call is made while that row cannot be reached. Real
`koubou worker` processes, a priced craftsman on the loopback fake OpenAI server, whose
requests are what the budget must hold: each one is a call that was paid for."""

from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from koubou_spool.cli.koubou import cli
from koubou_spool.spool import home as home_module
from koubou_spool.spool.cluster import Cluster
from koubou_spool.spool.files import Spool

from conftest import Workers, log_of, submit, wait_outcomes, write_config

try:
    import psycopg
except ImportError:  # the pg_server fixture names the command that adds it
    psycopg = None

DSN_ENV = "KOUBOU_TEST_CLUSTER_DSN"
PER_MTOK = 100.0  # $0.0001 a token, in and out: a call of the fake costs about $0.0006


def make_home(root: Path, name: str, base_url: str, *, daily_usd: float,
              when_exhausted: str, slots: int = 4, **cloud: object) -> Spool:
    """A home in the cluster with a priced cloud craftsman and a free local one, both on the
    fake (told apart by their model names)."""
    home = root / name
    home_module.init(home)
    write_config(home, craftsmen={
        "cloud": {"backend": "openai", "base_url": base_url, "model": "cloud-model",
                  "max_concurrent": slots, "timeout_s": 10, "max_tokens": 8, "retries": 0,
                  "price": {"input_per_mtok": PER_MTOK, "output_per_mtok": PER_MTOK}, **cloud},
        "local": {"backend": "openai", "base_url": base_url, "model": "local-model",
                  "local": True, "max_concurrent": 4, "timeout_s": 10, "max_tokens": 8,
                  "retries": 0}},
        budget={"daily_usd": daily_usd, "timezone": "UTC", "when_exhausted": when_exhausted},
        spool={"fsync": True, "heartbeat_s": 0.5, "lease_s": 10, "grace_s": 0.2,
               "stop_grace_s": 5},
        cluster={"dsn_env": DSN_ENV, "host": name})
    return Spool.open(home)


def calls(fake, model: str) -> list[dict]:
    return [r for r in fake.completions() if r.get("model") == model]


def billed(fake) -> float:
    """What the calls answered so far cost at the craftsman's price (the fake's usage)."""
    with fake.lock:
        answered = list(zip(fake.responses, fake.usage, strict=True))
    return sum((prompt + completion) * PER_MTOK / 1e6
               for response, (prompt, completion) in answered
               if response["model"] == "cloud-model")


def cluster_budget(dsn: str) -> tuple[float, int, int]:
    """The cluster's day spend, its reservations, and those still open."""
    with psycopg.connect(dsn) as conn:
        day_usd = conn.execute("SELECT day_usd FROM cluster_budget").fetchone()[0]
        total, open_ = conn.execute("SELECT count(*), count(*) FILTER (WHERE NOT settled) "
                                    "FROM cluster_reservations").fetchone()
    return float(day_usd), total, open_


@pytest.fixture
def cluster_env(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(DSN_ENV, pg_dsn)
    return pg_dsn


def test_a_budget_raced_by_three_hosts_of_four_workers_is_never_passed(
        tmp_path: Path, cluster_env: str, fake_openai, workers: Workers) -> None:
    # A call costs about $0.0004 and reserves $0.0034: with two in flight per host the first
    # refusal comes after some two dozen calls, and each host fails the rest of its tasks then.
    limit = 0.03
    fake_openai.latency_s = 0.02
    fake_openai.answer = {"content": "ok"}  # one word: within max_tokens, as a real server is
    spools = [make_home(tmp_path, f"host{n}", fake_openai.base_url, daily_usd=limit,
                        when_exhausted="fail", slots=2) for n in range(3)]
    ids = {spool: [submit(spool, id=f"{spool.home.name}-{n:02d}", craftsman="cloud",
                          content=f"task {n}") for n in range(30)] for spool in spools}
    for spool in spools:  # queued first: the twelve workers start together and race
        for _ in range(4):
            workers.start(spool.home)
    outcomes = {}
    for spool in spools:
        outcomes.update(wait_outcomes(spool, ids[spool], timeout=60))

    completed = [i for i, r in outcomes.items() if r["status"] == "completed"]
    refused = [i for i, r in outcomes.items() if r["status"] == "failed"]
    assert all(outcomes[i]["error"]["kind"] == "budget" for i in refused), outcomes
    assert completed and refused  # the budget ran out mid-race, not before nor never
    assert len(calls(fake_openai, "cloud-model")) == len(completed)
    assert {i.split("-")[0] for i in completed} == {"host0", "host1", "host2"}
    assert billed(fake_openai) <= limit
    spent, reservations, still_open = cluster_budget(cluster_env)
    assert spent <= limit
    assert spent == pytest.approx(billed(fake_openai), abs=1e-9)  # settled at the real cost
    assert reservations >= len(completed) and still_open == 0
    for spool in spools:  # each home's ledger keeps its own records (reports)
        assert (spool.home / "db" / "koubou.db").exists()


def test_while_postgres_is_down_no_cloud_call_is_made_and_local_work_goes_on(
        tmp_path: Path, pg_server, cluster_env: str, fake_openai, workers: Workers) -> None:
    spool = make_home(tmp_path, "host0", fake_openai.base_url, daily_usd=1.0,
                      when_exhausted="defer")
    proc = workers.start(spool.home)
    first = submit(spool, id="cloud-first", craftsman="cloud", content="before")
    assert wait_outcomes(spool, [first])[first]["status"] == "completed"

    pg_server.stop()
    cloud = [submit(spool, id=f"cloud-{n}", craftsman="cloud", content=f"c {n}")
             for n in range(5)]
    local = [submit(spool, id=f"local-{n}", craftsman="local", content=f"l {n}")
             for n in range(5)]
    done = wait_outcomes(spool, local)
    assert all(r["status"] == "completed" for r in done.values())
    time.sleep(1.0)  # two heartbeats: the deferred tasks stay deferred
    assert len(calls(fake_openai, "cloud-model")) == 1, log_of(proc)
    names = set(os.listdir(spool.pending))
    assert {f"{i}.json" for i in cloud} <= names  # waiting in pending/, not failed
    assert not set(os.listdir(spool.failed))

    pg_server.start()
    done = wait_outcomes(spool, cloud, timeout=30)  # the reconnect wakes them: no new file
    assert all(r["status"] == "completed" for r in done.values()), done
    assert len(calls(fake_openai, "cloud-model")) == 6
    assert all(r["result"]["attempts"] == 1 for r in done.values()), done  # waiting: no attempt
    assert cluster_budget(cluster_env)[0] == pytest.approx(billed(fake_openai), abs=1e-9)
    assert "no cloud call until it is back" in log_of(proc)


# --- rate windows across the cluster ----------------------------------------------------------

def test_a_rate_window_raced_by_twelve_connections_counts_no_more_than_it_allows(
        pg_dsn: str) -> None:
    handles = [Cluster.open(pg_dsn, host=f"host{n % 3}") for n in range(12)]

    def try_count(handle: Cluster, max_rpm: int | None, max_tpm: int | None) -> list[float]:
        return [handle.count_request("cloud", max_rpm, max_tpm, 100) for _ in range(5)]

    with ThreadPoolExecutor(12) as pool:
        rpm = [w for ws in pool.map(lambda h: try_count(h, 7, None), handles) for w in ws]
    assert rpm.count(0.0) == 7  # 60 tries, 7 counted: the rest told to wait about a minute
    assert all(55 < w <= 60 for w in rpm if w), rpm
    with psycopg.connect(pg_dsn) as conn:  # a new minute
        conn.execute("UPDATE cluster_windows SET requests = '[]'")
    with ThreadPoolExecutor(12) as pool:
        tpm = [w for ws in pool.map(lambda h: try_count(h, None, 450), handles) for w in ws]
    assert tpm.count(0.0) == 4  # 100 tokens each within 450 a minute
    for handle in handles:
        handle.close()


def test_max_rpm_holds_across_two_hosts(tmp_path: Path, cluster_env: str, fake_openai,
                                        workers: Workers) -> None:
    spools = [make_home(tmp_path, f"host{n}", fake_openai.base_url, daily_usd=1.0,
                        when_exhausted="defer", max_rpm=5, timeout_s=120) for n in range(2)]
    for spool in spools:
        for m in range(8):
            submit(spool, id=f"{spool.home.name}-{m}", craftsman="cloud", content=f"r {m}")
        workers.start(spool.home)
        workers.start(spool.home)
    deadline = time.monotonic() + 30
    while len(calls(fake_openai, "cloud-model")) < 5:  # nothing announces a request here
        assert time.monotonic() < deadline, [log_of(p) for p in workers.procs]
        time.sleep(0.05)
    time.sleep(2.0)  # each host alone would send five more in this minute
    assert len(calls(fake_openai, "cloud-model")) == 5
    done = sum(len(os.listdir(spool.completed)) for spool in spools)
    assert done == 5 and not any(os.listdir(spool.failed) for spool in spools)


def test_a_killed_workers_reservation_is_settled_in_full_and_left_open_by_none(
        tmp_path: Path, cluster_env: str, fake_openai, workers: Workers) -> None:
    spool = make_home(tmp_path, "host0", fake_openai.base_url, daily_usd=1.0,
                      when_exhausted="defer")
    fake_openai.latency_s = 30  # the call is in flight when its worker dies
    victim = workers.start(spool.home)
    task = submit(spool, id="killed", craftsman="cloud", content="mid-call")
    assert fake_openai.request_seen.wait(15), log_of(victim)
    victim.kill()
    victim.wait(timeout=10)
    assert cluster_budget(cluster_env)[2] == 1  # open, at its worst case
    fake_openai.latency_s = 0
    workers.start(spool.home)  # its recovery takes the dead worker's claim over
    record = wait_outcomes(spool, [task], timeout=30)[task]
    assert record["status"] == "completed", record
    spent, reservations, still_open = cluster_budget(cluster_env)
    assert reservations == 2 and still_open == 0
    with psycopg.connect(cluster_env) as conn:
        lost = conn.execute("SELECT reserved_usd, cost_usd FROM cluster_reservations "
                            "WHERE attempt = 1").fetchone()
    assert lost[0] == lost[1]  # the lost call may have run: it counts in full
    assert spent == pytest.approx(float(lost[0]) + billed(fake_openai), abs=1e-9)


def test_a_budget_alert_is_raised_once_for_the_cluster_when_its_spend_passes_the_threshold(
        tmp_path: Path, cluster_env: str, fake_openai, workers: Workers) -> None:
    # Each host alone spends under half the limit; together they pass it: the alert is the
    # cluster's, raised once, by the host whose call passed it.
    limit = 0.008
    fake_openai.answer = {"content": "ok"}
    spools = [make_home(tmp_path, name, fake_openai.base_url, daily_usd=limit,
                        when_exhausted="fail", slots=1) for name in ("host-a", "host-b")]
    for spool in spools:
        config = yaml.safe_load((spool.home / "config" / "koubou.yaml").read_text())
        config["budget"]["alert_percent"] = [50, 95]
        (spool.home / "config" / "koubou.yaml").write_text(yaml.safe_dump(config))
    procs, spent = [], []
    for spool in spools:  # one host after the other: b's calls pass the threshold
        procs.append(workers.start(spool.home))
        ids = [submit(spool, craftsman="cloud", content=f"task {n}") for n in range(7)]
        assert all(o["status"] == "completed"
                   for o in wait_outcomes(spool, ids, timeout=30).values())
        spent.append(billed(fake_openai) - sum(spent))
    assert max(spent) < limit / 2 <= sum(spent) < limit * 0.95, spent  # the test's premise
    with psycopg.connect(cluster_env) as conn:
        alerts = conn.execute("SELECT percent, host FROM cluster_alerts").fetchall()
    assert alerts == [(50, "host-b")]
    deadline = time.monotonic() + 10
    while "budget alert" not in log_of(procs[1]):  # logged after its call's outcome
        assert time.monotonic() < deadline, log_of(procs[1])
        time.sleep(0.05)
    assert log_of(procs[1]).count("budget alert") == 1
    assert "budget alert" not in log_of(procs[0])


def test_status_and_route_show_the_clusters_spend_against_this_homes_limits(
        tmp_path: Path, cluster_env: str, fake_openai, workers: Workers) -> None:
    # Host a spends; host b spent nothing itself, but its workers check its limit against the
    # cluster's spend, so its status and route show that spend, and exhausted.
    fake_openai.answer = {"content": "ok"}
    a = make_home(tmp_path, "host-a", fake_openai.base_url, daily_usd=1.0,
                  when_exhausted="fail")
    b = make_home(tmp_path, "host-b", fake_openai.base_url, daily_usd=0.001,
                  when_exhausted="fail")
    workers.start(a.home)
    ids = [submit(a, craftsman="cloud", content=f"task {n}") for n in range(4)]
    assert all(o["status"] == "completed" for o in wait_outcomes(a, ids, timeout=30).values())
    deadline = time.monotonic() + 10
    while cluster_budget(cluster_env)[2]:  # settled: the row holds real costs only
        assert time.monotonic() < deadline
        time.sleep(0.05)
    spent = billed(fake_openai)
    assert spent > 0.001  # the test's premise: past b's limit, far under a's

    def koubou(home: Path, *args: str, env: dict[str, str] | None = None) -> str:
        result = CliRunner().invoke(cli, ["--home", str(home), *args], env=env)
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output
        return result.output

    shown = json.loads(koubou(b.home, "status", "--json"))["budget"]
    assert shown["scope"] == "cluster" and shown["exhausted"], shown
    assert shown["day_spent_usd"] == pytest.approx(spent, abs=1e-6)
    assert shown["home_day_spent_usd"] == 0.0
    line = koubou(b.home, "route", "--craftsman", "cloud", "hello").splitlines()[-1]
    assert line == (f"budget       cluster day {spent:.4f} of 0.001 USD, month {spent:.4f} of "
                    f"None USD (this host day 0.0000, month 0.0000); exhausted, so fail"), line
    mine = json.loads(koubou(a.home, "route", "--json", "--craftsman", "cloud", "hello"))
    assert mine["craftsman"] == "cloud" and not mine["budget"]["exhausted"], mine
    with socket.socket() as probe:  # a port nothing listens on: the cluster cannot be read
        probe.bind(("127.0.0.1", 0))
        closed = f"postgresql://127.0.0.1:{probe.getsockname()[1]}/koubou"
    line = koubou(a.home, "status", env={DSN_ENV: closed}).splitlines()
    budget = [text for text in line if text.startswith("budget")]
    assert len(budget) == 1 and budget[0].startswith("budget       the cluster could not be "
                                                     "read"), line
    assert budget[0].endswith("; no cloud call until it can be, so fail"), budget


def test_a_host_whose_clock_lags_alerts_under_the_clusters_newer_day(cluster_env: str) -> None:
    # Host a spent 0.6 of a 1.0 daily limit on 2026-12-03. Host b, whose clock still says
    # 2026-12-02, sees the threshold passed: the alert is of the day that spend is of.
    from koubou_spool.craft.shared_budget import SharedBudget
    ahead = Cluster.open(cluster_env, host="host-a")
    ahead.ensure_schema()
    verdict, reservation = ahead.reserve(task_id="t1", attempt=1, craftsman="cloud", amount=0.6,
                                         day="2026-12-03", month="2026-12", daily_limit=1.0,
                                         monthly_limit=None)
    assert verdict == "ok"
    ahead.settle(reservation, 0.6)
    lagging = SharedBudget(cluster_env, "host-b", DSN_ENV)
    assert lagging.alerts_due("2026-12-02", "2026-12", (1.0, None), (50,)) == [
        ("2026-12-03", 50, 0.6, 1.0)]
    assert lagging.alerts_due("2026-12-02", "2026-12", (1.0, None), (50,)) == []  # once
    lagging.close()
    ahead.close()


def test_a_local_craftsmans_settle_asks_the_cluster_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A local craftsman's reservation (its rate window, in the home's ledger) settles there
    # only: no alert check reaches for a cluster that is away, so none warns of it.
    from koubou_spool.config import Craftsman
    from koubou_spool.craft.budget import BudgetSettings
    from koubou_spool.craft.limits import Budget
    from koubou_spool.craft.shared_budget import SharedBudget
    from koubou_spool.spool import ledger
    path = tmp_path / "koubou.db"
    ledger.open_ledger(path).close()
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"host=127.0.0.1 port={probe.getsockname()[1]} connect_timeout=1"
    budget = Budget(path, BudgetSettings(daily_usd=1.0, alert_percent=(1,)),
                    shared=SharedBudget(closed, "host-a", DSN_ENV))
    local = Craftsman(name="local", backend="openai", model="m", local=True, max_rpm=100)
    verdict, reservation = budget.reserve("t1", 1, local, 0.0, 10)
    assert verdict == "ok"
    assert budget.settle(reservation, 0.0) == []
    assert "cannot be reached" not in caplog.text
