"""The OpenAI Batch API, durable: files and batches kept in the home, each line a task.

    HOME/files/<file id>/data, meta.json          uploaded input files and built output files
    HOME/batches/<batch id>/batch.json            the batch object (status, times), atomic writes
    HOME/batches/<batch id>/input.jsonl           the input as it was when the batch was made
    HOME/batches/<batch id>/lines.json            [task id, custom_id] per line, once validated

A line's task id is the batch id and the line number (`batch_…-000042`), and submitting an id
that exists queues nothing: so a runner that dies anywhere (kill -9 of `koubou serve`) and starts
again resubmits, waits and finalizes the same lines, and no line runs twice to completion.
`request_counts` are counted from the spool (the outcome files), never kept in memory alone.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from anyio import to_thread

from ..config import Config
from ..errors import InvalidTask, KoubouError, TaskNotFound, UsageError
from ..service import control
from ..service.workshop import Workshop
from ..spool import durable, task as task_format
from ..spool.task import BATCH_URL
from . import batch as batch_format, chat

log = logging.getLogger(__name__)

MAX_LINES = 50_000
FILE_ID_RE = re.compile(r"file-[A-Za-z0-9_-]{1,100}")
BATCH_ID_RE = re.compile(r"batch_[A-Za-z0-9]{1,64}")
WINDOW_RE = re.compile(r"([1-9][0-9]*)([smhd])")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
SUBMIT_CHUNK = 500
BATCH_ERRORS = {"expired": "batch_expired", "cancelled": "batch_cancelled"}


class NotFound(TaskNotFound):
    """A file or batch id that is not in the home (or is no id at all)."""


def window_seconds(window: Any) -> int:
    """`24h` as seconds; UsageError for anything else."""
    match = WINDOW_RE.fullmatch(window) if isinstance(window, str) else None
    if not match:
        raise UsageError(f"completion_window: expected a duration such as 24h, got {window!r}")
    return int(match[1]) * UNITS[match[2]]


def _write_json(path: Path, value: Any) -> None:
    """Replace a JSON file whole, durably: tmp, fsync, rename, fsync of the directory."""
    _write_bytes(path, json.dumps(value, ensure_ascii=False).encode())


def _write_bytes(path: Path, data: bytes) -> None:
    durable.write_atomic(path, data)


def _page(items: list[dict[str, Any]], limit: int, after: str | None) -> dict[str, Any]:
    """OpenAI's cursor page: the items after `after`, at most `limit`."""
    if after:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


# --- files ------------------------------------------------------------------------------------

