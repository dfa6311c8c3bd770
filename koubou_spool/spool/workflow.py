"""The workflow file: named steps, each a task, with `after` between them by name. No I/O.

```yaml
id: digest-42            # the workflow id; step ids are <id>.<step> (default: a new id)
defaults: {craftsman: local, max_tokens: 800}   # fields every step starts from
steps:
  - name: a
    content: Summarise part one ...
  - name: b
    content: Summarise part two ...
  - name: both
    after: [a, b]
    content: "Combine these two summaries: {{a}} and {{b}}"
```

All or nothing: an unknown step, a cycle, a duplicate name or a field that is not a valid
task fails the whole file and nothing is queued. Queued again with the same id, a workflow
queues nothing new, since its step ids already exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from ..errors import InvalidTask
from . import task as task_format
from .task import Task

STEP_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
KEYS = ("id", "defaults", "steps")


@dataclass
class Workflow:
    """A checked workflow: its tasks in an order where each comes after its dependencies."""

    id: str
    tasks: list[Task]
    steps: dict[str, str]  # task id -> step name
    leaves: list[str]  # ids of the tasks no other step runs after


def load(text: str | bytes, source: str = "workflow") -> Workflow:
    """Parse and check a workflow file's YAML."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidTask(f"{source} is not valid YAML: {exc}") from None
    return build(document, source)


def build(document: Any, source: str = "workflow") -> Workflow:
    """Check a decoded workflow and make its tasks; InvalidTask naming the first problem."""
    if not isinstance(document, dict):
        raise InvalidTask(f"{source}: expected a mapping with steps:, got {type(document).__name__}")
    unknown = sorted(set(document) - set(KEYS), key=str)
    if unknown:
        raise InvalidTask(f"{source}: unknown key {unknown[0]!r} (a workflow has "
                          f"{', '.join(KEYS)})")
    workflow_id = document.get("id", task_format.new_id())
    if not isinstance(workflow_id, str) or not task_format.ID_RE.fullmatch(workflow_id):
        raise InvalidTask(f"{source}: id: expected 1-128 characters from A-Z a-z 0-9 . _ -, "
                          f"got {workflow_id!r}")
    defaults = document.get("defaults") or {}
    if not isinstance(defaults, dict) or "id" in defaults or "after" in defaults:
        raise InvalidTask(f"{source}: defaults: expected a mapping of task fields (not id or "
                          "after)")
    steps = _steps(document.get("steps"), source)
    order = _order(steps, source)
    ids = {name: f"{workflow_id}.{name}" for name in steps}
    tasks = [_task(name, {**defaults, **steps[name]}, ids, source) for name in order]
    needed = {d for step in steps.values() for d in step.get("after", [])}
    return Workflow(workflow_id, tasks, {ids[n]: n for n in order},
                    [ids[n] for n in order if n not in needed])


def _steps(value: Any, source: str) -> dict[str, dict[str, Any]]:
    """The steps by name, in file order."""
    if not isinstance(value, list) or not value:
        raise InvalidTask(f"{source}: steps: expected a non-empty list of steps")
    steps: dict[str, dict[str, Any]] = {}
    for index, step in enumerate(value):
        where = f"{source}: steps[{index}]"
        if not isinstance(step, dict):
            raise InvalidTask(f"{where}: expected a mapping with name and content")
        name = step.get("name")
        if not isinstance(name, str) or not STEP_RE.fullmatch(name):
            raise InvalidTask(f"{where}: name: expected 1-64 characters from A-Z a-z 0-9 _ -, "
                              f"got {name!r}")
        if name in steps:
            raise InvalidTask(f"{where}: a second step named {name!r}")
        if "id" in step:
            raise InvalidTask(f"{where} ({name}): a step has no id of its own; its id is "
                              "<workflow id>.<name>")
        after = step.get("after", [])
        if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
            raise InvalidTask(f"{where} ({name}): after: expected a list of step names")
        steps[name] = {k: v for k, v in step.items() if k != "name"}
    for name, step in steps.items():
        for dependency in step.get("after", []):
            if dependency not in steps:
                raise InvalidTask(f"{source}: step {name} runs after {dependency!r}, which is "
                                  "no step of this workflow")
    return steps


def _order(steps: dict[str, dict[str, Any]], source: str) -> list[str]:
    """The step names with each after its dependencies; InvalidTask naming a cycle."""
    order: list[str] = []
    state: dict[str, str] = {}  # name -> "visiting" or "done"

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name):] + [name]
            raise InvalidTask(f"{source}: the steps form a cycle: {' -> '.join(cycle)}")
        state[name] = "visiting"
        for dependency in steps[name].get("after", []):
            visit(dependency, path + [name])
        state[name] = "done"
        order.append(name)
    for name in steps:
        visit(name, [])
    return order


def _task(name: str, fields: dict[str, Any], ids: dict[str, str], source: str) -> Task:
    """One step as a task: its id, `after` and references turned from step names into ids."""
    after = fields.get("after", [])
    fields = dict(fields, id=ids[name], after=[ids[a] for a in after])
    try:
        for key in task_format.REFERENCED_FIELDS:
            if after and isinstance(fields.get(key), str):
                fields[key] = _rename(fields[key], after, ids)
        return task_format.validate(fields)
    except InvalidTask as exc:
        raise InvalidTask(f"{source}: step {name}: {exc}") from None


def _rename(text: str, after: list[str], ids: dict[str, str]) -> str:
    """`{{step...}}` references as `{{<workflow id>.step...}}`."""
    def renamed(match: re.Match) -> str:
        ref = task_format.reference(match.group(1), after)
        return "{{" + ids[ref.task_id] + match.group(1)[len(ref.task_id):] + "}}"
    return task_format.REFERENCE_RE.sub(renamed, text)
