"""The cluster queue (koubou_spool/spool/cluster.py) against a real PostgreSQL server
(tests/pgserver.py): the schema, claims, leases, the fence, delivery, wake-ups, the budget,
faults (a server restarted mid-run, a claimer killed or frozen), and the origin's half of the
bridge (koubou_spool/spool/bridge.py) between a real home and the cluster."""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from koubou_spool import config as config_module
from koubou_spool.spool import home as home_module, task as task_format
from koubou_spool.spool.files import Spool

from conftest import Workers, read_json, submit, wait_outcomes, write_config
from test_disk import _fill as fill_disk, small_disk  # noqa: F401 (a fixture, used by name)
import pgserver

try:
    from koubou_spool.service import bridging
    from koubou_spool.service.bridge_wakeups import Events
    from koubou_spool.spool import bridge, cluster
except ImportError:  # psycopg missing: the pg_server fixture names the command that adds it
    bridge = bridging = cluster = Events = None

CLAIMER = Path(__file__).parent / "cluster_claimer.py"
LEASE_S = 1.0
DSN_ENV = "KOUBOU_TEST_CLUSTER_DSN"


def tasks(count: int, craftsman: str = "echo", prefix: str = "t", **fields: object) -> list:
    """Submissions of `count` tasks with ids PREFIX-0000..."""
    return [cluster.Submission(task_format.validate(
        {"id": f"{prefix}-{n:04d}", "content": f"task {n}", **fields}), craftsman)
        for n in range(count)]


def completed(claim: cluster.ClusterClaim) -> dict:
    return {"id": claim.task_id, "content": "x", "status": "completed",
            "result": {"content": "done", "worker_id": claim.worker_id, "attempts": claim.attempt}}


