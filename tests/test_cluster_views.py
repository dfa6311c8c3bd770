"""The cluster seen from any host (PRODUCT.md §12, docs/CLUSTER.md "What every host shows"):
`koubou status`, `workers`, `list`, `report` and the dashboard's API of one home show every
host, from the rows each host's `koubou cluster` writes at its heartbeat. Real processes per
home (tests/test_cluster_hosts.py's Host) on a real PostgreSQL (tests/pgserver.py); a host
killed with SIGKILL is marked stale; an unreachable database costs one line, never the view."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner

from koubou_spool.cli.koubou import cli
from koubou_spool.spool import home as home_module

from conftest import submit, write_config
from cdp import CHROMIUM, Browser
from serve_client import running, serve_client
from test_cluster_hosts import DSN_ENV, LEASE_S, Host, drop, hosts, wait_delivered  # noqa: F401 (a fixture)

UNREAD = "the cluster could not be read, so this shows host"


def koubou(home: Path, *args: str) -> tuple[str, str]:
    """A koubou command on a home, in-process: its stdout and stderr (exit 0 asserted)."""
    result = CliRunner().invoke(cli, [*args, "--home", str(home)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout, result.stderr


def koubou_json(home: Path, *args: str) -> Any:
    out, err = koubou(home, *args, "--json")
    assert err == ""
    return json.loads(out)


def until(look: Any, ready: Any, timeout: float = 15) -> Any:
    """look() once ready(look()) holds: the rows follow each bridge's heartbeat, and nothing
    announces one, so this asks again briefly apart."""
    deadline = time.monotonic() + timeout
    while True:
        seen = look()
        if ready(seen):
            return seen
        assert time.monotonic() < deadline, seen
        time.sleep(0.1)


def wait_rows(home: Path, ready: Any, timeout: float = 15) -> dict[str, Any]:
    """The hosts of `koubou status --json`, by name, once ready(them) holds."""
    return until(lambda: {h["host"]: h for h in koubou_json(home, "status")["cluster"]["hosts"]},
                 ready, timeout)


def test_every_host_shows_the_whole_cluster_and_a_killed_host_goes_stale(
        hosts, pg_dsn: str) -> None:  # noqa: F811 (the fixture of test_cluster_hosts)
    a, b, c = hosts("host-a"), hosts("host-b", latency_ms=20), hosts("host-c", latency_ms=20)
    a.serve("local")
    b.serve("echo")
    c.serve("echo")
    submit(a.spool, id="stays", content="x", craftsman="local")  # host a's own: never leaves
    ids = drop(a, 12, "seen")
    assert set(wait_delivered(pg_dsn, ids, timeout=30)) >= set(ids)
    ran = {i: host.name for host in (b, c) for i in ids
           if (host.spool.completed / f"{i}.json").exists()}
    assert sorted(ran) == sorted(ids)

    # status: each host's queues, its row's age, fresh; this host marked
    # (each row is a snapshot of its host at its bridge's last heartbeat: wait for one that
    # shows the work done and both processes alive; under load a worker's beat can lag)
    rows = wait_rows(a.home, lambda found: set(found) == {"host-a", "host-b", "host-c"} and [
        sum(found[h.name]["queues"]["completed"] for h in (b, c)),
        found["host-a"]["queues"]["completed"], found["host-b"]["workers"],
        found["host-c"]["workers"]] == [len(ids), len(ids), 2, 2])
    assert rows["host-a"]["this_host"] and not rows["host-b"]["this_host"]
    assert not any(row["stale"] for row in rows.values())
    assert rows["host-a"]["queues"]["completed"] == len(ids)  # delivered back to the origin
    assert rows["host-b"]["workers"] == 2 and rows["host-c"]["workers"] == 2  # worker + bridge
    out, _ = koubou(a.home, "status")
    assert "hosts (as each host's bridge last wrote):" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("host-")] == [
        "host-a", "host-b", "host-c"]
    assert "host-a (this host)" in out and "stale" not in out

    # workers: every host's, with a host column (done counts follow the workers' heartbeats)
    workers = until(lambda: koubou_json(a.home, "workers"), lambda found: sum(
        w.get("done") or 0 for w in found if w["host"] != "host-a") == len(ids))
    by_host: dict[str, list] = {}
    for worker in workers:
        by_host.setdefault(worker["host"], []).append(worker)
    assert {name: len(found) for name, found in by_host.items()} == {
        "host-a": 2, "host-b": 2, "host-c": 2}
    served = {w["host"]: w["craftsmen"] for w in workers if not w["id"].startswith("bridge-")}
    assert served == {"host-a": ["local"], "host-b": ["echo"], "host-c": ["echo"]}
    out, _ = koubou(a.home, "workers")
    header = out.splitlines()[0].split()
    assert header[:2] == ["host", "worker"]
    assert {line.split()[0] for line in out.splitlines()[2:] if line.strip()} == {
        "host-a", "host-b", "host-c"}
    out, _ = koubou(a.home, "metrics")  # every host's row, as the exposition's gauges
    assert "koubou_cluster_reachable 1" in out
    assert 'koubou_cluster_host_workers{host="host-b"} 2' in out
    assert f'koubou_cluster_host_queue_depth{{host="host-a",state="completed"}} {len(ids)}' in out
    assert 'koubou_cluster_host_stale{host="host-c"} 0' in out
    from prometheus_client.parser import text_string_to_metric_families
    assert "koubou_cluster_host_age_seconds" in {
        f.name for f in text_string_to_metric_families(out)}
    out, _ = koubou(a.home, "top", "--once")
    assert {w["host"] + "/" + w["id"] for w in workers} <= set(out.split())

    # list: host b lists the tasks host a submitted, each once, with where they ran
    listed = koubou_json(b.home, "list", "--limit", "50")
    assert sorted(item["id"] for item in listed) == sorted(ids)
    assert all(item["origin"] == "host-a" and item["host"] == ran[item["id"]]
               and item["state"] == "completed" for item in listed)
    out, _ = koubou(b.home, "list", "--limit", "50")
    assert f"{ids[0]}  from host-a, on {ran[ids[0]]}" in out
    assert koubou_json(b.home, "list", "--state", "pending") == []
    # The origin lists its own, as before. Host a's `stays` goes round claim, failed attempt,
    # requeue, and a listing of one directory after another can miss it between two of them.
    own = until(lambda: koubou_json(a.home, "list", "--limit", "50"),
                lambda found: "stays" in {item["id"] for item in found})
    assert sorted(item["id"] for item in own) == sorted([*ids, "stays"])
    assert not any("origin" in item for item in own)

    # status ID from a host that neither submitted nor ran the task
    viewer = c if ran[ids[0]] == "host-b" else b
    found = koubou_json(viewer.home, "status", ids[0])
    assert (found["state"], found["origin"], found["host"]) == ("completed", "host-a", ran[ids[0]])
    assert found["result"]["content"] == "seen 0"  # the echo craftsman's answer
    out, _ = koubou(viewer.home, "status", ids[0])
    assert f"  origin   host-a, run on {ran[ids[0]]} (attempt 1)" in out.splitlines()

    # report: the tasks each host ran today, from its row
    report = until(lambda: koubou_json(a.home, "report")["cluster"],
                   lambda seen: seen["total"]["tasks"] == len(ids) + 1)
    per_host = {h["host"]: h for h in report["hosts"]}
    assert all(h["covered"] and not h["stale"] for h in per_host.values())
    for name in ("host-b", "host-c"):
        assert per_host[name]["tasks"] == sum(1 for i in ids if ran[i] == name)
        assert per_host[name]["completed"] == per_host[name]["tasks"]
        assert [c["craftsman"] for c in per_host[name]["by_craftsman"]] == (
            ["echo"] if per_host[name]["tasks"] else [])
    # host a ran only "stays" itself (its local craftsman's endpoint refuses: failed)
    assert (per_host["host-a"]["tasks"], per_host["host-a"]["failed"]) == (1, 1)
    assert report["total"]["completed"] == len(ids)
    out, _ = koubou(a.home, "report")
    assert f"cluster hosts, tasks each ran in {report['period']}:" in out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("total ")][-1] == [
        "total", str(len(ids) + 1)]
    assert koubou_json(a.home, "report", "--month", report["period"][:7])["cluster"]["total"][
        "completed"] == len(ids)
    old, _ = koubou(a.home, "report", "--day", "2020-01-01")
    assert "no figures for this period from host-a, host-b, host-c" in old
    out, _ = koubou(a.home, "report", "--csv")
    assert f"cluster_hosts,host-b,tasks,{per_host['host-b']['tasks']}" in out

    # the dashboard's API says the same
    async def api() -> tuple[dict, dict, dict]:
        async with serve_client(b.home) as client:
            return tuple([(await client.get(path)).json() for path in (
                "/api/workers", "/api/tasks?limit=50", "/api/report")])
    seen_workers, seen_tasks, seen_report = anyio.run(api)
    assert {h["host"] for h in seen_workers["cluster"]["hosts"]} == {"host-a", "host-b", "host-c"}
    assert {w["host"] for w in seen_workers["workers"]} == {"host-a", "host-b", "host-c"}
    assert sorted(t["id"] for t in seen_tasks["tasks"]) == sorted(ids)
    assert seen_tasks["cluster"] == {"host": "host-b"}
    assert seen_report["cluster"]["total"]["completed"] == len(ids)

    # host c killed with SIGKILL: its row stops; once older than its lease, it is stale
    c.kill()
    rows = wait_rows(a.home, lambda found: found["host-c"]["stale"], timeout=LEASE_S * 5)
    assert rows["host-c"]["age_s"] > LEASE_S
    assert not rows["host-a"]["stale"] and not rows["host-b"]["stale"]
    out, _ = koubou(a.home, "status")
    assert [line.split()[3] for line in out.splitlines() if line.startswith("host-c")] == ["stale"]
    stale = [w for w in koubou_json(a.home, "workers") if w["host"] == "host-c"]
    assert stale and all(w["liveness"] == "stale" and w["host_stale"] for w in stale)

    # with no host serving echo, a task forwarded by host a waits in the cluster: its status
    # on host a says so beside the bridge's claim that is its face
    b.kill()
    [waiting] = drop(a, 1, "waits")
    until(lambda: a.spool.find(waiting).state, lambda state: state == "in_progress")
    found = koubou_json(a.home, "status", waiting)
    assert found["worker_id"].startswith("bridge-")
    assert found["cluster"] == {"host": "host-a", "task": {"state": "pending", "host": None,
                                                           "attempt": 0}}
    out, _ = koubou(a.home, "status", waiting)
    assert "  cluster  pending" in out.splitlines()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")
def forget(home: Path, host: str) -> Any:
    return CliRunner().invoke(cli, ["cluster", "--forget", host, "--home", str(home)])


def test_a_host_that_left_is_forgotten_only_once_its_row_and_leases_ran_out(
        hosts, pg_dsn: str) -> None:  # noqa: F811 (the fixture of test_cluster_hosts)
    a, b = hosts("host-a"), hosts("host-b", latency_ms=20_000)
    a.serve("local")
    b.serve("echo")
    [task_id] = drop(a, 1, "held")
    until(lambda: [claim for claim, _ in b.spool.claims() if claim.startswith(task_id)], bool)
    wait_rows(a.home, lambda found: set(found) == {"host-a", "host-b"})
    alive = forget(a.home, "host-b")
    assert alive.exit_code == 2 and "looks alive" in alive.output, alive.output
    b.kill()
    held = forget(a.home, "host-b")  # its row is fresh and its lease runs a few seconds more
    assert held.exit_code == 2, held.output
    assert "still holds 1 running lease" in held.output or "looks alive" in held.output
    done = until(lambda: forget(a.home, "host-b"), lambda result: result.exit_code == 0)
    assert done.output.startswith("forgot host host-b (its row was ")
    assert set(wait_rows(a.home, lambda found: "host-b" not in found)) == {"host-a"}
    missing = forget(a.home, "host-z")
    assert missing.exit_code == 2 and "no host host-z in the cluster" in missing.output
    assert forget(a.home, "host-a").exit_code == 2  # this host: from another one
    assert task_format_state(pg_dsn, task_id) in ("pending", "in_progress")  # the task stays


def task_format_state(pg_dsn: str, task_id: str) -> str:
    import psycopg
    with psycopg.connect(pg_dsn) as conn:
        return conn.execute("SELECT state FROM cluster_tasks WHERE id = %s",
                            (task_id,)).fetchone()[0]


def test_only_a_missing_psycopg_is_blamed_on_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    from koubou_spool.config import ClusterSettings
    from koubou_spool.errors import ClusterUnavailable
    from koubou_spool.observe import cluster_view
    monkeypatch.setenv(DSN_ENV, "host=127.0.0.1")
    settings = ClusterSettings.parse({"dsn_env": DSN_ENV, "host": "host-a"})
    monkeypatch.delitem(sys.modules, "koubou_spool.spool.cluster_hosts", raising=False)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if it were not installed
    with pytest.raises(ClusterUnavailable, match="reading the cluster needs psycopg 3"):
        cluster_view.board_for(settings)
    monkeypatch.setitem(sys.modules, "koubou_spool.spool.cluster_hosts", None)  # our own fault
    with pytest.raises(ImportError) as raised:
        cluster_view.board_for(settings)
    assert not isinstance(raised.value, ClusterUnavailable)
    assert raised.value.name == "koubou_spool.spool.cluster_hosts"


def test_the_dashboard_shows_the_hosts_their_workers_and_other_origins_tasks(
        hosts, pg_dsn: str, tmp_path: Path) -> None:  # noqa: F811 (the fixture above)
    a, b = hosts("host-a"), hosts("host-b")
    a.serve("local")
    b.serve("echo")
    ids = drop(a, 3, "shown")
    wait_delivered(pg_dsn, ids, timeout=30)
    until(lambda: koubou_json(b.home, "status")["cluster"]["hosts"],
          lambda found: [h["host"] for h in found] == ["host-a", "host-b"])
    browser = Browser(tmp_path / "profile")
    try:
        with running(b.home, tmp_path / "serve.log") as server:
            browser.page("Page.navigate", url=server.url + "/")
            browser.wait_for("document.querySelectorAll('#hosts tr[data-host]').length === 2"
                             " && document.querySelectorAll('#tasks tr.task').length === 3", 10)
            hosts_shown = browser.evaluate(
                "[...document.querySelectorAll('#hosts tr[data-host]')].map((r) =>"
                " [...r.cells].map((c) => c.textContent))")
            worker_hosts = browser.evaluate(
                "[...document.querySelectorAll('#workers tbody tr')].map((r) =>"
                " r.cells[0].textContent)")
            tasks_shown = browser.evaluate(
                "[...document.querySelectorAll('#tasks tr.task')].map((r) =>"
                " [r.dataset.id, r.cells[3].textContent])")
            errors = browser.errors()
    finally:
        browser.close()
    assert [(row[0], row[2]) for row in hosts_shown] == [("host-a", "fresh"),
                                                         ("host-b (this host)", "fresh")]
    assert sorted(set(worker_hosts)) == ["host-a", "host-b"]
    assert sorted(tasks_shown) == [[i, "from host-a, on host-b"] for i in ids]
    assert errors == [], json.dumps(errors, indent=1)[:2000]


def silent_listener() -> socket.socket:
    """A loopback port that accepts connections and never answers: a server that hangs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


