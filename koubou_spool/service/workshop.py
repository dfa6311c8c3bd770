"""The workshop's operations, one method each, with no transport types: the CLI, the MCP server
and the HTTP server call them. Each call reads the home as it is now (the config is re-read, so
edits apply without a restart)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from ..config import ClusterSettings, Config, SpoolSettings
from ..craft import router
from ..craft.attach import read_attachments
from ..craft.budget import BudgetSettings
from ..craft.limits import Budget
from ..errors import ConfigError, KoubouError, TaskNotFound, UsageError, WaitTimeout
from ..observe import (cluster_view, gather as observe, metrics as metrics_module,
                       status as status_module)
from ..spool import home as home_module, task as task_format, workflow as workflow_format
from ..spool.entries import BRIDGE_PREFIX
from ..spool.files import Spool
from ..spool.home import STATE_DIRS
from . import control, serving
from .events import SpoolEvents

log = logging.getLogger(__name__)

MAX_WAIT_S = 50.0  # MCP clients give up on a tool call after about 60 s
PROMPT_FIELDS = ("content", "system", "messages", "context", "files", "type", "priority",
                 "craftsman", "model", "created_by", "metadata", "repo", "branch", "after")
MAX_PATCH_BYTES = 256 * 1024


class Workshop:
    """One home's operations: every command, tool and endpoint is one method, with no
    transport types."""

    def __init__(self, home: Path, config_path: Path) -> None:
        self.home = home
        self.config_path = config_path
        self._kept: tuple[Any, Config, Spool | None] | None = None  # (file stamp, config, spool)
        self._board: Any = None  # cluster_hosts.Board, made at the first look at the cluster

    def _stamp(self) -> Any:
        try:
            found = os.stat(self.config_path)
        except OSError:
            return None
        return (found.st_mtime_ns, found.st_size, found.st_ino)

    def config(self, required: bool = False) -> Config:
        """The configuration as the file is now: read again whenever the file changed, so
        edits apply without a restart (a long-running server asks for it on every request).
        A missing file (or one hidden from this user: config/ is the owner's) gives the
        defaults, unless `required`."""
        stamp = self._stamp()
        kept = self._kept
        if kept is not None and stamp is not None and kept[0] == stamp:
            return kept[1]
        try:
            config = home_module.load_config(self.home, self.config_path)
        except ConfigError:
            if required or os.path.exists(self.config_path):  # False when config/ is closed
                raise
            config = Config(craftsmen={}, spool=SpoolSettings())
        self._kept = (stamp, config, None)
        return config

    def spool(self) -> Spool:
        """The spool of the home."""
        config = self.config()
        kept = self._kept
        if kept is not None and kept[1] is config and kept[2] is not None:
            return kept[2]
        spool = Spool.open(self.home, config.spool)
        if kept is not None and kept[1] is config:
            self._kept = (kept[0], config, spool)
        return spool

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
                spool.wait_for_outcomes, {f"{task.id}.json"}, wait_s)
        return answer | self.result(task.id)

    async def delegate_workflow(self, document: Any, wait_s: float,
                                created_by: str | None = None) -> dict[str, Any]:
        """Queue a workflow (the decoded shape of a workflow file), wait up to wait_s for its
        steps, and say where each is, with the results of the steps nothing runs after.
        All or nothing: a bad step queues no step; the same workflow id queues nothing new."""
        if created_by and isinstance(document, dict):
            defaults = document.get("defaults")
            if defaults is None or isinstance(defaults, dict):  # build() names a bad one
                document = dict(document, defaults={"created_by": created_by, **(defaults or {})})
        workflow = workflow_format.build(document, "workflow")
        spool = self.spool()
        submitted = spool.submit(workflow.tasks)
        ids = [task.id for task in workflow.tasks]
        wait_s = min(max(wait_s, 0.0), MAX_WAIT_S)
        answer: dict[str, Any] = {"id": workflow.id,
                                  "new": sum(1 for _, _, new in submitted if new)}
        if wait_s > 0:
            pending = [task for task, state, _ in submitted if state == "pending"]
            warnings = serving.unserved(spool, self.config(), pending)
            for line in warnings:
                log.warning("%s", line)
            if warnings:
                answer["warning"] = warnings[0]
            await anyio.to_thread.run_sync(
                spool.wait_for_outcomes, {f"{i}.json" for i in ids}, wait_s)
        answer["steps"] = [self._step(workflow.steps[i], i) for i in ids]
        answer["results"] = [self.result(i) for i in workflow.leaves]
        return answer

    def _step(self, name: str, task_id: str) -> dict[str, Any]:
        """One step's name, id and state, and its error kind when it failed."""
        found = self.result(task_id)
        step = {"name": name, "id": task_id, "state": found["state"]}
        if isinstance(found.get("error"), dict):
            step["error"] = found["error"].get("kind")
        return step

    def submit(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Queue one task without waiting: its id, state, and whether it is new."""
        return self.submit_many([fields])[0]

    def submit_many(self, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Queue tasks (or Batch lines) in one go; all are checked before any is queued."""
        tasks = [task_format.validate(obj) for obj in objects]
        return [{"id": task.id, "state": state, "new": new}
                for task, state, new in self.spool().submit(tasks)]

    def route(self, fields: dict[str, Any],
              budget: dict[str, Any] | None = None) -> router.Route:
        """Where a task would go now, and why (the dry run of `koubou route`); `budget` is
        the budget's state when the caller has read it already."""
        config = self.config()
        task = task_format.validate(fields)
        texts = [a.text for a in read_attachments(task.files, config.attach)] if task.files \
            else []
        exhausted = bool((self.budget() if budget is None else budget).get("exhausted"))
        return router.route(task, config, attachments=texts, budget_exhausted=exhausted)

    def budget(self) -> dict[str, Any]:
        """The budget's state now: spent and left today and this month, exhausted or not; in
        a cluster, the cluster's spend against this home's limits."""
        settings = BudgetSettings.parse(self.config().budget)
        if not settings.enabled:
            return {"enabled": False}
        state = Budget(self.ledger_path, settings).state()
        day, month = settings.periods(time.time())
        seen = self._cluster(lambda board, me: {"spent": board.spent(day, month)})
        if seen is None:
            return state
        return cluster_view.budget_state(  # the limits too, should the ledger be unreadable
            state | {"daily_usd": settings.daily_usd, "monthly_usd": settings.monthly_usd,
                     "when_exhausted": settings.when_exhausted}, seen)

    def overview(self) -> dict[str, Any]:
        """Queue depth per state, the registered workers and the budget (`koubou status`);
        in a cluster, each host's queues and the age of its row."""
        spool = self.spool()
        facts = {"home": str(self.home), "queues": status_module.queue_counts(spool),
                 "workers": status_module.live_workers(spool, self.ledger_path,
                                                       self.config().spool.lease_s),
                 "budget": self.budget()}
        seen = self._cluster(lambda board, me: {"hosts": cluster_view.host_lines(
            cluster_view.hosts(board.hosts()), me)})
        return facts if seen is None else facts | {"cluster": seen}

    def _cluster(self, read: Callable[[Any, str], dict[str, Any]]) -> dict[str, Any] | None:
        """read(board, this host) on the cluster's database, with this host's name; or this
        host's name and the one sentence saying why the cluster could not be read. None
        without cluster.dsn_env: then psycopg is never imported."""
        settings = ClusterSettings.parse(self.config().cluster)
        if not settings.enabled:
            return None
        try:
            if self._board is None:
                self._board = cluster_view.board_for(settings)
            return {"host": settings.host} | read(self._board, settings.host)
        except KoubouError as exc:
            return {"host": settings.host, "error": cluster_view.unread(settings.host, exc)}

    def forget_host(self, host: str) -> dict[str, Any]:
        """Remove a host that left the cluster for good from its host list (`koubou cluster
        --forget`); refused while its row is fresh or a lease of it runs. Its tasks stay."""
        settings = ClusterSettings.parse(self.config(required=True).cluster)
        if not settings.enabled:
            raise UsageError("this home is in no cluster: its config has no cluster.dsn_env")
        if host == settings.host:
            raise UsageError(f"{host} is this host; forget it from another host of the cluster")
        found = cluster_view.board_for(settings).forget(host)
        if found["age_s"] is None:
            raise UsageError(f"no host {host} in the cluster; `koubou status` lists its hosts")
        if found["forgotten"]:
            return {"host": host} | found
        if found["leases"] and found["age_s"] > found["stale_after_s"]:
            raise UsageError(f"host {host} still holds {found['leases']} running lease(s): "
                             "either its bridge still runs without writing its row (stop it) "
                             "or they run out within its cluster.lease_s and are taken over; "
                             "forget it after that")
        raise UsageError(f"host {host} wrote its row {found['age_s']:.0f} s ago, within its "
                         f"lease of {found['stale_after_s']:.0f} s: it looks alive. Stop its "
                         "`koubou cluster` first, or wait")

    def retry(self, task_id: str) -> dict[str, Any]:
        """Queue a failed task again with its attempts reset."""
        name = control.retry(self.spool(), task_id)
        return {"id": task_id, "state": "pending", "file": name}

    def metrics(self) -> str:
        """The Prometheus exposition of the home right now; in a cluster, every host's row
        too (its unreachable database is `koubou_cluster_reachable 0`, never an error)."""
        text = observe.metrics_text(self.spool(), self.ledger_path, self.config(), time.time())
        seen = self._cluster(lambda board, me: {"hosts": cluster_view.hosts(board.hosts())})
        if seen is None:
            return text
        return text + metrics_module.render(metrics_module.cluster_families(seen.get("hosts")))

    def events(self) -> SpoolEvents:
        """A watcher of the spool's changes, to start on a running event loop."""
        return SpoolEvents(self.spool())

    def status(self, task_id: str) -> dict[str, Any]:
        """One task's state, attempts and result or error; for a workflow's id, its steps."""
        task_format.check_id(task_id, "task_id")
        spool = self.spool()
        try:
            found = status_module.task_status(spool, self.ledger_path, task_id)
        except TaskNotFound:
            steps = status_module.workflow_steps(spool, task_id)
            if steps:
                return {"workflow": task_id, "steps": steps}
            seen = self._cluster(lambda board, me: {"task": board.task(task_id)})
            if not seen or not seen.get("task"):
                raise
            return cluster_view.task_status(seen["task"], PROMPT_FIELDS)
        if str(found.get("worker_id")).startswith(BRIDGE_PREFIX):  # its face: where it runs
            seen = self._cluster(lambda board, me: {"task": cluster_view.where_it_runs(
                board.task(task_id))})
            if seen is not None:
                found["cluster"] = seen
        return found

    def detail(self, task_id: str) -> dict[str, Any]:
        """Everything a person looks at for one task: its status and attempts, the prompt
        (content, system, messages) and, for a repository task, its patch."""
        found = self.status(task_id)
        if "origin" in found:  # another host's: the task as the cluster holds it
            return found
        record = status_module.read_record(self.spool(), task_id) or {}
        found["task"] = {k: record[k] for k in PROMPT_FIELDS if k in record}
        found["task"].update({k: v for k, v in (record.get("body") or {}).items()
                              if k == "messages"})
        patch = self.home / "outputs" / str(found.get("id")) / "changes.patch"
        if found.get("id") and patch.is_file():
            found["patch"] = patch.read_bytes()[:MAX_PATCH_BYTES].decode("utf-8", "replace")
        return found

    def outcome(self, task_id: str) -> dict[str, Any]:
        """A finished task's whole outcome record; WaitTimeout naming its state if unfinished."""
        spool = self.spool()
        outcome = spool.outcome(task_id)
        if outcome is None:
            found = spool.find(task_id)
            raise WaitTimeout(f"task {task_id} is {found.state}, not finished; "
                              f"`koubou wait {task_id}` blocks until it is")
        return outcome

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

    def list(self, state: str | Sequence[str] | None, limit: int) -> list[dict[str, Any]]:
        """Tasks in these states (one, several, or None: all), newest first."""
        return self.listing(state, limit)["tasks"]

    def listing(self, state: str | Sequence[str] | None, limit: int) -> dict[str, Any]:
        """`list`, and in a cluster the cluster's tasks of other origins among them (with
        `cluster`: this host, or why the cluster could not be read)."""
        states = [state] if isinstance(state, str) else list(state or STATE_DIRS)
        for name in states:
            if name not in STATE_DIRS:
                raise UsageError(f"state must be one of {', '.join(STATE_DIRS)}, not {name!r}")
        limit = max(1, min(limit, 500))
        local = status_module.list_tasks(self.spool(), states, limit)
        seen = self._cluster(lambda board, me: {"tasks": board.tasks(
            origin=me, states=states, limit=limit)})
        if seen is None:
            return {"tasks": local}
        remote = seen.pop("tasks", [])
        return {"tasks": cluster_view.merge_tasks(local, remote, limit), "cluster": seen}

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel a pending or running task (failed as `cancelled`); said, not raised, when it
        had finished already."""
        try:
            record = self.cancel_record(task_id)
        except control.NotCancelled as exc:
            return {"id": task_id, "cancelled": False, "message": str(exc)}
        return {"id": record["id"], "state": "failed", "cancelled": True, "error": record["error"]}

    def cancel_record(self, task_id: str) -> dict[str, Any]:
        """Cancel a pending or running task; its outcome record. NotCancelled when finished."""
        task_format.check_id(task_id, "task_id")
        return control.cancel(self.spool(), self.ledger_path, task_id)

    def workers(self) -> dict[str, Any]:
        """Queue depths, workers, each endpoint of a craftsman that has several, and what each
        craftsman has in flight."""
        spool, config, now = self.spool(), self.config(), time.time()
        workers = observe.workers(spool, self.ledger_path, config, now)
        facts = {"queues": observe.queue_counts(spool), "workers": workers,
                 "endpoints": observe.endpoint_figures(workers),
                 "in_flight": observe.in_flight_by_craftsman(spool, self.ledger_path),
                 "budget": observe.today_budget(self.ledger_path, config, now)}
        seen = self._cluster(lambda board, me: {"hosts": cluster_view.hosts(board.hosts())})
        if seen is None:
            return facts
        for worker in workers:
            worker["host"] = seen["host"]
        if "error" in seen:
            return facts | {"cluster": seen}
        found = seen.pop("hosts")
        facts["workers"] = workers + cluster_view.other_workers(found, seen["host"])
        return facts | {"cluster": seen | {"hosts": cluster_view.host_lines(found, seen["host"])}}

    def report(self, day: str | None, month: str | None, since: str | None) -> dict[str, Any]:
        """The report of a period (default: today)."""
        config = self.config()
        figures = observe.report_for(self.spool(), self.ledger_path, config, day=day,
                                     month=month, since=since)
        label = figures["period"]["label"]
        seen = self._cluster(lambda board, me: cluster_view.report_rows(
            cluster_view.hosts(board.hosts()), label, board.usage(label)))
        return figures if seen is None else figures | {"cluster": seen}