def wait_until(condition, timeout: float, what: str) -> None:
    """For conditions no event announces (a lease running out on the server's clock)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.05)


@pytest.fixture
def store(pg_dsn: str):
    handle = cluster.Cluster.open(pg_dsn, host="host-a", lease_s=LEASE_S)
    yield handle
    handle.close()


# --- the schema ----------------------------------------------------------------------------------

def test_schema_is_created_on_first_connect_once_however_many_connect(pg_dsn: str) -> None:
    errors: list[BaseException] = []
    applied: list[list[str]] = []

    def first_connect() -> None:
        try:
            conn = cluster.connect(pg_dsn)
            applied.append(cluster.migrate(conn))
            conn.close()
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=first_connect) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert sorted(len(names) for names in applied) == [0] * 5 + [cluster.SCHEMA_VERSION]
    with cluster.connect(pg_dsn) as conn:
        assert cluster.schema_version(conn) == cluster.SCHEMA_VERSION
        assert cluster.migrate(conn) == []


def test_a_schema_newer_than_this_koubou_is_refused(store: cluster.Cluster, pg_dsn: str) -> None:
    with cluster.connect(pg_dsn) as conn:
        conn.execute("INSERT INTO cluster_migrations (name) VALUES ('9999_from_the_future')")
        with pytest.raises(cluster.ClusterSchemaError, match="9999_from_the_future"):
            cluster.migrate(conn)


# --- submit and claim ----------------------------------------------------------------------------

def test_submit_is_idempotent_on_the_id(store: cluster.Cluster) -> None:
    assert store.submit(tasks(2)) == [("t-0000", "pending", True), ("t-0001", "pending", True)]
    claim = store.claim("w1", ["echo"])
    again = store.submit(tasks(3))
    assert again == [("t-0000", "in_progress", False), ("t-0001", "pending", False),
                     ("t-0002", "pending", True)]
    assert store.publish(claim, completed(claim))
    assert store.submit(tasks(1))[0] == ("t-0000", "completed", False)
    assert store.submit(tasks(4)[3:] * 2) == [("t-0003", "pending", True),
                                              ("t-0003", "pending", False)]
    assert store.counts() == {"pending": 3, "in_progress": 0, "completed": 1, "failed": 0}


def test_claims_go_by_craftsman_then_priority_then_submit_order(store: cluster.Cluster) -> None:
    store.submit(tasks(2, "cloud", "c", priority=9))
    store.submit(tasks(3, "echo", "low", priority=2) + tasks(2, "echo", "high", priority=8))
    order = []
    while (claim := store.claim("w1", ["echo"])) is not None:
        order.append(claim.task_id)
        assert (claim.attempt, claim.craftsman, claim.origin) == (1, "echo", "host-a")
        assert task_format.decode(claim.body)["submitted_at"]
    assert order == ["high-0000", "high-0001", "low-0000", "low-0001", "low-0002"]
    assert store.counts()["pending"] == 2  # the cloud tasks wait for a host that serves cloud


def test_a_task_not_before_its_time_is_not_claimed(store: cluster.Cluster) -> None:
    store.submit(tasks(1, not_before=task_format.iso(time.time() + 3600)))
    assert store.claim("w1", ["echo"]) is None


def test_racing_claimers_each_task_goes_to_one(pg_dsn: str, store: cluster.Cluster) -> None:
    count, claimers = 400, 8
    store.submit(tasks(count))
    taken: list[list[str]] = [[] for _ in range(claimers)]

    def claim_all(n: int) -> None:
        own = cluster.Cluster(pg_dsn, host=f"host-{n}", lease_s=60)
        while (claim := own.claim(f"w{n}", ["echo"])) is not None:
            taken[n].append(claim.task_id)
        own.close()

    threads = [threading.Thread(target=claim_all, args=(n,)) for n in range(claimers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    elapsed = time.perf_counter() - started
    every = [task_id for own in taken for task_id in own]
    assert sorted(every) == [f"t-{n:04d}" for n in range(count)]  # each once, none lost
    assert sum(1 for own in taken if own) > 1  # they really raced
    print(f"\n{count} claims by {claimers} connections through SKIP LOCKED: "
          f"{count / elapsed:.0f} claims/s")


# --- leases and the fence ------------------------------------------------------------------------

def test_a_heartbeat_renews_leases_and_names_the_revoked(store: cluster.Cluster) -> None:
    store.submit(tasks(2))
    first, second = store.claim("w1", ["echo"]), store.claim("w1", ["echo"])
    time.sleep(LEASE_S * 0.6)
    assert store.heartbeat("w1", [first, second]) == []
    assert store.renew(first)
    time.sleep(LEASE_S * 0.6)  # past the first lease's end, not the renewed one's
    assert store.take_back_expired() == []
    with cluster.connect(store.dsn) as conn:  # a cancel, say, revokes the second
        conn.execute("UPDATE cluster_tasks SET state = 'pending', worker_id = NULL"
                     " WHERE id = %s", (second.task_id,))
    assert store.heartbeat("w1", [first, second]) == [second]
    assert not store.renew(second)


def test_a_heartbeat_leaves_a_lease_its_holder_does_not_track_to_run_out(
        store: cluster.Cluster, pg_dsn: str) -> None:
    store.submit(tasks(2))
    tracked = store.claim("w1", ["echo"])
    store.claim("w1", ["echo"])  # its reply lost, say: w1 never knew it had t-0001
    wait_until(lambda: store.heartbeat("w1", [tracked]) == []
               and store.take_back_expired() == [("t-0001", "pending")], LEASE_S * 5,
               "the untracked lease's end")
    other = cluster.Cluster(pg_dsn, host="host-b", lease_s=LEASE_S)
    assert (other.claim("w2", ["echo"]).task_id, tracked.attempt) == ("t-0001", 1)
    assert store.heartbeat("w1", [tracked]) == [] and store.renew(tracked)  # still w1's
    other.close()


def test_a_lease_that_runs_out_after_the_tasks_expires_at_fails_it_as_expired(
        store: cluster.Cluster) -> None:
    # Its origin's timer fired while the task was leased (a host had started it, so the origin
    # left it be); the host then died. Back to pending, it would wait for a host that serves
    # its craftsman, maybe none: it fails as expired at the take-back instead.
    soon = task_format.iso(time.time() + 0.3)
    store.submit(tasks(1, prefix="soon", expires_at=soon) + tasks(1, prefix="later"))
    claims = [store.claim("w-dead", ["echo"]) for _ in range(2)]
    assert sorted(c.task_id for c in claims) == ["later-0000", "soon-0000"]
    taken: list = []  # the two leases end a statement apart: one look may take back one only
    wait_until(lambda: taken.extend(store.take_back_expired()) or sorted(taken) == [
        ("later-0000", "pending"), ("soon-0000", "failed")], LEASE_S * 5, "the leases' end")
    [delivery] = store.undelivered()
    outcome = delivery.outcome
    assert (delivery.task_id, delivery.state, outcome["error"]["kind"]) == (
        "soon-0000", "failed", "expired")
    assert "lease ran out after its expires_at (worker w-dead" in outcome["error"]["message"]
    assert outcome["expires_at"] == soon and outcome["error"]["attempts"] == 1


def test_a_lease_given_back_uncounted_spends_none_of_its_attempts(
        store: cluster.Cluster) -> None:
    store.submit([cluster.Submission(task_format.validate({"id": "gb", "content": "c"}),
                                     "echo", 2)])
    first = store.claim("w1", ["echo"])
    assert store.requeue_many([first], counted=False) == {"gb"}  # a take-in the disk refused
    second = store.claim("w1", ["echo"])
    assert second.attempt == 2  # the fence still rises
    wait_until(lambda: store.take_back_expired() == [("gb", "pending")], LEASE_S * 5,
               "the first counted attempt's end")  # one of its two attempts spent, not two
    third = store.claim("w1", ["echo"])
    assert third.attempt == 3
    wait_until(lambda: store.take_back_expired() == [("gb", "failed")], LEASE_S * 5,
               "the second counted attempt's end")
    assert store.undelivered()[0].outcome["error"]["kind"] == "lost"


def test_an_expired_lease_is_taken_over_and_its_late_result_changes_nothing(
        store: cluster.Cluster, pg_dsn: str) -> None:
    store.submit(tasks(1))
    slow = store.claim("w-slow", ["echo"])
    assert store.take_back_expired() == []  # the lease still runs
    wait_until(lambda: store.take_back_expired() == [("t-0000", "pending")], LEASE_S * 5,
               "the lease's end")
    other = cluster.Cluster(pg_dsn, host="host-b", lease_s=LEASE_S)
    fresh = other.claim("w-fresh", ["echo"])
    assert (fresh.task_id, fresh.attempt) == ("t-0000", 2)  # the attempt counted
    late = completed(slow) | {"result": {"content": "late"}}
    assert not store.publish(slow, late)
    assert not store.requeue(slow)
    assert other.publish(fresh, completed(fresh))
    assert not store.publish(slow, late)  # after the real outcome too
    [delivery] = store.undelivered()
    assert delivery.outcome["result"]["worker_id"] == "w-fresh" and delivery.attempt == 2
    other.close()


def test_a_lease_that_expires_on_its_last_attempt_fails_as_lost(store: cluster.Cluster) -> None:
    store.submit([cluster.Submission(task_format.validate({"id": "once", "content": "c"}),
                                     "echo", max_attempts=1)])
    store.claim("w1", ["echo"])
    wait_until(lambda: store.take_back_expired() == [("once", "failed")], LEASE_S * 5,
               "the lease's end")
    [delivery] = store.undelivered()
    assert delivery.state == "failed"
    assert delivery.outcome["error"]["kind"] == "lost"
    assert delivery.outcome["error"]["attempts"] == 1
    assert delivery.outcome["content"] == "c"  # the task's fields kept, as in an outcome file
    task_format.parse_iso(delivery.outcome["error"]["at"])


def test_a_submit_racing_the_purge_of_its_ids_row_starts_from_the_fence(
        pg_dsn: str, store: cluster.Cluster) -> None:
    import psycopg
    from koubou_spool.spool import cluster_batch as batch
    store.submit(tasks(1))
    claim = store.claim("w1", ["echo"])
    assert store.publish(claim, completed(claim)) and store.mark_delivered(["t-0000"]) == 1
    time.sleep(0.01)
    params = {"origin": "host-a", "age_s": 0, "ids": ["t-0000"]}
    with psycopg.connect(pg_dsn) as purger:  # a purge, held open between its delete and commit
        purger.execute(batch.LOCK_FENCES, params)
        assert purger.execute(batch.PURGE, params).rowcount == 1
        submitted = threading.Thread(target=store.submit, args=(tasks(1),))
        submitted.start()  # the origin sends t-0000 again meanwhile (a retry there)
        time.sleep(0.5)
        assert submitted.is_alive()  # it waits for the purge
        purger.commit()
    submitted.join(timeout=10)
    # it started from the fence the purge left (before: its snapshot, taken while the delete
    # was uncommitted, had no fence, and the row began again at attempt 0 of run 0)
    again = store.claim("w2", ["echo"])
    assert (again.attempt, again.run) == (2, 1)
    assert not store.publish(claim, completed(claim))  # the old lease stays fenced out


def test_a_publish_repeated_after_a_lost_reply_is_still_ours(store: cluster.Cluster) -> None:
    store.submit(tasks(1))
    claim = store.claim("w1", ["echo"])
    assert store.publish(claim, completed(claim))
    assert store.publish(claim, completed(claim))  # as if the first commit's reply was lost
    impostor = cluster.ClusterClaim(claim.task_id, claim.attempt, "w2", "echo", "host-a", b"", 3)
    assert not store.publish(impostor, completed(impostor))


def test_a_requeue_by_the_holder_keeps_the_attempt_counted(store: cluster.Cluster) -> None:
    store.submit(tasks(1))
    claim = store.claim("w1", ["echo"])
    assert store.requeue(claim)
    assert not store.publish(claim, completed(claim))  # given back: no longer ours
    assert store.claim("w1", ["echo"]).attempt == 2


def test_a_task_given_back_counted_on_its_last_attempt_fails_as_lost(
        store: cluster.Cluster) -> None:
    store.submit([cluster.Submission(task_format.validate({"id": "twice", "content": "c"}),
                                     "echo", max_attempts=2)])
    for attempt in (1, 2):
        claim = store.claim("w1", ["echo"])
        assert claim.attempt == attempt and store.requeue_many([claim]) == {"twice"}
    # before: back to pending every time, claimed again past max_attempts (5 of 2 in a review)
    assert store.claim("w1", ["echo"]) is None
    [delivery] = store.undelivered()
    assert delivery.state == "failed" and delivery.outcome["error"]["kind"] == "lost"
    assert delivery.outcome["error"]["attempts"] == 2 and delivery.outcome["content"] == "c"
    assert "given back by host host-a" in delivery.outcome["error"]["message"]


def test_many_tasks_cross_in_one_statement_each_with_one_wakeup_per_craftsman(
        pg_dsn: str, store: cluster.Cluster) -> None:
    wakeups = cluster.Wakeups(pg_dsn)
    assert wakeups.wait(5).recheck
    store.submit(tasks(40, "echo") + tasks(30, "gpu", "g"))
    assert sorted(wakeups.wait(5).notices) == [(cluster.TASKS_CHANNEL, "echo"),
                                               (cluster.TASKS_CHANNEL, "gpu")]
    first = store.claim_many("w1", ["echo"], 25)
    assert [c.task_id for c in first] == [f"t-{n:04d}" for n in range(25)]  # submit order
    rest = store.claim_many("w2", ["echo"], 25)
    assert len(rest) == 15 and {c.attempt for c in first + rest} == {1}
    revoked = cluster.ClusterClaim(first[0].task_id, 0, "w1", "echo", "host-a", b"", 3)
    assert store.requeue_many(rest[:5] + [revoked]) == {c.task_id for c in rest[:5]}
    assert wakeups.wait(5).notices == ((cluster.TASKS_CHANNEL, "echo"),)
    sent = [(c, completed(c)) for c in first[1:]] + [(revoked, completed(revoked))]
    assert store.publish_many(sent) == {c.task_id for c in first[1:]}  # the fence, row by row
    assert wakeups.wait(5).notices == ((cluster.OUTCOMES_CHANNEL, "host-a"),)
    assert store.publish_many(sent) == {c.task_id for c in first[1:]}  # a lost reply, again
    assert wakeups.wait(0.3) == cluster.Wake()  # nothing changed: nobody woken
    assert store.counts() == {"pending": 30 + 5, "in_progress": 11, "completed": 24,
                              "failed": 0}
    assert len(store.undelivered()) == 24
    wakeups.close()


def test_workers_register_and_heartbeat_and_the_clock_skew_is_measured(
        store: cluster.Cluster, pg_dsn: str) -> None:
    store.register_worker("w1", 1234, ["echo", "gpu"])
    store.register_worker("w1", 1235, ["echo"])  # restarted under the same id
    store.heartbeat("w1", [])
    with cluster.connect(pg_dsn) as conn:
        assert conn.execute("SELECT host, pid, craftsmen, heartbeat_at >= started_at"
                            " FROM cluster_workers").fetchall() == [("host-a", 1235, ["echo"], True)]
    assert abs(store.clock_skew()) < 5  # one machine: only the round trip


# --- outcomes back to their origin ---------------------------------------------------------------

def test_outcomes_go_to_their_origin_until_it_has_written_them(pg_dsn: str) -> None:
    host_a = cluster.Cluster.open(pg_dsn, host="host-a", lease_s=LEASE_S)
    host_b = cluster.Cluster.open(pg_dsn, host="host-b", lease_s=LEASE_S)
    host_a.submit(tasks(3, "gpu", "from-a"))
    host_b.submit(tasks(1, "gpu", "from-b"))
    while (claim := host_b.claim("w-b", ["gpu"])) is not None:  # host b serves gpu
        assert host_b.publish(claim, completed(claim))
    assert [d.task_id for d in host_a.undelivered()] == ["from-a-0000", "from-a-0001",
                                                         "from-a-0002"]
    assert [d.task_id for d in host_b.undelivered()] == ["from-b-0000"]
    # host a wrote the first two, then went down before it wrote the third
    assert host_a.mark_delivered(["from-a-0000", "from-a-0001", "from-b-0000"]) == 2
    host_a.close()
    back = cluster.Cluster(pg_dsn, host="host-a")  # host a returns
    assert [d.task_id for d in back.undelivered()] == ["from-a-0002"]
    assert back.mark_delivered(["from-a-0002"]) == 1
    assert back.mark_delivered(["from-a-0002"]) == 0  # delivered once
    assert back.undelivered() == []
    back.close()
    host_b.close()


# --- wake-ups ------------------------------------------------------------------------------------

def wait_into(wakeups: cluster.Wakeups, woke: list) -> None:
    woke.append((wakeups.wait(10), time.perf_counter()))


def test_a_waiter_wakes_within_milliseconds_of_a_submit_elsewhere(pg_dsn: str,
                                                                  store: cluster.Cluster) -> None:
    wakeups = cluster.Wakeups(pg_dsn)
    assert wakeups.wait(5) == cluster.Wake(recheck=True)  # listening: look once, then wait
    delays = []
    for n in range(20):
        woke: list[tuple[cluster.Wake, float]] = []
        waiter = threading.Thread(target=wait_into, args=(wakeups, woke))
        waiter.start()
        time.sleep(0.02)  # let it block on the socket
        sent = time.perf_counter()
        store.submit(tasks(1, "gpu", f"n{n}"))
        waiter.join(timeout=10)
        wake, at = woke[0]
        assert wake.notices == ((cluster.TASKS_CHANNEL, "gpu"),)
        delays.append(at - sent)
    delays.sort()
    assert delays[len(delays) // 2] < 0.5  # generous: the figure is printed, not judged
    print(f"\nNOTIFY wake-up, submit to waiter: p50 {delays[10] * 1000:.2f} ms, "
          f"max {delays[-1] * 1000:.2f} ms (submit's commit included)")
    wakeups.close()


def test_an_idle_wait_returns_at_its_timeout_with_nothing(pg_dsn: str) -> None:
    wakeups = cluster.Wakeups(pg_dsn, [cluster.OUTCOMES_CHANNEL])
    assert wakeups.wait(5).recheck
    started = time.monotonic()
    assert wakeups.wait(0.3) == cluster.Wake()
    assert 0.25 < time.monotonic() - started < 3
    wakeups.close()


@pytest.mark.parametrize("how", [signal.SIGQUIT, signal.SIGKILL], ids=["immediate", "killed"])
def test_after_a_server_restart_the_listener_reconnects_and_rechecks_once(
        pg_server, pg_dsn: str, store: cluster.Cluster, how: int) -> None:
    wakeups = cluster.Wakeups(pg_dsn)
    assert wakeups.wait(5).recheck
    pg_server.stop(how)  # an immediate shutdown, or the postmaster killed: a crash either way
    assert wakeups.wait(5) == cluster.Wake()  # the connection is gone
    assert wakeups.wait(0.2) == cluster.Wake()  # still down: it waited, nothing more
    pg_server.start()
    with pytest.raises(cluster.ClusterUnavailable):  # the store's connection died too
        store.submit(tasks(1, "gpu", "in-the-gap"))
    store.submit(tasks(1, "gpu", "in-the-gap"))  # a new connection; the NOTIFY reaches nobody
    assert wakeups.wait(15) == cluster.Wake(recheck=True)
    assert wakeups.reconnects == 1
    assert store.claim("w1", ["gpu"]).task_id == "in-the-gap-0000"  # the one re-check finds it
    woke: list = []
    waiter = threading.Thread(target=lambda: woke.append(wakeups.wait(10)))
    waiter.start()
    time.sleep(0.05)
    store.submit(tasks(1, "gpu", "after"))
    waiter.join(timeout=10)
    assert woke == [cluster.Wake(((cluster.TASKS_CHANNEL, "gpu"),))]  # wake-ups resume
    wakeups.close()


# --- the budget ----------------------------------------------------------------------------------

def test_a_budget_raced_by_twelve_connections_never_passes_its_limit(pg_dsn: str) -> None:
    limit, amount = 5.0, 0.07  # 71 reservations fit, the 72nd does not
    granted: list[float] = []
    lock = threading.Lock()

    def spend(host: int, worker: int) -> None:
        own = cluster.Cluster.open(pg_dsn, host=f"host-{host}")
        while True:
            verdict, _ = own.reserve(task_id=f"{host}-{worker}", attempt=1, craftsman="cloud",
                                     amount=amount, day="2026-12-02", month="2026-12",
                                     daily_limit=limit, monthly_limit=100.0)
            if verdict != "ok":
                break
            with lock:
                granted.append(amount)
        own.close()

    threads = [threading.Thread(target=spend, args=(h, w)) for h in range(3) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(granted) == 71 and sum(granted) <= limit
    check = cluster.Cluster(pg_dsn, host="x")
    day, month = check.spent("2026-12-02", "2026-12")
    assert day == pytest.approx(71 * amount) and month == pytest.approx(71 * amount)
    check.close()


def test_settling_replaces_the_reservation_in_its_own_period(store: cluster.Cluster) -> None:
    def reserve(amount: float, day: str) -> tuple[str, float]:
        return store.reserve(task_id="t", attempt=1, craftsman="cloud", amount=amount, day=day,
                             month="2026-12", daily_limit=1.0, monthly_limit=1.5)

    verdict, first = reserve(0.8, "2026-12-01")
    assert verdict == "ok" and reserve(0.3, "2026-12-01") == ("budget", 0.0)
    store.settle(first, 0.1)
    assert store.spent("2026-12-01", "2026-12") == pytest.approx((0.1, 0.1))
    verdict, second = reserve(0.9, "2026-12-01")
    assert verdict == "ok"
    # a new day starts from nothing; the month carries on
    assert reserve(0.6, "2026-12-02") == ("budget", 0.0)  # the month: 1.0 + 0.6 > 1.5
    verdict, third = reserve(0.4, "2026-12-02")
    assert verdict == "ok"
    store.settle(second, None)  # yesterday's call, cost unknown: its reservation stands
    store.settle(second, 0.0)  # settled once only
    assert store.spent("2026-12-02", "2026-12") == pytest.approx((0.4, 1.4))


def test_a_host_whose_clock_lags_at_midnight_never_restarts_the_day(pg_dsn: str) -> None:
    ahead = cluster.Cluster.open(pg_dsn, host="ahead")
    behind = cluster.Cluster(pg_dsn, host="behind")

    def reserve(host: cluster.Cluster, day: str) -> str:
        return host.reserve(task_id="t", attempt=1, craftsman="cloud", amount=0.6, day=day,
                            month="2026-12", daily_limit=1.0, monthly_limit=None)[0]

    assert reserve(behind, "2026-12-01") == "ok"
    assert reserve(ahead, "2026-12-02") == "ok"  # a new day on the host that is ahead
    assert reserve(behind, "2026-12-01") == "budget"  # counted in the new day: 1.2 > 1.0
    assert reserve(ahead, "2026-12-02") == "budget"
    assert behind.spent("2026-12-01", "2026-12") == pytest.approx((0.6, 1.2))
    ahead.close()
    behind.close()


# --- faults --------------------------------------------------------------------------------------

def run_claimer(store: cluster.Cluster, wakeups: cluster.Wakeups, worker: str,
                published: collections.Counter, lock: threading.Lock, done: threading.Event,
                errors: list) -> None:
    """A worker's loop, as the bridge will run it: claim, publish, and when there is nothing
    or the server is gone, wait on the wake-ups (which reconnect and re-check)."""
    try:
        while not done.is_set():
            try:
                store.take_back_expired()
                claim = store.claim(worker, ["echo"])
            except cluster.ClusterUnavailable:
                wakeups.wait(LEASE_S)
                continue
            if claim is None:
                wakeups.wait(LEASE_S)
                continue
            time.sleep(0.002)  # the craftsman's work
            while True:  # a publish whose reply was lost is asked again: it knows its own
                try:
                    won = store.publish(claim, completed(claim))
                    break
                except cluster.ClusterUnavailable:
                    wakeups.wait(0.2)
            if won:
                with lock:
                    published[claim.task_id] += 1
    except BaseException as exc:  # noqa: BLE001 (reported by the test)
        errors.append(exc)


def completed_count(store: cluster.Cluster) -> int:
    try:
        return store.counts()["completed"]
    except cluster.ClusterUnavailable:  # the first look after the restart, on the old connection
        return -1


def test_a_postgres_restart_mid_run_loses_nothing_and_completes_nothing_twice(
        pg_server, pg_dsn: str, store: cluster.Cluster) -> None:
    count = 600
    store.submit(tasks(count))
    published: collections.Counter = collections.Counter()
    lock, done, errors = threading.Lock(), threading.Event(), []
    handles = [(cluster.Cluster(pg_dsn, host=f"host-{n}", lease_s=LEASE_S),
                cluster.Wakeups(pg_dsn)) for n in range(3)]
    threads = [threading.Thread(target=run_claimer, args=(own, wake, f"w{n}", published, lock,
                                                          done, errors))
               for n, (own, wake) in enumerate(handles)]
    for thread in threads:
        thread.start()
    wait_until(lambda: sum(published.values()) >= count // 4, 30, "a quarter of the tasks")
    pg_server.stop(signal.SIGQUIT)  # a crash of the server, mid-run
    stopped_at = sum(published.values())
    pg_server.start()
    wait_until(lambda: completed_count(store) == count, 40, "every task")
    done.set()
    for _, wake in handles:
        wake.close()
    for thread in threads:
        thread.join(timeout=10)
    assert not errors
    assert stopped_at < count  # the crash came mid-run
    assert set(published) == {f"t-{n:04d}" for n in range(count)}
    assert set(published.values()) == {1}  # none completed twice
    assert store.counts() == {"pending": 0, "in_progress": 0, "completed": count, "failed": 0}
    deliveries = store.undelivered(limit=count + 1)
    assert len(deliveries) == count
    again = sum(1 for d in deliveries if d.attempt > 1)
    print(f"\n{count} tasks, server crashed after {stopped_at}: {again} ran a second attempt")


def start_claimer(pg_dsn: str, worker: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    return subprocess.Popen([sys.executable, str(CLAIMER), pg_dsn, "host-c", worker, "echo",
                             str(LEASE_S)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)


def test_a_claimer_killed_with_sigkill_has_its_lease_taken_over(pg_dsn: str,
                                                              store: cluster.Cluster) -> None:
    store.submit(tasks(1))
    proc = start_claimer(pg_dsn, "w-doomed")
    try:
        assert proc.stdout.readline().split() == ["claimed", "t-0000", "1"]
        proc.kill()
        proc.wait(timeout=10)
        assert store.claim("w-heir", ["echo"]) is None  # still leased to the dead
        wait_until(lambda: store.take_back_expired() == [("t-0000", "pending")], LEASE_S * 5,
                   "the dead claimer's lease end")
        heir = store.claim("w-heir", ["echo"])
        assert heir.attempt == 2
        assert store.publish(heir, completed(heir))
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_frozen_claimer_that_wakes_after_its_lease_is_fenced_out(pg_dsn: str,
                                                                  store: cluster.Cluster) -> None:
    store.submit(tasks(1))
    proc = start_claimer(pg_dsn, "w-frozen")
    try:
        assert proc.stdout.readline().split() == ["claimed", "t-0000", "1"]
        proc.send_signal(signal.SIGSTOP)  # a paused VM, a swapped-out host
        wait_until(lambda: store.take_back_expired() == [("t-0000", "pending")], LEASE_S * 5,
                   "the frozen claimer's lease end")
        heir = store.claim("w-heir", ["echo"])
        proc.send_signal(signal.SIGCONT)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().split() == ["published", "False"]
        assert proc.wait(timeout=10) == 0
        assert store.publish(heir, completed(heir))
        assert store.undelivered()[0].outcome["result"]["worker_id"] == "w-heir"
    finally:
        proc.kill()
        proc.wait(timeout=10)


# --- the origin's half of the bridge: a home's files and the cluster -----------------------------

@pytest.fixture
def origin(isolated_env: Path) -> Spool:
    """The file spool of the submitting host."""
    home_module.init(isolated_env)
    return Spool.open(isolated_env)


def serve_remotely(pg_dsn: str, craftsman: str = "gpu") -> list[str]:
    """Another host's worker: runs every pending task of the craftsman; the ids it finished."""
    other = cluster.Cluster(pg_dsn, host="host-b", lease_s=LEASE_S)
    done = []
    while (claim := other.claim("w-b", [craftsman])) is not None:
        record = task_format.decode(claim.body) | {"status": "completed", "result": {
            "content": "from host b", "worker_id": "w-b", "attempts": claim.attempt}}
        assert other.publish(claim, record)
        done.append(claim.task_id)
    other.close()
    return done


