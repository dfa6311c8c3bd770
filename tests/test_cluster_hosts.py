"""Homes as hosts of one cluster, end to end: each home with its own `koubou worker` and
`koubou cluster` processes and its own cluster.host, on a real PostgreSQL (tests/pgserver.py).
Tasks dropped into one host's pending/ whose craftsman only another host serves run there and
come back into the first host's completed/; kill -9 of a serving host, and a restart of the
server, lose none and complete none twice."""

from __future__ import annotations

import collections
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from koubou_spool import config as config_module
from koubou_spool.cli.koubou import cli
from koubou_spool.service import serving
from koubou_spool.spool import task as task_format
from koubou_spool.spool.entries import BRIDGE_PREFIX

import clusterhosts
from clusterhosts import DSN_ENV, LEASE_S, Host, drop, rows, wait_delivered
from conftest import log_of, read_json, submit, wait_outcomes

hosts = clusterhosts.hosts  # the fixture, found by pytest here


def assert_once_each(origin: Host, servers: list[Host], ids: list[str], pg_dsn: str) -> None:
    """Each task completed, its outcome in the origin's completed/ (once: a name is one file),
    run by a worker of a serving host, the cluster's row completed and delivered."""
    outcomes = wait_outcomes(origin.spool, ids, timeout=30)
    assert not {f"{i}.json" for i in ids} & set(os.listdir(origin.spool.failed))
    server_ids = {w for host in servers for w in host.spool.worker_ids()}
    for record in outcomes.values():
        assert record["status"] == "completed", record
        assert "metadata" not in record  # take_in's mark stays on the host that ran it
        assert record["result"]["worker_id"] in server_ids
    found = wait_delivered(pg_dsn, ids)
    assert {i: found[i][0] for i in ids} == dict.fromkeys(ids, "completed")
    assert all(found[i][2] == origin.name and found[i][4] for i in ids)
    names = {f"{i}.json" for i in ids}
    assert not names & set(os.listdir(origin.spool.pending))
    assert not [entry for entry, _ in origin.spool.claims() if entry.split("@")[0] in names]


def test_tasks_dropped_on_one_host_run_on_the_host_that_serves_them_and_come_back(
        hosts, pg_dsn: str) -> None:
    started = time.monotonic()
    a, b = hosts("host-a"), hosts("host-b")
    a.serve("local")  # host a serves no echo
    b.serve("echo")
    submit(a.spool, id="stays", content="x", craftsman="local")
    config_a = config_module.load(a.home / "config" / "koubou.yaml")
    assert serving.unserved(a.spool, config_a, [task_format.validate(  # the bridge forwards it
        {"content": "x", "craftsman": "echo"})]) == []
    submit(a.spool, id="secret", content="x", craftsman="echo", sensitivity="confidential")
    ids = drop(a, 40, "across")
    assert_once_each(a, [b], ids, pg_dsn)
    assert "stays" not in rows(pg_dsn)  # a task host a serves never leaves it
    assert "secret" not in rows(pg_dsn) and a.spool.find("secret").state == "pending"
    assert sorted(os.listdir(b.spool.completed)) == sorted(f"{i}.json" for i in ids)
    more = drop(a, 5, "later")  # the bridges are idle now: inotify and NOTIFY wake them
    assert_once_each(a, [b], more, pg_dsn)
    # SIGTERM: the bridges exit 0 (index 1; a worker's own SIGTERM exit is test_worker's, and
    # once, under load, a worker here died of it: see the note)
    assert a.terminate()[1] == 0 and b.terminate()[1] == 0
    # (a worker stopping may log a heartbeat on its closed lock: that is the worker's)
    assert "Traceback" not in a.logs("cluster") + b.logs("cluster")
    assert a.spool.find("stays").state in ("pending", "in_progress", "failed")  # still a's
    assert time.monotonic() - started < 20


