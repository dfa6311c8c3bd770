"""Starts the tests' `koubou worker` processes by fork, from one interpreter that has imported
koubou, the openai SDK and psycopg already.

A worker started by `python -m koubou_spool.cli.koubou worker` spends 0.2 s of CPU starting, and
0.8-0.9 s more importing openai on its first openai task (652 pydantic models; bench/FINDINGS.md,
sixth look): over a quarter of the suite's CPU, on 2 cores. A child of this process is the same
worker, its code run from the same `main`, in a process of its own (signals, kill -9, its own
log), whose modules were imported once, before any thread, loop or file was opened.

    python tests/zygote.py        (run by conftest.Zygote, which talks to it on stdin/stdout)

Requests on stdin, one JSON line each: {"argv", "env", "cwd", "log"}; answered on stdout with
{"spawned": pid}. When a child ends, {"exited": pid, "returncode": rc} (minus the signal that
ended it, as subprocess has it). The zygote ends when its stdin closes.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys

# The path `python -m` gives a worker (its directory first), not tests/.
sys.path[0] = os.getcwd()

# What a worker imports, now, while this process has no thread: a fork copies it all.
import koubou_spool.cli.koubou as koubou_cli  # noqa: E402
import openai  # noqa: E402, F401  (imported on a worker's first openai task otherwise)

try:  # a bridge's (`koubou cluster`), and a worker's of a cluster home
    import psycopg  # noqa: F401
except ImportError:  # the cluster tests are skipped then (or fail, in CI)
    pass


def _child(request: dict, wakeup: tuple[int, int]) -> None:
    """In the forked child: become the worker the request describes, and exit as it does."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd in wakeup:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    sys.argv = ["koubou", *request["argv"]]
    code = 0
    try:
        koubou_cli.main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 (what an uncaught exception does to an interpreter)
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _say(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    wakeup = os.pipe()
    os.set_blocking(wakeup[1], False)
    signal.set_wakeup_fd(wakeup[1])
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that the wakeup fd is written
    pending = b""  # read unbuffered: select must see every request that is not handled yet
    while True:
        ready, _, _ = select.select([0, wakeup[0]], [], [])
        if wakeup[0] in ready:
            os.read(wakeup[0], 4096)
        while True:  # every child that ended, whichever woke us
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            _say({"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})
        if 0 in ready:
            chunk = os.read(0, 65536)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(request, wakeup)
                _say({"spawned": pid})


if __name__ == "__main__":
    main()