def test_a_task_forwarded_from_a_home_comes_back_into_its_completed(
        origin: Spool, store: cluster.Cluster, pg_dsn: str) -> None:
    task_id = submit(origin, id="across", content="for the gpu host")
    assert [t.id for t in bridge.forward(origin, store, [("across.json", "gpu")],
                                         "bridge-a")] == ["across"]
    assert [name for name, _ in origin.claims()][0].startswith("across.json@bridge-a")
    assert store.states(["across"]) == {"across": "pending"}
    assert serve_remotely(pg_dsn) == [task_id]
    assert bridge.deliver(origin, store, "bridge-a") == ["across"]
    record = read_json(origin.completed / "across.json")
    assert record["result"]["content"] == "from host b" and record["content"] == "for the gpu host"
    assert list(origin.claims()) == []
    assert bridge.deliver(origin, store, "bridge-a") == []  # delivered once


def test_a_face_renamed_by_hand_out_of_its_claim_is_left_undelivered(
        origin: Spool, store: cluster.Cluster, pg_dsn: str) -> None:
    submit(origin, id="stray", content="c")
    bridge.forward(origin, store, [("stray.json", "gpu")], "bridge-a")
    serve_remotely(pg_dsn)
    [(entry, _)] = origin.claims()
    os.rename(origin.in_progress / entry, origin.in_progress / "stray.json")  # no claim now
    assert bridge.deliver(origin, store, "bridge-a") == []
    assert os.listdir(origin.in_progress) == ["stray.json"]
    assert [d.task_id for d in store.undelivered()] == ["stray"]