@pytest.mark.parametrize("server", ["refused", "silent"])
@pytest.mark.slow
def test_with_the_cluster_unreachable_each_view_shows_its_home_and_says_so_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: str) -> None:
    import pgserver
    silent = silent_listener() if server == "silent" else None
    port = silent.getsockname()[1] if silent else pgserver.free_port()
    monkeypatch.setenv(DSN_ENV, f"host=127.0.0.1 port={port} user=koubou dbname=nowhere")
    host = Host(tmp_path, "host-a")
    task_id = submit(host.spool, content="x", craftsman="echo")
    views = [["status"], ["workers"], ["list"], ["report"]]
    forms = [[], ["--json"]] if server == "refused" else [["--json"]]  # silent: 2 s each
    try:
        for args in views:
            for form in forms:
                started = time.monotonic()
                out, err = koubou(host.home, *args, *form)
                assert time.monotonic() - started < 10  # the connect timeout, not a hang
                assert err.count("\n") == 1 and UNREAD in err, (args, err)
                assert "Traceback" not in out + err
                if args == ["list"]:
                    assert task_id in out  # the home's own tasks, as without a cluster
        if server == "refused":  # the home's own figures, and the cluster said unread
            out, _ = koubou(host.home, "metrics")
            assert "koubou_queue_depth" in out and "koubou_cluster_reachable 0" in out
        facts = koubou_json_quiet(host.home, "status")
        assert facts["queues"]["pending"] == 1
        assert UNREAD in facts["cluster"]["error"] and facts["cluster"]["host"] == "host-a"
        out, _ = koubou(host.home, "status")
        assert out.startswith("pending 1") and "hosts (" not in out
    finally:
        if silent:
            silent.close()


