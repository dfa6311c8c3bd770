"""`koubou-mcp`: the spool as Model Context Protocol tools on stdio (PRODUCT.md §8).

A coding agent delegates work to the craftsmen without leaving its session: it queues a task,
waits a bounded time (inotify, in a thread, well under the client's ~60 s tool timeout), and
comes back later with get_task_status / get_task_result for tasks still running.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from ..service import control
from ..spool import home as home_module, task as task_format
from ..observe import gather as observe, status as status_module
from ..config import Config, SpoolSettings
from ..errors import ConfigError, KoubouError, UsageError
from ..spool.home import STATE_DIRS
from ..spool.files import Spool
from ..spool.watcher import wait_for_files

try:  # mcp 2 renamed FastMCP to MCPServer; the tool API is the same
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
except ImportError:  # pragma: no cover - mcp 1.x
    from mcp.server.fastmcp import FastMCP as MCPServer
    from mcp.server.fastmcp.exceptions import ToolError

log = logging.getLogger(__name__)

DEFAULT_WAIT_S = 20.0
MAX_WAIT_S = 50.0  # MCP clients give up on a tool call after about 60 s

INSTRUCTIONS = """\
koubou is a workshop of craftsmen: a local LLM and, if configured, cloud models and CLI agents.
Delegate self-contained work (reviews, drafts, summaries, boilerplate, analysis of text you
include) with delegate_task; keep work that needs your own tools or conversation. A task runs
on the craftsman its router picks. Poll slow tasks with get_task_status / get_task_result."""


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


# --- the MCP surface ---------------------------------------------------------------------

DELEGATE = """\
Queue a task for the workshop's craftsmen (LLMs) and wait up to wait_s seconds for its result.

Use it for self-contained work whose whole input you can put in `content` (or `files`): code
review, drafting docs or tests, summaries, refactoring suggestions, analysis. Returns the id and
state; when the task finished within wait_s, also its `result` (content, craftsman, model, usage)
or `error`. If it is still pending or in_progress, call get_task_result(id) later.

Fields: content (required, the prompt); id (optional, [A-Za-z0-9._-], not starting with a dot;
reusing an id queues nothing and reports the existing task, so retries are safe); type
(code_review, documentation, analysis, ...); priority 1-10 (10 first); difficulty
low|medium|high|auto (routing input); sensitivity: `confidential` means the content must never
leave local craftsmen (use it for secrets, credentials, private data or proprietary code),
`public` allows cloud craftsmen, `auto` (default) lets the router decide by scanning for
secrets; craftsman (a name, or auto); model; system (system prompt); context (object given to
the model); files (paths on this machine whose text is attached); max_tokens. wait_s defaults to
20 and is capped at 50 (tool calls time out near 60 s); 0 returns at once."""


@contextmanager
def _told() -> Iterator[None]:
    """KoubouError reaches the model as the tool's error text (the SDK hides other errors)."""
    try:
        yield
    except KoubouError as exc:
        raise ToolError(str(exc)) from None


def build_server(workshop: Workshop) -> MCPServer:
    """The MCP server with the koubou tools bound to a home."""
    server = MCPServer("koubou", instructions=INSTRUCTIONS)

    @server.tool(description=DELEGATE)
    async def delegate_task(content: str, id: str | None = None, type: str | None = None,
                            priority: int | None = None, difficulty: str | None = None,
                            sensitivity: str | None = None, craftsman: str | None = None,
                            model: str | None = None, system: str | None = None,
                            context: dict[str, Any] | None = None,
                            files: list[str] | None = None, max_tokens: int | None = None,
                            wait_s: float = DEFAULT_WAIT_S) -> dict[str, Any]:
        fields = {"content": content, "id": id, "type": type, "priority": priority,
                  "difficulty": difficulty, "sensitivity": sensitivity, "craftsman": craftsman,
                  "model": model, "system": system, "context": context, "files": files,
                  "max_tokens": max_tokens, "created_by": "mcp"}
        with _told():
            return await workshop.delegate(fields, wait_s)

    @server.tool(description="A task's state (pending, in_progress, completed, failed), its "
                             "attempts so far, and its result or error when finished.")
    def get_task_status(task_id: str) -> dict[str, Any]:
        with _told():
            return workshop.status(task_id)

    @server.tool(description="The result of a finished task (content, craftsman, model, usage, "
                             "cost) or its error; for an unfinished task, its state. Does not wait.")
    def get_task_result(task_id: str) -> dict[str, Any]:
        with _told():
            return workshop.result(task_id)

    @server.tool(description="Tasks newest first, optionally only one state (pending, "
                             "in_progress, completed, failed); limit defaults to 20.")
    def list_tasks(state: str | None = None, limit: int = 20) -> dict[str, Any]:
        with _told():
            return {"tasks": workshop.list(state, limit)}

    @server.tool(description="Cancel a pending or running task: it moves to failed/ with "
                             "error kind `cancelled`; a running request is aborted and its "
                             "result discarded. Finished tasks are left as they are.")
    def cancel_task(task_id: str) -> dict[str, Any]:
        with _told():
            return workshop.cancel(task_id)

    @server.tool(description="Queue depths, the workers serving the spool (liveness, heartbeat "
                             "age, tasks in flight, done and failed), and today's spend vs budget. "
                             "Check it when a task stays pending: no live worker means nothing runs.")
    def get_worker_status() -> dict[str, Any]:
        with _told():
            return workshop.workers()

    @server.tool(description="Usage report: tasks by state/type/craftsman/model, queue wait and "
                             "run time (mean, p50, p95), tokens, cost and budget left. Period: "
                             "day YYYY-MM-DD, month YYYY-MM or since ISO time; default today.")
    def get_report(day: str | None = None, month: str | None = None,
                   since: str | None = None) -> dict[str, Any]:
        with _told():
            return workshop.report(day, month, since)

    return server


def main(argv: list[str] | None = None) -> None:
    """Console entry point: serve MCP on stdio (stdout is the protocol; logs go to stderr)."""
    parser = argparse.ArgumentParser(prog="koubou-mcp", description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="The spool home (default: $KOUBOU_HOME, /var/koubou "
                                       "if writable, else ~/.local/share/koubou).")
    parser.add_argument("--config", help="Config file (default: HOME/config/koubou.yaml).")
    parser.add_argument("--log-level", default="warning",
                        choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    home = home_module.resolve(args.home)
    workshop = Workshop(home, home_module.config_path(home, args.config))
    build_server(workshop).run("stdio")


if __name__ == "__main__":
    main()
