"""The task file format (README: Tasks): ids, times, validation and outcome records. No I/O here."""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, UTC
from typing import Any

from ..errors import InvalidTask

# Not starting with a dot: an id names files and directories (pending/<id>.json,
# outputs/<id>/), so "." and ".." would name the directory itself or its parent, and a hidden
# name is skipped by every scan (a task that would never run).
ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
ID_RULE = "1-128 characters from A-Z a-z 0-9 . _ -, not starting with a dot"
DIFFICULTIES = ("low", "medium", "high", "auto")
SENSITIVITIES = ("public", "confidential", "auto")
ERROR_KINDS = ("invalid", "backend", "timeout", "budget", "policy", "cancelled", "expired",
               "dependency", "lost", "invalid_output", "verify")
BATCH_URL = "/v1/chat/completions"
# Body fields that stay koubou's: the prompt is built from the task, the model and token limit
# have fields of their own (and the limit's name is the craftsman's `token_limit_param`), and
# answers are read whole. A task's `params` naming one is refused; a Batch body's are taken
# as the task's fields (model is routing's).
RESERVED_PARAMS = ("messages", "model", "stream", "max_tokens", "max_completion_tokens")
# Params that are task fields too: given in `params`, they are checked and used as the field.
PARAM_FIELDS = ("temperature", "reasoning_effort")
MAX_INT = 2**53 - 1  # the largest integer every JSON reader (and the ledger) keeps exactly
MAX_DEPTH = 100  # nesting deeper than this is refused: no task needs it, and it costs recursion
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_id_lock = threading.Lock()
_last_id = [0, 0]  # [milliseconds, random part] of the last id made by this process


class UnreadableTask(InvalidTask):
    """Bytes that are not a JSON document at all; a file still being written looks like this."""


# --- ids and times -------------------------------------------------------------------------

def new_id() -> str:
    """A ULID: 26 characters, sortable by creation time, unique; monotonic within this process."""
    ms = time.time_ns() // 1_000_000
    with _id_lock:
        if ms <= _last_id[0]:
            ms, rand = _last_id[0], _last_id[1] + 1
        else:
            rand = int.from_bytes(os.urandom(10), "big")
        _last_id[0], _last_id[1] = ms, rand
    value = (ms << 80) | (rand & ((1 << 80) - 1))
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def iso(ts: float) -> str:
    """A Unix time as ISO-8601 in UTC with milliseconds and an explicit offset."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def parse_iso(text: str) -> float:
    """An ISO-8601 time as a Unix time; a time without an offset is taken as UTC."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# --- the task --------------------------------------------------------------------------------

@dataclass
class Task:
    """A validated task. `raw` is the object as submitted (plus its id), kept in the outcome."""

    raw: dict[str, Any]
    id: str
    content: str
    messages: list[dict[str, Any]] | None = None
    type: str = "general"
    priority: int = 5
    difficulty: str = "auto"
    sensitivity: str = "auto"
    craftsman: str = "auto"
    model: str | None = None
    system: str | None = None
    context: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float | None = None
    reasoning_effort: str | None = None
    timeout_s: float | None = None
    max_attempts: int | None = None
    attempts: int = 0
    after: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    not_before: float | None = None
    expires_at: float | None = None
    submitted_at: float | None = None
    fresh_id: bool = False  # the id was generated here: no other task can hold it
    repo: str | None = None  # a repository task (README: Repository tasks)
    base: str | None = None
    branch: str | None = None
    verify: list[str] = field(default_factory=list)
    push: bool | None = None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _fail(name: str, expected: str, value: Any) -> InvalidTask:
    shown = json.dumps(value, ensure_ascii=False)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return InvalidTask(f"{name}: expected {expected}, got {shown} ({_kind(value)})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _string(obj: dict, name: str, *, choices: tuple[str, ...] = (), pattern: re.Pattern | None = None,
            non_empty: bool = False) -> str | None:
    if name not in obj:
        return None
    value = obj[name]
    if choices:
        if value not in choices:
            raise _fail(name, "one of " + ", ".join(choices), value)
        return value
    if not isinstance(value, str) or (non_empty and not value):
        raise _fail(name, "a non-empty string" if non_empty else "a string", value)
    if pattern is not None and not pattern.fullmatch(value):
        raise _fail(name, ID_RULE, value)
    return value


def _int(obj: dict, name: str, low: int, high: int | None = None) -> int | None:
    if name not in obj:
        return None
    value = obj[name]
    if not _is_int(value) or value < low or value > (MAX_INT if high is None else high):
        span = f"from {low} to {high}" if high is not None else f"of at least {low} (below 2^53)"
        raise _fail(name, f"an integer {span}", value)
    return value


