"""The HTTP app: one route table, each route a line naming its view (views/ has one module per
resource), behind the guard (tokens, body limits) and over one Workshop."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Iterator

import uvicorn

from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..integrations.batches import BatchRunner, Batches
from ..service.workshop import Workshop
from .guard import Guard
from .settings import BATCH_FILE_BYTES, ServeSettings
from .views import batches, chat, common, dashboard, events, files, models, tasks

log = logging.getLogger(__name__)

MULTIPART_SLACK = 1024 * 1024  # the form fields and boundaries around an uploaded file


def routes() -> list:
    """Every route of koubou serve."""
    return [
        Route("/v1/models", models.list_models),
        Route("/v1/models/{model}", models.one_model),
        Route("/v1/chat/completions", chat.create, methods=["POST"]),
        Route("/v1/files", files.upload, methods=["POST"]),
        Route("/v1/files", files.list_files),
        Route("/v1/files/{file_id}", files.one_file),
        Route("/v1/files/{file_id}", files.delete, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", files.content),
        Route("/v1/batches", batches.create, methods=["POST"]),
        Route("/v1/batches", batches.list_batches),
        Route("/v1/batches/{batch_id}", batches.one_batch),
        Route("/v1/batches/{batch_id}/cancel", batches.cancel, methods=["POST"]),
        Route("/api/tasks", tasks.submit, methods=["POST"]),
        Route("/api/tasks", tasks.list_tasks),
        Route("/api/tasks/{task_id}", tasks.status),
        Route("/api/tasks/{task_id}/result", tasks.result),
        Route("/api/tasks/{task_id}/cancel", tasks.cancel, methods=["POST"]),
        Route("/api/tasks/{task_id}/retry", tasks.retry, methods=["POST"]),
        Route("/api/workers", tasks.workers),
        Route("/api/report", tasks.report),
        Route("/api/events", events.stream),
        Route("/metrics", tasks.metrics),
        Route("/healthz", tasks.health),
        Route("/", dashboard.page),
        Mount("/static", StaticFiles(packages=[("koubou_spool.serve", "static")]), name="static"),
    ]


def build_app(workshop: Workshop, settings: ServeSettings) -> Guard:
    """The ASGI app of a home: Starlette behind the guard."""
    task_bytes = settings.max_body_bytes or workshop.config().spool.max_task_bytes

    def body_limit(method: str, path: str) -> int:
        if method == "POST" and path == "/v1/files":
            return BATCH_FILE_BYTES + MULTIPART_SLACK
        return task_bytes

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.events = workshop.events()
        app.state.events.start()
        app.state.runner = BatchRunner(app.state.batches, app.state.events)
        app.state.runner.start()
        log.info("serving %s", workshop.home)
        try:
            yield
        finally:
            await app.state.runner.stop()
            app.state.events.close()

    app = Starlette(routes=routes(), lifespan=lifespan,
                    exception_handlers=common.EXCEPTION_HANDLERS)
    app.state.workshop = workshop
    app.state.settings = settings
    app.state.batches = Batches(workshop)
    return Guard(app, settings.tokens, body_limit)


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM once it has shut down, so the process would die by the signal;
    a service stopped by systemd or a person should end with exit 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle_exit)
        yield


def run(app: Guard, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT, then finish the requests in flight (5 s) and return."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", proxy_headers=False,
                            server_header=False, timeout_graceful_shutdown=5)
    _Server(config).run()
