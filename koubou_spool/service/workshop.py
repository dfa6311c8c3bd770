"""The workshop's operations, one method each, with no transport types: the MCP server calls
them, and so will the CLI and the HTTP server. Each call reads the home as it is now (the config is
re-read, so edits apply without a restart)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import anyio

from ..config import Config, SpoolSettings
from ..errors import ConfigError, UsageError
from ..observe import gather as observe, status as status_module
from ..spool import home as home_module, task as task_format
from ..spool.files import Spool
from ..spool.home import STATE_DIRS
from ..spool.watcher import wait_for_files
from . import control, serving

log = logging.getLogger(__name__)

MAX_WAIT_S = 50.0  # MCP clients give up on a tool call after about 60 s


class Workshop:
    """The home the server works on; every tool is one method, with no MCP types."""

    def __init__(self, home: Path, config_path: Path) -> None:
        self.home = home
        self.config_path = config_path

    def config(self) -> Config:
        """The configuration, re-read each call so edits apply without a restart."""
        try:
            return home_module.load_config(self.home, self.config_path)
        except ConfigError:
            if self.config_path.exists():
                raise
            return Config(craftsmen={}, spool=SpoolSettings())

    def spool(self) -> Spool:
        """The spool of the home."""
        return Spool.open(self.home, self.config().spool)

    @property
    def ledger_path(self) -> Path:
        return self.home / "db" / "koubou.db"

    async def delegate(self, fields: dict[str, Any], wait_s: float) -> dict[str, Any]:
        """Queue a task, wait up to wait_s for it, and say where it is."""
        task = task_format.validate({k: v for k, v in fields.items() if v is not None})
        spool = self.spool()
        (_, state, new), = spool.submit([task])
        answer = {"id": task.id, "new": new}
        wait_s = min(max(wait_s, 0.0), MAX_WAIT_S)
        if wait_s > 0 and state == "pending":  # said at once, in the reply and the log
            for line in serving.unserved(spool, self.config(), [task]):
                log.warning("%s", line)
                answer["warning"] = line
        if wait_s > 0 and state not in ("completed", "failed"):
            await anyio.to_thread.run_sync(
                wait_for_files, [spool.completed, spool.failed], {f"{task.id}.json"}, wait_s)
        return answer | self.result(task.id)

    def status(self, task_id: str) -> dict[str, Any]:
        """One task's state, attempts and result or error."""
        task_format.check_id(task_id, "task_id")
        return status_module.task_status(self.spool(), self.ledger_path, task_id)

    def result(self, task_id: str) -> dict[str, Any]:
        """The outcome of a finished task, or its state while it is not finished."""
        task_format.check_id(task_id, "task_id")
        spool = self.spool()
        outcome = spool.outcome(task_id)
        if outcome is None:
            state = spool.find(task_id).state
            return {"id": task_id, "state": state,
                    "message": f"not finished ({state}); ask again later"}
        answer = {"id": task_id, "state": outcome.get("status")}
        for key in ("result", "error"):
            if key in outcome:
                answer[key] = outcome[key]
        return answer

    def list(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        """Tasks, newest first."""
        if state is not None and state not in STATE_DIRS:
            raise UsageError(f"state must be one of {', '.join(STATE_DIRS)}, not {state!r}")
        states = [state] if state else list(STATE_DIRS)
        return status_module.list_tasks(self.spool(), states, max(1, min(limit, 500)))

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel a pending or running task (failed as `cancelled`)."""
        task_format.check_id(task_id, "task_id")
        try:
            record = control.cancel(self.spool(), self.ledger_path, task_id)
        except control.NotCancelled as exc:
            return {"id": task_id, "cancelled": False, "message": str(exc)}
        return {"id": record["id"], "state": "failed", "cancelled": True, "error": record["error"]}

    def workers(self) -> dict[str, Any]:
        """Queue depths, workers and what each craftsman has in flight."""
        spool, config, now = self.spool(), self.config(), time.time()
        return {"queues": observe.queue_counts(spool),
                "workers": observe.workers(spool, self.ledger_path, config, now),
                "in_flight": observe.in_flight_by_craftsman(spool, self.ledger_path),
                "budget": observe.today_budget(self.ledger_path, config, now)}

    def report(self, day: str | None, month: str | None, since: str | None) -> dict[str, Any]:
        """The report of a period (default: today)."""
        config = self.config()
        return observe.report_for(self.spool(), self.ledger_path, config, day=day, month=month,
                                  since=since)