def test_outcomes_that_cannot_be_placed_hold_back_none_behind_them(
        origin: Spool, store: cluster.Cluster, pg_dsn: str) -> None:
    for task_id in ("lost-1", "lost-2"):
        submit(origin, id=task_id, content="c")
    bridge.forward(origin, store, [("lost-1.json", "gpu"), ("lost-2.json", "gpu")], "bridge-a")
    for entry, _ in list(origin.claims()):  # their faces gone (a home restored from a backup)
        os.unlink(origin.in_progress / entry)
    serve_remotely(pg_dsn)
    time.sleep(0.01)  # finished after them
    submit(origin, id="fine", content="c")
    bridge.forward(origin, store, [("fine.json", "gpu")], "bridge-a")
    serve_remotely(pg_dsn)
    # before: each round read the two oldest rows, placed neither, and stopped there
    assert bridge.deliver(origin, store, "bridge-a", limit=2) == ["fine"]
    assert read_json(origin.completed / "fine.json")["result"]["content"] == "from host b"
    assert sorted(d.task_id for d in store.undelivered()) == ["lost-1", "lost-2"]


def test_an_outcome_written_before_a_crash_is_only_marked_when_delivered_again(
        origin: Spool, store: cluster.Cluster, pg_dsn: str) -> None:
    submit(origin, id="twice", content="c")
    bridge.forward(origin, store, [("twice.json", "gpu")], "bridge-a")
    serve_remotely(pg_dsn)
    [delivery] = store.undelivered()
    # written; the bridge died before marking it delivered
    assert bridge.place(origin, [delivery], "bridge-a") == ["twice"]
    before = (origin.completed / "twice.json").read_bytes()
    assert bridge.deliver(origin, store, "bridge-a2") == ["twice"]
    assert (origin.completed / "twice.json").read_bytes() == before
    assert sorted(os.listdir(origin.failed)) == [] and store.undelivered() == []


def placed_then_retried(origin: Spool, store: cluster.Cluster, pg_dsn: str) -> None:
    """Task `replay`, forwarded, run on host b and written into the origin's spool by a bridge
    that died before marking it delivered; then retried there (its outcome made a failure)."""
    from koubou_spool.service import control
    submit(origin, id="replay", content="c")
    bridge.forward(origin, store, [("replay.json", "gpu")], "bridge-a")
    serve_remotely(pg_dsn)
    assert bridge.place(origin, store.undelivered(), "bridge-a") == ["replay"]
    record = read_json(origin.completed / "replay.json")
    assert record["cluster"] == {"run": 0, "host": "host-b"}  # the run it was given, and where
    os.rename(origin.completed / "replay.json", origin.failed / "replay.json")
    control.retry(origin, "replay")


def runs_again_on_b(origin: Spool, store: cluster.Cluster, pg_dsn: str) -> None:
    """The retried task leaves as a new run, is run on host b and comes back as that run."""
    assert [t.id for t in bridge.forward(origin, store, [("replay.json", "gpu")],
                                         "bridge-a2")] == ["replay"]
    assert serve_remotely(pg_dsn) == ["replay"]
    assert bridge.deliver(origin, store, "bridge-a2") == ["replay"]
    assert read_json(origin.completed / "replay.json")["cluster"] == {"run": 1, "host": "host-b"}
    assert list(origin.claims()) == [] and store.undelivered() == []


@pytest.mark.parametrize("first", ["deliver", "forward", "face"])
def test_a_task_retried_before_its_delivery_was_marked_runs_again(
        origin: Spool, store: cluster.Cluster, pg_dsn: str, first: str) -> None:
    # Before: its row, finished and unmarked, was delivered again into the retried task, which
    # so got the old outcome without running (and a forward found the id there, not new).
    placed_then_retried(origin, store, pg_dsn)
    if first == "face":  # claimed by a bridge that died before its submit
        origin.claim("replay.json", "bridge-dead")
    if first in ("deliver", "face"):  # the next bridge's first delivery round
        assert bridge.deliver(origin, store, "bridge-a2") == ["replay"]
        assert os.listdir(origin.pending) == ["replay.json"] and list(origin.claims()) == []
        assert store.undelivered() == []  # the retry said it had been delivered
    if first == "forward":  # the next bridge's first forward round
        assert [t.id for t in bridge.forward(origin, store, [("replay.json", "gpu")],
                                             "bridge-a2")] == ["replay"]
        assert bridge.deliver(origin, store, "bridge-a2") == []
        assert store.states(["replay"]) == {"replay": "pending"}
        assert serve_remotely(pg_dsn) == ["replay"]
        assert bridge.deliver(origin, store, "bridge-a2") == ["replay"]
        assert read_json(origin.completed / "replay.json")["cluster"]["run"] == 1
        return
    assert not (origin.completed / "replay.json").exists()
    assert not (origin.failed / "replay.json").exists()
    runs_again_on_b(origin, store, pg_dsn)


def test_a_retried_task_a_worker_here_runs_keeps_its_claim_and_its_own_outcome(
        origin: Spool, store: cluster.Cluster, pg_dsn: str) -> None:
    # Before: the delivery took the worker's claim over, fencing it out, and wrote the old run's
    # outcome in its place.
    placed_then_retried(origin, store, pg_dsn)
    claim = origin.claim("replay.json", "worker-a")
    assert bridge.deliver(origin, store, "bridge-a2") == []
    assert [name for name, _ in origin.claims()] == [claim.file_name]
    record = task_format.decode(origin.read_claim(claim)[0]) | {
        "status": "completed", "result": {"content": "run here", "worker_id": "worker-a"}}
    assert origin.publish(claim, "replay", record)
    assert bridge.deliver(origin, store, "bridge-a2") == ["replay"]  # marked only
    assert read_json(origin.completed / "replay.json")["result"]["content"] == "run here"
    assert store.undelivered() == []


def test_a_host_that_was_down_gets_its_outcomes_when_it_returns(
        origin: Spool, store: cluster.Cluster, pg_dsn: str) -> None:
    for n in range(3):
        submit(origin, id=f"away-{n}", content="c")
        bridge.forward(origin, store, [(f"away-{n}.json", "gpu")], "bridge-old")
    # host a goes down; recovery had put one of the dead bridge's claims back in pending/
    [(entry, _)] = [c for c in origin.claims() if c[0].startswith("away-2.json@")]
    os.rename(origin.in_progress / entry, origin.pending / "away-2.json")
    assert sorted(serve_remotely(pg_dsn)) == ["away-0", "away-1", "away-2"]
    back = cluster.Cluster(pg_dsn, host="host-a")  # host a returns, with a new bridge
    assert sorted(bridge.deliver(origin, back, "bridge-new")) == ["away-0", "away-1", "away-2"]
    assert sorted(os.listdir(origin.completed)) == ["away-0.json", "away-1.json", "away-2.json"]
    assert list(origin.claims()) == [] and os.listdir(origin.pending) == []
    back.close()


def test_a_lost_task_is_delivered_into_failed(origin: Spool, store: cluster.Cluster) -> None:
    submit(origin, id="lost", content="c")
    bridge.forward(origin, store, [("lost.json", "gpu")], "bridge-a", max_attempts=1)
    store.claim("w-dies", ["gpu"])
    wait_until(lambda: store.take_back_expired() == [("lost", "failed")], LEASE_S * 5,
               "the lease's end")
    assert bridge.deliver(origin, store, "bridge-a") == ["lost"]
    assert read_json(origin.failed / "lost.json")["error"]["kind"] == "lost"


def test_tasks_forwarded_while_the_cluster_is_down_wait_in_pending(pg_server,
                                                                  origin: Spool) -> None:
    down = cluster.Cluster(f"host=127.0.0.1 port={pgserver.free_port()} user=koubou dbname=x",
                           host="host-a")
    for task_id in ("waits", "too"):
        submit(origin, id=task_id, content="c")
    with pytest.raises(cluster.ClusterUnavailable, match="local work goes on"):
        bridge.forward(origin, down, [("waits.json", "gpu"), ("too.json", "gpu")], "bridge-a")
    assert sorted(os.listdir(origin.pending)) == ["too.json", "waits.json"]
    assert list(origin.claims()) == []
    assert "attempts" not in read_json(origin.pending / "waits.json")  # no attempt spent


def test_a_file_that_is_no_task_stays_behind_and_the_rest_of_the_round_leaves(
        origin: Spool, store: cluster.Cluster) -> None:
    submit(origin, id="first", content="c")
    (origin.pending / "broken.json").write_text("{not json")
    submit(origin, id="last", content="c")
    leaving = [(name, "gpu") for name in ("first.json", "broken.json", "gone.json", "last.json")]
    assert [t.id for t in bridge.forward(origin, store, leaving, "bridge-a")] == ["first", "last"]
    assert os.listdir(origin.pending) == ["broken.json"]  # for a worker to reject, uncounted
    assert store.states(["first", "last"]) == {"first": "pending", "last": "pending"}


# --- the serving host's half, and two homes end to end -------------------------------------------

def two_homes(tmp_path: Path) -> tuple[Spool, Spool]:
    spools = []
    for name in ("host-a", "host-b"):
        home_module.init(tmp_path / name)
        write_config(tmp_path / name)
        spools.append(Spool.open(tmp_path / name))
    return spools[0], spools[1]


