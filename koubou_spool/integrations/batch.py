"""OpenAI Batch API compatibility: outcome records as Batch output lines, and the progress line.

No I/O. An output line is `{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error"}`; `body` is the server's own response body when the craftsman spoke chat
completions (the outcome keeps it as `result.response`), else a chat.completion object built
from the outcome, so scripts written for the Batch API read koubou's results unchanged.
"""

from __future__ import annotations

from typing import Any

from ..spool.task import parse_iso


MESSAGE_FIELDS = ("tool_calls", "refusal")


def chat_completion(task_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """The chat.completion of a completed outcome's `result`: the server's body as it came,
    or one built from what the result kept (echo and CLI agents answer in other shapes)."""
    if isinstance(result.get("response"), dict):
        return result["response"]
    finished = result.get("finished_at")
    message: dict[str, Any] = {"role": "assistant", "content": result.get("content", "")}
    for name in MESSAGE_FIELDS:
        if result.get(name) is not None:
            message[name] = result[name]
    if result.get("reasoning") is not None:  # gpt-oss through LM Studio, Ollama, vLLM, llama.cpp
        message["reasoning_content"] = result["reasoning"]
    finish = result.get("finish_reason") or ("tool_calls" if message.get("tool_calls") else "stop")
    return {
        "id": f"chatcmpl-{task_id}", "object": "chat.completion",
        "created": int(parse_iso(finished)) if isinstance(finished, str) else 0,
        "model": result.get("model"),
        "choices": [{"index": 0, "finish_reason": finish, "message": message,
                     "logprobs": result.get("logprobs")}],
        "usage": result.get("usage") or {"prompt_tokens": 0, "completion_tokens": 0,
                                         "total_tokens": 0},
        "system_fingerprint": None,
    }


def output_line(task_id: str, outcome: dict[str, Any] | None) -> dict[str, Any]:
    """The Batch output line of one task: a response when it completed, else an error."""
    line: dict[str, Any] = {"id": f"batch_req_{task_id}", "custom_id": task_id,
                            "response": None, "error": None}
    if outcome is None:
        line["error"] = {"code": "not_finished", "message": "the task has not finished"}
    elif outcome.get("status") == "completed":
        line["response"] = {"status_code": 200, "request_id": f"req_{task_id}",
                            "body": chat_completion(task_id, outcome.get("result") or {})}
    else:
        error = outcome.get("error") or {}
        line["error"] = {"code": error.get("kind", "failed"),
                         "message": error.get("message", "the task failed")}
    return line


def output_lines(task_ids: list[str], outcomes: dict[str, dict[str, Any] | None]) -> list[dict]:
    """Output lines in input order, joined on custom_id (= the task id)."""
    return [output_line(task_id, outcomes.get(task_id)) for task_id in task_ids]


def _clock(value: float | None) -> str:
    if value is None:
        return "--:--"
    minutes, secs = divmod(int(round(value)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes:02d}:{secs:02d}"


def progress_line(done: int, failed: int, total: int, elapsed: float, width: int = 30) -> str:
    """`[#####.....]  12/200 done  1 failed  4.2/s  ETA 00:45` for a batch being waited on."""
    finished = done + failed
    filled = int(width * finished / total) if total else width
    rate = finished / elapsed if elapsed > 0 else 0.0
    eta = (total - finished) / rate if rate > 0 else None
    return (f"[{'#' * filled}{'.' * (width - filled)}] {finished}/{total} "
            f"({done} done, {failed} failed)  {rate:.1f}/s  ETA {_clock(eta if finished < total else 0)}")