def koubou_json_quiet(home: Path, *args: str) -> Any:
    """--json output of a command whose stderr carries the cluster's line."""
    out, _ = koubou(home, *args, "--json")
    return json.loads(out)


def test_without_a_cluster_the_views_are_unchanged_and_never_import_psycopg(
        tmp_path: Path) -> None:
    home = tmp_path / "solo"
    home_module.init(home)
    write_config(home)
    script = f"""
import sys
from click.testing import CliRunner
from koubou_spool.cli.koubou import cli
for args in (["status"], ["workers"], ["list"], ["report"], ["status", "--json"],
             ["workers", "--json"], ["list", "--json"], ["report", "--json"]):
    result = CliRunner().invoke(cli, [*args, "--home", {str(home)!r}])
    assert result.exit_code == 0, (args, result.output, result.exception)
    shown = result.stdout
    assert '"cluster":' not in shown and "hosts" not in shown and not result.stderr, shown
assert "psycopg" not in sys.modules, "psycopg imported without cluster.dsn_env"
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60,
                   env=os.environ | {DSN_ENV: "host=127.0.0.1 port=1"})


def test_a_host_row_sums_today_at_each_heartbeat_and_the_days_before_once_an_hour(
        tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from koubou_spool import config as config_module
    from koubou_spool.observe.cluster_view import Snapshots
    from koubou_spool.spool import ledger
    from koubou_spool.spool.files import Spool
    home = tmp_path / "h"
    home_module.init(home)
    write_config(home, budget={"timezone": "UTC"})
    now = datetime(2026, 11, 15, 12, tzinfo=UTC).timestamp()
    path = home / "db" / "koubou.db"
    conn = ledger.open_ledger(path)

    def finished(task_id: str, at: float, cost: float) -> None:
        conn.execute("INSERT INTO tasks (id, craftsman, status, finished_at, prompt_tokens,"
                     " completion_tokens, cost_usd) VALUES (?, 'echo', 'completed', ?, 3, 4, ?)",
                     (task_id, at, cost))
    finished("last-month", now - 20 * 86400, 1.0)
    finished("yesterday", now - 86400, 0.25)
    finished("today", now - 3600, 0.5)
    shots = Snapshots(Spool.open(home), path,
                      config_module.load(home / "config" / "koubou.yaml"))
    first = shots.take(now)["usage"]
    assert (first["day"], first["month"], first["timezone"]) == ("2026-11-15", "2026-11", "UTC")
    [today] = first["today"]
    [month] = first["this_month"]
    assert (today["tasks"], today["prompt_tokens"], today["cost_usd"]) == (1, 3, 0.5)
    assert (month["tasks"], month["completion_tokens"], month["cost_usd"]) == (2, 8, 0.75)
    finished("late", now - 86400, 1.0)  # a row of yesterday that landed late
    finished("now", now + 1, 1.0)
    later = shots.usage(now + 2)
    assert [later["today"][0]["tasks"], later["this_month"][0]["tasks"]] == [2, 3]
    hour_on = shots.usage(now + 3601)
    assert [hour_on["today"][0]["tasks"], hour_on["this_month"][0]["tasks"]] == [2, 4]
    # the figures of each day and month, to be written into cluster_usage
    shots = Snapshots(Spool.open(home), path,
                      config_module.load(home / "config" / "koubou.yaml"))
    shots.take(now)
    first_look = shots.unwritten
    assert sorted(first_look) == sorted(
        [f"2026-10-{d:02d}" for d in range(1, 32)] + ["2026-10"]
        + [f"2026-11-{d:02d}" for d in range(1, 16)] + ["2026-11"])
    assert [row["tasks"] for row in first_look["2026-10-26"]] == [1]  # last month's
    assert [row["tasks"] for row in first_look["2026-10"]] == [1]
    assert [row["tasks"] for row in first_look["2026-11-14"]] == [2]  # yesterday, with `late`
    assert first_look["2026-11-13"] == []  # covered: nothing ran that day
    shots.written()
    shots.usage(now + 2)
    assert sorted(shots.unwritten) == ["2026-11", "2026-11-15"]  # today's, at each heartbeat
    shots.written()
    finished("after-midnight", now + 12 * 3600 + 60, 1.0)
    shots.usage(now + 12 * 3600 + 120)  # the next day: yesterday summed once more, whole
    assert sorted(shots.unwritten) == sorted(
        [f"2026-11-{d:02d}" for d in range(1, 17)] + ["2026-11"])
    assert [row["tasks"] for row in shots.unwritten["2026-11-15"]] == [2]
    assert [row["tasks"] for row in shots.unwritten["2026-11-16"]] == [1]


def test_a_report_of_an_earlier_day_shows_what_each_host_ran_that_day(
        hosts, pg_dsn: str) -> None:  # noqa: F811 (the fixture of test_cluster_hosts)
    # Before: only a host's row was read, which holds its today and this month, so a report
    # of yesterday showed no host's figures.
    from datetime import timedelta

    from koubou_spool.observe import report as report_module
    from koubou_spool.spool.ledger import LedgerWriter
    from koubou_spool.spool.task import iso
    a, b = hosts("host-a"), hosts("host-b")
    yesterday = report_module.local_day(time.time(), None) - timedelta(days=1)
    noon = report_module.day_start(yesterday, None) + 12 * 3600
    writer = LedgerWriter(b.home / "db" / "koubou.db")
    for n in range(3):
        writer.task_finished({"id": f"old-{n}", "content": "x", "status": "completed",
                              "result": {"content": "ok", "craftsman": "echo", "attempts": 1,
                                         "usage": {"prompt_tokens": 2, "completion_tokens": 5},
                                         "queued_at": iso(noon), "started_at": iso(noon),
                                         "finished_at": iso(noon + n)}})
    writer.close()
    b.start("cluster")  # host b's bridge alone: it writes its days as it starts
    day = yesterday.isoformat()
    def look() -> dict:  # "cannot be read" until host b's bridge has made the schema
        out, err = koubou(a.home, "report", "--day", day, "--json")
        return {} if err else json.loads(out)["cluster"]
    seen = until(look, lambda seen: seen and seen["total"]["tasks"] == 3)
    [line] = seen["hosts"]
    assert (line["host"], line["covered"], line["completed"], line["completion_tokens"]) == (
        "host-b", True, 3, 15)
    month = koubou_json(a.home, "report", "--month", day[:7])["cluster"]
    assert month["total"]["completed"] >= 3 and month["hosts"][0]["covered"]
    old, _ = koubou(a.home, "report", "--month", "2020-01")
    assert "no figures for this period from host-b" in old
    out, _ = koubou(a.home, "report", "--day", day)
    assert f"cluster hosts, tasks each ran in {day}:" in out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("total ")][-1] == [
        "total", "3"]