def _number(obj: dict, name: str, low: float, high: float | None = None) -> float | None:
    if name not in obj:
        return None
    value = obj[name]
    if not _is_number(value) or value < low or (high is not None and value > high) or (
            high is None and value <= low):
        span = f"from {low:g} to {high:g}" if high is not None else f"greater than {low:g}"
        raise _fail(name, f"a number {span}", value)
    return float(value)


def _object(obj: dict, name: str) -> dict:
    value = obj.get(name, {})
    if not isinstance(value, dict):
        raise _fail(name, "an object", value)
    return value


def _string_list(obj: dict, name: str, pattern: re.Pattern | None = None) -> list[str]:
    value = obj.get(name, [])
    expected = "a list of task ids" if pattern else "a list of strings"
    if not isinstance(value, list):
        raise _fail(name, expected, value)
    for index, item in enumerate(value):
        if not isinstance(item, str) or (pattern is not None and not pattern.fullmatch(item)):
            raise _fail(f"{name}[{index}]", "a task id" if pattern else "a string", item)
    return value


def _time(obj: dict, name: str) -> float | None:
    if name not in obj:
        return None
    value = obj[name]
    try:
        if not isinstance(value, str):
            raise TypeError(value)
        return parse_iso(value)
    except (TypeError, ValueError, OverflowError):
        raise _fail(name, "an ISO-8601 time such as 2026-11-21T04:47:06+00:00", value) from None


# --- params: what else reaches the backend ---------------------------------------------------

_RESERVED_WHY = {
    "messages": "the prompt is built from content, system, context and files",
    "model": "use the task's `model` field",
    "stream": "koubou reads whole answers",
    "max_tokens": "use the task's `max_tokens` field",
    "max_completion_tokens": "use the task's `max_tokens` field; the craftsman's "
                             "token_limit_param names it for its server",
}


def _params(fields: dict, where: str) -> dict[str, Any]:
    """The task's backend parameters, checked; temperature and reasoning_effort given there
    become the task's own fields (a task may not set one twice, differently)."""
    params = fields.get("params", {})
    if not isinstance(params, dict):
        raise _fail(where, "an object", params)
    params = dict(params)
    for key in RESERVED_PARAMS:
        if key in params:
            raise InvalidTask(f"{where}.{key}: reserved, koubou sets it ({_RESERVED_WHY[key]})")
    for name in PARAM_FIELDS:
        if name in params:
            value = params.pop(name)
            if name in fields and fields[name] != value:
                raise InvalidTask(f"{where}.{name}: the task sets {name} to another value; "
                                  "give it once")
            fields[name] = value
    if "n" in params and not (_is_int(params["n"]) and params["n"] == 1):
        raise _fail(f"{where}.n", "1 (a task has one answer)", params["n"])
    _check_response_format(params.get("response_format"), f"{where}.response_format")
    return params


def _check_response_format(value: Any, where: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise _fail(where, 'an object with a "type"', value)
    if value["type"] == "json_schema" and not (isinstance(value.get("json_schema"), dict) and
                                               isinstance(value["json_schema"].get("schema"),
                                                          dict)):
        raise _fail(f"{where}.json_schema", 'an object with a "schema" object',
                    value.get("json_schema"))
    schema = json_schema_of({"response_format": value})
    if schema is not None:
        import jsonschema  # only tasks with a schema pay for the import
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise InvalidTask(f"{where}: the schema is not a valid JSON Schema: "
                              f"{exc.message}") from None


def asks_for_json(params: dict[str, Any]) -> bool:
    """True when `response_format` asks the server for a JSON answer."""
    response_format = params.get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") in (
        "json_object", "json_schema")


