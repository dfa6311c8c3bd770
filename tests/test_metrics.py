"""`koubou metrics`: Prometheus text parsed by prometheus_client, with a real worker running."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from conftest import Workers, submit, wait_outcomes, wait_ready, wait_worker_row, write_config
from koubou_spool.observe import metrics
from koubou_spool.cli.koubou import cli
from koubou_spool.spool.files import Spool


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_label_values_are_escaped() -> None:
    family = metrics.Family("koubou_x", "gauge", "x.")
    family.add(1.5, craftsman='we"ird\\name\nnext')
    parsed = samples(metrics.render([family]))
    assert parsed[("koubou_x", frozenset({("craftsman", 'we"ird\\name\nnext')}))] == 1.5


def test_metrics_of_a_home_with_a_worker_parse(home: Path, spool: Spool, workers: Workers,
                                               tmp_path: Path) -> None:
    write_config(home, budget={"daily_usd": 500, "monthly_usd": 5000, "timezone": "UTC"},
                 craftsmen={"echo": {"backend": "echo", "max_concurrent": 4,
                                     "price": {"input_per_mtok": 1000, "output_per_mtok": 2000}}},
                 routing={"rules": [{"then": "echo"}]})
    workers.start(home)
    wait_ready(spool)
    ids = [submit(spool, content=f"task {n} words here") for n in range(3)]
    outcomes = wait_outcomes(spool, ids)
    spent = sum(o["result"]["cost_usd"] for o in outcomes.values())
    prompt = sum(o["result"]["usage"]["prompt_tokens"] for o in outcomes.values())
    submit(spool, id="queued-later", content="x", not_before="2999-01-01T00:00:00Z")
    done = {"craftsman": "echo", "model": "echo", "outcome": "completed"}
    deadline = time.monotonic() + 10
    while True:  # the ledger's records are written behind the outcomes, by the worker's thread
        result = CliRunner().invoke(cli, ["metrics"])
        assert result.exit_code == 0, result.output
        parsed = samples(result.output)
        if parsed.get(("koubou_tasks_total", frozenset(done.items()))) == 4:
            break
        assert time.monotonic() < deadline, result.output
        time.sleep(0.1)
    names = {name for name, _ in parsed}
    assert {"koubou_queue_depth", "koubou_tasks_total", "koubou_tokens_total",
            "koubou_cost_usd_total", "koubou_budget_remaining_usd",
            "koubou_worker_heartbeat_age_seconds", "koubou_worker_alive"} <= names
    assert parsed[("koubou_queue_depth", frozenset({("state", "completed")}))] == 4  # + the probe
    tokens_in = parsed[("koubou_tokens_total", frozenset({**done, "direction": "in"}.items()))]
    assert tokens_in >= prompt
    cost = parsed[("koubou_cost_usd_total", frozenset(done.items()))]
    assert cost == pytest.approx(spent + outcomes_probe_cost(spool), rel=1e-6)
    left = parsed[("koubou_budget_remaining_usd", frozenset({("period", "daily")}))]
    assert left == pytest.approx(500 - cost, rel=1e-6)
    alive = [v for (name, _), v in parsed.items() if name == "koubou_worker_alive"]
    assert alive == [1]
    ages = [v for (name, _), v in parsed.items() if name == "koubou_worker_heartbeat_age_seconds"]
    assert len(ages) == 1 and 0 <= ages[0] < 60


def outcomes_probe_cost(spool: Spool) -> float:
    probes = [n for n in os.listdir(spool.completed) if n.startswith("probe-")]
    return sum(spool.outcome(n[:-5])["result"]["cost_usd"] for n in probes)


def test_metrics_output_is_written_atomically(home: Path, tmp_path: Path) -> None:
    target = tmp_path / "textfile" / "koubou.prom"
    target.parent.mkdir()
    target.write_text("old\n")
    result = CliRunner().invoke(cli, ["metrics", "--output", str(target)])
    assert result.exit_code == 0, result.output
    assert result.output == ""
    assert os.listdir(target.parent) == ["koubou.prom"]  # no temporary left behind
    assert samples(target.read_text())[("koubou_queue_depth",
                                        frozenset({("state", "pending")}))] == 0
    missing = CliRunner().invoke(cli, ["metrics", "--output", str(tmp_path / "no" / "x.prom")])
    assert missing.exit_code == 4 and "writable" in missing.output


# --- the live views --------------------------------------------------------------------------

def read_until(fd: int, needle: bytes, deadline: float) -> bytes:
    """Terminal output until `needle` appears (select with a deadline, no sleeps)."""
    seen = b""
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not shown; screen so far: {seen[-400:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    return seen


def read_to_end(fd: int, deadline: float) -> None:
    """Until the child closes its terminal (it exited), or fail at the deadline."""
    read_until(fd, b"\0never shown\0", deadline)


def test_top_redraws_on_spool_events_and_quits_on_q(home: Path, spool: Spool) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: koubou top on the pty
        os.execv(sys.executable, [sys.executable, "-m", "koubou_spool.cli.koubou", "top",
                                  "--home", str(home)])
    try:
        deadline = time.monotonic() + 30
        read_until(fd, b"pending 0", deadline)
        submit(spool, content="wake the view")
        read_until(fd, b"pending 1", deadline)
        os.write(fd, b"q")
        read_to_end(fd, deadline)  # fails at the deadline if q did not end it
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def test_workers_shows_a_worker_the_ledger_has_no_row_for_from_its_lock_file(
        home: Path, spool: Spool) -> None:
    # A worker just started, or a ledger too busy to read: its lock file still names it.
    fd = spool.register_worker("w-lockonly", {"id": "w-lockonly", "pid": os.getpid(),
                                              "craftsmen": ["echo"]})
    try:
        listed = json.loads(CliRunner().invoke(cli, ["workers", "--json"]).output)
    finally:
        spool.unregister_worker("w-lockonly", fd)
    assert [(w["id"], w["craftsmen"], w["liveness"]) for w in listed] == [
        ("w-lockonly", ["echo"], "alive")]


def test_workers_lists_a_live_worker(home: Path, spool: Spool, workers: Workers) -> None:
    workers.start(home, "--craftsman", "echo")
    wait_ready(spool)
    wait_worker_row(home)
    result = CliRunner().invoke(cli, ["workers"])
    assert result.exit_code == 0, result.output
    assert "alive" in result.output and "echo" in result.output
    listed = json.loads(CliRunner().invoke(cli, ["workers", "--json"]).output)
    assert listed[0]["liveness"] == "alive" and listed[0]["done"] >= 0
    assert 0 <= listed[0]["heartbeat_age_s"] < 60