class Files:
    """Uploaded and built files under HOME/files."""

    def __init__(self, home: Path) -> None:
        self.root = home / "files"

    def _dir(self, file_id: str) -> Path:
        if not isinstance(file_id, str) or not FILE_ID_RE.fullmatch(file_id):
            raise NotFound(f"no file {file_id!r}")
        return self.root / file_id

    def create(self, filename: str, purpose: str, source: BinaryIO, file_id: str | None = None,
               ) -> dict[str, Any]:
        """Store a file whole (tmp, then rename into place) and return its file object."""
        file_id = file_id or f"file-{task_format.new_id()}"
        directory = self._dir(file_id)
        self.root.mkdir(mode=0o750, exist_ok=True)
        staging = self.root / f".{file_id}.{os.getpid()}.new"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o750)
        with open(staging / "data", "wb") as out:
            shutil.copyfileobj(source, out, 1024 * 1024)
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        meta = {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed",
                "expires_at": None, "status_details": None}
        _write_json(staging / "meta.json", meta)
        shutil.rmtree(directory, ignore_errors=True)  # a rebuilt output file after a resume
        os.rename(staging, directory)
        durable.sync_dir(self.root)
        return meta

    def get(self, file_id: str) -> dict[str, Any]:
        """The file object; NotFound when there is none."""
        try:
            return json.loads((self._dir(file_id) / "meta.json").read_bytes())
        except FileNotFoundError:
            raise NotFound(f"no file {file_id!r}") from None

    def path(self, file_id: str) -> Path:
        """Where the file's bytes are."""
        self.get(file_id)
        return self._dir(file_id) / "data"

    def delete(self, file_id: str) -> dict[str, Any]:
        """Remove a file (batches keep their own copy of their input)."""
        self.get(file_id)
        doomed = self.root / f".{file_id}.{os.getpid()}.deleted"
        os.rename(self._dir(file_id), doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return {"id": file_id, "object": "file", "deleted": True}

    def list(self, purpose: str | None, limit: int, after: str | None) -> dict[str, Any]:
        """Files newest first."""
        found = []
        if self.root.is_dir():
            for entry in os.listdir(self.root):
                if FILE_ID_RE.fullmatch(entry):
                    try:
                        found.append(self.get(entry))
                    except NotFound:
                        continue
        found = [f for f in found if purpose is None or f.get("purpose") == purpose]
        found.sort(key=lambda f: (f["created_at"], f["id"]), reverse=True)
        return _page(found, limit, after)


# --- lines ------------------------------------------------------------------------------------

def line_task_id(batch_id: str, number: int) -> str:
    """The task id of a batch's line (1-based): stable, so a resubmission queues nothing."""
    return f"{batch_id}-{number:06d}"


def read_lines(data: Iterator[bytes], batch: dict[str, Any], config: Config,
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The tasks of a batch's input lines, or the errors that fail the batch (with line numbers)."""
    tasks, errors, seen = [], [], set()
    for number, raw in enumerate(data, 1):
        if not raw.strip():
            continue
        if len(tasks) + len(errors) >= MAX_LINES:
            errors.append(_line_error(number, "too_many_lines",
                                      f"a batch holds at most {MAX_LINES} requests"))
            break
        try:
            tasks.append(_line_task(raw, number, batch, config, seen))
        except KoubouError as exc:
            code = "model_not_found" if isinstance(exc, chat.ModelNotFound) else "invalid_request"
            errors.append(_line_error(number, code, str(exc)))
    if not tasks and not errors:
        errors.append(_line_error(None, "empty_file", "the input file has no requests"))
    return tasks, errors


def _line_error(line: int | None, code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line}


def _line_task(raw: bytes, number: int, batch: dict[str, Any], config: Config,
               seen: set[str]) -> dict[str, Any]:
    try:
        line = json.loads(raw)
    except ValueError as exc:
        raise InvalidTask(f"line {number} is not JSON: {exc}") from None
    if not isinstance(line, dict):
        raise InvalidTask(f"line {number}: expected a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidTask(f"line {number}: custom_id must be a non-empty string")
    if custom_id in seen:
        raise InvalidTask(f"line {number}: custom_id {custom_id!r} is used twice in the file")
    seen.add(custom_id)
    if line.get("method", "POST") != "POST" or line.get("url") != batch["endpoint"]:
        raise InvalidTask(f"line {number}: method must be POST and url {batch['endpoint']}")
    body = chat.check_body(line.get("body"))
    craftsman = chat.resolve_model(body.get("model", chat.AUTO), config)
    task_id = line_task_id(batch["id"], number)
    fields = chat.task_fields(body, task_id, craftsman, {
        "created_by": "serve-batch", "expires_at": task_format.iso(batch["expires_at"]),
        "metadata": {"batch_id": batch["id"], "custom_id": custom_id, "line": number}})
    task_format.validate(fields)  # a line that is no valid task fails the batch, now
    return fields


def output_files(lines: list[list[str]], outcomes: Callable[[str], dict | None],
                 unfinished: str = "batch_cancelled") -> tuple[list[dict], list[dict]]:
    """The output lines (successes) and error lines (failures) in input order, on custom_id."""
    output, errors = [], []
    for task_id, custom_id in lines:
        outcome = outcomes(task_id)
        line = batch_format.output_line(task_id, outcome)
        line["custom_id"] = custom_id
        if outcome is not None and outcome.get("status") == "completed":
            output.append(line)
            continue
        kind = ((outcome or {}).get("error") or {}).get("kind")
        if outcome is not None and kind not in BATCH_ERRORS:
            status, body = chat.error_of(outcome)
            line["response"] = {"status_code": status, "request_id": f"req_{task_id}",
                                "body": body}
        else:  # never run: the batch ended first
            line["error"]["code"] = BATCH_ERRORS.get(kind, unfinished)
        errors.append(line)
    return output, errors


# --- batches ----------------------------------------------------------------------------------

class Batches:
    """Batch objects in HOME/batches; every change of state is one atomic write."""

    def __init__(self, workshop: Workshop) -> None:
        self.workshop = workshop
        self.root = workshop.home / "batches"
        self.files = Files(workshop.home)
        self._lock = threading.Lock()  # the runner's threads and the views' read-modify-writes

    def _dir(self, batch_id: str) -> Path:
        if not isinstance(batch_id, str) or not BATCH_ID_RE.fullmatch(batch_id):
            raise NotFound(f"no batch {batch_id!r}")
        return self.root / batch_id

    def create(self, input_file_id: str, endpoint: str, window: str,
               metadata: dict[str, Any] | None) -> dict[str, Any]:
        """A new batch in `validating`, with its own copy of the input."""
        if endpoint != BATCH_URL:
            raise UsageError(f"endpoint: only {BATCH_URL} is served, not {endpoint!r}")
        seconds = window_seconds(window)
        if metadata is not None and not isinstance(metadata, dict):
            raise UsageError("metadata: expected an object of strings")
        source = self.files.path(input_file_id)
        now = int(time.time())
        batch_id = f"batch_{task_format.new_id()}"
        batch = {"id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None,
                 "input_file_id": input_file_id, "completion_window": window,
                 "status": "validating", "output_file_id": None, "error_file_id": None,
                 "created_at": now, "in_progress_at": None, "expires_at": now + seconds,
                 "finalizing_at": None, "completed_at": None, "failed_at": None,
                 "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0},
                 "metadata": metadata}
        self.root.mkdir(mode=0o750, exist_ok=True)
        staging = self.root / f".{batch_id}.new"
        staging.mkdir(mode=0o750)
        try:
            os.link(source, staging / "input.jsonl")
        except OSError:
            shutil.copyfile(source, staging / "input.jsonl")
        _write_json(staging / "batch.json", batch)
        os.rename(staging, self._dir(batch_id))
        durable.sync_dir(self.root)
        return batch

    def stored(self, batch_id: str) -> dict[str, Any]:
        """The batch object as last written."""
        try:
            return json.loads((self._dir(batch_id) / "batch.json").read_bytes())
        except FileNotFoundError:
            raise NotFound(f"no batch {batch_id!r}") from None

    def get(self, batch_id: str) -> dict[str, Any]:
        """The batch object with live request_counts while it runs."""
        batch = self.stored(batch_id)
        if batch["status"] in ACTIVE:
            batch["request_counts"] = self.counts(batch_id)
        return batch

    def update(self, batch_id: str, *, only_from: tuple[str, ...] = (),
               **changes: Any) -> dict[str, Any]:
        """Write new fields of a batch (one atomic replace); with `only_from`, only while its
        status is one of those (a cancel and the runner's next step must not undo each other).
        Returns the batch as it is now."""
        with self._lock:
            batch = self.stored(batch_id)
            if only_from and batch["status"] not in only_from:
                return batch
            batch |= changes
            _write_json(self._dir(batch_id) / "batch.json", batch)
            return batch

    def lines(self, batch_id: str) -> list[list[str]] | None:
        """[task id, custom_id] per request, once the batch was validated."""
        try:
            return json.loads((self._dir(batch_id) / "lines.json").read_bytes())
        except FileNotFoundError:
            return None

    def counts(self, batch_id: str) -> dict[str, int]:
        """request_counts from the outcome files in the spool."""
        lines = self.lines(batch_id) or []
        states = list(self.workshop.spool().outcome_states(f"{t}.json" for t, _ in lines).values())
        return {"total": len(lines), "completed": states.count("completed"),
                "failed": states.count("failed")}

    def list(self, limit: int, after: str | None) -> dict[str, Any]:
        """Batches newest first (ids are time-sortable)."""
        ids = sorted((e for e in os.listdir(self.root) if BATCH_ID_RE.fullmatch(e)),
                     reverse=True) if self.root.is_dir() else []
        if after in ids:
            ids = ids[ids.index(after) + 1:]
        elif after:
            ids = []
        page = [self.get(i) for i in ids[:limit + 1]]
        return _page(page, limit, None)

    def active(self) -> list[str]:
        """Ids of the batches not yet in a final state (to resume at start-up)."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in sorted(os.listdir(self.root)):
            if BATCH_ID_RE.fullmatch(entry):
                try:
                    if self.stored(entry)["status"] in ACTIVE:
                        found.append(entry)
                except (NotFound, ValueError):
                    continue
        return found

    def lock(self, batch_id: str) -> int | None:
        """The batch's runner lock (it dies with its holder); None when another process has it."""
        fd = os.open(self._dir(batch_id) / ".lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    # --- the steps of a batch, each safe to run again after a crash -----------------------

    def validate(self, batch_id: str) -> list[dict[str, Any]] | None:
        """Read the input: the tasks, with lines.json written; None when the batch failed."""
        batch = self.stored(batch_id)
        config = self.workshop.config()
        with open(self._dir(batch_id) / "input.jsonl", "rb") as data:
            tasks, errors = read_lines(data, batch, config)
        if errors:
            self.update(batch_id, status="failed", failed_at=int(time.time()),
                        errors={"object": "list", "data": errors[:100]})
            return None
        lines = [[t["custom_id"], t["metadata"]["custom_id"]] for t in tasks]
        _write_json(self._dir(batch_id) / "lines.json", lines)
        return tasks

    def queue(self, tasks: list[dict[str, Any]]) -> None:
        """Submit the lines' tasks; an id already in the spool (a resume) queues nothing."""
        for start in range(0, len(tasks), SUBMIT_CHUNK):
            self.workshop.submit_many(tasks[start:start + SUBMIT_CHUNK])

    def open_lines(self, batch_id: str) -> list[str]:
        """Task ids of the lines that have no outcome yet."""
        ids = [t for t, _ in self.lines(batch_id) or []]
        finished = self.workshop.spool().outcome_states(f"{t}.json" for t in ids)
        return [t for t in ids if f"{t}.json" not in finished]

    def stop_lines(self, task_ids: list[str], kind: str) -> list[str]:
        """Fail lines as cancelled (pending or running) or expired (only those not started);
        returns the ids that were never queued (a batch cancelled while it was validating)."""
        spool, ledger_path, unqueued = self.workshop.spool(), self.workshop.ledger_path, []
        for task_id in task_ids:
            try:
                control.cancel(spool, ledger_path, task_id, kind=kind,
                               running=kind == "cancelled")
            except control.NotCancelled:
                continue  # finished meanwhile, or running past the window: it may still finish
            except TaskNotFound:
                unqueued.append(task_id)
        return unqueued

    def finalize(self, batch_id: str) -> dict[str, Any]:
        """Build the output and error files from the outcomes, and end the batch."""
        batch = self.update(batch_id, only_from=("in_progress", "cancelling"),
                            status="finalizing", finalizing_at=int(time.time()))
        lines = self.lines(batch_id) or []
        output, errors = output_files(lines, self.workshop.spool().outcome)
        changes: dict[str, Any] = {"request_counts": self.counts(batch_id)}
        for lines_out, key, suffix in ((output, "output_file_id", "output"),
                                       (errors, "error_file_id", "errors")):
            if lines_out:
                changes[key] = self._write_output(batch_id, suffix, lines_out)["id"]
        now = int(time.time())
        if batch.get("cancelling_at"):
            changes.update(status="cancelled", cancelled_at=now)
        elif any((line.get("error") or {}).get("code") == "batch_expired" for line in errors):
            changes.update(status="expired", expired_at=now)
        else:
            changes.update(status="completed", completed_at=now)
        return self.update(batch_id, **changes)

    def _write_output(self, batch_id: str, suffix: str, lines: list[dict]) -> dict[str, Any]:
        tmp = self._dir(batch_id) / f".{suffix}.jsonl"
        with open(tmp, "wb") as out:
            for line in lines:
                out.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
        with open(tmp, "rb") as source:
            made = self.files.create(f"{batch_id}_{suffix}.jsonl", "batch_output", source,
                                     file_id=f"file-{batch_id}-{suffix}")
        tmp.unlink()
        return made


# --- the runner -------------------------------------------------------------------------------

class BatchRunner:
    """Drives every active batch of the home in the server's event loop, woken by spool events."""

    def __init__(self, batches: Batches, events: Any) -> None:
        self.batches = batches
        self.events = events
        self._wakes: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._ended: dict[str, set[str | None]] = {}  # outcomes seen per batch; None: overflow

    def start(self) -> None:
        """Resume the batches a previous server left unfinished, and listen for outcomes."""
        self.events.listen(self._on_event)
        for batch_id in self.batches.active():
            self.drive(batch_id)

    async def stop(self) -> None:
        """Stop driving (the batches resume at the next start)."""
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def drive(self, batch_id: str) -> None:
        """Run a batch to its end (idempotent: one driver per batch)."""
        if batch_id not in self._tasks or self._tasks[batch_id].done():
            self._wakes[batch_id] = asyncio.Event()
            self._tasks[batch_id] = asyncio.get_running_loop().create_task(self._run(batch_id))

    def poke(self, batch_id: str) -> None:
        """Wake a batch's driver (after a cancel)."""
        if batch_id in self._wakes:
            self._wakes[batch_id].set()

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Ask a batch to stop: `cancelling` now, `cancelled` once its lines have ended."""
        batch = self.batches.update(batch_id, only_from=("validating", "in_progress"),
                                    status="cancelling", cancelling_at=int(time.time()))
        if batch["status"] == "cancelling":
            self.drive(batch_id)
            self.poke(batch_id)
        return self.batches.get(batch_id)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["change"] == "overflow":
            for batch_id, wake in self._wakes.items():
                self._ended.setdefault(batch_id, set()).add(None)
                wake.set()
            return
        task_id = event.get("id") or ""
        if event["state"] in ("completed", "failed") and event["change"] == "added" \
                and task_id.startswith("batch_"):
            batch_id = task_id.rsplit("-", 1)[0]
            if batch_id in self._wakes:
                self._ended.setdefault(batch_id, set()).add(task_id)
                self._wakes[batch_id].set()

    async def _run(self, batch_id: str) -> None:
        lock = await to_thread.run_sync(self.batches.lock, batch_id)
        if lock is None:
            log.info("batch %s is driven by another process", batch_id)
            return
        try:
            await self._steps(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a broken batch must not stop the server
            log.exception("batch %s stopped; it resumes at the next start", batch_id)
        finally:
            os.close(lock)

    async def _steps(self, batch_id: str) -> None:
        run = to_thread.run_sync
        batch = await run(self.batches.stored, batch_id)
        if batch["status"] == "validating":
            tasks = await run(self.batches.validate, batch_id)
            if tasks is None:
                return
            if (await run(self.batches.stored, batch_id))["status"] == "validating":
                await run(self.batches.queue, tasks)
            batch = await run(lambda: self.batches.update(
                batch_id, only_from=("validating",), status="in_progress",
                in_progress_at=int(time.time())))
        if batch["status"] in ("in_progress", "cancelling"):
            await self._wait_lines(batch_id)
        await run(self.batches.finalize, batch_id)
        log.info("batch %s finished", batch_id)

    async def _wait_lines(self, batch_id: str) -> None:
        run, wake = to_thread.run_sync, self._wakes[batch_id]
        self._ended[batch_id] = set()
        waiting = set(await run(self.batches.open_lines, batch_id))
        while True:
            wake.clear()
            ended = self._ended[batch_id]
            if None in ended:  # events were lost: look at the directories again
                ended.clear()
                waiting = set(await run(self.batches.open_lines, batch_id))
            waiting -= ended
            ended.clear()
            batch = await run(self.batches.stored, batch_id)
            stop = "cancelled" if batch["status"] == "cancelling" else (
                "expired" if time.time() >= batch["expires_at"] else None)
            if stop and waiting:
                waiting -= set(await run(self.batches.stop_lines, sorted(waiting), stop))
                waiting &= set(await run(self.batches.open_lines, batch_id))
            if not waiting:
                return
            left = batch["expires_at"] - time.time()
            try:  # woken by an outcome of this batch, a cancel, or the end of the window
                await asyncio.wait_for(wake.wait(), left + 0.5 if left > 0 else 60)
            except TimeoutError:
                pass