def json_schema_of(params: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON Schema the answer must match: OpenAI's `json_schema.schema`, or llama.cpp's
    `schema` beside `type: json_object`; None when there is none."""
    response_format = params.get("response_format")
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema")
    schema = response_format.get("schema")
    return schema if response_format.get("type") == "json_object" and isinstance(schema, dict) \
        else None


# --- references: {{ID}}, {{ID.diff}}, {{ID.json.a.b}} --------------------------------------

REFERENCE_RE = re.compile(r"\{\{([A-Za-z0-9_-][A-Za-z0-9._-]*)\}\}")
_REFERENCE_ID_RE = re.compile(r"(.+?)(?:\.diff|\.json(?:\..*)?)?")
REFERENCED_FIELDS = ("content", "system")


@dataclass(frozen=True)
class Reference:
    """`{{ID}}` (the result's content), `{{ID.diff}}` (its patch) or `{{ID.json.a.b}}`."""

    text: str
    task_id: str
    part: str  # content, diff or json
    path: tuple[str, ...] = ()


def reference(inner: str, after: list[str]) -> Reference:
    """The reference `{{inner}}` of a task that runs after `after`; InvalidTask naming it when
    it names no task in `after` or no part of one."""
    text = "{{" + inner + "}}"
    for task_id in sorted(after, key=len, reverse=True):  # ids may hold dots: longest first
        if inner == task_id:
            return Reference(text, task_id, "content")
        if inner.startswith(task_id + "."):
            rest = inner[len(task_id) + 1:].split(".")
            if rest == ["diff"]:
                return Reference(text, task_id, "diff")
            if rest[0] == "json" and all(rest[1:]):
                return Reference(text, task_id, "json", tuple(rest[1:]))
            raise InvalidTask(f"{text}: a reference to {task_id} is {{{{{task_id}}}}}, "
                              f"{{{{{task_id}.diff}}}} or {{{{{task_id}.json.FIELD}}}}")
    named = _REFERENCE_ID_RE.fullmatch(inner).group(1)
    raise InvalidTask(f"{text}: {named} is not in after ({', '.join(after) or 'empty'}); a "
                      "task can only use the results of tasks it runs after")


def references(text: str, after: list[str]) -> list[Reference]:
    """Every reference in a text, checked against `after`."""
    return [reference(m.group(1), after) for m in REFERENCE_RE.finditer(text)]


def check_references(fields: dict[str, Any], after: list[str]) -> None:
    """At submit: the references in content and system of a task with `after` name its
    dependencies (a task without `after` has no references: its braces are its own)."""
    if not after or fields.get("messages") is not None:
        return
    for name in REFERENCED_FIELDS:
        if isinstance(fields.get(name), str):
            references(fields[name], after)


def fill_references(text: str, after: list[str], results: dict[str, dict[str, Any]],
                    diffs: dict[str, str | None]) -> str:
    """The text with each reference replaced by what it names in the dependencies' `results`
    (and patches, `diffs`); InvalidTask naming a reference whose field is not there."""
    def value(match: re.Match) -> str:
        ref = reference(match.group(1), after)
        result = results.get(ref.task_id) or {}
        if ref.part == "content":
            return str(result.get("content", ""))
        if ref.part == "diff":
            diff = diffs.get(ref.task_id)
            if diff is None:
                raise InvalidTask(f"{ref.text}: {ref.task_id} has no diff (only repository "
                                  "tasks make one)")
            return diff
        found = _json_field(ref, result)
        return found if isinstance(found, str) else json.dumps(found, ensure_ascii=False)
    return REFERENCE_RE.sub(value, text)


def _json_field(ref: Reference, result: dict[str, Any]) -> Any:
    """The field a `{{ID.json.a.b}}` reference names in a result's parsed JSON."""
    if "json" in result:
        found = result["json"]
    else:
        try:
            found = json.loads(result.get("content", ""))
        except (TypeError, ValueError):
            raise InvalidTask(f"{ref.text}: the result of {ref.task_id} is not JSON") from None
    for depth, key in enumerate(ref.path):
        if isinstance(found, dict) and key in found:
            found = found[key]
        elif isinstance(found, list) and key.isdigit() and int(key) < len(found):
            found = found[int(key)]
        else:
            where = ".".join(ref.path[:depth + 1])
            raise InvalidTask(f"{ref.text}: the JSON result of {ref.task_id} has no field "
                              f"{where}")
    return found


def is_batch_line(obj: dict) -> bool:
    """True for an OpenAI Batch API input line rather than a plain task."""
    return "custom_id" in obj and "body" in obj


def _messages_text(messages: list[dict[str, Any]]) -> str:
    parts = []
    for message in messages:
        body = message.get("content")
        if isinstance(body, list):  # content parts: keep the text ones
            body = "\n".join(p["text"] for p in body if isinstance(p.get("text"), str))
        if isinstance(body, str):
            parts.append(body)
    return "\n\n".join(parts)


def _check_messages(messages: Any) -> None:
    """Chat messages as the Batch API has them: {role, content} with text or content parts."""
    expected = "a non-empty list of {role, content} objects"
    if not isinstance(messages, list) or not messages:
        raise _fail("body.messages", expected, messages)
    for index, message in enumerate(messages):
        where = f"body.messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _fail(where, "a {role, content} object", message)
        body = message.get("content")
        if body is None or isinstance(body, str):
            continue
        if not isinstance(body, list):
            raise _fail(f"{where}.content", "a string or a list of content parts", body)
        for number, part in enumerate(body):
            if not isinstance(part, dict) or not isinstance(part.get("type", ""), str) or (
                    "text" in part and not isinstance(part["text"], str)):
                raise _fail(f"{where}.content[{number}]", "a content part such as "
                            '{"type": "text", "text": "..."}', part)


def _batch_fields(obj: dict) -> dict[str, Any]:
    """Check a Batch input line and give the task fields it stands for."""
    custom_id = obj["custom_id"]
    if not isinstance(custom_id, str) or not ID_RE.fullmatch(custom_id):
        raise _fail("custom_id", ID_RULE, custom_id)
    if obj.get("method", "POST") != "POST":
        raise _fail("method", '"POST"', obj.get("method"))
    if obj.get("url", BATCH_URL) != BATCH_URL:
        raise _fail("url", f'"{BATCH_URL}"', obj.get("url"))
    body = obj["body"]
    if not isinstance(body, dict):
        raise _fail("body", "an object", body)
    messages = body.get("messages")
    _check_messages(messages)
    content = _messages_text(messages)
    if not content.strip():
        raise _fail("body.messages", "at least one message with text content", messages)
    fields: dict[str, Any] = {"id": custom_id, "content": content, "messages": messages}
    for name in ("max_tokens", "max_completion_tokens", "temperature", "reasoning_effort"):
        if name in body:
            fields["max_tokens" if name == "max_completion_tokens" else name] = body[name]
    fields["params"] = {k: v for k, v in body.items()
                        if k not in RESERVED_PARAMS and k not in PARAM_FIELDS}
    return fields


def validate(obj: Any, default_id: str | None = None) -> Task:
    """Check a decoded task object against the task format (README: Tasks) and return the Task it describes.

    Raises InvalidTask naming the field, what was expected and what was found, and nothing
    else, whatever the object holds: every reader of a task file (workers, recovery,
    maintain) relies on that to refuse a file instead of crashing on it.
    """
    try:
        return _validate(obj, default_id)
    except InvalidTask:
        raise
    except (ArithmeticError, LookupError, RecursionError, TypeError, ValueError,
            AttributeError) as exc:  # a shape no check above foresaw: still only invalid
        raise InvalidTask(f"not a valid task: {exc}") from None


def _validate(obj: Any, default_id: str | None) -> Task:
    if not isinstance(obj, dict):
        raise _fail("task", "a JSON object", obj)
    fields = dict(obj)
    if is_batch_line(obj):
        fields.update(_batch_fields(obj))
    if "content" not in fields:
        raise InvalidTask("content: required field is missing (the prompt for the craftsman)")
    content = _string(fields, "content", non_empty=True)
    if not content.strip():
        raise _fail("content", "a non-empty string", content)
    _string(fields, "created_by")
    _object(fields, "metadata")
    given_id = _string(fields, "id", pattern=ID_RE) or default_id
    task_id = given_id or new_id()
    params = _params(fields, "body" if is_batch_line(obj) else "params")
    after = _string_list(fields, "after", ID_RE)
    check_references(fields, after)
    raw = dict(obj)
    raw["id"] = task_id
    return Task(
        raw=raw, id=task_id, content=content, messages=fields.get("messages"),
        type=_string(fields, "type", non_empty=True) or "general",
        priority=_int(fields, "priority", 1, 10) or 5,
        difficulty=_string(fields, "difficulty", choices=DIFFICULTIES) or "auto",
        sensitivity=_string(fields, "sensitivity", choices=SENSITIVITIES) or "auto",
        craftsman=_string(fields, "craftsman", non_empty=True) or "auto",
        model=_string(fields, "model", non_empty=True),
        system=_string(fields, "system"),
        context=_object(fields, "context"),
        files=_string_list(fields, "files"),
        max_tokens=_int(fields, "max_tokens", 1),
        temperature=_number(fields, "temperature", 0.0, 2.0),
        reasoning_effort=_string(fields, "reasoning_effort", non_empty=True),
        timeout_s=_number(fields, "timeout_s", 0.0),
        max_attempts=_int(fields, "max_attempts", 1),
        attempts=_int(fields, "attempts", 0) or 0,
        after=after, params=params,
        not_before=_time(fields, "not_before"),
        expires_at=_time(fields, "expires_at"),
        submitted_at=_time(fields, "submitted_at"),
        fresh_id=given_id is None,
        **_repository_fields(fields, task_id),
    )


def _repository_fields(fields: dict, task_id: str) -> dict[str, Any]:
    """repo, base, branch, verify and push of a repository task; {} for any other task."""
    repo = _string(fields, "repo", non_empty=True)
    if repo is None:
        for name in ("base", "branch", "verify", "push"):
            if fields.get(name) is not None:
                raise InvalidTask(f"{name}: only a repository task has one; add `repo`")
        return {}
    verify = fields.get("verify")
    if isinstance(verify, list) and not verify:
        raise _fail("verify", "an argv list with at least the command", verify)
    push = fields.get("push")
    if push is not None and not isinstance(push, bool):
        raise _fail("push", "true or false", push)
    branch = _string(fields, "branch", non_empty=True)
    # The branch it is delivered on by default, koubou/<id>: an id may hold what a git ref may
    # not (git check-ref-format: "..", a last "." or ".lock"), which the worker would refuse.
    if branch is None and (".." in task_id or task_id.endswith((".", ".lock"))):
        raise InvalidTask(f"id: {task_id!r} makes no git branch name (koubou/{task_id}, the "
                          "branch a repository task is delivered on); give it a `branch`, or "
                          "another id")
    return {"repo": repo, "base": _string(fields, "base", non_empty=True), "branch": branch,
            "verify": _string_list(fields, "verify") if verify is not None else [], "push": push}


def parse(data: bytes, default_id: str | None = None) -> Task:
    """Decode and validate the bytes of a task file."""
    return validate(decode(data), default_id)


def decode(data: bytes) -> Any:
    """The JSON document in a task file; UnreadableTask when there is none (yet), InvalidTask
    for a whole document that is not strict JSON (NaN, duplicate keys, lone surrogates, too
    deep)."""
    if not data.strip():
        raise UnreadableTask("the file is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableTask(f"not UTF-8 text (binary data at byte {exc.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise UnreadableTask(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") \
            from None
    except _NotStrictJSON as exc:
        raise InvalidTask(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidTask(f"not a valid task: nested too deeply (over {MAX_DEPTH} levels)") \
            from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise InvalidTask(f"not a valid task: {exc}") from None
    _check_strict(text, obj)
    return obj


class _NotStrictJSON(ValueError):
    """JSON that Python's parser accepts and RFC 8259 does not."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _NotStrictJSON(f"duplicate key {duplicate!r} (which one was meant?)")
    return obj


def _no_constant(name: str) -> Any:
    raise _NotStrictJSON(f"{name} is not a JSON number")


def _check_strict(text: str, obj: Any) -> None:
    """Refuse nesting past MAX_DEPTH and strings with lone surrogates (not Unicode: no outcome
    could be written as UTF-8). Cheap tests first: the hot path pays two counts and a search."""
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(obj) > MAX_DEPTH:
        raise InvalidTask(f"not a valid task: nested too deeply (over {MAX_DEPTH} levels)")
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidTask(f"not valid Unicode: a lone surrogate "
                              f"({exc.object[exc.start]!a}) in a string") from None


def _depth(obj: Any) -> int:
    """How deeply lists and objects nest (iterative: no recursion on hostile input)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((item, depth + 1) for item in value)
    return deepest


def check_id(value: Any, name: str = "id") -> str:
    """value when it is a task id; InvalidTask saying the rule otherwise (for ids from callers)."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise _fail(name, ID_RULE, value)
    return value


def id_from_name(name: str) -> str | None:
    """The task id a file name stands for (`<id>.json`), or None when the stem is not an id."""
    stem = name[:-5] if name.endswith(".json") else name
    return stem if ID_RE.fullmatch(stem) else None


def encode(obj: dict[str, Any]) -> bytes:
    """The bytes of a task or outcome file."""
    # One line: json.dumps with indent= runs the pure-Python encoder, 5-10x slower on the
    # hot path; jq or `koubou result --json` pretty-print it for people.
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


# --- outcomes --------------------------------------------------------------------------------

def completed_record(task: Task, result: dict[str, Any]) -> dict[str, Any]:
    """The completed outcome: every field of the task, `status` and `result`."""
    record = dict(task.raw)
    record["status"] = "completed"
    record["result"] = result
    record.pop("error", None)
    return record


def failed_record(task_raw: dict[str, Any], kind: str, message: str, attempts: int,
                  at: float) -> dict[str, Any]:
    """The failed outcome: every field of the task, `status` and `error`."""
    assert kind in ERROR_KINDS, kind
    record = dict(task_raw)
    record["status"] = "failed"
    record["error"] = {"kind": kind, "message": message, "attempts": attempts, "at": iso(at)}
    record.pop("result", None)
    return record
