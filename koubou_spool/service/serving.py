"""Will a live worker take these tasks? `koubou-submit --wait`, `koubou wait` and MCP
`delegate_task` say at once when none will, then wait on: a worker may yet start."""

from __future__ import annotations

from dataclasses import replace

from ..config import Config
from ..craft import router
from ..craft.budget import BudgetSettings
from ..observe.status import served_craftsmen
from ..spool.files import Spool
from ..spool.task import Task

SAMPLE = 1000  # a batch's lines mostly route alike; routing 50,000 of them would delay the wait
SHOWN_IDS = 3


def destinations(task: Task, config: Config) -> list[str | None]:
    """Where a worker may send the task, the likeliest first; None: no craftsman (the task fails
    at whichever worker sees it). The attached files' text and the budget's state are not known
    here, so every destination they could lead to is listed."""
    variants = [task, replace(task, sensitivity="confidential")] if task.files else [task]
    budgets = (False, True) if BudgetSettings.parse(config.budget).enabled else (False,)
    found = [router.route(variant, config, budget_exhausted=exhausted).craftsman
             for variant in variants for exhausted in budgets]
    return list(dict.fromkeys(found))


def unserved(spool: Spool, config: Config, tasks: list[Task]) -> list[str]:
    """One sentence per craftsman that some of the tasks go to and no live worker serves."""
    if not tasks:
        return []
    if spool.bridge_running():
        return []  # the cluster's bridge forwards what no worker here serves
    served = served_craftsmen(spool)
    if not served:
        return [f"no worker is running in {spool.home}; {_waiting([t.id for t in tasks])} "
                "in the queue until one starts (`koubou worker`)"]
    missing: dict[str, list[str]] = {}
    for task in tasks[:SAMPLE]:
        goes_to = destinations(task, config)
        if None not in goes_to and not served.intersection(goes_to):
            missing.setdefault(str(goes_to[0]), []).append(task.id)
    return [_sentence(name, ids) for name, ids in missing.items()]


def _waiting(task_ids: list[str]) -> str:
    if len(task_ids) == 1:
        return f"task {task_ids[0]} waits"
    shown = ", ".join(task_ids[:SHOWN_IDS])
    more = f" and {len(task_ids) - SHOWN_IDS} more" if len(task_ids) > SHOWN_IDS else ""
    return f"tasks {shown}{more} wait"


def _sentence(craftsman: str, task_ids: list[str]) -> str:
    return (f"no live worker serves craftsman {craftsman}; {_waiting(task_ids)} until one "
            f"does (`koubou worker --craftsman {craftsman}`, or `koubou worker` for all)")
