"""`max_concurrent` across the hosts of a cluster (PRODUCT.md §12; craft/shared_slots.py).

A server every host reaches at one address has its slots in PostgreSQL as session advisory
locks: given back by NOTIFY, freed by a killed worker's session, taken again by number after a
restart, and, end to end, three hosts of one craftsman never send its server more than its
max_concurrent at once.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import clusterhosts
import netns
import pgserver
from conftest import submit, wait_outcomes
from fake_openai import FakeOpenAI
from koubou_spool.config import Craftsman, Endpoint

shared_slots = pytest.importorskip("koubou_spool.craft.shared_slots",
                                   reason="psycopg 3: pip install -e '.[cluster]'")
hosts = clusterhosts.hosts
KEY = "gpu@0123456789ab"


class Granted:
    """A SharedSlots whose grants set an event, so a test can wait for one."""

    def __init__(self, dsn: str | None, cap: int = 1) -> None:
        self.event = threading.Event()
        self.slots = shared_slots.SharedSlots(dsn, {KEY: cap})
        self.slots.on_grant = self.event.set

    def take(self, within: float) -> int | None:
        """A slot, waiting up to `within` seconds for its grant."""
        self.event.clear()
        slot = self.slots.take(KEY)
        if slot is None and self.event.wait(within):
            slot = self.slots.take(KEY)
        return slot


@pytest.fixture
def granted(pg_dsn: str) -> Iterator[list[Granted]]:
    made: list[Granted] = []
    yield made
    for each in made:
        each.slots.close()


def advisory_locks(dsn: str) -> int:
    import psycopg
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                            " AND granted").fetchone()[0]


def test_which_servers_the_cluster_shares() -> None:
    assert not shared_slots.shared_url("http://127.0.0.1:1234/v1")
    assert not shared_slots.shared_url("http://127.8.0.3:1234/v1")
    assert not shared_slots.shared_url("http://localhost:11434/v1")
    assert not shared_slots.shared_url("http://[::1]:8000/v1")
    assert shared_slots.shared_url("http://gpu1:1234/v1")
    assert shared_slots.shared_url("http://10.0.0.7:1234/v1")
    assert shared_slots.shared_url("")  # the provider's cloud API
    craftsmen = [
        Craftsman(name="own", backend="openai", base_url="http://127.0.0.1:1/v1"),
        Craftsman(name="lan", backend="openai", base_url="http://gpu1:1/v1", max_concurrent=3),
        Craftsman(name="secret", backend="openai", base_url="http://gpu1:1/v1", local=True),
        Craftsman(name="echo", backend="echo"),
        Craftsman(name="many", backend="openai", endpoints=(
            Endpoint(base_url="http://127.0.0.1:2/v1", max_concurrent=4),
            Endpoint(base_url="http://gpu2:2/v1", max_concurrent=2)))]
    caps = shared_slots.cluster_caps(craftsmen)
    assert sorted(caps.values()) == [2, 3] and len(caps) == 2
    assert all(k.startswith(("lan@", "many@")) for k in caps)


def test_a_slot_given_back_is_granted_to_the_waiting_worker_by_notify(
        pg_dsn: str, granted: list[Granted]) -> None:
    a, b = Granted(pg_dsn), Granted(pg_dsn)
    granted.extend((a, b))
    assert a.take(within=10) == 0
    assert b.take(within=1.0) is None  # the one slot is a's: no grant comes
    given = time.monotonic()
    a.slots.give(KEY, 0)
    assert b.event.wait(10)
    waited = time.monotonic() - given
    assert b.slots.take(KEY) == 0
    # Well inside the retry that covers dead sessions: the NOTIFY of the unlock woke b.
    assert waited < shared_slots.RETRY_S, waited
    print(f"\ngranted {waited * 1000:.1f} ms after the give")


def test_a_request_waiting_for_a_slot_gets_the_grant_and_one_that_gave_up_gives_it_back(
        pg_dsn: str, granted: list[Granted]) -> None:
    a, b = Granted(pg_dsn), Granted(pg_dsn)
    granted.extend((a, b))
    assert a.take(within=10) == 0
    waiting = b.slots.wait_for(KEY)  # a failover's wait: the grant goes to it, in use
    a.slots.give(KEY, 0)
    assert waiting.result(timeout=10) == 0
    assert b.slots.held(KEY) == (1, 0)  # in use, no spare the loop could give back
    b.slots.drop_spares(KEY)  # what the loop does while its worker can start nothing more
    assert b.slots.held(KEY) == (1, 0)
    late = a.slots.wait_for(KEY)  # waits for b's slot; granted it, but gives up (its time ran
    b.slots.give(KEY, 0)          # out as the grant came)
    assert late.result(timeout=10) == 0
    a.slots.stop_waiting(KEY, late)
    assert a.slots.held(KEY) == (0, 0)
    deadline = time.monotonic() + 10
    while advisory_locks(pg_dsn):  # the slot went back to the cluster
        assert time.monotonic() < deadline, "a slot granted to a waiter that gave up is held"
        time.sleep(0.05)


def test_a_killed_holders_slot_is_free_again_without_a_notify(
        pg_dsn: str, granted: list[Granted]) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, psycopg\n"
         "conn = psycopg.connect(sys.argv[1], autocommit=True)\n"
         "conn.execute('SELECT pg_advisory_lock(hashtext(%s), 0)', (sys.argv[2],))\n"
         "print('held', flush=True)\n"
         "time.sleep(600)\n", pg_dsn, KEY], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        b = Granted(pg_dsn)
        granted.append(b)
        assert b.take(within=1.0) is None
        holder.kill()  # SIGKILL: its session ends when the server sees the socket close
        assert b.take(within=shared_slots.RETRY_S + 8) == 0
    finally:
        holder.kill()
        holder.wait()


def test_after_a_postgresql_restart_slots_in_use_are_taken_again_first(
        pg_dsn: str, pg_server: pgserver.PgServer, granted: list[Granted]) -> None:
    a = Granted(pg_dsn)
    granted.append(a)
    assert a.take(within=10) == 0  # in use by a request when the server goes
    pg_server.restart()
    deadline = time.monotonic() + 20
    while advisory_locks(pg_dsn) < 1:  # a reconnects and takes its slot 0 again
        assert time.monotonic() < deadline, "slot 0 was not taken again after the restart"
        time.sleep(0.1)
    b = Granted(pg_dsn)
    granted.append(b)
    assert b.take(within=shared_slots.RETRY_S + 1) is None  # past a retry: still a's
    a.slots.give(KEY, 0)
    assert b.take(within=10) == 0


def test_while_postgresql_is_away_no_slot_is_granted(
        pg_dsn: str, pg_server: pgserver.PgServer, granted: list[Granted]) -> None:
    pg_server.stop()
    a = Granted(pg_dsn)
    granted.append(a)
    assert a.take(within=1.0) is None
    pg_server.start()
    assert a.take(within=15) == 0  # the reconnect grants what waited


def slot_logs(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == shared_slots.__name__ and text in r.getMessage()]


def wait_logs(caplog: pytest.LogCaptureFixture, text: str, count: int, timeout: float) -> None:
    """Until the slots thread logged `text` `count` times (its tries, which nothing else
    announces)."""
    deadline = time.monotonic() + timeout
    while len(slot_logs(caplog, text)) < count:
        assert time.monotonic() < deadline, f"{count} tries logging {text!r} within {timeout} s"
        time.sleep(0.05)


def test_a_worker_that_cannot_reach_postgresql_says_so_once_not_at_each_try(
        granted: list[Granted], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=shared_slots.__name__)
    a = Granted(f"host=127.0.0.1 port={pgserver.free_port()} user=koubou dbname=x")
    granted.append(a)
    assert a.take(within=0.1) is None
    wait_logs(caplog, "cannot be reached", 4, timeout=10)  # backing off: 0.1, 0.2, 0.4 s
    said = [r.getMessage() for r in slot_logs(caplog, "") if r.levelno >= logging.WARNING]
    assert len(said) == 1, said
    assert "cannot be reached" in said[0] and "tasks of shared endpoints wait" in said[0]


TRAP = """
    CREATE SCHEMA trap;
    CREATE TABLE trap.armed ();
    -- First on the session's search_path: the slots' retake of slot 1 fails while armed.
    CREATE FUNCTION trap.pg_try_advisory_lock(k integer, n integer) RETURNS boolean
        LANGUAGE plpgsql AS $$
        BEGIN
            IF n > 0 AND EXISTS (SELECT FROM trap.armed) THEN
                RAISE EXCEPTION 'slot % refused', n;
            END IF;
            RETURN pg_catalog.pg_try_advisory_lock(k, n);
        END $$;"""


def test_a_reconnect_that_fails_half_way_closes_its_session(
        pg_dsn: str, granted: list[Granted], caplog: pytest.LogCaptureFixture) -> None:
    import psycopg
    admin = psycopg.connect(pg_dsn, autocommit=True)
    admin.execute(TRAP)
    a = Granted(f"{pg_dsn} application_name=trapped options='-csearch_path=trap,pg_catalog'",
                cap=2)
    granted.append(a)
    assert a.take(within=10) == 0 and a.take(within=10) == 1  # in use by two requests
    admin.execute("INSERT INTO trap.armed DEFAULT VALUES")
    caplog.set_level(logging.DEBUG, logger=shared_slots.__name__)
    admin.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                  " WHERE application_name = 'trapped'")
    # Each reconnect takes slot 0 again and fails on slot 1. Its session must end there: one
    # left open holds slot 0 for as long as anything refers to the error (here, the log).
    wait_logs(caplog, "slot 1 refused", 3, timeout=10)
    admin.execute("DELETE FROM trap.armed")
    deadline = time.monotonic() + 15
    while admin.execute("SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid)"
                        " WHERE locktype = 'advisory' AND application_name = 'trapped'"
                        ).fetchone()[0] < 2:
        assert time.monotonic() < deadline, "slots 0 and 1 were not taken again"
        time.sleep(0.1)
    assert not slot_logs(caplog, "was taken while PostgreSQL was away"), \
        "slot 0 was still held by the session of a failed reconnect"
    assert admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                         " 'trapped'").fetchone()[0] == 1, "failed reconnects left sessions open"
    admin.close()


@pytest.fixture
def shared_server() -> Iterator[FakeOpenAI]:
    """A fake OpenAI server at an address that is not loopback: one a test namespace's veth
    gives this host, standing in for a GPU server every host of the cluster reaches."""
    reason = netns.why_not()
    if reason is not None:
        pytest.skip(f"a server at a non-loopback address needs a network namespace: {reason};"
                    " bin/koubou-test run as root enables it where the machine allows them")
    with netns.Namespace() as ns:
        server = FakeOpenAI(latency_s=0.15, host=ns.outside).start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def two_shared_servers() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    """Two fake OpenAI servers at a non-loopback address, as two GPU hosts of one craftsman."""
    reason = netns.why_not()
    if reason is not None:
        pytest.skip(f"a server at a non-loopback address needs a network namespace: {reason};"
                    " bin/koubou-test run as root enables it where the machine allows them")
    with netns.Namespace() as ns:
        servers = [FakeOpenAI(latency_s=3, host=ns.outside).start() for _ in range(2)]
        try:
            yield servers[0], servers[1]
        finally:
            for server in servers:
                server.stop()


def gpu_host(hosts, servers: tuple[FakeOpenAI, FakeOpenAI]) -> tuple[Any, Craftsman, list[str]]:
    """Host a, whose craftsman gpu has the two servers as endpoints of one slot each: the host,
    the craftsman as configured, and the cluster keys of its endpoints' slots."""
    from koubou_spool import config as config_module
    from koubou_spool.craft.endpoints import endpoint_key
    craftsmen = {"gpu": {"backend": "openai", "model": "m", "timeout_s": 20, "retries": 0,
                         "endpoints": [{"base_url": server.base_url, "max_concurrent": 1}
                                       for server in servers]}}
    a = hosts("a", craftsmen=craftsmen)
    gpu = config_module.load(a.home / "config" / "koubou.yaml").craftsmen["gpu"]
    return a, gpu, [endpoint_key("gpu", endpoint) for endpoint in gpu.endpoints]


