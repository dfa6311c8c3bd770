"""`koubou`: init, info, worker, status, list, result, wait."""

from __future__ import annotations

import click

from .. import __version__
from ..service import serving
from ..spool import ledger
from ..spool import home as home_module, permissions
from ..observe import status as status_module
from ..spool.task import DIFFICULTIES, SENSITIVITIES
from ..errors import EXIT_OK, EXIT_TASK_FAILED, UsageError
from ..spool.home import STATE_DIRS
from ..work.worker import run_worker
from ..observe import render as report_render
from .common import (KoubouGroup, cluster_notice, emit_json, home_options, notice, session,
                     setup_logging)

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group(cls=KoubouGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="koubou")
@home_options
def cli() -> None:
    """koubou-spool: a crash-safe spool of LLM tasks for local and cloud craftsmen.

    Tasks are JSON files that move by rename through HOME/tasks/pending, in_progress,
    completed and failed. Queue them with koubou-submit; run them with `koubou worker`.
    """


@cli.command()
@home_options
@json_option
@click.option("--group", metavar="NAME",
              help="The group that may submit and read (default: the home's group, or for a "
                   "new home your primary group).")
def init(group: str | None, as_json: bool) -> None:
    """Create the home: directories, a commented config, the ledger. Safe to run again.

    Sets the modes of the home (closed to others, open to the group, written only by you, the
    workers' user); run again on an existing home, it repairs them and says what it changed.
    """
    where = session()
    made = home_module.init(where.home, group)
    ledger.open_ledger(where.ledger_path).close()
    repaired = permissions.repair(where.home, group)
    if as_json:
        emit_json({"home": str(where.home), "created": [str(p) for p in made],
                   "repaired": repaired})
        return
    click.echo(str(where.home))
    if made:
        click.echo(f"created {len(made)} entries; edit {where.config_path} to add craftsmen",
                   err=True)
    for line in repaired[:permissions.SHOWN]:
        click.echo(f"repaired {line}", err=True)
    if len(repaired) > permissions.SHOWN:
        click.echo(f"repaired {len(repaired) - permissions.SHOWN} more paths the same way",
                   err=True)


@cli.command()
@home_options
@json_option
def info(as_json: bool) -> None:
    """Print which home, config and ledger are used, and the spool settings."""
    where = session()
    config = where.config()
    facts = {"version": __version__, "home": str(where.home), "config": str(where.config_path),
             "config_exists": where.config_path.exists(), "ledger": str(where.ledger_path),
             "craftsmen": {name: {"backend": c.backend, "model": c.model, "local": c.local,
                                  "base_url": c.base_url, "max_concurrent": c.max_concurrent,
                                  "endpoints": [e.base_url for e in c.endpoints]}
                           for name, c in config.craftsmen.items()},
             "spool": vars(config.spool)}
    if as_json:
        emit_json(facts)
        return
    for key in ("version", "home", "config", "ledger"):
        click.echo(f"{key:8} {facts[key]}")
    for name, c in facts["craftsmen"].items():
        urls = c["endpoints"] or [c["base_url"]] if c["base_url"] or c["endpoints"] else []
        where_to = f" at {', '.join(urls)}" if urls else ""
        click.echo(f"craftsman {name}: {c['backend']} {c['model']}{where_to}"
                   f"{' (local)' if c['local'] else ''}")
    click.echo("spool    " + ", ".join(f"{k}={v}" for k, v in facts["spool"].items()))


@cli.command()
@home_options
@click.option("--craftsman", "craftsmen", multiple=True, metavar="NAME",
              help="Serve only this craftsman (repeatable; default: all).")
@click.option("--concurrency", type=click.IntRange(min=1), default=16, show_default=True,
              help="Tasks in flight in this process, all craftsmen together.")
@click.option("--drain", is_flag=True, help="Exit once the queue is empty.")
def worker(craftsmen: tuple[str, ...], concurrency: int, drain: bool) -> None:
    """Run a worker: claim pending tasks and send them to their craftsmen.

    SIGTERM or Ctrl-C stops claiming, lets tasks in flight finish (or requeues them after
    spool.stop_grace_s), and exits 0.
    """
    setup_logging()
    where = session()
    config = where.config(required=True)
    run_worker(where.home, config, craftsmen=list(craftsmen) or None,
               concurrency=concurrency, drain=drain)


