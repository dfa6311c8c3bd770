"""`koubou report`, `koubou workers`, `koubou top`, `koubou metrics`: read-only views."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..observe import gather as observe, render as report_render, top as top_module
from ..errors import SpoolError, UsageError
from ..observe.render import seconds
from .common import KoubouCommand, cluster_notice, emit_json, home_options, session


@click.command(cls=KoubouCommand)
@home_options
@click.option("--day", metavar="YYYY-MM-DD", help="One day in budget.timezone.")
@click.option("--month", metavar="YYYY-MM", help="One month in budget.timezone.")
@click.option("--since", metavar="ISO", help="From this time until now (no offset: budget.timezone).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV rows: section,name,metric,value.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write a self-contained HTML page with charts to FILE.")
def report(day: str | None, month: str | None, since: str | None, as_json: bool, as_csv: bool,
           html_file: str | None) -> None:
    """Tasks, wait and run times, tokens, cost and budget for a period (default: today).

    Days and months are in budget.timezone (default: local time); the budget figures are for
    the last day of the period and its month to date.
    """
    if as_json and as_csv:
        raise UsageError("give --json or --csv, not both")
    figures = session().report(day, month, since)
    cluster_notice(figures.get("cluster"))
    if html_file:
        observe.write_atomic(Path(html_file), report_render.html_page(figures))
    if as_json:
        emit_json(figures)
    elif as_csv:
        click.echo(report_render.csv_text(figures), nl=False)
    else:
        click.echo(report_render.text(figures), nl=False)


@click.command(cls=KoubouCommand)
@home_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def workers(as_json: bool) -> None:
    """Workers with their liveness, heartbeat age, tasks in flight, done and failed counts,
    each endpoint of their craftsmen (requests, failures, in flight, resting), and in a
    cluster the slots they hold of each server the hosts share."""
    facts = session().workers()
    found = facts["workers"]
    cluster_notice(facts.get("cluster"))
    if as_json:
        emit_json(found)
        return
    if not found:
        click.echo("no workers running; start one with `koubou worker`")
        return
    hosts = "cluster" in facts  # in a cluster: every host's workers, with a host column
    rows = [([w.get("host") or "-"] if hosts else []) + [
        w["id"], w["liveness"], seconds(w.get("heartbeat_age_s")), w.get("in_flight", "-"),
        w.get("done", "-"), w.get("failed", "-"), ",".join(w["craftsmen"]) or "all"]
        for w in found]
    for line in report_render.table((["host"] if hosts else []) + [
            "worker", "liveness", "heartbeat", "in flight", "done", "failed", "craftsmen"], rows):
        click.echo(line)
    shown = [[w["id"], craftsman, e["base_url"], e["requests"], e["failures"], e["in_flight"],
              f"resting {e['cooling_s']:g} s" if e["cooling"] else "up"]
             for w in found for craftsman, ones in (w.get("endpoints") or {}).items()
             for e in ones]
    if shown:
        click.echo("")
        for line in report_render.table(["worker", "craftsman", "endpoint", "requests", "failures",
                                         "in flight", "state"], shown):
            click.echo(line)
    held = [[w["id"], s["craftsman"], s["server"], s["in_use"], s["spare"], s["cap"]]
            for w in found for s in w.get("cluster_slots") or ()]
    if held:  # the servers every host reaches: their max_concurrent holds across the cluster
        click.echo("")
        for line in report_render.table(["worker", "craftsman", "shared server", "in use",
                                         "spare", "of"], held):
            click.echo(line)


@click.command(cls=KoubouCommand)
@home_options
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts and pipes).")
def top(once: bool) -> None:
    """A live view of queues, workers and spend; redraws on spool events. q or Ctrl-C quits."""
    where = session()

    def draw() -> list[str]:
        now = time.time()
        found = where.workers()
        shown = found["workers"]
        if "cluster" in found:  # every host's workers: named host/worker
            shown = [w | {"id": f"{w['host']}/{w['id']}"} for w in shown]
        return top_module.frame(where.home, found["queues"], shown, found["in_flight"],
                                found["budget"], now)
    if once:
        click.echo("\n".join(draw()))
        return
    top_module.run(where.spool(), draw)


@click.command(cls=KoubouCommand)
@home_options
@click.option("--output", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write to FILE atomically (tmp + rename) instead of stdout, for "
                   "node_exporter's textfile collector (FILE should end in .prom).")
def metrics(output: str | None) -> None:
    """Prometheus text exposition: queue depths, in flight, task/token/cost counters, budget."""
    text = session().metrics()
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        observe.write_atomic(Path(output), text)
    except OSError as exc:
        raise SpoolError(f"cannot write {output}: {exc.strerror}; check the directory exists "
                         "and is writable") from None
