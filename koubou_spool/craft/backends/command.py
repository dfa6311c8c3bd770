"""CLI agents as craftsmen (`claude -p`, `codex exec`): an argv list, never a shell.

The prompt goes on stdin, or into the argv where `{prompt}` stands. Stdin is the better way: an
argv is world-readable in /proc/PID/cmdline while the agent runs, so a confidential prompt is
never put there (the attempt fails as `policy`). A `{prompt}` argument is passed after `--`
(added when the argv has none before it), so a prompt such as `--help` is never an option; a
value from the task (`{model}`) that starts with `-` is refused for the same reason. Each task
runs in its own working directory, in its own process group, so a timeout kills the agent and
everything it started. Output is capped; a non-zero exit fails the attempt with the tail of
stderr.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
from pathlib import Path
from typing import Any

from ...config import Craftsman
from ...errors import ConfigError
from ...spool import permissions
from . import BackendError, Reply, Request, sandbox, usage

STDERR_TAIL = 2000
_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
AGENT_UMASK = permissions.CHILD_UMASK  # what an agent writes: group-readable, never others'
# What claude -p's JSON says about the run besides the answer, kept in the result: the session
# to resume (`claude -r`), how many turns it took, how it ended.
CLAUDE_DETAILS = ("session_id", "num_turns", "duration_ms", "subtype")


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """The chat messages as one prompt for a command-line agent."""
    parts = []
    for message in messages:
        content = message.get("content", "")
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        parts.append(f"[system]\n{text}" if message.get("role") == "system" else text)
    return "\n\n".join(parts)


class CommandBackend:
    """Runs the craftsman's argv once per attempt."""

    def __init__(self, craftsman: Craftsman) -> None:
        self.craftsman = craftsman
        self.template = _operands_after_dashes(craftsman)
        self.prompt_in_argv = any("{prompt}" in arg for arg in self.template)

    def _argv(self, request: Request) -> tuple[list[str], bytes | None]:
        if self.prompt_in_argv and request.confidential:
            raise BackendError(f"confidential prompt refused: craftsman {self.craftsman.name} "
                               "puts {prompt} in its argv, which every user of this machine "
                               "can read; configure it to read the prompt on stdin",
                               kind="policy")
        if request.model.startswith("-") and any("{model}" in a for a in self.template):
            raise BackendError(f"model {request.model!r} starts with '-': it would be an "
                               f"option of {self.template[0]}", kind="invalid")
        prompt = prompt_text(request.messages)
        argv = [arg.replace("{prompt}", prompt).replace("{model}", request.model)
                for arg in self.template]
        return argv, None if self.prompt_in_argv else prompt.encode()

    async def complete(self, request: Request) -> Reply:
        """Run the agent and read its answer in the configured output format."""
        argv, stdin = self._argv(request)
        workdir = Path(request.workdir) if request.workdir else None
        if workdir is not None:
            permissions.make_dir(workdir, permissions.OWNER_DIR, parents=True)
        if self.craftsman.sandbox == "bwrap":
            argv = sandbox.bwrap_argv(argv, str(workdir or Path.cwd()), request.writable,
                                      self.craftsman.sandbox_binds, read_only=request.read_only)
        try:
            # The agent's files in outputs/ are the group's to read and nobody else's, whatever
            # the worker's umask: the child gets its own (set after fork, not process-wide).
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, cwd=workdir, start_new_session=True,
                env={**os.environ, **request.env} if request.env else None,
                preexec_fn=_die_with_parent, umask=AGENT_UMASK)
        except OSError as exc:
            raise BackendError(f"cannot run {argv[0]}: {exc.strerror}") from None
        try:
            out, err = await asyncio.wait_for(self._communicate(proc, stdin), request.timeout_s)
        except TimeoutError:
            await _kill_group(proc)
            raise BackendError(f"{argv[0]} did not finish within {request.timeout_s:g} s; "
                               "its process group was killed", kind="timeout",
                               retryable=True) from None
        except BaseException:
            await _kill_group(proc)
            raise
        if proc.returncode != 0:
            tail = err[-STDERR_TAIL:].decode("utf-8", "replace").strip()
            raise BackendError(f"{argv[0]} exited with status {proc.returncode}: {tail}")
        return parse_output(self.craftsman.output, out.decode("utf-8", "replace"), request.model)

    async def _communicate(self, proc: asyncio.subprocess.Process,
                           stdin: bytes | None) -> tuple[bytes, bytes]:
        if stdin is not None:
            proc.stdin.write(stdin)
        proc.stdin.close()
        limit = self.craftsman.max_output_bytes
        # stderr is drained to its end whatever its size (only its tail is kept), and stdout is
        # judged on its own: a reader that stops at the cap while the other waits for EOF
        # leaves the agent blocked on a full pipe until the timeout, a retryable failure.
        err_task = asyncio.ensure_future(_read_tail(proc.stderr, STDERR_TAIL * 4))
        try:
            out = await _read_capped(proc.stdout, limit)
            if len(out) > limit:
                await _kill_group(proc)
                raise BackendError(
                    f"{self.craftsman.argv[0]} wrote more than max_output_bytes ({limit}); it "
                    f"was stopped and the task is not retried (raise craftsmen."
                    f"{self.craftsman.name}.max_output_bytes if answers are this long)")
            err = await err_task
        finally:
            err_task.cancel()
        await proc.wait()
        return out, err

    async def close(self) -> None:
        """Nothing to release."""