@cli.command("cluster")
@home_options
@click.option("--forget", "forget", metavar="HOST",
              help="Instead: remove HOST, a host that left for good, from the cluster's host "
                   "list. Refused while its row is younger than its lease or a lease of it "
                   "runs. Its tasks stay in the cluster: those it submitted are delivered if "
                   "it comes back.")
def cluster_command(forget: str | None) -> None:
    """Run this home's bridge to the cluster (docs/CLUSTER.md): forward the tasks no worker
    here serves, deliver their outcomes, take in cluster tasks for the craftsmen this host
    serves. Needs `cluster.dsn_env` in the config; SIGTERM exits 0.
    """
    if forget is not None:
        _forget_host(forget)
        return
    try:
        from ..service.bridging import run_bridge  # psycopg only where the cluster is used
    except ImportError as exc:
        raise UsageError(f"`koubou cluster` needs psycopg 3 ({exc}); install it with "
                         "pip install 'koubou-spool[cluster]'") from None
    setup_logging()
    where = session()
    config = where.config(required=True)
    raise SystemExit(run_bridge(where.home, config))


def _forget_host(host: str) -> None:
    found = session().forget_host(host)
    left = (f"; {found['open']} task(s) it submitted stay in the cluster, delivered if it comes "
            "back") if found["open"] else ""
    click.echo(f"forgot host {host} (its row was {found['age_s']:.0f} s old){left}")


@cli.command()
@home_options
@json_option
@click.argument("task_id", required=False)
def status(task_id: str | None, as_json: bool) -> None:
    """Queue depth per state and live workers; with an ID, that task's state and attempts
    (a workflow's id: its steps)."""
    where = session()
    if task_id:
        found = where.status(task_id)
        if as_json:
            emit_json(found)
        elif "workflow" in found:
            _print_workflow_status(found)
        else:
            _print_task_status(found)
        return
    facts = where.overview()
    cluster_notice(facts.get("cluster"))
    if as_json:
        emit_json(facts)
        return
    click.echo("  ".join(f"{state} {n}" for state, n in facts["queues"].items()))
    for w in facts["workers"]:
        click.echo(f"worker {w['id']} {w['liveness']} in_flight={w.get('in_flight', '?')} "
                   f"done={w.get('done', '?')} failed={w.get('failed', '?')}")
    click.echo(_budget_line(facts["budget"]))
    if facts.get("cluster", {}).get("hosts") is not None:
        click.echo("")
        for line in report_render.hosts_table(facts["cluster"]["hosts"]):
            click.echo(line)


def _print_workflow_status(found: dict) -> None:
    click.echo(f"workflow {found['workflow']}: {len(found['steps'])} steps")
    for step in found["steps"]:
        held = f" by {step['worker_id']}" if step.get("worker_id") else ""
        click.echo(f"  {step['step']}: {step['state']}{held}")


def _print_task_status(found: dict) -> None:
    click.echo(f"{found.get('id') or found['file']}: {found['state']}")
    if found.get("origin"):  # a cluster task submitted on another host
        click.echo(f"  origin   {found['origin']}" + (f", run on {found['host']} (attempt "
                                                      f"{found['attempt']})" if found.get("host")
                                                      else ""))
    if found.get("worker_id"):
        click.echo(f"  worker   {found['worker_id']}")
    _print_cluster_face(found.get("cluster"))
    if found.get("worktree"):
        click.echo(f"  worktree {found['worktree']}")
    for attempt in found.get("attempts", []):
        tokens = attempt.get("total_tokens")
        click.echo(f"  attempt {attempt['attempt']}: {attempt.get('outcome') or 'running'} on "
                   f"{attempt.get('craftsman')}" + (f", {tokens} tokens" if tokens else ""))
    error = found.get("error")
    if error:
        click.echo(f"  error    {error['kind']}: {error['message']}")
    result = found.get("result")
    if result:
        click.echo(f"  result   {len(result.get('content', ''))} characters from "
                   f"{result.get('craftsman')} ({result.get('model')}), "
                   f"{result.get('duration_s')} s; `koubou result {found['id']}` prints it")
        _print_repository_result(result.get("repo"))


