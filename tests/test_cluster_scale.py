"""3,000 tasks across three hosts (#16, Tests): three homes as hosts, each with its own worker
and bridge processes and serving a craftsman of its own, tasks dropped on all three, most of
them for another host's craftsman. Each completes exactly once: one attempt, one completed row
in PostgreSQL, its outcome in its submitting host's completed/ and nowhere but there and on the
host that ran it, none in any failed/."""

from __future__ import annotations

import os
import time

import pytest

from koubou_spool.spool import task as task_format

import clusterhosts
from clusterhosts import Host, wait_delivered
from conftest import wait_outcomes

hosts = clusterhosts.hosts  # the fixture, found by pytest here

NAMES = ("host-a", "host-b", "host-c")
PER_HOST = 1_000
CHUNK = 100  # tasks dropped on one host before the next host's turn
SLOTS = 64  # each echo craftsman's max_concurrent: the leases a host holds at once


def craftsman_of(name: str) -> str:
    """The craftsman a host serves: host-a serves echo-a."""
    return f"echo-{name[-1]}"


def routed(origin: int, n: int) -> str:
    """The craftsman of task n dropped on host `origin`: one in ten its own host's, the rest
    alternately the other two hosts'."""
    served_by = origin if n % 10 == 0 else (origin + 1 + n % 2) % len(NAMES)
    return craftsman_of(NAMES[served_by])


def drop_all(three: list[Host]) -> dict[str, tuple[str, str]]:
    """PER_HOST tasks on each host, in chunks taking turns; task id -> (origin, craftsman)."""
    dropped = {}
    for start in range(0, PER_HOST, CHUNK):
        for origin, host in enumerate(three):
            batch = [task_format.validate({
                "id": f"{host.name}-{n:04d}", "content": f"task {n} of {host.name}",
                "craftsman": routed(origin, n)}) for n in range(start, start + CHUNK)]
            host.spool.submit(batch)
            dropped.update((t.id, (host.name, t.raw["craftsman"])) for t in batch)
    return dropped


@pytest.mark.slow
def test_3000_tasks_dropped_on_three_hosts_complete_once_each_on_their_origin(
        hosts, pg_dsn: str) -> None:
    craftsmen = {craftsman_of(name): {"backend": "echo", "max_concurrent": SLOTS}
                 for name in NAMES}
    three = [hosts(name, craftsmen=craftsmen, serve=[craftsman_of(name)], log_level="warning")
             for name in NAMES]
    for host in three:
        host.serve(craftsman_of(host.name))
    by_name = {host.name: host for host in three}
    runner = {craftsman_of(name): name for name in NAMES}
    started = time.monotonic()
    dropped = drop_all(three)
    for host in three:
        wait_outcomes(host.spool, [i for i, (o, _) in dropped.items() if o == host.name],
                      timeout=90)
    elapsed = time.monotonic() - started
    crossing = [i for i, (origin, craftsman) in dropped.items() if runner[craftsman] != origin]
    assert len(crossing) == 2_700
    found = wait_delivered(pg_dsn, crossing, timeout=30)
    assert set(found) == set(crossing)  # a task its own host serves never leaves it
    completed = {host.name: set(os.listdir(host.spool.completed)) for host in three}
    for task_id, (origin, craftsman) in dropped.items():
        ran_on = by_name[runner[craftsman]]
        record = by_name[origin].spool.outcome(task_id)
        assert record["status"] == "completed" and record["result"]["attempts"] == 1, record
        assert record["result"]["worker_id"] in ran_on.spool.worker_ids()
        assert {name for name in NAMES if f"{task_id}.json" in completed[name]} == {
            origin, ran_on.name}
        if task_id in found:
            assert found[task_id] == ("completed", 1, origin, ran_on.name, True), task_id
    for host in three:
        assert os.listdir(host.spool.failed) == [] and os.listdir(host.spool.pending) == []
    assert "Traceback" not in "".join(host.logs() for host in three)
    print(f"\n3,000 tasks across three hosts ({len(crossing)} crossing): {elapsed:.1f} s, "
          f"{len(dropped) / elapsed:.0f} tasks/s")
