"""The worker: the loop (worker) over intake, dispatch, the attempt and publish, and the kinds of
work an attempt runs. May import the spool core, the craft and ops' systemd notifier; nothing
imports it but the CLI."""

from .worker import Worker, run_worker

__all__ = ["Worker", "run_worker"]