def _print_cluster_face(cluster: dict | None) -> None:
    """Where a task this host forwarded runs now, or why the cluster could not say."""
    if cluster and cluster.get("error"):
        notice(cluster["error"])
    elif cluster and cluster.get("task"):
        task = cluster["task"]
        click.echo(f"  cluster  {task['state']}" + (f" on {task['host']} (attempt "
                                                    f"{task['attempt']})" if task["host"] else ""))


def _print_repository_result(repo: dict | None) -> None:
    """A repository task's branch, commit and verify result."""
    if not repo:
        return
    commit = (repo.get("commit") or "none: nothing changed")[:12]
    click.echo(f"  branch   {repo.get('branch')} at {commit} "
               f"({'pushed' if repo.get('pushed') else 'not pushed'})")
    verify = repo.get("verify")
    if verify:
        click.echo(f"  verify   {' '.join(verify.get('argv', []))}: exit {verify.get('exit_code')}"
                   f" in {verify.get('duration_s')} s")


@cli.command(name="list")
@home_options
@json_option
@click.option("--state", type=click.Choice(STATE_DIRS), multiple=True,
              help="Only tasks in this state (repeatable; default: all).")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
def list_command(state: tuple[str, ...], limit: int, as_json: bool) -> None:
    """List tasks, newest first."""
    found = session().listing(state or None, limit)
    cluster_notice(found.get("cluster"))
    if as_json:
        emit_json(found["tasks"])
        return
    for item in found["tasks"]:
        label = item["id"] or item["file"]
        extra = " (rejected input)" if item.get("rejected") else ""
        if item.get("origin"):
            extra = f"  from {item['origin']}" + (f", on {item['host']}" if item["host"] else "")
        click.echo(f"{item['time']}  {item['state']:11}  {label}{extra}")


@cli.command()
@home_options
@json_option
@click.argument("task_id")
def result(task_id: str, as_json: bool) -> None:
    """Print a finished task's result (exit 1 if it failed, 3 if it has not finished)."""
    click.get_current_context().exit(_print_outcome(session().outcome(task_id), as_json))


def _print_outcome(outcome: dict, as_json: bool) -> int:
    if as_json:
        emit_json(outcome)
    elif outcome.get("status") == "completed":
        click.echo(outcome["result"]["content"])
    else:
        error = outcome.get("error") or {}
        click.echo(f"task {outcome.get('id') or outcome.get('file')} failed "
                   f"({error.get('kind')}): {error.get('message')}", err=True)
    return EXIT_OK if outcome.get("status") == "completed" else EXIT_TASK_FAILED


@cli.command()
@home_options
@json_option
@click.option("--timeout", type=float, default=None, help="Give up after S seconds (exit 3).")
@click.argument("task_ids", nargs=-1, required=True)
def wait(task_ids: tuple[str, ...], timeout: float | None, as_json: bool) -> None:
    """Block until the tasks finish (inotify, no polling); exit 1 if any failed."""
    where = session()
    config = where.config()
    spool = where.spool()
    for line in serving.unserved(spool, config, status_module.unfinished_tasks(spool, list(task_ids))):
        notice(line)
    outcomes = status_module.wait_for_outcomes(spool, list(task_ids), timeout)
    failed = [o for o in outcomes.values() if o.get("status") != "completed"]
    if as_json:
        emit_json(outcomes)
    else:
        for task_id, outcome in outcomes.items():
            error = outcome.get("error") or {}
            detail = f" ({error.get('kind')}: {error.get('message')})" if error else ""
            click.echo(f"{task_id}: {outcome.get('status')}{detail}")
    click.get_current_context().exit(EXIT_TASK_FAILED if failed else EXIT_OK)

cli.lazy.update({name: f"koubou_spool.cli.{module}:{name}" for module, names in (
    ("observe", ("report", "workers", "top", "metrics")),
    ("operate", ("maintain", "doctor", "ledger")),
    ("serve", ("serve",))) for name in names})