def test_an_id_another_host_forwarded_first_fails_here_as_invalid_naming_that_host(
        tmp_path: Path, pg_dsn: str) -> None:
    home_a, home_b = two_homes(tmp_path)
    host_a = cluster.Cluster.open(pg_dsn, host="host-a", lease_s=30)
    host_b = cluster.Cluster.open(pg_dsn, host="host-b", lease_s=30)
    for home in (home_a, home_b):
        submit(home, id="nightly", content=f"from {home.home.name}", craftsman="echo")
    submit(home_b, id="own", content="b's", craftsman="echo")
    assert [t.id for t in bridge.forward(home_a, host_a, [("nightly.json", "echo")],
                                         "bridge-a")] == ["nightly"]
    # host b's task of the same id would have waited for ever: the outcome goes to host a only
    sent = bridge.forward(home_b, host_b, [("nightly.json", "echo"), ("own.json", "echo")],
                          "bridge-b")
    assert [t.id for t in sent] == ["own"]
    failed = read_json(home_b.failed / "nightly.json")
    assert failed["error"]["kind"] == "invalid" and "host host-a" in failed["error"]["message"]
    assert failed["content"] == "from host-b"
    assert [match["name"] for _, match in home_b.claims()] == ["own.json"]  # own's face only
    assert host_a.origins_of(["nightly", "own"]) == {"nightly": "host-a", "own": "host-b"}
    # host a sending its own again is idempotent, as before: its face stays
    submit(home_a, id="again", content="c", craftsman="echo")
    bridge.forward(home_a, host_a, [("again.json", "echo")], "bridge-a")
    faces = sorted(match["name"] for _, match in home_a.claims())
    home_a.requeue(next(e for e, m in home_a.claims() if m["name"] == "again.json"), None)
    assert [t.id for t in bridge.forward(home_a, host_a, [("again.json", "echo")],
                                         "bridge-a")] == ["again"]
    assert sorted(match["name"] for _, match in home_a.claims()) == faces
    host_a.close()
    host_b.close()


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "pending"])
def test_a_serving_hosts_own_task_of_the_same_id_never_answers_a_forwarded_one(
        tmp_path: Path, pg_dsn: str, finished: bool) -> None:
    home_a, home_b = two_homes(tmp_path)
    host_a = cluster.Cluster.open(pg_dsn, host="host-a", lease_s=30)
    host_b = cluster.Cluster.open(pg_dsn, host="host-b", lease_s=30)
    submit(home_b, id="nightly", content="b's private text", craftsman="echo",
           sensitivity="confidential")  # host b's own, never in the cluster
    if finished:
        finish_by_hand(home_b, "nightly", "b's private result")
    submit(home_a, id="nightly", content="a's question", craftsman="echo")
    bridge.forward(home_a, host_a, [("nightly.json", "echo")], "bridge-a")
    # before: leased and kept, and host b's outcome went to host a as the answer to its task
    assert bridge.take_in(home_b, host_b, "bridge-b", "echo", 4) == []
    assert bridge.deliver(home_a, host_a, "bridge-a") == ["nightly"]
    failed = read_json(home_a.failed / "nightly.json")
    assert failed["error"]["kind"] == "invalid" and "host host-b" in failed["error"]["message"]
    assert failed["content"] == "a's question" and "result" not in failed
    assert "b's private" not in json.dumps(failed)
    here = home_b.outcome("nightly") if finished else read_json(home_b.pending / "nightly.json")
    assert here["content"] == "b's private text"  # host b's own task as it was
    host_a.close()
    host_b.close()


def test_a_task_holding_u0000_fails_on_its_origin_and_never_enters_the_cluster(
        origin: Spool, store: cluster.Cluster) -> None:
    submit(origin, id="nul", content="a\x00b")
    submit(origin, id="plain", content="ab")
    # before: jsonb refused it in every bridge's take-back, which then stopped every bridge
    sent = bridge.forward(origin, store, [("nul.json", "gpu"), ("plain.json", "gpu")],
                          "bridge-a")
    assert [t.id for t in sent] == ["plain"]
    failed = read_json(origin.failed / "nul.json")
    assert failed["error"]["kind"] == "invalid" and "U+0000" in failed["error"]["message"]
    assert failed["content"] == "a\x00b"
    assert store.states(["nul", "plain"]) == {"plain": "pending"}


def test_an_outcome_holding_u0000_crosses_with_a_replacement_character(
        origin: Spool, store: cluster.Cluster, pg_dsn: str) -> None:
    submit(origin, id="agent", content="run the tool")
    bridge.forward(origin, store, [("agent.json", "gpu")], "bridge-a")
    other = cluster.Cluster(pg_dsn, host="host-b", lease_s=LEASE_S)
    claim = other.claim("w-b", ["gpu"])
    record = task_format.decode(claim.body) | {"status": "completed", "result": {
        "content": "out\x00put", "worker_id": "w-b", "attempts": claim.attempt}}
    assert other.publish(claim, record)  # before: psycopg.DataError, out of the bridge's round
    other.close()
    assert bridge.deliver(origin, store, "bridge-a") == ["agent"]
    assert read_json(origin.completed / "agent.json")["result"]["content"] == "out\ufffdput"


def test_a_task_dropped_on_one_home_runs_on_the_other_and_comes_back(
        tmp_path: Path, pg_dsn: str, workers: Workers) -> None:
    home_a, home_b = two_homes(tmp_path)
    host_a = cluster.Cluster.open(pg_dsn, host="host-a", lease_s=30)
    host_b = cluster.Cluster.open(pg_dsn, host="host-b", lease_s=30)
    ids = [submit(home_a, id=f"e2e-{n}", content=f"echo me {n}", craftsman="echo")
           for n in range(5)]
    # host a serves no echo, say: out they go, in one insert
    assert [t.id for t in bridge.forward(home_a, host_a, [(f"{i}.json", "echo") for i in ids],
                                         "bridge-a")] == ids
    workers.start(home_b.home)
    leases = {lease.task_id: lease for lease in bridge.take_in(home_b, host_b, "bridge-b",
                                                               "echo", 16)}
    assert sorted(leases) == ids
    wait_outcomes(home_b, ids)  # host b's own worker ran them, from its pending/
    assert bridge.renew(host_b, "bridge-b", leases) == []
    assert sorted(bridge.send_back(home_b, host_b, leases)) == ids and leases == {}
    assert sorted(bridge.deliver(home_a, host_a, "bridge-a")) == ids
    for n, task_id in enumerate(ids):
        record = read_json(home_a.completed / f"{task_id}.json")
        assert record["status"] == "completed" and f"echo me {n}" in record["result"]["content"]
        assert record["result"]["worker_id"] in home_b.worker_ids()  # host b's worker ran it
    assert list(home_a.claims()) == [] and os.listdir(home_a.pending) == []
    host_a.close()
    host_b.close()


def test_a_lease_lost_while_the_task_ran_is_fenced_then_sent_back_without_a_second_run(
        tmp_path: Path, pg_dsn: str) -> None:
    home_a, home_b = two_homes(tmp_path)
    host_a = cluster.Cluster.open(pg_dsn, host="host-a", lease_s=LEASE_S)
    host_b = cluster.Cluster.open(pg_dsn, host="host-b", lease_s=LEASE_S)
    submit(home_a, id="slow", content="c", craftsman="echo")
    bridge.forward(home_a, host_a, [("slow.json", "echo")], "bridge-a")
    [first] = bridge.take_in(home_b, host_b, "bridge-b", "echo", 1)
    leases = {first.task_id: first}
    wait_until(lambda: host_a.take_back_expired() == [("slow", "pending")], LEASE_S * 5,
               "the lease's end")  # host b was too slow to renew
    assert bridge.renew(host_b, "bridge-b", leases) == ["slow"] and leases == {}
    # host b's worker finishes the task after all (here: the outcome written by hand)
    claim = home_b.claim("slow.json", "worker-b")
    record = task_format.decode(home_b.read_claim(claim)[0]) | {
        "status": "completed", "result": {"content": "first run", "worker_id": "worker-b"}}
    assert home_b.publish(claim, "slow", record)
    [second] = bridge.take_in(home_b, host_b, "bridge-b", "echo", 1)  # the same host again
    assert second.attempt == 2 and os.listdir(home_b.pending) == []  # not queued twice
    assert not host_b.publish(first, record)  # the revoked lease is fenced out
    assert bridge.send_back(home_b, host_b, {"slow": second}) == {"slow"}
    assert bridge.deliver(home_a, host_a, "bridge-a") == ["slow"]
    assert read_json(home_a.completed / "slow.json")["result"]["content"] == "first run"
    host_a.close()
    host_b.close()


def finish_by_hand(spool: Spool, task_id: str, content: str) -> None:
    """The serving home's worker finishing a taken-in task (here: its outcome written by hand)."""
    claim = spool.claim(f"{task_id}.json", "worker-b")
    record = task_format.decode(spool.read_claim(claim)[0]) | {
        "status": "completed", "result": {"content": content, "worker_id": "worker-b"}}
    assert spool.publish(claim, task_id, record)


def retried_after_a_run_on_b(tmp_path: Path, pg_dsn: str, *, purged: bool = False) -> tuple:
    """Task `again` of host a, run on host b ("first run"), delivered (its cluster row
    `purged` then), then retried on a and forwarded again: (home_a, home_b, host_a, host_b)."""
    from koubou_spool.service import control
    home_a, home_b = two_homes(tmp_path)
    host_a = cluster.Cluster.open(pg_dsn, host="host-a", lease_s=30)
    host_b = cluster.Cluster.open(pg_dsn, host="host-b", lease_s=30)
    submit(home_a, id="again", content="c", craftsman="echo")
    bridge.forward(home_a, host_a, [("again.json", "echo")], "bridge-a")
    [first] = bridge.take_in(home_b, host_b, "bridge-b", "echo", 1)
    finish_by_hand(home_b, "again", "first run")
    assert bridge.send_back(home_b, host_b, {"again": first}) == {"again"}
    assert bridge.deliver(home_a, host_a, "bridge-a") == ["again"]
    if purged:
        time.sleep(0.01)
        assert host_a.purge(0) == 1
    os.rename(home_a.completed / "again.json", home_a.failed / "again.json")  # say it failed
    control.retry(home_a, "again")
    bridge.forward(home_a, host_a, [("again.json", "echo")], "bridge-a")
    return home_a, home_b, host_a, host_b


