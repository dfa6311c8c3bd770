"""Tasks that build on each other."""

from __future__ import annotations

from pathlib import Path

from conftest import Workers, submit, wait_outcomes, wait_ready
from koubou_spool.spool.files import Spool


def test_a_task_runs_as_soon_as_its_dependency_completes(home: Path, spool: Spool,
                                                         workers: Workers) -> None:
    workers.start(home)
    child = submit(spool, craftsman="echo", content="second", after=["first"])
    wait_ready(spool)
    submit(spool, id="first", craftsman="echo", content="first")
    # No other file arrives to wake the worker: the outcome of `first` alone must.
    outcomes = wait_outcomes(spool, [child, "first"], timeout=10)
    assert outcomes[child]["status"] == "completed"
