"""`koubou maintain`, `koubou doctor`, `koubou ledger rebuild`: operating a home."""

from __future__ import annotations

import click

from ..ops import doctor as doctor_module
from ..ops import maintain as maintain_module
from ..ops import rebuild as rebuild_module
from ..errors import KoubouError
from .common import KoubouCommand, KoubouGroup, emit_json, home_options, session, setup_logging

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


class DoctorFound(KoubouError):
    """`koubou doctor` found errors (exit 4)."""


@click.command(cls=KoubouCommand)
@home_options
@json_option
@click.option("--purge-after", metavar="AGE",
              help="Delete outcomes in completed/ and failed/ older than AGE (30m, 12h, 7d, 2w; "
                   "by file time). Default: keep everything.")
@click.option("--purge-ledger", is_flag=True,
              help="With --purge-after, delete the purged tasks' ledger rows too.")
@click.option("--vacuum", is_flag=True,
              help="VACUUM the ledger afterwards (while workers run: given up after 1 s).")
def maintain(purge_after: str | None, purge_ledger: bool, vacuum: bool, as_json: bool) -> None:
    """For cron and timers: requeue dead workers' tasks, fail expired ones, purge, vacuum.

    Also removes staging files left in tasks/tmp for over a day. Concurrent runs are safe:
    one works, the others say "another maintain is running" and exit 0.
    """
    setup_logging()
    where = session()
    age = None if purge_after is None else maintain_module.parse_duration(purge_after)
    config = where.config()
    summary = maintain_module.run(where.spool(), config, where.ledger_path,
                                  purge_after=age, purge_ledger=purge_ledger, vacuum=vacuum)
    if as_json:
        emit_json(summary.as_dict())
    else:
        click.echo(summary.line())


@click.command(cls=KoubouCommand)
@home_options
@json_option
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds to wait for each craftsman's /v1/models.")
@click.option("--strict", is_flag=True, help="Exit 4 on warnings too.")
def doctor(timeout: float, strict: bool, as_json: bool) -> None:
    """Check the home, config, API keys, inotify limits, ledger, every craftsman's endpoint,
    and a running `koubou serve`.

    Exits 0 when nothing is broken (warnings are printed), 4 naming each broken craftsman.
    """
    setup_logging()
    where = session()
    checks = doctor_module.run(where.home, where.config_path, timeout)
    if where.config_path.exists() and all(c.name != "config" or c.status != "error"
                                          for c in checks):
        from ..serve import probe  # the HTTP face's own check, when a server runs

        checks.append(probe.check(where.home, where.config(required=True), timeout))
    if as_json:
        emit_json(doctor_module.as_dict(checks))
    else:
        _print_checks(checks)
    worst = {c.status for c in checks}
    if "error" in worst or (strict and "warning" in worst):
        broken = doctor_module.broken_craftsmen(checks)
        named = f"; broken craftsmen: {', '.join(broken)}" if broken else ""
        raise DoctorFound(f"doctor found problems in {where.home}{named}")


def _print_checks(checks: list[doctor_module.Check]) -> None:
    for check in checks:
        click.echo(f"{check.status:8} {check.name}")
        for problem in check.problems:
            click.echo(f"  {problem.level}: {problem.message}")


@click.group(cls=KoubouGroup)
@home_options
def ledger() -> None:
    """The SQLite ledger of attempts, tokens and costs."""


@ledger.command(cls=KoubouCommand)
@home_options
@json_option
def rebuild(as_json: bool) -> None:
    """Rebuild the ledger from the outcome files; the old one is kept as koubou.db.old-TIME.

    Refuses while workers run: stop them first.
    """
    setup_logging()
    where = session()
    config = where.config()
    done = rebuild_module.rebuild(where.spool(), where.ledger_path, config)
    if as_json:
        emit_json(done.as_dict())
        return
    moved = f"; the old ledger is {done.old}" if done.old else ""
    click.echo(f"rebuilt {done.ledger}: {done.tasks} tasks, {done.attempts} attempts, "
               f"{done.rejects} rejects ({done.skipped} files skipped){moved}")