@pytest.mark.parametrize("purged", [False, True], ids=["kept", "purged"])
def test_a_retried_task_runs_again_where_an_older_run_finished_but_once_per_run(
        tmp_path: Path, pg_dsn: str, purged: bool) -> None:
    # purged: the row gone between the delivery and the retry, its fence kept (before: the
    # retry started again at run 0, attempt 1, and host b sent back the first run's outcome)
    home_a, home_b, host_a, host_b = retried_after_a_run_on_b(tmp_path, pg_dsn, purged=purged)
    [second] = bridge.take_in(home_b, host_b, "bridge-b", "echo", 1)
    assert (second.run, second.attempt) == (1, 2)
    assert os.listdir(home_b.pending) == ["again.json"]  # queued again, the old outcome gone
    assert not (home_b.completed / "again.json").exists() and list(home_b.claims()) == []
    finish_by_hand(home_b, "again", "second run")
    assert host_b.requeue(second)  # the lease lost after this run finished here
    [third] = bridge.take_in(home_b, host_b, "bridge-b", "echo", 1)
    assert (third.run, third.attempt) == (1, 3) and os.listdir(home_b.pending) == []
    assert bridge.send_back(home_b, host_b, {"again": third}) == {"again"}  # no third run
    assert bridge.deliver(home_a, host_a, "bridge-a") == ["again"]
    assert read_json(home_a.completed / "again.json")["result"]["content"] == "second run"
    host_a.close()
    host_b.close()


def retried_while_b_still_has_its_first_run(tmp_path: Path, pg_dsn: str) -> tuple:
    """Task `kept` of host a taken in by host b (its copy still pending there), its lease lost
    and the task run by host c and delivered, then retried on a: (home_a, home_b, host_a,
    host_b)."""
    from koubou_spool.service import control
    home_a, home_b = two_homes(tmp_path)
    host_a, host_b, host_c = (cluster.Cluster.open(pg_dsn, host=f"host-{name}", lease_s=30)
                              for name in "abc")
    submit(home_a, id="kept", content="c", craftsman="echo")
    bridge.forward(home_a, host_a, [("kept.json", "echo")], "bridge-a")
    [first] = bridge.take_in(home_b, host_b, "bridge-b", "echo", 1)
    assert host_b.requeue(first)  # host b's lease lost before its worker got to the task
    by_c = host_c.claim("worker-c", ["echo"])
    assert host_c.publish(by_c, completed(by_c) | {"result": {"content": "run on c"}})
    host_c.close()
    assert bridge.deliver(home_a, host_a, "bridge-a") == ["kept"]
    os.rename(home_a.completed / "kept.json", home_a.failed / "kept.json")  # say it failed
    control.retry(home_a, "kept")
    bridge.forward(home_a, host_a, [("kept.json", "echo")], "bridge-a")
    assert os.listdir(home_b.pending) == ["kept.json"]  # the first run, still here
    return home_a, home_b, host_a, host_b


@pytest.mark.parametrize("finished", [False, True], ids=["still-pending", "finished"])
def test_an_older_run_adopted_by_a_retry_runs_once_when_its_lease_comes_back(
        tmp_path: Path, pg_dsn: str, finished: bool) -> None:
    # before: the adopted copy finished under the older run's mark, and a lease of the new run
    # lost and taken here again replaced that outcome with a run more
    home_a, home_b, host_a, host_b = retried_while_b_still_has_its_first_run(tmp_path, pg_dsn)
    [second] = bridge.take_in(home_b, host_b, "bridge-b", "echo", 1)
    assert (second.run, second.adopted) == (1, 0)
    assert os.listdir(home_b.pending) == ["kept.json"]  # adopted, not queued twice
    if finished:
        finish_by_hand(home_b, "kept", "the one run on b")
    assert host_b.requeue(second)  # the new run's lease lost too
    [third] = bridge.take_in(home_b, host_b, "bridge-b", "echo", 1)
    assert (third.run, third.adopted) == (1, 0)
    assert os.listdir(home_b.pending) == ([] if finished else ["kept.json"])  # no run more
    if not finished:
        finish_by_hand(home_b, "kept", "the one run on b")
    assert bridge.send_back(home_b, host_b, {"kept": third}) == {"kept"}
    assert bridge.deliver(home_a, host_a, "bridge-a") == ["kept"]
    assert read_json(home_a.completed / "kept.json")["result"]["content"] == "the one run on b"
    # a run after that is a new one: the adoption is forgotten, the old outcome replaced
    os.rename(home_a.completed / "kept.json", home_a.failed / "kept.json")
    from koubou_spool.service import control
    control.retry(home_a, "kept")
    bridge.forward(home_a, host_a, [("kept.json", "echo")], "bridge-a")
    [fourth] = bridge.take_in(home_b, host_b, "bridge-b", "echo", 1)
    assert (fourth.run, fourth.adopted) == (2, None)
    assert os.listdir(home_b.pending) == ["kept.json"]
    host_a.close()
    host_b.close()


def test_a_rerun_this_home_cannot_queue_leaves_the_old_outcome_and_the_lease_goes_back(
        tmp_path: Path, pg_dsn: str) -> None:
    _, home_b, host_a, host_b = retried_after_a_run_on_b(tmp_path, pg_dsn)
    os.rename(home_b.pending, tmp_path / "aside")
    home_b.pending.write_text("not a directory")  # the queueing fails after the move aside
    with pytest.raises(bridge.TakeInRefused) as refused:
        bridge.take_in(home_b, host_b, "bridge-b", "echo", 1)
    assert refused.value.taken == [] and isinstance(refused.value.cause, OSError)
    # before: the old outcome stayed behind as a claim of the bridge, and the task hung
    assert read_json(home_b.completed / "again.json")["result"]["content"] == "first run"
    assert list(home_b.claims()) == [] and os.listdir(home_b.tmp) == []
    assert host_b.states(["again"]) == {"again": "pending"}
    home_b.pending.unlink()
    os.rename(tmp_path / "aside", home_b.pending)
    [second] = bridge.take_in(home_b, host_b, "bridge-b", "echo", 1)
    assert os.listdir(home_b.pending) == ["again.json"] and os.listdir(home_b.tmp) == []
    assert not (home_b.completed / "again.json").exists()
    host_a.close()
    host_b.close()


def test_a_bridge_never_takes_in_a_task_its_own_host_forwarded(
        tmp_path: Path, pg_dsn: str) -> None:
    # Its worker for the craftsman came back after the task left: taken in by its own bridge,
    # the task would be queued nowhere (its face holds the name) and its lease held for ever.
    home_a, host_a = forwarded(tmp_path, pg_dsn, "own")
    assert bridge.take_in(home_a, host_a, "bridge-a", "echo", 4) == []
    host_b = cluster.Cluster.open(pg_dsn, host="host-b", lease_s=30)
    assert host_b.claim_many("bridge-b", ["echo"], 4, others_only=True)[0].task_id == "own"
    host_a.close()
    host_b.close()


def test_an_expires_at_past_what_python_can_hold_forwards_as_never(
        tmp_path: Path, pg_dsn: str) -> None:
    home_module.init(tmp_path / "host-a")
    write_config(tmp_path / "host-a")
    home_a = Spool.open(tmp_path / "host-a")
    host_a = cluster.Cluster.open(pg_dsn, host="host-a", lease_s=30)
    submit(home_a, id="far", content="c", craftsman="echo",
           expires_at="9999-12-31T23:00:00-05:00", not_before="9999-12-31T23:00:00-05:00")
    # before: ValueError (year 10000 is out of range) out of forward, and the bridge died
    assert [t.id for t in bridge.forward(home_a, host_a, [("far.json", "echo")], "bridge-a")] \
        == ["far"]
    with cluster.connect(pg_dsn) as conn:
        [(expires, not_before)] = conn.execute(
            "SELECT expires_at, not_before FROM cluster_tasks").fetchall()
    assert expires.year == not_before.year == 9999
    host_a.close()


# --- the serving host's bridge (service/bridging.py), driven round by round ----------------------

@pytest.fixture
def serving_bridge(pg_dsn: str, monkeypatch: pytest.MonkeyPatch):
    """A factory of host b's bridge (`koubou cluster`) in this process, on a home made under a
    directory given, whose live worker serves echo (as it would say); its rounds are run by the
    test. The listener thread is not started: the test passes the wake-ups it would bring."""
    made = []
    monkeypatch.setenv(DSN_ENV, pg_dsn)

    def make(root: Path) -> bridging.Bridge:
        home = root / "host-b"
        home_module.init(home)
        config = write_config(home, cluster={"dsn_env": DSN_ENV, "host": "host-b",
                                             "lease_s": 30})
        made.append(bridging.Bridge(home, config_module.load(config)))
        made[-1].served = {"echo"}
        return made[-1]
    yield make
    for serving in made:
        serving.wakeups.close()
        serving.cluster.close_quietly()
        serving.board.close()


def forwarded(root: Path, pg_dsn: str, *ids: str,
              content: str = "c") -> tuple[Spool, cluster.Cluster]:
    """Host a, with these echo tasks forwarded by its bridge."""
    home_module.init(root / "host-a")
    write_config(root / "host-a")
    home_a = Spool.open(root / "host-a")
    host_a = cluster.Cluster.open(pg_dsn, host="host-a", lease_s=30)
    for task_id in ids:
        submit(home_a, id=task_id, content=content, craftsman="echo")
    bridge.forward(home_a, host_a, [(f"{i}.json", "echo") for i in ids], "bridge-a")
    return home_a, host_a


def test_a_lease_that_ran_out_is_not_cancelled_here_when_another_host_finished_the_task(
        tmp_path: Path, pg_dsn: str, serving_bridge) -> None:
    import psycopg
    home_a, host_a = forwarded(tmp_path, pg_dsn, "slow", "stop")
    serving = serving_bridge(tmp_path)
    leases = bridge.take_in(serving.spool, serving.cluster, serving.id, "echo", 2)
    assert sorted(lease.task_id for lease in leases) == ["slow", "stop"]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # host b too slow to renew "slow"
        conn.execute("UPDATE cluster_tasks SET lease_until = now() - interval '1 second' "
                     "WHERE id = 'slow'")
    host_c = cluster.Cluster.open(pg_dsn, host="host-c", lease_s=30)
    assert host_c.take_back_expired() == [("slow", "pending")]
    taken_over = host_c.claim("w-c", ["echo"])
    assert host_c.publish(taken_over, completed(taken_over))  # host c ran it to the end
    assert host_a.cancel("stop", task_format.failed_record(
        {"id": "stop", "content": "c"}, "cancelled", "cancelled on host-a", 0, time.time()))
    serving._leases_ended(["slow", "stop"])
    # before: "slow" was cancelled here too, its outcome and log saying so, which was not true
    assert os.path.exists(serving.spool.pending / "slow.json")
    assert serving.spool.outcome("stop")["error"]["kind"] == "cancelled"
    host_c.close()
    host_a.close()