@cli.command()
@home_options
@json_option
@click.argument("task_id")
def cancel(task_id: str, as_json: bool) -> None:
    """Cancel a pending or running task: it fails as `cancelled`.

    A running task's worker sees its claim taken, aborts the request and discards any result.
    Exit 1 when the task had already finished.
    """
    record = session().cancel_record(task_id)
    if as_json:
        emit_json(record)
    else:
        click.echo(f"{record['id']}: cancelled ({record['error']['message']})")


@cli.command()
@home_options
@click.argument("task_id")
def retry(task_id: str) -> None:
    """Queue a failed task again, with its attempts reset."""
    click.echo(f"{task_id}: queued again as pending/{session().retry(task_id)['file']}")


@cli.command()
@home_options
@json_option
@click.argument("text")
@click.option("--craftsman", default="auto", help="Ask for a craftsman, as a task would.")
@click.option("--difficulty", type=click.Choice(DIFFICULTIES), default="auto")
@click.option("--sensitivity", type=click.Choice(SENSITIVITIES), default="auto")
@click.option("--type", "type_", default="general", metavar="TYPE")
@click.option("--attach", multiple=True, metavar="PATH", help="Files the task would attach.")
def route(text: str, craftsman: str, difficulty: str, sensitivity: str, type_: str,
          attach: tuple[str, ...], as_json: bool) -> None:
    """Dry run: which craftsman a task with this TEXT would go to, and why.

    Names the sensitive pattern that matched (never the text it matched), the difficulty and
    its keywords, the rule that fired and the budget's state.
    """
    where = session()
    where.config(required=True)
    budget = where.budget()  # read once: in a cluster it is a round trip to its database
    decision = where.route({"content": text, "craftsman": craftsman, "type": type_,
                            "difficulty": difficulty, "sensitivity": sensitivity,
                            "files": list(attach)}, budget)
    facts = {"craftsman": decision.craftsman, "reason": decision.reason,
             "outcome": decision.kind or "run", "confidential": decision.confidential,
             "sensitive_pattern": decision.pattern, "difficulty": decision.difficulty,
             "keywords": list(decision.keywords), "rule": decision.rule, "notes": decision.notes,
             "budget": budget}
    if as_json:
        emit_json(facts)
        return
    _print_route(facts)


def _print_route(facts: dict) -> None:
    sensitivity = "confidential" if facts["confidential"] else "public"
    if facts["sensitive_pattern"]:
        sensitivity += f" (matched sensitive pattern {facts['sensitive_pattern']})"
    keywords = f" (keywords: {', '.join(facts['keywords'])})" if facts["keywords"] else ""
    click.echo(f"craftsman    {facts['craftsman'] or '-'} ({facts['outcome']})")
    click.echo(f"why          {facts['reason']}")
    for note in facts["notes"]:
        click.echo(f"             {note}")
    click.echo(f"sensitivity  {sensitivity}")
    click.echo(f"difficulty   {facts['difficulty']}{keywords}")
    click.echo(_budget_line(facts["budget"]))


def _budget_line(budget: dict) -> str:
    if not budget.get("enabled"):
        return "budget       none configured"
    if "cluster_error" in budget:
        return (f"budget       {budget['cluster_error']}; no cloud call until it can be, so "
                f"{budget['when_exhausted']}")
    if "error" in budget and "scope" not in budget:
        return f"budget       {budget['error']}"
    exhausted = f"; exhausted, so {budget['when_exhausted']}" if budget["exhausted"] else ""
    figures = (f"day {budget['day_spent_usd']:.4f} of {budget['daily_usd']} USD, "
               f"month {budget['month_spent_usd']:.4f} of {budget['monthly_usd']} USD")
    if budget.get("scope") == "cluster":
        home = budget.get("home_day_spent_usd"), budget.get("home_month_spent_usd")
        mine = ("this host's ledger unreadable" if home[0] is None
                else f"this host day {home[0]:.4f}, month {home[1]:.4f}")
        return f"budget       cluster {figures} ({mine}){exhausted}"
    return f"budget       {figures}{exhausted}"


def main() -> None:
    """Console entry point."""
    cli(prog_name="koubou")


if __name__ == "__main__":
    main()