def test_a_serving_host_killed_mid_run_has_its_tasks_taken_over_after_the_lease(
        hosts, pg_dsn: str) -> None:
    a, b, c = hosts("host-a"), hosts("host-b", latency_ms=400, slots=4), hosts("host-c")
    a.serve("local")
    b.serve("echo")
    ids = drop(a, 24, "killed")
    deadline = time.monotonic() + 15
    # Host b is on its way: a first round done there (its own completed/, not a's: a's
    # deliveries may lag behind on a busy machine), rounds left to take in, and a round in
    # hand (between two rounds b holds no lease: on a loaded machine the look can land there).
    while len(os.listdir(b.spool.completed)) < 4 or not (
            {"pending", "in_progress"} <= {row[0] for row in rows(pg_dsn).values()}):
        assert time.monotonic() < deadline, b.logs()
        time.sleep(0.05)
    b.kill()  # kill -9 of every process of host b, leases held
    held = [i for i, row in rows(pg_dsn).items() if row[0] == "in_progress"]
    assert held, "host b held no lease when it was killed"
    c.serve("echo")
    assert_once_each(a, [b, c], ids, pg_dsn)
    found = rows(pg_dsn)
    assert all(found[i][1] == 2 and found[i][3] == "host-c" for i in held)  # taken over once
    assert "Traceback" not in a.logs("cluster") + c.logs("cluster")


def test_a_postgres_restart_mid_run_loses_nothing_and_wakeups_resume(
        hosts, pg_server, pg_dsn: str) -> None:
    a, b = hosts("host-a"), hosts("host-b", latency_ms=100, slots=4)
    a.serve("local")
    b.serve("echo")
    ids = drop(a, 30, "before")
    deadline = time.monotonic() + 15
    while len(os.listdir(a.spool.completed)) < 3:
        assert time.monotonic() < deadline, b.logs()
        time.sleep(0.05)
    pg_server.restart()
    after = drop(a, 10, "after")  # dropped once the server is back
    assert_once_each(a, [b], ids + after, pg_dsn)
    # (a worker stopping may log a heartbeat on its closed lock: that is the worker's)
    assert "Traceback" not in a.logs("cluster") + b.logs("cluster")


def test_while_the_cluster_cannot_be_reached_local_work_goes_on_and_it_is_said_once(
        hosts, pg_server, monkeypatch: pytest.MonkeyPatch) -> None:
    import pgserver
    monkeypatch.setenv(DSN_ENV, f"host=127.0.0.1 port={pgserver.free_port()} user=koubou "
                       "dbname=nowhere")
    a = hosts("host-a")
    _, bridge = a.serve("echo")
    ids = drop(a, 5, "local")
    outcomes = wait_outcomes(a.spool, ids, timeout=15)  # its own worker, no database needed
    assert all(record["status"] == "completed" for record in outcomes.values())
    submit(a.spool, id="waits", content="x", craftsman="local")  # no worker serves it here
    time.sleep(2)  # some heartbeats of trying again
    assert a.spool.find("waits").state == "pending" and "attempts" not in read_json(
        a.spool.pending / "waits.json")
    assert bridge.poll() is None
    assert log_of(bridge).count("cannot be reached") == 1  # once a minute, not per attempt
    bridge.send_signal(signal.SIGTERM)
    assert bridge.wait(timeout=10) == 0