def test_forwarded_tasks_no_host_holds_come_home_with_the_attempts_they_spent(
        tmp_path: Path, pg_dsn: str) -> None:
    home_a, host_a = forwarded(tmp_path, pg_dsn, "tried", "fresh", "running", "waiting",
                               "local")
    host_b = cluster.Cluster.open(pg_dsn, host="host-b", lease_s=30)
    tried, fresh, running = host_b.claim_many("bridge-b", ["echo"], 3, others_only=True)
    assert host_b.requeue(tried)  # a lease lost: its attempt counts
    assert host_b.requeue_many([fresh], counted=False) == {"fresh"}  # never started: none
    # the bridge died: recovery put two faces back in pending/, and a worker here took one
    faces = {match["name"]: entry for entry, match in home_a.claims()}
    for name in ("waiting.json", "local.json"):
        assert home_a.requeue(faces[name], None)
    live = home_a.claim("local.json", "worker-live")
    # a worker of echo is back on host a, and a bridge there (a new one) brings them home
    assert bridge.bring_home(home_a, host_a, "bridge-a2", ["echo"], 3) == [
        "fresh", "tried", "waiting"]
    assert sorted(os.listdir(home_a.pending)) == ["fresh.json", "tried.json", "waiting.json"]
    assert read_json(home_a.pending / "tried.json")["attempts"] == 1
    assert read_json(home_a.pending / "fresh.json").get("attempts", 0) == 0
    # the one another host holds stays there, its face with it; the one a worker here runs
    # keeps its claim (before: taken from it, and run twice)
    assert host_a.states(["tried", "fresh", "running", "waiting", "local"]) == {
        "running": "in_progress", "local": "pending"}
    assert sorted(entry for entry, _ in home_a.claims()) == sorted(
        [faces["running.json"], live.file_name])
    assert bridge.bring_home(home_a, host_a, "bridge-a2", ["echo"], 3) == []
    host_a.close()
    host_b.close()


def test_a_task_brought_home_and_forwarded_again_keeps_its_lost_leases_fenced(
        tmp_path: Path, pg_dsn: str) -> None:
    home_a, host_a = forwarded(tmp_path, pg_dsn, "twice")
    host_b = cluster.Cluster.open(pg_dsn, host="host-b", lease_s=30)
    [lost] = host_b.claim_many("bridge-b", ["echo"], 1, others_only=True)
    assert host_b.requeue(lost)  # its lease lost, say, but host b's craftsman still at it
    # Host a's allowance is 5 now: the attempts spent are told by what the run was granted, 3
    # (before: by today's 5, and the face came home with 3 attempts for 1)
    assert bridge.bring_home(home_a, host_a, "bridge-a2", ["echo"], 5) == ["twice"]
    assert read_json(home_a.pending / "twice.json")["attempts"] == 1
    # the worker left again: the face goes back out
    bridge.forward(home_a, host_a, [("twice.json", "echo")], "bridge-a3", max_attempts=5)
    [again] = host_b.claim_many("bridge-b2", ["echo"], 1, others_only=True)
    assert (again.attempt, again.run) == (2, 1)  # before: (1, 0), the lost lease's own number
    assert not host_b.publish(lost, completed(lost))  # fenced out
    assert host_b.requeue(again)
    assert bridge.bring_home(home_a, host_a, "bridge-a4", ["echo"], 5) == ["twice"]
    assert read_json(home_a.pending / "twice.json")["attempts"] == 2
    host_a.close()
    host_b.close()


def test_a_dead_bridges_faces_wait_for_the_next_bridge_which_adopts_them(
        tmp_path: Path, pg_dsn: str) -> None:
    from koubou_spool.ops import maintain
    home_a, host_a = forwarded(tmp_path, pg_dsn, "held", "delivering", "written")
    faces = {match["name"]: entry for entry, match in home_a.claims()}  # of bridge-a, dead
    for name in ("delivering.json", "written.json"):  # it died delivering these two
        os.rename(home_a.in_progress / faces[name], home_a.in_progress / f"{faces[name]}.fin")
    (home_a.completed / "written.json").write_text(json.dumps(
        {"id": "written", "status": "completed", "result": {"content": "done"}}))
    ledger_path = home_a.home / "db" / "koubou.db"
    in_cluster = config_module.load(write_config(home_a.home, cluster={
        "dsn_env": DSN_ENV, "host": "host-a"}))
    assert maintain.run(home_a, in_cluster, ledger_path).requeued == 0  # left for the bridge
    assert len(list(home_a.claims())) == 3 and os.listdir(home_a.pending) == []
    adopted = bridge.adopt_faces(home_a, "bridge-new", 30)
    assert sorted(task.id for task in adopted) == ["delivering", "held"]
    assert sorted((match["name"], match["worker"], match["fin"]) for _, match in home_a.claims()
                  ) == [("delivering.json", "bridge-new", None),
                        ("held.json", "bridge-new", None)]  # written's marker gone
    # out of the cluster (a cluster: section without dsn_env is none), the faces of a dead
    # bridge go back to pending/, as before
    alone = config_module.load(write_config(home_a.home, cluster={"host": "host-a"}))
    assert maintain.run(home_a, alone, ledger_path).requeued == 2
    assert sorted(os.listdir(home_a.pending)) == ["delivering.json", "held.json"]
    host_a.close()


def test_a_face_whose_row_is_gone_comes_home_at_the_next_look(
        tmp_path: Path, pg_dsn: str) -> None:
    home_a, host_a = forwarded(tmp_path, pg_dsn, "orphan", "kept")
    with cluster.connect(pg_dsn) as conn:  # a withdraw that committed, its reply lost
        conn.execute("DELETE FROM cluster_tasks WHERE id = 'orphan'")
    assert bridge.bring_home(home_a, host_a, "bridge-a", ["other"], 3,
                             pending_too=False) == []  # a NOTIFY's look: bridge faces only
    assert bridge.bring_home(home_a, host_a, "bridge-a", ["other"], 3) == ["orphan"]
    assert os.listdir(home_a.pending) == ["orphan.json"]  # before: claimed for ever, no row
    assert host_a.states(["kept"]) == {"kept": "pending"}  # echo is not served: it stays out
    host_a.close()