def test_a_worker_that_can_start_nothing_more_holds_no_spare_cluster_slot(
        hosts, pg_dsn: str, two_shared_servers: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    import psycopg
    a, gpu, keys = gpu_host(hosts, two_shared_servers)
    a.start("worker", "--craftsman", "gpu", "--concurrency", "1")
    for n in range(3):
        submit(a.spool, craftsman="gpu", content=f"a {n}")
    deadline = time.monotonic() + 15
    while sum(len(s.completions()) + s.in_flight for s in two_shared_servers) < 1:
        assert time.monotonic() < deadline, a.logs()
        time.sleep(0.05)
    time.sleep(1.0)  # the worker asked for a slot of both servers: both grants are in by now
    # One request runs, and the worker can start no other: the other server's one cluster
    # slot is free for another host (before: held as a spare for the whole request).
    with psycopg.connect(pg_dsn, autocommit=True) as other_host:
        taken = [other_host.execute(shared_slots.TRY, (key, 0)).fetchone()[0] for key in keys]
    assert sorted(taken) == [False, True], (taken, a.logs())
    # `koubou workers` shows what the worker holds (its heartbeat came since the request began)
    from click.testing import CliRunner
    from koubou_spool.cli.koubou import cli
    shown = CliRunner().invoke(cli, ["workers", "--home", str(a.home), "--json"])
    assert shown.exit_code == 0, shown.output
    [worker] = [w for w in json.loads(shown.stdout) if w.get("craftsmen") == ["gpu"]]
    held = {(s["server"], s["in_use"], s["spare"], s["cap"]) for s in worker["cluster_slots"]}
    busy = taken.index(False)  # the server whose one slot the worker holds
    assert held == {(gpu.endpoints[busy].base_url, 1, 0, 1),
                    (gpu.endpoints[1 - busy].base_url, 0, 0, 1)}, shown.output
    table = CliRunner().invoke(cli, ["workers", "--home", str(a.home)]).output
    assert "shared server" in table and gpu.endpoints[busy].base_url in table
    metrics = CliRunner().invoke(cli, ["metrics", "--home", str(a.home)]).stdout
    assert (f'koubou_cluster_slots_held{{worker="{worker["id"]}",craftsman="gpu",server="'
            f'{gpu.endpoints[busy].base_url}",use="in_use"}} 1') in metrics, metrics
    from prometheus_client.parser import text_string_to_metric_families
    assert "koubou_cluster_slots_held" in {f.name for f in text_string_to_metric_families(metrics)}


def test_a_worker_at_its_concurrency_fails_over_to_a_shared_endpoint_within_the_attempt(
        hosts, pg_dsn: str, two_shared_servers: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    import psycopg
    first, second = two_shared_servers
    for server in two_shared_servers:
        server.latency_s = 0.2
    first.fail_next = 1  # a 500 from the endpoint the request goes to first
    a, _, keys = gpu_host(hosts, two_shared_servers)
    with psycopg.connect(pg_dsn, autocommit=True) as other_host:
        # another host holds the second server's one slot: the request starts at the first
        assert other_host.execute(shared_slots.TRY, (keys[1], 0)).fetchone()[0]
        a.start("worker", "--craftsman", "gpu", "--concurrency", "1")
        task_id = submit(a.spool, craftsman="gpu", content="moves")
        deadline = time.monotonic() + 15
        while first.fail_next:
            assert time.monotonic() < deadline, a.logs()
            time.sleep(0.05)
        time.sleep(0.5)  # the 500 is back at the worker, which waits for the second's grant
        # The first server's slot went back before the wait (before: held through it, so two
        # hosts failing over the other way round would each hold what the other waits for).
        assert other_host.execute(shared_slots.TRY, (keys[0], 0)).fetchone()[0], a.logs()
        other_host.execute("SELECT pg_advisory_unlock(hashtext(%s), 0)", (keys[0],))
        other_host.execute(shared_slots.GIVE, (keys[1], 0, shared_slots.SLOTS_CHANNEL, keys[1]))
        outcome = wait_outcomes(a.spool, [task_id], timeout=30)[task_id]
    # The move waited for the grant within the attempt (before: no spare was ready, the attempt
    # failed, and only the next one ran it).
    assert outcome["status"] == "completed", (outcome, a.logs())
    assert outcome["result"]["attempts"] == 1, (outcome, a.logs())
    assert outcome["result"]["endpoint"] == second.base_url
    assert len(second.completions()) == 1


@pytest.mark.parametrize("form", ["base_url", "endpoints"])
@pytest.mark.slow
def test_three_hosts_never_send_a_shared_server_more_than_its_max_concurrent(
        hosts, shared_server: FakeOpenAI, form: str) -> None:
    where = ({"base_url": shared_server.base_url, "max_concurrent": 2} if form == "base_url" else
             {"endpoints": [{"base_url": shared_server.base_url, "max_concurrent": 2}]})
    craftsmen = {"gpu": {"backend": "openai", "model": "m", "timeout_s": 20, "retries": 0,
                         **where}}
    made = [hosts(name, craftsmen=craftsmen) for name in ("a", "b", "c")]
    for host in made:
        host.start("worker", "--craftsman", "gpu")
    ids = {host.name: [submit(host.spool, craftsman="gpu", content=f"{host.name} {n}")
                       for n in range(12)] for host in made}
    for host in made:
        outcomes = wait_outcomes(host.spool, ids[host.name], timeout=60)
        assert all(o["status"] == "completed" for o in outcomes.values()), host.logs()
    assert len(shared_server.completions()) == 36
    # Each host alone may send 2; three would send 6 without the cluster's slots.
    assert shared_server.max_in_flight == 2, shared_server.max_in_flight
