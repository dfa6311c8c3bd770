"""What every command shares: --home/--config, logging, and errors mapped to exit codes."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from typing import Any
from collections.abc import Callable

import click

from ..spool import home as home_module, permissions
from ..errors import KoubouError, EXIT_UNUSABLE
from ..service.workshop import Workshop

LOG_LEVELS = ("debug", "info", "warning", "error")


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None:
        ctx.find_root().meta[f"koubou.{param.name}"] = value
    return value


def home_options(command: Callable) -> Callable:
    """--home, --config and --log-level, accepted before or after the subcommand."""
    for option in reversed([
        # readable=False: a home closed to this user is refused by the spool, with the group
        # to join, not by click.
        click.option("--home", type=click.Path(file_okay=False, readable=False),
                     expose_value=False,
                     callback=_remember, help="The spool home (default: $KOUBOU_HOME, "
                     "/var/koubou if writable, else ~/.local/share/koubou)."),
        click.option("--config", type=click.Path(dir_okay=False), expose_value=False,
                     callback=_remember, help="Config file (default: HOME/config/koubou.yaml)."),
        click.option("--log-level", type=click.Choice(LOG_LEVELS), expose_value=False,
                     callback=_remember, help="Log verbosity on stderr (default: info)."),
    ]):
        command = option(command)
    return command


def session() -> Workshop:
    """The home of the running command, from the options seen on the command line, and its
    operations (service.workshop): a command parses, calls one and prints what it returns."""
    meta = click.get_current_context().find_root().meta
    home = home_module.resolve(meta.get("koubou.home"))
    return Workshop(home, home_module.config_path(home, meta.get("koubou.config")))


def setup_logging() -> None:
    """One line per event on stderr, at --log-level."""
    level = click.get_current_context().find_root().meta.get("koubou.log_level", "info")
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "debug":  # one line per request from the HTTP stack is noise, not events
        for name in ("httpx", "httpx2", "openai"):
            logging.getLogger(name).setLevel(logging.WARNING)


def emit_json(value: Any) -> None:
    """One JSON document on stdout."""
    click.echo(json.dumps(value, ensure_ascii=False, indent=1, default=str))


def notice(message: str) -> None:
    """One line on stderr, named like the errors, for what the user should know but is no error."""
    click.echo(f"{click.get_current_context().find_root().info_name}: {message}", err=True)


def cluster_notice(cluster: dict[str, Any] | None) -> None:
    """The one line a view of the cluster adds on stderr when the cluster could not be read."""
    if cluster and cluster.get("error"):
        notice(cluster["error"])


def _fail(error: Exception, code: int) -> None:
    notice(str(error))
    raise click.exceptions.Exit(code)


class _Guarded:
    """Maps KoubouError (and unexpected OS errors) to one sentence on stderr and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except KoubouError as exc:
            _fail(exc, exc.exit_code)
        except PermissionError as exc:
            if not exc.filename:
                raise
            _fail(RuntimeError(permissions.denied(exc.filename)), EXIT_UNUSABLE)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            _fail(RuntimeError(f"{exc.strerror or exc}{where}; check the home's permissions"),
                  EXIT_UNUSABLE)


class KoubouGroup(_Guarded, click.Group):
    """A click group with koubou's error mapping. Commands in `lazy` (name: "module:attribute")
    are imported only when named or listed: a worker's start, the command run most often,
    does not import doctor's HTTP client or the report's renderers."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            module, _, attribute = self.lazy[name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)


class KoubouCommand(_Guarded, click.Command):
    """A click command with koubou's error mapping."""
