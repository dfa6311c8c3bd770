"""The task format (README: Tasks): validation messages, ids, Batch lines, outcomes."""

from __future__ import annotations

import json

import pytest

from koubou_spool.spool import task as task_format
from koubou_spool.errors import InvalidTask
from koubou_spool.spool.task import UnreadableTask


def test_only_content_is_required_and_defaults_are_filled() -> None:
    task = task_format.validate({"content": "review this"})
    assert (task.type, task.priority, task.difficulty, task.sensitivity, task.craftsman) == (
        "general", 5, "auto", "auto", "auto")
    assert task_format.ID_RE.fullmatch(task.id)
    assert task.raw["id"] == task.id


@pytest.mark.parametrize("obj, message", [
    ([1, 2], 'task: expected a JSON object, got [1, 2] (array)'),
    ({}, "content: required field is missing"),
    ({"content": 5}, "content: expected a non-empty string, got 5 (number)"),
    ({"content": ""}, 'content: expected a non-empty string, got "" (string)'),
    ({"content": "x", "priority": "high"},
     'priority: expected an integer from 1 to 10, got "high" (string)'),
    ({"content": "x", "priority": 11}, "priority: expected an integer from 1 to 10, got 11"),
    ({"content": "x", "priority": True}, "priority: expected an integer from 1 to 10, got true"),
    ({"content": "x", "id": "../etc/passwd"},
     'id: expected 1-128 characters from A-Z a-z 0-9 . _ -, not starting with a dot, '
     'got "../etc/passwd"'),
    ({"content": "x", "difficulty": "hard"}, "difficulty: expected one of low, medium, high"),
    ({"content": "x", "sensitivity": "secret"}, "sensitivity: expected one of public"),
    ({"content": "x", "context": "text"}, 'context: expected an object, got "text"'),
    ({"content": "x", "after": ["ok", "../x"]}, 'after[1]: expected a task id, got "../x"'),
    ({"content": "x", "not_before": "tomorrow"}, "not_before: expected an ISO-8601 time"),
    ({"content": "x", "temperature": 3}, "temperature: expected a number from 0 to 2"),
    ({"content": "x", "max_tokens": 0}, "max_tokens: expected an integer of at least 1"),
    ({"content": "x", "metadata": []}, "metadata: expected an object, got [] (array)"),
    ({"content": "x", "not_before": 1700000000}, "not_before: expected an ISO-8601 time"),
    ({"content": "x", "expires_at": None}, "expires_at: expected an ISO-8601 time"),
    ({"content": "x", "files": None}, "files: expected a list of strings, got null"),
    ({"content": "x", "after": "a"}, 'after: expected a list of task ids, got "a"'),
    ({"content": "x", "attempts": 10**20}, "attempts: expected an integer of at least 0"),
    ({"custom_id": "b", "body": {"messages": [{"role": "user", "content": [{"text": 5}]}]}},
     "body.messages[0].content[0]: expected a content part"),
    ({"custom_id": "b", "body": {"messages": [{"role": "user", "content": 5}]}},
     "body.messages[0].content: expected a string or a list of content parts"),
])
def test_invalid_tasks_name_field_expected_and_got(obj: object, message: str) -> None:
    with pytest.raises(InvalidTask) as caught:
        task_format.validate(obj)
    assert str(caught.value).startswith(message)


def test_unreadable_bytes_are_told_apart_from_invalid_tasks() -> None:
    for data, message in [(b"", "the file is empty"), (b"\xff\xfe\x00", "not UTF-8 text"),
                          (b'{"content": "hal', "not valid JSON")]:
        with pytest.raises(UnreadableTask, match=message):
            task_format.parse(data)
    with pytest.raises(InvalidTask) as caught:
        task_format.parse(b'{"priority": 3}')
    assert not isinstance(caught.value, UnreadableTask)


def test_ids_are_unique_and_sort_by_creation_time() -> None:
    ids = [task_format.new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 26 for i in ids)


def test_file_name_gives_the_id_when_the_task_has_none() -> None:
    assert task_format.validate({"content": "x"}, task_format.id_from_name("job-7.json")).id == "job-7"
    assert task_format.id_from_name("weird name.json") is None
    assert task_format.validate({"content": "x", "id": "mine"}, "other").id == "mine"


def test_openai_batch_input_line_is_a_task() -> None:
    line = {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "max_tokens": 50,
                     "messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Say hi"}]}}
    task = task_format.parse(json.dumps(line).encode())
    assert task.id == "req-1"
    assert task.messages == line["body"]["messages"]
    assert task.max_tokens == 50
    assert "Say hi" in task.content
    assert task.raw["custom_id"] == "req-1"


@pytest.mark.parametrize("change, message", [
    ({"url": "/v1/embeddings"}, "url: expected"),
    ({"custom_id": "a/b"}, "custom_id: expected"),
    ({"body": {"messages": []}}, "body.messages: expected a non-empty list"),
])
def test_bad_batch_lines_are_invalid(change: dict, message: str) -> None:
    line = {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}]}}
    line.update(change)
    with pytest.raises(InvalidTask, match=message):
        task_format.validate(line)


def test_outcomes_keep_every_task_field() -> None:
    task = task_format.validate({"content": "x", "type": "analysis", "metadata": {"k": 1},
                                 "created_by": "cron"})
    done = task_format.completed_record(task, {"content": "answer"})
    assert done["status"] == "completed" and done["result"] == {"content": "answer"}
    assert {k: done[k] for k in task.raw} == task.raw
    failed = task_format.failed_record(task.raw, "backend", "HTTP 500", 3, 0.0)
    assert failed["error"] == {"kind": "backend", "message": "HTTP 500", "attempts": 3,
                               "at": "1970-01-01T00:00:00.000+00:00"}


def test_times_are_utc_with_offset() -> None:
    assert task_format.iso(1_700_000_000.5) == "2023-11-14T22:13:20.500+00:00"
    assert task_format.parse_iso("2023-11-14T22:13:20.500+00:00") == 1_700_000_000.5
    assert task_format.parse_iso("2023-11-15T07:13:20.500+09:00") == 1_700_000_000.5


@pytest.mark.parametrize("data, message", [
    (b'{"content": "a", "content": "b"}', "duplicate key 'content'"),
    (b'{"content": "x", "temperature": NaN}', "NaN is not a JSON number"),
    (b'{"content": "x", "timeout_s": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"content": "\\udc00"}', "lone surrogate"),
    (b'{"content": "x", "c": ' + b"[" * 101 + b"]" * 101 + b"}", "nested too deeply"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"content": "x", "max_tokens": ' + b"9" * 5000 + b"}", "digits"),
])
def test_json_that_is_not_strict_is_invalid_not_a_crash(data: bytes, message: str) -> None:
    with pytest.raises(InvalidTask, match=message) as caught:
        task_format.parse(data)
    assert not isinstance(caught.value, UnreadableTask)  # whole documents: no wait for a writer


def test_escaped_surrogate_pairs_and_moderate_nesting_are_fine() -> None:
    task = task_format.parse(b'{"content": "\\ud83d\\ude00", "context": {"a": [[[1]]]}}')
    assert task.content == "\U0001f600"