def _operands_after_dashes(craftsman: Craftsman) -> tuple[str, ...]:
    """The argv with `--` before a `{prompt}` argument, unless one is there already.

    Options after `{prompt}` would be taken as operands once `--` is in front of it, so that
    argv is refused with the fix rather than run wrong.
    """
    argv = craftsman.argv
    if "{prompt}" not in argv:
        return argv
    at = argv.index("{prompt}")
    if "--" in argv[:at]:
        return argv
    if any(arg.startswith("-") for arg in argv[at + 1:]):
        raise ConfigError(f"craftsmen.{craftsman.name}.argv: options after {{prompt}}; put "
                          "{prompt} last (koubou passes it after `--`), or leave it out to "
                          "give the prompt on stdin")
    return (*argv[:at], "--", *argv[at:])


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the worker dies, however it dies (PR_SET_PDEATHSIG),
    so an orphaned agent does not go on editing, spending or pushing."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


async def _read_capped(stream: asyncio.StreamReader, limit: int) -> bytes:
    chunks, size = [], 0
    while size <= limit:
        chunk = await stream.read(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


async def _read_tail(stream: asyncio.StreamReader, keep: int) -> bytes:
    """Read a stream to its end, keeping only its last `keep` bytes."""
    tail = bytearray()
    while chunk := await stream.read(65536):
        tail += chunk
        del tail[:-keep]
    return bytes(tail)


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the agent's whole process group, SIGKILL what is left after 2 s."""
    for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(proc.wait(), grace)
            os.killpg(proc.pid, signal.SIGKILL)  # children may outlive their leader
            return
        except ProcessLookupError:
            return
        except TimeoutError:
            continue


def parse_output(kind: str, text: str, model: str) -> Reply:
    """The agent's answer, tokens and cost from its stdout."""
    if kind == "claude-json":
        return _claude(text, model)
    if kind == "codex-jsonl":
        return _codex(text, model)
    return Reply(content=text, model=model, usage=usage(0, 0))


def _claude(text: str, model: str) -> Reply:
    """`claude -p --output-format json`: one object with result, is_error, usage, cost."""
    try:
        data = json.loads(text)
    except ValueError:
        raise BackendError(f"claude output is not JSON: {text[:200]!r}") from None
    if not isinstance(data, dict):
        raise BackendError("claude output is not a JSON object")
    if data.get("is_error"):
        raise BackendError(f"claude reported an error: {str(data.get('result'))[:500]}")
    used = data.get("usage") or {}
    prompt = sum(int(used.get(k) or 0) for k in (
        "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
    reply = Reply(content=str(data.get("result", "")), model=model,
                  usage=usage(prompt, int(used.get("output_tokens") or 0)),
                  details={k: data[k] for k in CLAUDE_DETAILS if data.get(k) is not None})
    if data.get("total_cost_usd") is not None:
        reply.cost_usd = float(data["total_cost_usd"])
    return reply


def _codex(text: str, model: str) -> Reply:
    """`codex exec --json`: JSONL events; the last agent message is the answer."""
    message, prompt, cached, output, details = None, 0, 0, 0, {}
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "thread.started" and event.get("thread_id"):
            details["session_id"] = event["thread_id"]  # `codex exec resume` takes it
        elif kind == "item.completed":
            item = event.get("item") or {}
            if (item.get("type") or item.get("item_type")) in ("agent_message",
                                                                "assistant_message"):
                message = item.get("text", "")
        elif kind == "turn.completed":
            used = event.get("usage") or {}
            prompt += int(used.get("input_tokens") or 0)
            cached += int(used.get("cached_input_tokens") or 0)
            output += int(used.get("output_tokens") or 0)
        elif kind in ("turn.failed", "error"):
            error = event.get("error") or event
            raise BackendError(f"codex reported an error: {str(error.get('message'))[:500]}")
    if message is None:
        raise BackendError("codex output had no agent message")
    counted = usage(prompt, output)
    counted["cached_tokens"] = cached
    return Reply(content=message, model=model, usage=counted, details=details)
