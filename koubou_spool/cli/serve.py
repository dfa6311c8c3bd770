"""`koubou serve`: the HTTP face (README: koubou serve)."""

from __future__ import annotations

import click

from ..service.workshop import Workshop
from .common import KoubouCommand, home_options, session, setup_logging


@click.command(cls=KoubouCommand)
@home_options
@click.option("--host", default=None, help="Address to listen on (default: serve.host, "
              "127.0.0.1). Beyond loopback only with tokens set.")
@click.option("--port", type=int, default=None, help="Port (default: serve.port, 8787).")
def serve(host: str | None, port: int | None) -> None:
    """Serve the OpenAI-compatible API, the Batch API, REST, events and the dashboard.

    Bearer tokens come from the variable named by serve.tokens_env (KOUBOU_SERVE_TOKENS,
    comma-separated); without one the server listens on loopback only.
    """
    from ..serve import settings as serve_settings
    from ..serve.app import build_app, run

    setup_logging()
    where = session()
    workshop = Workshop(where.home, where.config_path)
    settings = serve_settings.load(workshop.config())
    host, port = host or settings.host, port if port is not None else settings.port
    serve_settings.check_bind(host, settings)
    workshop.spool()  # an unusable home is one sentence now, not a traceback per request
    app = build_app(workshop, settings)
    run(app, host, port)