def test_a_home_without_a_cluster_dsn_is_told_in_one_sentence(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DSN_ENV, raising=False)
    host = Host(tmp_path, "host-a")
    result = subprocess.run([sys.executable, "-m", "koubou_spool.cli.koubou", "cluster", "--home",
                             str(host.home)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"koubou: cluster.dsn_env names {DSN_ENV}, which is not set in this environment; "
        "export the cluster's PostgreSQL DSN in it"]


def test_a_second_bridge_in_one_home_is_refused_in_one_sentence(hosts) -> None:
    a = hosts("host-a")
    _, first = a.serve("echo")
    second = a.start("cluster")
    assert second.wait(timeout=30) == 2  # before: it ran beside the first, both forwarding
    assert log_of(second).strip().splitlines()[-1] == (
        f"koubou: another bridge serves this home already (pid {first.pid}): "
        "one `koubou cluster` per home")
    assert first.poll() is None  # the first serves on, the only bridge registered
    assert [i for i in a.spool.worker_ids() if i.startswith(BRIDGE_PREFIX)] == [
        i for i in a.spool.worker_ids() if (a.spool.worker_info(i) or {}).get("pid") == first.pid]


def test_doctor_checks_the_cluster(tmp_path: Path, pg_dsn: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import pgserver
    from koubou_spool.ops import doctor
    from koubou_spool.spool import cluster
    host = Host(tmp_path, "host-a")
    config_path = host.home / "config" / "koubou.yaml"
    config = config_module.load(config_path)
    monkeypatch.delenv(DSN_ENV, raising=False)
    [unset] = doctor.check_cluster(config)
    assert unset.level == doctor.ERROR and f"{DSN_ENV}, which is not set" in unset.message
    monkeypatch.setenv(DSN_ENV, f"host=127.0.0.1 port={pgserver.free_port()} user=koubou dbname=x")
    [down] = doctor.check_cluster(config)
    assert down.level == doctor.ERROR and "cannot be reached" in down.message
    monkeypatch.setenv(DSN_ENV, pg_dsn)
    fresh = doctor.check_cluster(config)  # an empty database: the bridge will migrate it
    assert [p.level for p in fresh] == [doctor.INFO, doctor.WARNING]
    assert "schema version 0 of" in fresh[0].message and "s from the database's" in fresh[0].message
    cluster.Cluster.open(pg_dsn, host="host-a").close()
    checks = {c.name: c for c in doctor.run(host.home, config_path, timeout=0.5)}
    assert checks["cluster"].status == "ok"
    assert f"schema version {cluster.SCHEMA_VERSION} of" in checks["cluster"].problems[0].message
    monkeypatch.setattr(cluster.Cluster, "clock_skew", lambda self: 12.5)
    skewed = doctor.check_cluster(config)
    assert [p.level for p in skewed] == [doctor.INFO, doctor.WARNING]
    assert "clock is +12.5 s from the cluster database's" in skewed[1].message


def test_an_origin_bridge_killed_mid_run_is_replaced_and_nothing_runs_twice(
        hosts, pg_dsn: str) -> None:
    a, b = hosts("host-a"), hosts("host-b", latency_ms=300, slots=2)
    _, first = a.serve("local")
    b.serve("echo")
    ids = drop(a, 10, "orphan")
    deadline = time.monotonic() + 15
    while len(os.listdir(a.spool.completed)) < 2 or len(rows(pg_dsn)) < len(ids):
        assert time.monotonic() < deadline, a.logs("cluster")
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # its claims on host a are the faces of tasks on host b
    first.wait(timeout=10)
    delivered = set(os.listdir(a.spool.completed))
    faces = {entry.split("@")[0] for entry, _ in a.spool.claims()}
    # A worker of echo comes up on host a while no bridge runs there. The faces stay claimed
    # for the next bridge (before: host a's workers requeued them at their next heartbeat, and
    # this one ran them beside host b).
    local = a.start("worker", "--craftsman", "echo")
    deadline = time.monotonic() + 15
    while len(a.spool.worker_ids()) < 3:
        assert time.monotonic() < deadline, a.logs("worker")
        time.sleep(0.02)
    time.sleep(1.5)  # three heartbeats of each worker, each with its recovery
    assert os.listdir(a.spool.pending) == [] and set(os.listdir(a.spool.completed)) == delivered
    assert {entry.split("@")[0] for entry, _ in a.spool.claims()} == faces
    from koubou_spool.ops import doctor
    config = config_module.load(a.home / "config" / "koubou.yaml")
    [said] = doctor.check_faces(a.home, config)  # nothing else says where they wait
    assert said.level == doctor.WARNING and said.message.startswith(
        f"{len(faces)} task(s) forwarded to the cluster by a bridge that is no longer running")
    a.start("cluster")  # a new bridge adopts them: home what no host leased, the rest delivered
    assert_once_each(a, [a, b], ids, pg_dsn)
    assert doctor.check_faces(a.home, config) == []
    assert doctor.check_faces(a.home / "nowhere", config) == []  # the home check says why
    ran_on_b = {name.removesuffix(".json") for name in os.listdir(b.spool.completed)}
    assert "adopted" in a.logs("cluster")
    time.sleep(0.2)  # the ledger's records follow the outcomes by a commit
    with sqlite3.connect(a.home / "db" / "koubou.db") as ledger:
        ran_on_a = {row[0] for row in ledger.execute(
            "SELECT task_id FROM attempts WHERE worker_id = ?", (local_worker(a, local),))}
    assert ran_on_a.isdisjoint(ran_on_b) and ran_on_a | ran_on_b >= set(ids)


def local_worker(host: Host, proc: subprocess.Popen) -> str:
    """The worker id of one of a host's worker processes."""
    return next(i for i in host.spool.worker_ids()
                if (host.spool.worker_info(i) or {}).get("pid") == proc.pid)


def test_two_serving_hosts_share_the_work_each_taking_no_more_than_its_slots(
        hosts, pg_dsn: str) -> None:
    a = hosts("host-a")
    b, c = hosts("host-b", latency_ms=200, slots=2), hosts("host-c", latency_ms=200, slots=2)
    a.serve("local")
    b.serve("echo")
    c.serve("echo")
    ids = drop(a, 16, "shared")
    most = 0
    deadline = time.monotonic() + 30
    while len(os.listdir(a.spool.completed)) < len(ids):
        assert time.monotonic() < deadline, a.logs("cluster")
        held = collections.Counter(row[3] for row in rows(pg_dsn).values()
                                   if row[0] == "in_progress")
        most = max([most, *held.values()])
        time.sleep(0.05)
    assert_once_each(a, [b, c], ids, pg_dsn)
    ran = collections.Counter(row[3] for row in rows(pg_dsn).values())
    assert set(ran) == {"host-b", "host-c"} and sum(ran.values()) == len(ids), ran
    assert most <= 2  # never more leases on one host than its echo's max_concurrent


def test_a_host_busy_with_its_own_tasks_leaves_the_cluster_tasks_to_a_free_host(
        hosts, pg_dsn: str) -> None:
    # Take-ins count the home's own tasks of the craftsman, running and waiting, against its
    # max_concurrent: before, host b took in two more, to wait there behind its own work.
    a = hosts("host-a")
    b, c = hosts("host-b", latency_ms=1500, slots=2), hosts("host-c", latency_ms=100, slots=2)
    a.serve("local")
    b.serve("echo")
    c.serve("echo")
    own = drop(b, 6, "own")  # two running, four waiting: 4.5 s of work
    deadline = time.monotonic() + 15
    while sum(entry.startswith("own-") for entry, _ in b.spool.claims()) < 2:
        assert time.monotonic() < deadline, b.logs()
        time.sleep(0.02)
    ids = drop(a, 6, "shared")
    assert_once_each(a, [b, c], ids, pg_dsn)
    assert collections.Counter(row[3] for row in rows(pg_dsn).values()) == {"host-c": 6}
    assert not [i for i in own if i in rows(pg_dsn)]  # its own never left it
    wait_outcomes(b.spool, own, timeout=30)


def test_a_host_whose_own_work_ends_takes_in_the_cluster_tasks_that_waited(
        hosts, pg_dsn: str) -> None:
    # Nothing else announces the end of the home's own work: no lease ended, and the tasks'
    # NOTIFY went out long before. A task of its own waiting for its not_before holds no slot.
    a, b = hosts("host-a"), hosts("host-b", latency_ms=700, slots=1)
    a.serve("local")
    b.serve("echo")
    tomorrow = task_format.iso(time.time() + 86400)
    submit(b.spool, id="own-later", content="later", craftsman="echo", not_before=tomorrow)
    [own] = drop(b, 1, "own")
    deadline = time.monotonic() + 15
    while not any(entry.startswith(f"{own}.json@") for entry, _ in b.spool.claims()):
        assert time.monotonic() < deadline, b.logs()
        time.sleep(0.02)
    ids = drop(a, 2, "waited")
    assert_once_each(a, [b], ids, pg_dsn)  # before: pending for good once b's own task ended
    assert os.listdir(b.spool.pending) == ["own-later.json"]


def test_leases_of_a_serving_worker_that_died_are_given_back_at_once_by_its_bridge(
        hosts, pg_dsn: str) -> None:
    a, b, c = hosts("host-a"), hosts("host-b", latency_ms=400, slots=4), hosts("host-c")
    a.serve("local")
    worker_b, _ = b.serve("echo")
    c.serve("local")  # host c's echo worker starts later
    ids = drop(a, 12, "handed")
    deadline = time.monotonic() + 15
    while len(os.listdir(a.spool.completed)) < 2:
        assert time.monotonic() < deadline, b.logs()
        time.sleep(0.05)
    worker_b.send_signal(signal.SIGKILL)  # host b's bridge lives on
    worker_b.wait(timeout=10)
    c.start("worker", "--craftsman", "echo")
    started = time.monotonic()
    assert_once_each(a, [b, c], ids, pg_dsn)
    assert time.monotonic() - started < LEASE_S * 3
    assert "gave back" in b.logs("cluster")
    assert all(rows(pg_dsn)[i][3] in ("host-b", "host-c") for i in ids)


def test_a_lease_that_ends_at_a_heartbeat_makes_room_for_the_next_task(
        hosts, pg_dsn: str) -> None:
    # The heartbeat may send back an outcome before the round its inotify event wakes: then the
    # heartbeat, not the round, freed the slot, and no NOTIFY will come for the tasks that wait
    # (theirs went out when they were forwarded). Seen as a stall in a run as a normal user.
    a, b = hosts("host-a"), hosts("host-b", latency_ms=1000, slots=1)
    a.serve("local")
    _, bridge_b = b.serve("echo")
    ids = drop(a, 3, "beat")
    deadline = time.monotonic() + 15
    while sorted(row[0] for row in rows(pg_dsn).values()) != ["in_progress", "pending",
                                                               "pending"]:
        assert time.monotonic() < deadline, b.logs()
        time.sleep(0.02)
    time.sleep(0.3)  # the NOTIFYs of the forwards reach host b's bridge and are spent
    bridge_b.send_signal(signal.SIGSTOP)  # its lease's task finishes while it cannot look
    try:
        wait_outcomes(b.spool, [i for i, row in rows(pg_dsn).items() if row[0] == "in_progress"])
        time.sleep(1.0)  # past its heartbeat_s (0.5): it wakes to a beat and the event at once
    finally:
        bridge_b.send_signal(signal.SIGCONT)
    assert_once_each(a, [b], ids, pg_dsn)


def cancel_on(host: Host, task_id: str) -> None:
    result = CliRunner().invoke(cli, ["cancel", task_id, "--home", str(host.home)])
    assert result.exit_code == 0, result.output


def wait_row(pg_dsn: str, task_id: str, state: str, timeout: float = 10) -> tuple:
    """Until the task's cluster row is in `state` (the first bridge may not have made the
    schema yet); the row."""
    deadline = time.monotonic() + timeout
    row = None
    while row is None or row[0] != state:
        assert time.monotonic() < deadline, row
        time.sleep(0.05)
        try:
            row = rows(pg_dsn).get(task_id)
        except clusterhosts.psycopg.errors.UndefinedTable:
            row = None
    return row


def running_on(a: Host, b: Host, prefix: str) -> str:
    """A task dropped on host a, once host b's worker is running it (a slow echo there)."""
    a.serve("local")
    b.serve("echo")
    [task_id] = drop(a, 1, prefix)
    deadline = time.monotonic() + 15
    while not any(entry.startswith(f"{task_id}.json@vm-") for entry, _ in b.spool.claims()):
        assert time.monotonic() < deadline, b.logs()
        time.sleep(0.05)
    return task_id


def test_a_task_cancelled_on_its_origin_stops_on_the_host_running_it(
        hosts, pg_dsn: str) -> None:
    a, b = hosts("host-a"), hosts("host-b", latency_ms=20_000, slots=2)
    task_id = running_on(a, b, "cancel")
    started = time.monotonic()
    cancel_on(a, task_id)
    assert read_json(a.spool.failed / f"{task_id}.json")["error"]["kind"] == "cancelled"
    wait_row(pg_dsn, task_id, "failed")
    [stopped] = wait_outcomes(b.spool, [task_id], timeout=10).values()  # not after 20 s
    assert stopped["status"] == "failed" and stopped["error"]["kind"] == "cancelled"
    assert time.monotonic() - started < 10
    assert not (b.spool.completed / f"{task_id}.json").exists()
    assert not (a.spool.completed / f"{task_id}.json").exists()
    while f"stopped {task_id}" not in b.logs("cluster"):  # logged once its cancel returned
        assert time.monotonic() - started < 10, b.logs("cluster")
        time.sleep(0.05)
    assert "Traceback" not in a.logs("cluster") + b.logs("cluster")


def test_a_forwarded_task_cancelled_before_any_host_takes_it_never_runs(
        hosts, pg_dsn: str) -> None:
    a, b = hosts("host-a"), hosts("host-b")
    a.serve("local")  # no host serves echo yet: the task waits in the cluster
    [task_id] = drop(a, 1, "early")
    wait_row(pg_dsn, task_id, "pending")
    cancel_on(a, task_id)
    assert wait_row(pg_dsn, task_id, "failed")[1] == 0  # never claimed
    b.serve("echo")
    later = drop(a, 2, "later")  # host b serves and takes these, not the cancelled one
    assert_once_each(a, [b], later, pg_dsn)
    assert rows(pg_dsn)[task_id][:2] == ("failed", 0)
    assert task_id not in {entry.split(".json")[0] for entry in os.listdir(b.spool.pending)
                           + os.listdir(b.spool.completed) + os.listdir(b.spool.failed)}
    assert read_json(a.spool.failed / f"{task_id}.json")["error"]["kind"] == "cancelled"


def test_a_forwarded_task_comes_home_when_a_worker_of_its_craftsman_starts_there(
        hosts, pg_dsn: str) -> None:
    a = hosts("host-a")
    a.serve("local")  # no host serves echo: the task leaves and waits in the cluster
    [task_id] = drop(a, 1, "home")
    wait_row(pg_dsn, task_id, "pending")
    a.start("worker", "--craftsman", "echo")  # before: it waited for another host for ever
    [outcome] = wait_outcomes(a.spool, [task_id], timeout=15).values()
    assert outcome["status"] == "completed" and outcome["result"]["attempts"] == 1
    assert task_id not in rows(pg_dsn)
    assert "brought 1 task(s) home from the cluster" in a.logs("cluster")
    assert "Traceback" not in a.logs()


def test_a_cluster_task_retried_on_its_origin_runs_again(hosts, pg_dsn: str) -> None:
    a, b = hosts("host-a"), hosts("host-b")
    a.serve("local")
    [task_id] = drop(a, 1, "again")
    wait_row(pg_dsn, task_id, "pending")
    cancel_on(a, task_id)  # failed on its origin, over in the cluster, delivered
    wait_row(pg_dsn, task_id, "failed")
    result = CliRunner().invoke(cli, ["retry", task_id, "--home", str(a.home)])
    assert result.exit_code == 0, result.output
    wait_row(pg_dsn, task_id, "pending")  # forwarded again: the same row, a new run
    b.serve("echo")
    assert_once_each(a, [b], [task_id], pg_dsn)
    assert not (a.spool.failed / f"{task_id}.json").exists()
    assert rows(pg_dsn)[task_id][:2] == ("completed", 1)


def test_a_retry_of_a_task_that_ended_on_a_serving_host_runs_there_again(
        hosts, pg_dsn: str) -> None:
    # Host b holds the old run's outcome (cancelled while it ran there). The retried task it
    # leases again is a new run: it must run, not have that outcome sent back as its own.
    a, b = hosts("host-a"), hosts("host-b", latency_ms=20_000, slots=2)
    task_id = running_on(a, b, "rerun")
    cancel_on(a, task_id)
    [stopped] = wait_outcomes(b.spool, [task_id], timeout=10).values()
    assert stopped["error"]["kind"] == "cancelled"
    wait_delivered(pg_dsn, [task_id])
    b.kill()  # and back without the latency, so that the new run is quick
    path = b.home / "config" / "koubou.yaml"
    path.write_text(path.read_text().replace("latency_ms: 20000", "latency_ms: 0"))
    result = CliRunner().invoke(cli, ["retry", task_id, "--home", str(a.home)])
    assert result.exit_code == 0, result.output
    b.serve("echo")
    assert_once_each(a, [b], [task_id], pg_dsn)
    assert read_json(b.spool.completed / f"{task_id}.json")["result"]["content"] == "rerun 0"
    assert not (b.spool.failed / f"{task_id}.json").exists()
    assert rows(pg_dsn)[task_id][:2] == ("completed", 2)


def test_a_forwarded_task_with_not_before_runs_at_its_time_with_nothing_else_happening(
        hosts, pg_dsn: str) -> None:
    # Nothing wakes the serving host's bridge at the task's time but the time itself: no other
    # task, no outcome, no NOTIFY (the task's went out when it was forwarded, too early).
    a, b = hosts("host-a"), hosts("host-b")
    a.serve("local")
    b.serve("echo")
    later = time.time() + 3
    task_id = submit(a.spool, craftsman="echo", content="later",
                     not_before=task_format.iso(later))
    outcome = wait_outcomes(a.spool, [task_id], timeout=15)[task_id]
    back = time.time()
    assert outcome["status"] == "completed"
    assert later <= back < later + 5, back - later  # at its time: not before, not much after
    assert rows(pg_dsn)[task_id][:2] == ("completed", 1)
    print(f"\nthe outcome was back {back - later:.2f} s after its not_before")


def test_a_forwarded_task_no_host_starts_before_its_expires_at_fails_as_expired(
        hosts, pg_dsn: str) -> None:
    a = hosts("host-a")
    a.serve("local")  # no host serves echo: the task waits in the cluster
    deadline = time.time() + 2
    task_id = submit(a.spool, craftsman="echo", content="soon or never",
                     expires_at=task_format.iso(deadline))
    outcome = wait_outcomes(a.spool, [task_id], timeout=10)[task_id]
    back = time.time()
    assert outcome["status"] == "failed" and outcome["error"]["kind"] == "expired", outcome
    assert deadline <= back < deadline + 4, back - deadline
    assert wait_delivered(pg_dsn, [task_id])[task_id][0] == "failed"
    b = hosts("host-b")
    b.serve("echo")  # a host that comes for it later finds nothing to run
    late = drop(a, 1, "late")
    assert_once_each(a, [b], late, pg_dsn)
    assert not (b.spool.completed / f"{task_id}.json").exists()


def test_a_cancel_made_while_the_origins_bridge_was_down_reaches_the_cluster(
        hosts, pg_dsn: str) -> None:
    # No inotify event of the bridge saw the cancel's outcome land (it was not running; an
    # overflow loses one the same way): its first look at the home must find it.
    a, b = hosts("host-a"), hosts("host-b")
    _, bridge_a = a.serve("local")
    [task_id] = drop(a, 1, "unseen")
    wait_row(pg_dsn, task_id, "pending")
    bridge_a.kill()
    bridge_a.wait()
    cancel_on(a, task_id)
    a.start("cluster")
    assert wait_row(pg_dsn, task_id, "failed")[1] == 0  # ended there, never claimed
    b.serve("echo")
    later = drop(a, 2, "later")
    assert_once_each(a, [b], later, pg_dsn)
    assert not (b.spool.completed / f"{task_id}.json").exists()
