"""One craftsman, several endpoints (PRODUCT.md §12): the choice, cooldowns shared by the home,
failover within an attempt, waiting in pending/ while every endpoint rests, and probes.

Real parts: loopback fake servers (tests/fake_openai.py), in this process or as processes a
test kills with SIGKILL and starts again on the same port; real worker processes; the real
llama.cpp engine twice. Only 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import missing, wait_outcomes, write_config
from fake_openai import FakeOpenAI
import realengine
from koubou_spool.cli.koubou import cli
from koubou_spool.config import Craftsman, Endpoint
from koubou_spool.craft import endpoints as endpoints_module
from koubou_spool.craft.endpoints import EndpointPool, choose, cooldown_s
from koubou_spool.spool import home as home_module
from koubou_spool.spool import task as task_format
from koubou_spool.spool.files import Spool
from koubou_spool.spool.watcher import OUTCOME_MASK, Watcher

FAKE = Path(__file__).with_name("fake_openai.py")


class FakeProcess:
    """tests/fake_openai.py as a process: killed for real (SIGKILL), started again on its port."""

    def __init__(self, latency_ms: float = 0.0) -> None:
        self.latency_ms = latency_ms
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE), "--latency-ms", str(self.latency_ms), "--port",
             str(self.port)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self.port = int(self.proc.stdout.readline())  # printed once it listens

    def stop(self) -> dict:
        """SIGTERM, and what it served: {"completions": n, "max_in_flight": m}."""
        self.proc.send_signal(signal.SIGTERM)
        served = json.loads(self.proc.stdout.readline())
        self.proc.wait(timeout=10)
        self.proc = None
        return served

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def fakes() -> Iterator[list[FakeProcess]]:
    made: list[FakeProcess] = []
    yield made
    for fake in made:
        fake.kill()


def endpoints_home(home: Path, urls: list[str], slots: int, **more: object) -> Spool:
    """A home whose `local` craftsman has these endpoints, `slots` each; fsync off (speed)."""
    home_module.init(home)
    write_config(home, craftsmen={"local": {
        "backend": "openai", "model": "fake-model", "local": True, "timeout_s": 20,
        "max_tokens": 16, "endpoints": [{"base_url": u, "max_concurrent": slots} for u in urls],
        **more}}, spool={"fsync": False})
    return Spool.open(home)


def submit_many(spool: Spool, count: int, prefix: str) -> list[str]:
    tasks = [task_format.validate({"content": f"task {i}", "id": f"{prefix}-{i:04d}"})
             for i in range(count)]
    spool.submit(tasks)
    return [t.id for t in tasks]


def wait_count(directory: Path, count: int, timeout: float) -> None:
    """Until `directory` holds at least `count` entries, on inotify."""
    watcher = Watcher()
    watcher.watch(directory, OUTCOME_MASK)
    deadline = time.monotonic() + timeout
    try:
        while len(os.listdir(directory)) < count:
            assert time.monotonic() < deadline, f"fewer than {count} in {directory}"
            if watcher.wait(deadline - time.monotonic()):
                watcher.events()
    finally:
        watcher.close()


def finished(outcome: dict) -> float:
    return datetime.fromisoformat(outcome["result"]["finished_at"].replace("Z", "+00:00")).timestamp()


def craftsman(*urls: str, slots: int = 2) -> Craftsman:
    return Craftsman(name="local", backend="openai", model="m", local=True,
                     endpoints=tuple(Endpoint(u, slots) for u in urls),
                     max_concurrent=slots * len(urls))


# --- the pure parts ------------------------------------------------------------------------------

def test_the_rest_grows_from_two_seconds_to_five_minutes_and_honours_retry_after() -> None:
    assert [cooldown_s(n) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert cooldown_s(30) == 300.0
    assert cooldown_s(1, retry_after=3) == 3.0 and cooldown_s(3, retry_after=3) == 8.0


def test_most_free_slots_first_weighted_then_the_fastest() -> None:
    assert choose([1, 3, 2], [1, 1, 1], [None, None, None], [0, 1, 2]) == 1
    assert choose([2, 2, 2], [1, 1, 1], [0.3, 0.1, 0.2], [0, 1, 2]) == 1  # tie: latency
    assert choose([2, 2, 0], [1, 1, 1], [0.3, None, 0.1], [0, 1, 2]) == 1  # unmeasured first
    assert choose([2, 3, 2], [2, 1, 1], [None] * 3, [0, 1, 2]) == 0  # weight
    assert choose([0, 0, 5], [1, 1, 1], [None] * 3, [0, 1]) is None  # 2 not a candidate
    near = [0.100, 0.110, 0.120]  # equal endpoints, measured a little apart: they take turns
    assert [choose([2, 2, 2], [1, 1, 1], near, [0, 1, 2], turn) for turn in range(4)] == [
        0, 1, 2, 0]


def test_slots_and_rests_are_the_homes_not_a_workers(tmp_path: Path) -> None:
    one = EndpointPool(craftsman("http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"), tmp_path)
    other = EndpointPool(craftsman("http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"), tmp_path)
    leases = [one.acquire(), one.acquire(), one.acquire()]
    assert [lease.index for lease in leases] == [0, 1, 0]  # most free first, ties by order
    last = other.acquire()  # the one slot left, wherever it is
    assert last is not None and other.acquire() is None
    one.sent(0)
    one.failed(0, "cannot reach it")
    assert not other.usable(0) and other.usable(1)  # read from the home's file
    assert other.state()[0]["cooling"] and 1.5 < other.state()[0]["cooling_s"] <= 2.0
    one.sent(0)
    one.failed(0, "in flight when it died")  # the same failure: the rest does not grow
    assert other.rests[0].read()["failures"] == 1
    one.sent(0)
    one.failed(0, "HTTP 429", retry_after=10)  # only a longer Retry-After lengthens a rest
    assert other.rests[0].read()["failures"] == 1 and 9 < other.state()[0]["cooling_s"] <= 10
    one.close()
    other.close()


# --- through real workers -----------------------------------------------------------------------

def test_a_killed_endpoint_loses_its_share_and_wins_it_back_after_a_probe(
        isolated_env: Path, workers, fakes: list[FakeProcess]) -> None:
    fakes.extend(FakeProcess(ms) for ms in (20, 40, 60))
    spool = endpoints_home(isolated_env, [f.base_url for f in fakes], 2)
    middle = fakes[1].base_url
    workers.start(isolated_env)
    ids = submit_many(spool, 600, "kill")
    wait_count(spool.completed, 100, 60)
    killed = time.time()
    fakes[1].kill()
    time.sleep(1.0)  # the outage: shorter than the first rest (2 s), so a probe ends it
    fakes[1].start()
    restarted = time.time()
    outcomes = wait_outcomes(spool, ids, 120)
    assert [i for i, o in outcomes.items() if o["status"] != "completed"] == []
    assert {o["result"]["attempts"] for o in outcomes.values()} == {1}  # failover, not retries
    by_endpoint = Counter(o["result"]["endpoint"] for o in outcomes.values())
    assert set(by_endpoint) == {f.base_url for f in fakes}
    middle_done = sorted(finished(o) for o in outcomes.values()
                         if o["result"]["endpoint"] == middle)
    during = [t for t in middle_done if killed + 0.2 < t < restarted]
    assert during == []  # its share went to the others while it was down
    assert any(killed < finished(o) < restarted for o in outcomes.values()
               if o["result"]["endpoint"] != middle)
    back = [t for t in middle_done if t > restarted]
    assert back, "no traffic returned to the restarted endpoint"
    recovery = back[0] - killed
    assert recovery < 2.0 + endpoints_module.PROBE_S + 3.0  # one rest, one probe, slack
    print(f"\nshares {dict(by_endpoint)}; first answer from the restarted endpoint "
          f"{back[0] - restarted:.2f} s after its restart, {recovery:.2f} s after the kill")


def test_equal_endpoints_share_equally_and_their_slots_hold_across_workers(
        isolated_env: Path, workers, fakes: list[FakeProcess]) -> None:
    # A slower endpoint takes less by design, so the servers must be equal in fact, on a
    # machine whose two cores the rest of the suite keeps busy: each a process of its own (as
    # threads of the test's process, one the GIL favoured took 0.44), and 200 ms a request, as
    # a model's is, so that tens of ms of a server's or a worker's waiting for a core are
    # noise. At 50 ms, under the full suite, one endpoint took 0.52.
    fakes.extend(FakeProcess(latency_ms=200) for _ in range(3))
    spool = endpoints_home(isolated_env, [f.base_url for f in fakes], 2)
    workers.start(isolated_env)
    workers.start(isolated_env)
    wait_outcomes(spool, submit_many(spool, 150, "even"), 60)
    served = [fake.stop() for fake in fakes]
    shares = [s["completions"] / 150 for s in served]
    most = [s["max_in_flight"] for s in served]
    print(f"\nshares {[round(s, 3) for s in shares]}")
    # Within 10 points of a third each: none starved, none preferred. Closer than that measures
    # the machine: a server slowed by the others is a slower endpoint, and takes less by
    # design (CI once saw 0.273 / 0.363 / 0.363 against 5 points).
    assert all(abs(share - 1 / 3) <= 0.10 for share in shares), shares
    assert max(most) <= 2  # max_concurrent per endpoint, the two workers together


@pytest.mark.slow
def test_with_every_endpoint_down_tasks_wait_without_spending_attempts(
        isolated_env: Path, workers, fakes: list[FakeProcess]) -> None:
    fakes.extend(FakeProcess() for _ in range(3))
    spool = endpoints_home(isolated_env, [f.base_url for f in fakes], 2)
    for fake in fakes:
        fake.kill()
    workers.start(isolated_env)
    ids = submit_many(spool, 30, "down")
    time.sleep(10.0)  # the outage: rests of 2, 4 and 8 s begin, and failed probes extend them
    assert os.listdir(spool.completed) == [] and os.listdir(spool.failed) == []
    assert len(os.listdir(spool.pending)) == 30  # waiting where they were queued
    held = [json.loads((spool.pending / name).read_bytes()) for name in os.listdir(spool.pending)]
    assert {task.get("attempts", 0) for task in held} == {0}  # some were tried: none counted
    rests = list((isolated_env / "run" / "endpoints").iterdir())
    assert len(rests) == 3
    for fake in fakes:
        fake.start()
    outcomes = wait_outcomes(spool, ids, 30)  # woken by the rest's timer: nothing else comes
    assert {o["status"] for o in outcomes.values()} == {"completed"}
    assert {o["result"]["attempts"] for o in outcomes.values()} == {1}


@pytest.mark.slow
def test_a_429_with_retry_after_keeps_every_request_away_for_its_seconds(
        isolated_env: Path, workers) -> None:
    # 150 tasks at 50 ms over the other endpoint's 2 slots take 3.75 s at least, so traffic
    # is still flowing when the 3 s are over.
    limited, other = FakeOpenAI(latency_s=0.05).start(), FakeOpenAI(latency_s=0.05).start()
    limited.rate_limit_next, limited.retry_after_s = 1, 3
    try:
        home_module.init(isolated_env)
        write_config(isolated_env, craftsmen={"local": {
            "backend": "openai", "model": "fake-model", "local": True, "timeout_s": 20,
            "endpoints": [{"base_url": limited.base_url, "max_concurrent": 1},
                          {"base_url": other.base_url, "max_concurrent": 2}]}},
            spool={"fsync": False})
        spool = Spool.open(isolated_env)
        workers.start(isolated_env)
        workers.start(isolated_env)  # the rest one of them starts holds the other off too
        outcomes = wait_outcomes(spool, submit_many(spool, 150, "limited"), 60)
        arrivals = sorted(r["at"] for r in limited.requests)
    finally:
        limited.stop()
        other.stop()
    assert {o["status"] for o in outcomes.values()} == {"completed"}
    assert {o["result"]["attempts"] for o in outcomes.values()} == {1}
    refused_at, later = arrivals[0], arrivals[1:]
    assert later, "traffic never returned to the endpoint after its Retry-After"
    assert later[0] - refused_at >= 3.0, later[0] - refused_at
    print(f"\nfirst request after the 429: {later[0] - refused_at:.2f} s later")


@pytest.mark.slow
def test_two_real_engines_as_two_endpoints_of_one_craftsman(
        isolated_env: Path, workers, tmp_path: Path) -> None:
    if not realengine.is_built():
        missing("the real llama.cpp engine (a 4-minute build)", realengine.BUILD_ENABLES)
    model = realengine.write_model(tmp_path / "tiny-chatml.gguf")
    servers = [realengine.Server(model, tmp_path / f"server-{n}.log") for n in range(2)]
    try:
        urls = [server.start() for server in servers]
        home_module.init(isolated_env)
        write_config(isolated_env, craftsmen={"local": {
            "backend": "openai", "model": realengine.MODEL_ID, "local": True, "timeout_s": 60,
            "max_tokens": 4, "endpoints": [{"base_url": u, "max_concurrent": 1} for u in urls]}})
        spool = Spool.open(isolated_env)
        workers.start(isolated_env)
        outcomes = wait_outcomes(spool, submit_many(spool, 6, "real"), 120)
    finally:
        for server in servers:
            server.stop()
    assert {o["status"] for o in outcomes.values()} == {"completed"}
    assert {o["result"]["endpoint"] for o in outcomes.values()} == set(urls)
    assert {o["result"]["model"] for o in outcomes.values()} == {realengine.MODEL_ID}


def test_each_endpoint_shows_in_workers_metrics_report_and_doctor(
        isolated_env: Path, workers, fake_openai: FakeOpenAI) -> None:
    dead = f"http://127.0.0.1:{realengine.free_port()}/v1"
    spool = endpoints_home(isolated_env, [fake_openai.base_url, dead], 2)
    workers.start(isolated_env)
    outcomes = wait_outcomes(spool, submit_many(spool, 20, "shown"), 30)
    assert {o["result"]["endpoint"] for o in outcomes.values()} == {fake_openai.base_url}
    runner = CliRunner()
    deadline = time.monotonic() + 10
    while True:  # the figures reach the ledger with the next heartbeat (heartbeat_s: 1)
        [worker] = json.loads(runner.invoke(cli, ["workers", "--json"]).stdout)
        shown = {e["base_url"]: e for e in worker["endpoints"].get("local", [])}
        if sum(e["requests"] for e in shown.values()) >= 20 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert shown[fake_openai.base_url]["requests"] >= 20 and not shown[fake_openai.base_url]["cooling"]
    assert shown[dead]["failures"] >= 1 and shown[dead]["cooling"]
    text = runner.invoke(cli, ["metrics"]).stdout
    assert f'koubou_endpoint_cooling{{craftsman="local",endpoint="{dead}"}} 1' in text
    assert f'koubou_endpoint_cooling{{craftsman="local",endpoint="{fake_openai.base_url}"}} 0' in text
    report = json.loads(runner.invoke(cli, ["report", "--json"]).stdout)
    [row] = report["endpoints"]
    assert row["endpoint"] == fake_openai.base_url and row["tasks"] == 20 and row["run_p50_s"] > 0
    checked = runner.invoke(cli, ["doctor"])
    assert checked.exit_code != 0
    assert f"endpoint {fake_openai.base_url} answers" in checked.stdout
    assert f"cannot reach {dead}/models" in checked.stdout


def test_a_request_every_endpoint_fails_at_spends_its_attempts(isolated_env: Path, workers) -> None:
    servers = [FakeOpenAI().start() for _ in range(2)]
    for server in servers:
        server.fail_next = 1000  # HTTP 500 to every chat request; /models still answers
    try:
        spool = endpoints_home(isolated_env, [s.base_url for s in servers], 1)
        write_config(isolated_env, craftsmen={"local": {
            "backend": "openai", "model": "fake-model", "local": True, "timeout_s": 20,
            "endpoints": [{"base_url": s.base_url} for s in servers]}},
            spool={"fsync": False, "max_attempts": 2})
        workers.start(isolated_env)
        [outcome] = wait_outcomes(spool, submit_many(spool, 1, "broken"), 30).values()
        sent = [len(s.completions()) for s in servers]
    finally:
        for server in servers:
            server.stop()
    assert outcome["status"] == "failed" and outcome["error"]["attempts"] == 2
    assert "every endpoint of local failed" in outcome["error"]["message"]
    # Each endpoint at most once per attempt; in the second, one still resting from the first
    # is not tried (on a loaded machine its rest may outlast the requeue).
    assert sorted(sent) in ([1, 2], [2, 2]), sent


def test_a_5xx_moves_the_request_and_a_400_fails_it_at_once(isolated_env: Path, workers) -> None:
    first, second = FakeOpenAI().start(), FakeOpenAI().start()
    try:
        spool = endpoints_home(isolated_env, [first.base_url, second.base_url], 1)
        first.fail_next, first.fail_status = 1, 503
        workers.start(isolated_env)
        [moved] = wait_outcomes(spool, submit_many(spool, 1, "moved"), 30).values()
        second.reject_next = first.reject_next = 1  # whichever gets it answers 400
        [refused] = wait_outcomes(spool, submit_many(spool, 1, "refused"), 30).values()
        asked = len(first.completions()) + len(second.completions())
    finally:
        first.stop()
        second.stop()
    assert moved["status"] == "completed" and moved["result"]["attempts"] == 1
    assert moved["result"]["endpoint"] == second.base_url
    assert refused["status"] == "failed" and "maximum context length" in refused["error"]["message"]
    assert asked == 3  # 503 then 200, then one 400: a request's own fault is not moved
