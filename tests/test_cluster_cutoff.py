"""A host cut off from PostgreSQL by the network, not by a server that stopped.

Host c runs in a network namespace of its own (tests/netns.py), joined to the server by a veth
pair; hosts a and b reach it on 127.0.0.1. The test takes c's link down while c holds leases:
packets vanish, no reset and no FIN tell anyone. Its local work goes on and it says once that
the cluster cannot be reached; its leases are taken over by b after lease_s; when the link
comes back c rejoins, and its late results are fenced out.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import netns
import pgserver
from conftest import missing, wait_outcomes
from test_cluster_hosts import DSN_ENV, LEASE_S, Host, assert_once_each, drop, rows

# How soon a cut-off bridge must notice: keepalives end an idle connection in about 11 s, and
# tcp_user_timeout one with a request unanswered as soon; the rest is slack for a busy machine.
NOTICED_WITHIN_S = 25.0


class CutOff:
    """A server for this test alone, listening on 127.0.0.1 and on a namespace's veth."""

    def __init__(self, ns: netns.Namespace, server: pgserver.PgServer) -> None:
        self.ns, self.server = ns, server
        self.dsn = server.create_database("cutoff")  # as hosts a and b reach it
        self.dsn_inside = server.dsn("cutoff", ns.outside)  # as host c does, over the veth


@pytest.fixture
def cut_off(monkeypatch: pytest.MonkeyPatch) -> Iterator[CutOff]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("psycopg 3", "pip install -e '.[cluster]'")
    if not pgserver.is_available():
        missing("PostgreSQL's initdb and postgres", pgserver.ENABLES)
    reason = netns.why_not()
    if reason is not None:  # a container without CAP_NET_ADMIN, or a normal user
        pytest.skip(f"cutting a host off needs a network namespace: {reason}; bin/koubou-test run as "
                    "root enables it where the machine allows namespaces")
    with netns.Namespace() as ns:
        server = pgserver.PgServer(listen=(ns.outside,), trust=(f"{ns.inside}/32",))
        try:
            setup = CutOff(ns, server.init().start())
            monkeypatch.setenv(DSN_ENV, setup.dsn)
            yield setup
        finally:
            server.destroy()


def wait_log(host: Host, text: str, count: int, timeout: float, since: float) -> float:
    """Until the host's bridge has logged `text` `count` times, at most `timeout` seconds after
    `since` (a time.monotonic()); the seconds from `since`."""
    while host.logs("cluster").count(text) < count:
        assert time.monotonic() - since < timeout, host.logs("cluster")
        time.sleep(0.1)
    return time.monotonic() - since


@pytest.mark.slow
def test_a_host_cut_off_goes_on_locally_and_its_leases_are_taken_over(
        tmp_path: Path, cut_off: CutOff) -> None:
    a, b = Host(tmp_path, "host-a"), Host(tmp_path, "host-b")
    c = Host(tmp_path, "host-c", latency_ms=1500, slots=4)
    c.prefix = cut_off.ns.command([])
    c.env = {**os.environ, DSN_ENV: cut_off.dsn_inside}
    try:
        a.serve("local")  # host a serves no echo: its echo tasks cross
        c.serve("echo")
        wait_log(c, "connected to the cluster as host host-c", 1, 15, time.monotonic())
        ids = drop(a, 12, "cut")
        deadline = time.monotonic() + 15
        while len(held := [i for i, row in rows(cut_off.dsn).items()
                           if row[0] == "in_progress" and row[3] == "host-c"]) < 4:
            assert time.monotonic() < deadline, c.logs()
            time.sleep(0.05)

        cut_off.ns.cut()
        cut_at = time.monotonic()
        local = drop(c, 3, "local")  # host c serves echo itself: these never leave it
        b.serve("echo")
        assert_once_each(a, [b], ids, cut_off.dsn)  # b took over c's leases after lease_s
        found = rows(cut_off.dsn)
        assert all(found[i][1] == 2 and found[i][3] == "host-b" for i in held), found
        wait_outcomes(c.spool, local, timeout=10)  # local work went on, the link still down
        noticed = wait_log(c, "cluster's PostgreSQL cannot be reached", 1, NOTICED_WITHIN_S,
                           cut_at)

        cut_off.ns.restore()
        rejoined = wait_log(c, "connected to the cluster as host host-c", 2, 30,
                            time.monotonic())
        after = drop(a, 6, "after")  # wake-ups reach every host again
        assert_once_each(a, [b, c], after, cut_off.dsn)
        found = rows(cut_off.dsn)
        assert all(found[i][1] == 2 and found[i][3] == "host-b" for i in held)  # c fenced out
        b_workers = set(b.spool.worker_ids())
        outcomes = wait_outcomes(a.spool, held, timeout=1)
        assert all(o["result"]["worker_id"] in b_workers for o in outcomes.values())
        assert c.logs("cluster").count("cannot be reached") == 1  # said once, not per round
        assert "Traceback" not in a.logs("cluster") + b.logs("cluster") + c.logs("cluster")
        print(f"\nhost c said it was cut off {noticed:.1f} s after the cut; rejoined "
              f"{rejoined:.1f} s after the link came back (lease_s {LEASE_S})")
    finally:
        for host in (a, b, c):
            host.kill()


HOLDER = """\
import sys, threading, time
from koubou_spool.craft.shared_slots import SharedSlots
granted = threading.Event()
slots = SharedSlots(sys.argv[1], {sys.argv[2]: 1})
slots.on_grant = granted.set
if slots.take(sys.argv[2]) is None:
    granted.wait(15)
print("held" if slots.take(sys.argv[2]) == 0 else "not held", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_cut_off_hosts_cluster_slots_are_freed_by_the_server(cut_off: CutOff) -> None:
    # The slots are session advisory locks: the server, not the host, must end the session of
    # a host it no longer hears from. With the system's keepalives that takes two hours.
    from koubou_spool.craft.shared_slots import RETRY_S, SharedSlots
    key = "gpu@cut"
    holder = subprocess.Popen(cut_off.ns.command([sys.executable, "-c", HOLDER,
                                                  cut_off.dsn_inside, key]),
                              stdout=subprocess.PIPE, text=True)
    granted = threading.Event()
    waiting = SharedSlots(cut_off.dsn, {key: 1})
    waiting.on_grant = granted.set
    try:
        assert holder.stdout.readline().strip() == "held"
        assert waiting.take(key) is None
        assert not granted.wait(1.0)  # the host on the other side of the link holds it
        cut_off.ns.cut()
        cut_at = time.monotonic()
        assert granted.wait(NOTICED_WITHIN_S + RETRY_S), "the cut-off host's slot stayed held"
        freed = time.monotonic() - cut_at
        assert waiting.take(key) == 0
        print(f"\nthe cut-off host's slot was free again {freed:.1f} s after the cut")
    finally:
        waiting.close()
        holder.kill()
        holder.wait()
