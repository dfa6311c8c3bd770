"""`koubou-submit`: queue one task or a batch, optionally wait for the outcome."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import click

from .. import __version__
from ..integrations import batch as batch_format
from ..repo.policy import is_url
from ..observe import status as status_module
from ..spool import task as task_format
from ..config import Config
from ..errors import EXIT_OK, EXIT_TASK_FAILED, InvalidTask, UsageError, WaitTimeout
from ..observe.gather import write_atomic
from ..observe.progress import wait_with_progress
from ..spool import workflow as workflow_format
from ..spool.files import Spool
from ..spool.task import DIFFICULTIES, SENSITIVITIES, Task
from ..service import serving
from .common import KoubouCommand, home_options, notice, session


def _json_object(value: str | None, what: str) -> dict | None:
    if value is None:
        return None
    try:
        decoded = json.loads(value)
    except ValueError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(decoded, dict):
        raise UsageError(f"{what} must be a JSON object")
    return decoded


def _params(values: tuple[str, ...]) -> dict[str, Any]:
    """`--param KEY=JSON`... as one object."""
    params = {}
    for value in values:
        key, equals, text = value.partition("=")
        if not key or not equals:
            raise UsageError(f"--param {value}: expected KEY=JSON, e.g. --param seed=7")
        try:
            params[key] = json.loads(text)
        except ValueError:
            raise UsageError(f"--param {value}: {text!r} is not JSON; a string needs its quotes, "
                             f"e.g. --param '{key}=\"{text}\"'") from None
    return params


def _read_task_file(path: str) -> dict:
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    obj = task_format.decode(data)
    if not isinstance(obj, dict):
        raise InvalidTask(f"{path}: a task file holds one JSON object")
    return obj


def _read_batch(path: str) -> list[Task]:
    """Every line of a JSONL file as a task; all errors reported together, none queued then."""
    try:
        stream = sys.stdin.buffer if path == "-" else open(path, "rb")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    tasks, errors, seen = [], [], set()
    with stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                task = task_format.parse(line)
            except InvalidTask as exc:
                errors.append(f"line {number}: {exc}")
                continue
            if task.id in seen:
                errors.append(f"line {number}: id {task.id} appears twice in the batch")
            seen.add(task.id)
            tasks.append(task)
    if errors:
        shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
        raise InvalidTask(f"{path}: {len(errors)} invalid lines, nothing queued: {shown}")
    if not tasks:
        raise InvalidTask(f"{path} holds no tasks")
    return tasks


def _check_craftsmen(tasks: list[Task], config: Config) -> None:
    """A craftsman the config does not know is a mistake to report now, not at the worker."""
    if not config.craftsmen:
        return
    for task in tasks:
        if task.craftsman != "auto" and task.craftsman not in config.craftsmen:
            raise InvalidTask(f"craftsman: no craftsman named {task.craftsman!r} in "
                              f"{config.path}; configured: {', '.join(sorted(config.craftsmen))}")


def _single_task(text: str | None, file: str | None, fields: dict[str, Any]) -> Task:
    if text is not None and file is not None:
        raise UsageError("give the task as TEXT or --file, not both")
    if file is not None:
        obj = _read_task_file(file)
    elif text == "-":
        obj = {"content": sys.stdin.read()}
    elif text is not None:
        obj = {"content": text}
    else:
        raise UsageError("nothing to submit: give TEXT, - for stdin, --file or --batch")
    after, params = fields.pop("after", ()), fields.pop("params", {})
    obj.update({k: v for k, v in fields.items() if v not in (None, ())})
    if after:
        known = obj.get("after") if isinstance(obj.get("after"), list) else []
        obj["after"] = known + [a for a in after if a not in known]
    if params and isinstance(obj.get("params", {}), dict):  # else validation names the field
        obj["params"] = {**obj.get("params", {}), **params}
    return task_format.validate(obj)


def _given_options(fields: dict[str, Any]) -> list[str]:
    """The task options given on the command line, by their names there."""
    names = {"files": "--attach", "params": "--param"}
    return [names.get(key, f"--{key.replace('_', '-')}") for key, value in fields.items()
            if value not in (None, (), {})]


def _repository_fields(repo: str | None, base: str | None, branch: str | None,
                       verify: str | None, push: bool | None) -> dict[str, Any]:
    """--repo and its companions as task fields; a local path is made absolute here, since
    the worker does not run where this command runs."""
    if repo is None:
        if any(v is not None for v in (base, branch, verify, push)):
            raise UsageError("--base, --branch, --verify and --push go with --repo")
        return {}
    try:
        argv = shlex.split(verify) if verify is not None else None
    except ValueError as exc:
        raise UsageError(f"--verify: {exc}") from None
    if argv == []:
        raise UsageError("--verify: give the command to run, e.g. --verify 'pytest -q'")
    location = repo if is_url(repo) else os.path.abspath(os.path.expanduser(repo))
    return {"repo": location, "base": base, "branch": branch, "verify": argv, "push": push}


def _read_workflow(path: str) -> workflow_format.Workflow:
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    return workflow_format.load(data, path)


@click.command(cls=KoubouCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="koubou-submit")
@home_options
@click.argument("text", required=False)
@click.option("--file", "file", metavar="F", help="A JSON task file (- for stdin).")
@click.option("--batch", metavar="FILE.jsonl",
              help="One task or OpenAI Batch input line per line (- for stdin).")
@click.option("--type", "type_", metavar="TYPE", help="Task type, e.g. code_review.")
@click.option("--priority", type=click.IntRange(1, 10), help="1-10; 10 runs first (default 5).")
@click.option("--difficulty", type=click.Choice(DIFFICULTIES))
@click.option("--sensitivity", type=click.Choice(SENSITIVITIES),
              help="confidential never leaves local craftsmen.")
@click.option("--craftsman", metavar="NAME", help="Ask for a craftsman (routing may refuse).")
@click.option("--model", help="Model override.")
@click.option("--system", help="System prompt.")
@click.option("--context", metavar="JSON", help="Extra context object given to the model.")
@click.option("--attach", multiple=True, metavar="PATH", help="Attach a text file (repeatable).")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Output token limit.")
@click.option("--id", "task_id", metavar="ID",
              help="Task id; resubmitting an existing id queues nothing and exits 0.")
@click.option("--after", multiple=True, metavar="ID",
              help="Run after this task completed (repeatable); {{ID}} in the text is its result.")
@click.option("--param", "params", multiple=True, metavar="KEY=JSON",
              help="A chat-completions body field sent as it is, e.g. seed=7 (repeatable).")
@click.option("--repo", metavar="PATH|URL",
              help="A repository task: work on this git repository (under repos.allowed).")
@click.option("--base", metavar="REF", help="With --repo: start from this ref (default HEAD).")
@click.option("--branch", metavar="NAME", help="With --repo: the result branch (koubou/ID).")
@click.option("--verify", metavar="'CMD ARGS'",
              help="With --repo: run this in the worktree after the craftsman; exit 0 passes.")
@click.option("--push/--no-push", default=None,
              help="With --repo: push the result branch back (default: repos.push).")
@click.option("--workflow", metavar="FILE.yaml",
              help="Queue a workflow: named steps with after between them (- for stdin).")
@click.option("--wait", is_flag=True, help="Block until done and print the result.")
@click.option("--timeout", type=float, help="With --wait: give up after S seconds (exit 3).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of ids/results.")
@click.option("--output", metavar="OUT.jsonl",
              help="With --batch --wait: write the OpenAI Batch output lines here, not to stdout.")
def submit(text: str | None, file: str | None, batch: str | None, type_: str | None,
           priority: int | None, difficulty: str | None, sensitivity: str | None,
           craftsman: str | None, model: str | None, system: str | None, context: str | None,
           attach: tuple[str, ...], max_tokens: int | None, task_id: str | None,
           after: tuple[str, ...], params: tuple[str, ...], repo: str | None, base: str | None,
           branch: str | None, verify: str | None, push: bool | None, workflow: str | None,
           wait: bool,
           timeout: float | None, as_json: bool, output: str | None) -> None:
    """Queue a task for the craftsmen: TEXT, - (stdin), --file F, --batch FILE.jsonl or
    --workflow FILE.yaml.

    Prints the id of each task queued. Exit codes: 0 ok, 1 the task failed (with --wait),
    2 invalid input, 3 --timeout passed (the task stays queued), 4 spool unusable.
    """
    where = session()
    config = where.config()
    spool = where.spool()
    fields = {"type": type_, "priority": priority, "difficulty": difficulty,
              "sensitivity": sensitivity, "craftsman": craftsman, "model": model,
              "system": system, "context": _json_object(context, "--context"),
              "files": list(attach) or None, "max_tokens": max_tokens, "id": task_id,
              "after": after, "params": _params(params),
              **_repository_fields(repo, base, branch, verify, push)}
    if output is not None and not (batch is not None and wait):
        raise UsageError("--output goes with --batch FILE --wait")
    if workflow is not None:
        given = _given_options(fields)
        if text is not None or file is not None or batch is not None or given:
            raise UsageError("--workflow takes its tasks from the file; drop TEXT, --file, "
                             "--batch and task options (put shared fields under defaults:)")
        click.get_current_context().exit(
            _submit_workflow(spool, config, _read_workflow(workflow), wait, timeout, as_json))
    if batch is not None:
        # Refused, not ignored: a --repo given here would have turned no line into a
        # repository task, and its prompt would have gone to a text craftsman.
        given = _given_options(fields)
        if text is not None or file is not None or given:
            raise UsageError("--batch takes its tasks, and each task's fields, from the file; "
                             f"drop {', '.join(given) or 'TEXT and --file'}")
        tasks = _read_batch(batch)
    else:
        tasks = [_single_task(text, file, fields)]
    click.get_current_context().exit(
        _submit_tasks(spool, config, tasks, batch is not None, wait, timeout, as_json, output))


def _submit_tasks(spool: Spool, config: Config, tasks: list[Task], batch: bool, wait: bool,
                  timeout: float | None, as_json: bool, output: str | None) -> int:
    """Queue tasks and say each id; with wait, the results (a batch: a progress bar, then
    its output lines). The exit code."""
    _check_craftsmen(tasks, config)
    submitted = spool.submit(tasks)
    for task, state, new in submitted:
        if as_json and not wait:
            click.echo(json.dumps({"id": task.id, "state": state, "new": new}))
        elif not as_json and not (wait and batch):  # the progress bar says it
            click.echo(task.id if new else f"{task.id} (already {state})", err=wait)
    if not wait:
        return EXIT_OK
    _say_unserved(spool, config, submitted)
    if batch:
        return _wait_batch(spool, [t.id for t in tasks], timeout, output)
    outcomes = status_module.wait_for_outcomes(spool, [t.id for t in tasks], timeout)
    return _report(outcomes, as_json)


def _say_unserved(spool: Spool, config: Config, submitted: list[tuple[Task, str, bool]]) -> None:
    """Before a wait: say at once which queued tasks no live worker serves."""
    for line in serving.unserved(spool, config, [t for t, state, _ in submitted
                                                 if state == "pending"]):
        notice(line)


def _submit_workflow(spool: Spool, config: Config, workflow: workflow_format.Workflow,
                     wait: bool, timeout: float | None, as_json: bool) -> int:
    """Queue every step (nothing new when the workflow id was queued before); with wait, a
    line per step as it ends, then the results of the steps nothing runs after."""
    _check_craftsmen(workflow.tasks, config)
    submitted = spool.submit(workflow.tasks)
    for task, state, new in submitted:
        if as_json and not wait:
            click.echo(json.dumps({"id": task.id, "state": state, "new": new}))
        elif not as_json:
            click.echo(task.id if new else f"{task.id} (already {state})", err=wait)
    if not wait:
        return EXIT_OK
    _say_unserved(spool, config, submitted)
    ids = [t.id for t in workflow.tasks]
    told: set[str] = set()

    def progress(done: int, failed: int, total: int) -> None:
        for task_id in ids:
            outcome = None if task_id in told else spool.outcome(task_id)
            if outcome is not None:
                told.add(task_id)
                error = outcome.get("error") or {}
                said = f" ({error.get('kind')})" if error else ""
                click.echo(f"step {workflow.steps[task_id]}: {outcome.get('status')}{said}",
                           err=True)
    finished = wait_with_progress(spool, ids, timeout, progress)
    if len(finished) < len(ids):
        missing = [workflow.steps[t] for t in ids if t not in finished]
        raise WaitTimeout(f"timed out after {timeout:g} s; steps still open: "
                          f"{', '.join(missing)}")
    return _report({t: spool.outcome(t) for t in workflow.leaves}, as_json)


def _wait_batch(spool: Spool, task_ids: list[str], timeout: float | None,
                output: str | None) -> int:
    """Progress bar on stderr until the batch is done, then OpenAI Batch output lines."""
    bar = _ProgressBar()
    finished = wait_with_progress(spool, task_ids, timeout, bar.update)
    bar.close()
    if len(finished) < len(task_ids):
        missing = [t for t in task_ids if t not in finished]
        raise WaitTimeout(f"timed out after {timeout:g} s; {len(missing)} of {len(task_ids)} "
                          f"still queued, e.g. {', '.join(missing[:3])}")
    lines = batch_format.output_lines(task_ids, {t: spool.outcome(t) for t in task_ids})
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    if output is None:
        click.echo(text, nl=False)
    else:
        write_atomic(Path(output), text)
    return EXIT_TASK_FAILED if any(line["error"] for line in lines) else EXIT_OK


class _ProgressBar:
    """One stderr line rewritten in place, at most ten times a second (and always at the end)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.drawn = 0.0
        self.last = ""

    def update(self, done: int, failed: int, total: int) -> None:
        now = time.monotonic()
        self.last = batch_format.progress_line(done, failed, total, now - self.started)
        if now - self.drawn >= 0.1 or done + failed == total:
            click.echo("\r" + self.last, nl=False, err=True)
            self.drawn = now

    def close(self) -> None:
        click.echo("\r" + self.last, err=True)


def _report(outcomes: dict[str, dict], as_json: bool) -> int:
    failed = 0
    for task_id, outcome in outcomes.items():
        if outcome.get("status") != "completed":
            failed += 1
        if as_json:
            click.echo(json.dumps(outcome, ensure_ascii=False))
        elif outcome.get("status") == "completed":
            if len(outcomes) > 1:
                click.echo(f"== {task_id}")
            click.echo(outcome["result"]["content"])
        else:
            error = outcome.get("error") or {}
            click.echo(f"koubou-submit: task {task_id} failed ({error.get('kind')}): "
                       f"{error.get('message')}", err=True)
    return EXIT_TASK_FAILED if failed else EXIT_OK


def main() -> None:
    """Console entry point."""
    submit(prog_name="koubou-submit")


if __name__ == "__main__":
    main()