def test_maintain_purges_the_hosts_delivered_cluster_rows_past_the_retention(
        tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from koubou_spool.ops import maintain
    home_a, host_a = forwarded(tmp_path, pg_dsn, "old", "open")
    host_b = cluster.Cluster.open(pg_dsn, host="host-b", lease_s=30)
    old, _ = host_b.claim_many("bridge-b", ["echo"], 2, others_only=True)
    record = {"id": "old", "status": "completed", "result": {"content": "done"}}
    assert host_b.publish(old, record)
    assert bridge.deliver(home_a, host_a, "bridge-a") == ["old"]
    config = config_module.load(write_config(home_a.home, cluster={
        "dsn_env": DSN_ENV, "host": "host-a"}))
    ledger_path = home_a.home / "db" / "koubou.db"
    monkeypatch.setenv(DSN_ENV, pg_dsn)
    kept = maintain.run(home_a, config, ledger_path, purge_after=3600)
    assert kept.cluster_purged == 0 and "0 cluster task rows" in kept.line()
    time.sleep(0.05)
    summary = maintain.run(home_a, config, ledger_path, purge_after=0.01)
    assert summary.cluster_purged == 1 and summary.errors == []
    assert host_a.states(["old", "open"]) == {"open": "in_progress"}  # still running on b
    monkeypatch.delenv(DSN_ENV)
    unset = maintain.run(home_a, config, ledger_path, purge_after=0.01)
    assert unset.cluster_purged is None and "cluster task rows" not in unset.line()
    assert unset.errors == [f"cluster: cluster.dsn_env names {DSN_ENV}, which is not set"]
    host_a.close()
    host_b.close()


def test_a_cancel_whose_row_could_not_be_read_still_stops_the_local_copy(
        tmp_path: Path, pg_dsn: str, serving_bridge) -> None:
    _, host_a = forwarded(tmp_path, pg_dsn, "stop-me")
    host_b = serving_bridge(tmp_path)
    assert host_b._connect()
    host_b._round(Events(flags={"tasks:echo"}))
    assert list(host_b.leases) == ["stop-me"] and os.listdir(host_b.spool.pending) == [
        "stop-me.json"]
    record = task_format.failed_record({"id": "stop-me", "content": "c"}, "cancelled",
                                       "cancelled on host a", 1, time.time())
    assert host_a.cancel("stop-me", record)  # and koubou_cancel tells host b
    ends_of = host_b.cluster.ends_of

    def blip_then_ends(ids) -> dict:  # the connection lost between the renewal and the read
        host_b.cluster.ends_of = ends_of
        with cluster.connect(pg_dsn) as conn:
            conn.execute("SELECT pg_terminate_backend(%s, 5000)",
                         (host_b.cluster._conn.info.backend_pid,))
        return ends_of(ids)
    host_b.cluster.ends_of = blip_then_ends
    host_b._round(Events(flags={"cancel"}))
    assert not host_b.up and host_b.leases == {}  # the cluster away; the lease revoked
    assert os.listdir(host_b.spool.pending) == ["stop-me.json"]
    assert host_b._connect()  # back: the bridge's round after a reconnect
    host_b._round(Events(rescan=True, outcomes=True, flags={"recheck"}))
    assert os.listdir(host_b.spool.pending) == [], "the cancelled task's local copy runs on"
    assert read_json(host_b.spool.failed / "stop-me.json")["error"]["kind"] == "cancelled"
    host_a.close()


def test_a_cluster_task_that_is_no_valid_task_here_fails_on_its_origin_as_invalid(
        tmp_path: Path, pg_dsn: str) -> None:
    home_a, host_a = forwarded(tmp_path, pg_dsn, "good", "unread", "garbled", "listed",
                               "marked")
    with cluster.connect(pg_dsn) as conn:  # sent by an origin whose koubou reads tasks otherwise
        for task_id, body in (("unread", '{"id": "unread", "content": "c", "priority": "high"}'),
                              ("garbled", "not a task at all"), ("listed", '["c"]'),
                              ("marked", '{"id": "marked", "content": "c", "metadata": [1]}')):
            conn.execute("UPDATE cluster_tasks SET body = convert_to(%s, 'UTF8') WHERE id = %s",
                         (body, task_id))
    home_module.init(tmp_path / "host-b")
    home_b = Spool.open(tmp_path / "host-b")
    host_b = cluster.Cluster.open(pg_dsn, host="host-b", lease_s=30)
    leases = bridge.take_in(home_b, host_b, "bridge-b", "echo", 8)
    assert [lease.task_id for lease in leases] == ["good"]
    assert os.listdir(home_b.pending) == ["good.json"]
    assert host_a.states(["good", "unread", "garbled", "listed", "marked"]) == {
        "good": "in_progress", "unread": "failed", "garbled": "failed", "listed": "failed",
        "marked": "failed"}
    assert sorted(bridge.deliver(home_a, host_a, "bridge-a")) == [
        "garbled", "listed", "marked", "unread"]
    unread = read_json(home_a.failed / "unread.json")
    assert (unread["content"], unread["error"]["kind"], unread["error"]["attempts"]) == (
        "c", "invalid", 1)
    assert unread["error"]["message"].startswith("host host-b refused it, not run: priority")
    garbled = read_json(home_a.failed / "garbled.json")
    assert garbled["error"]["kind"] == "invalid" and "not valid JSON" in garbled["error"]["message"]
    assert "metadata: expected an object" in read_json(home_a.failed / "marked.json")[
        "error"]["message"]
    host_a.close()
    host_b.close()


def test_a_take_in_the_disk_refuses_gives_the_leases_back_and_the_bridge_goes_on(
        tmp_path: Path, pg_dsn: str, serving_bridge,
        small_disk: Path,  # noqa: F811 (test_disk's fixture, imported above)
        caplog: pytest.LogCaptureFixture) -> None:
    _, host_a = forwarded(tmp_path, pg_dsn, "later")
    host_b = serving_bridge(small_disk)
    assert host_b._connect()
    lock = host_b._lock_fd = host_b.spool.register_worker(host_b.id, {"id": host_b.id})
    filler = fill_disk(small_disk)
    with caplog.at_level(logging.WARNING, logger=bridging.__name__):
        host_b._round(Events(flags={"tasks:echo"}))  # before: NoSpace, and the bridge died
    assert "no space left for" in caplog.text and "taken in again once this home can" in caplog.text
    assert host_b.leases == {} and host_a.states(["later"]) == {"later": "pending"}
    host_b._round(Events(flags={"tasks:echo"}))  # the give-back's own NOTIFY: not at once again
    with cluster.connect(pg_dsn) as conn:
        assert conn.execute("SELECT state, attempt FROM cluster_tasks").fetchall() == [
            ("pending", 1)]
    with caplog.at_level(logging.WARNING, logger=bridging.__name__):
        for _ in range(3):  # heartbeats with the disk still full: no take-in, unsaid
            assert not host_b._beat()
            host_b._round(Events(flags={"freed"}))
    assert caplog.text.count("taken in again once this home can") == 1
    with cluster.connect(pg_dsn) as conn:  # before: a lease and an attempt at each heartbeat
        assert conn.execute("SELECT state, attempt FROM cluster_tasks").fetchall() == [
            ("pending", 1)]
    assert os.listdir(host_b.spool.tmp) == []  # the probe of room leaves nothing
    filler.unlink()
    assert host_b._beat()  # its next heartbeat: room again, the take-in tries again
    host_b._round(Events(flags={"freed"}))
    assert list(host_b.leases) == ["later"]
    assert os.listdir(host_b.spool.pending) == ["later.json"]
    host_b.spool.unregister_worker(host_b.id, lock)
    host_a.close()


def test_after_a_refused_take_in_the_probe_asks_room_for_the_biggest_task_refused(
        tmp_path: Path, pg_dsn: str, serving_bridge,
        small_disk: Path) -> None:  # noqa: F811 (test_disk's fixture, imported above)
    _, host_a = forwarded(tmp_path, pg_dsn, "big", content="x" * 300_000)
    host_b = serving_bridge(small_disk)
    assert host_b._connect()
    lock = host_b._lock_fd = host_b.spool.register_worker(host_b.id, {"id": host_b.id})
    filler = fill_disk(small_disk)
    os.truncate(filler, os.path.getsize(filler) - 64 * 1024)  # room for 64 KiB, not 300 KB
    host_b._round(Events(flags={"tasks:echo"}))
    assert host_b.leases == {}
    for _ in range(3):  # before: a 4 KiB probe passed, and each heartbeat leased it again
        assert not host_b._beat()
        host_b._round(Events(flags={"freed"}))
    with cluster.connect(pg_dsn) as conn:
        assert conn.execute("SELECT state, attempt FROM cluster_tasks").fetchall() == [
            ("pending", 1)]
    filler.unlink()
    assert host_b._beat()
    host_b._round(Events(flags={"freed"}))
    assert list(host_b.leases) == ["big"]
    host_b.spool.unregister_worker(host_b.id, lock)
    host_a.close()


def test_a_take_in_into_an_unusable_pending_dir_gives_the_leases_back_and_goes_on(
        tmp_path: Path, pg_dsn: str, serving_bridge,
        caplog: pytest.LogCaptureFixture) -> None:
    _, host_a = forwarded(tmp_path, pg_dsn, "later")
    host_b = serving_bridge(tmp_path / "b")
    assert host_b._connect()
    lock = host_b._lock_fd = host_b.spool.register_worker(host_b.id, {"id": host_b.id})
    pending = host_b.spool.pending
    os.rename(pending, tmp_path / "aside")
    pending.write_text("not a directory")  # an error no disk check names
    with caplog.at_level(logging.WARNING, logger=bridging.__name__):
        host_b._round(Events(flags={"tasks:echo"}))  # before: the error killed the bridge
    assert "taken in again once this home can" in caplog.text
    assert host_b.leases == {} and host_a.states(["later"]) == {"later": "pending"}
    with caplog.at_level(logging.WARNING, logger=bridging.__name__):
        # still no directory: no lease taken to be given back again, and this host's row,
        # which cannot be read, is said stale (before: the heartbeat's snapshot killed it)
        assert not host_b._beat()
        host_b._round(Events(flags={"freed"}))
    assert "this host's row in the cluster is not updated" in caplog.text
    pending.unlink()
    os.rename(tmp_path / "aside", pending)
    assert host_b._beat()
    host_b._round(Events(flags={"freed"}))
    assert list(host_b.leases) == ["later"] and os.listdir(pending) == ["later.json"]
    with cluster.connect(pg_dsn) as conn:  # the refused lease spent no attempt
        assert conn.execute("SELECT attempt, max_attempts FROM cluster_tasks").fetchall() == [
            (2, 4)]
    host_b.spool.unregister_worker(host_b.id, lock)
    host_a.close()


def test_recovery_gives_a_dead_bridges_claims_back_uncounted(origin: Spool, tmp_path: Path) -> None:
    from koubou_spool.config import SpoolSettings
    from koubou_spool.spool.ledger import LedgerWriter
    from koubou_spool.spool.recovery import recover_orphans
    for task_id in ("faced", "worked"):
        submit(origin, id=task_id, content="c")
    origin.claim("faced.json", "bridge-host-a-1-dead")  # a bridge that died: no lock file
    origin.claim("worked.json", "host-a-2-dead")  # an ordinary worker that died
    ledger = LedgerWriter(tmp_path / "ledger.db")
    try:
        done = recover_orphans(origin, SpoolSettings(), "host-a-3-live", ledger)
    finally:
        ledger.close()
    assert sorted((r.task_id, r.action) for r in done) == [("faced", "requeued"),
                                                            ("worked", "requeued")]
    assert "attempts" not in read_json(origin.pending / "faced.json")  # the face was no attempt
    assert read_json(origin.pending / "worked.json")["attempts"] == 1


def test_unfinished_rows_an_older_koubou_stored_with_u0000_fail_when_the_schema_migrates(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stored before the forward refused them, they broke every bridge's take-back for good.
    with cluster.connect(pg_dsn) as conn:
        monkeypatch.setattr(cluster, "MIGRATIONS", cluster.MIGRATIONS[:-1])
        cluster.migrate(conn)
        monkeypatch.undo()
        bodies = {"nul": "a\x00b", "escaped": "a\\u0000b", "both": "a\\\x00b", "plain": "ab"}
        for task_id, content in bodies.items():  # the U+0000 ones on their last attempt
            conn.execute(
                "INSERT INTO cluster_tasks (id, origin, craftsman, priority, max_attempts, body, "
                "state, attempt, host, lease_until) VALUES (%s, 'host-a', 'gpu', 0, 3, %s, "
                "'in_progress', %s, 'host-b', now() - interval '1 minute')",
                (task_id, task_format.encode({"id": task_id, "content": content}),
                 3 if "\x00" in content else 1))
        conn.commit()
    store = cluster.Cluster.open(pg_dsn, host="host-a", lease_s=LEASE_S)  # migrates
    # before: psycopg.errors.UntranslatableCharacter, at every host's heartbeat
    assert sorted(store.take_back_expired()) == [("escaped", "pending"), ("plain", "pending")]
    assert store.states(list(bodies)) == {"nul": "failed", "both": "failed",
                                          "escaped": "pending", "plain": "pending"}
    with cluster.connect(pg_dsn) as conn:
        outcomes = dict(conn.execute("SELECT id, outcome FROM cluster_tasks WHERE outcome "
                                     "IS NOT NULL").fetchall())
    assert outcomes["nul"]["content"] == "a\ufffdb" and outcomes["both"]["content"] == "a\\\ufffdb"
    for outcome in outcomes.values():
        assert outcome["status"] == "failed" and outcome["error"]["kind"] == "invalid"
        assert "U+0000" in outcome["error"]["message"] and "craftsman gpu" in outcome["error"][
            "message"]
        task_format.parse_iso(outcome["error"]["at"])
    store.close()
