"""Commands the operator configures (hooks.on_finish, budget.alert_command): an argv, never a
shell; their failure is logged, never fatal."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


async def run_argv(argv: list[str], env: dict[str, str], what: str) -> None:
    """Run a configured argv to completion and log how it ended."""
    try:
        proc = await asyncio.create_subprocess_exec(*argv, env=env,
                                                    stdin=asyncio.subprocess.DEVNULL)
        status = await proc.wait()
        if status != 0:
            log.warning("%s %s exited with status %d", what, argv[0], status)
    except OSError as exc:
        log.warning("%s %s could not run: %s", what, argv[0], exc.strerror)
