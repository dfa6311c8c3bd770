"""Which craftsman a task goes to (PRODUCT.md §6). Pure: no I/O.

This is the first cut: an explicit `craftsman`, then the first `routing.rules` entry whose
condition holds, using the task's declared sensitivity and difficulty. Pattern and keyword
detection and budgets slot in here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Config
from .task import Task


@dataclass(frozen=True)
class Route:
    """A routing decision: the craftsman, or why there is none (`kind` is the failure kind)."""

    craftsman: str | None
    reason: str
    kind: str = ""


def _holds(condition: Any, task: Task) -> bool:
    if condition is None:
        return True
    if condition == "confidential":
        return task.sensitivity == "confidential"
    if isinstance(condition, dict):
        return all(getattr(task, key, None) == value for key, value in condition.items())
    return False


def route(task: Task, config: Config) -> Route:
    """Pick the craftsman for a task."""
    if task.craftsman != "auto":
        chosen = config.craftsmen.get(task.craftsman)
        if chosen is None:
            return Route(None, f"craftsman {task.craftsman!r} is not configured (known: "
                               f"{', '.join(sorted(config.craftsmen)) or 'none'})", "invalid")
        if task.sensitivity == "confidential" and not chosen.local:
            return _local_instead(task, config)
        return Route(chosen.name, "asked for by the task")
    for index, rule in enumerate(config.routing.get("rules") or []):
        if isinstance(rule, dict) and _holds(rule.get("if"), task):
            name = rule.get("then")
            if name in config.craftsmen:
                if task.sensitivity == "confidential" and not config.craftsmen[name].local:
                    return _local_instead(task, config)
                return Route(name, f"rule {index + 1}")
    if len(config.craftsmen) == 1:
        return Route(next(iter(config.craftsmen)), "the only craftsman")
    return Route(None, "no routing rule matched and the task names no craftsman", "policy")


def _local_instead(task: Task, config: Config) -> Route:
    local = [c.name for c in config.craftsmen.values() if c.local and c.backend != "echo"]
    if local:
        return Route(local[0], "confidential: routed to a local craftsman")
    return Route(None, "confidential task and no local craftsman is configured", "policy")
