"""What reaches the backend and what comes back: params verbatim, the answer's own fields, JSON
answers checked, odd finish reasons retried, Batch bodies as the server sent them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conftest import Workers, submit, wait_outcomes, wait_ready, write_config
from fake_openai import FakeOpenAI
from koubou_spool.cli.koubou import cli
from koubou_spool.craft.backends import BackendError, Reply
from koubou_spool.craft.backends.command import parse_output
from koubou_spool.errors import InvalidTask
from koubou_spool.integrations import batch as batch_format
from koubou_spool.spool import task as task_format
from koubou_spool.spool.files import Spool
from koubou_spool.work.kinds import parse_json_answer, reply_fields

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
JSON_SCHEMA = {"type": "json_schema",
               "json_schema": {"name": "answer", "strict": True, "schema": SCHEMA}}


def run_one(spool: Spool, **fields: Any) -> dict[str, Any]:
    """Queue one task and wait for its outcome."""
    return _outcome(spool, submit(spool, **fields))


def _outcome(spool: Spool, task_id: str) -> dict[str, Any]:
    return wait_outcomes(spool, [task_id])[task_id]


@pytest.fixture
def worker(home: Path, spool: Spool, workers: Workers) -> Workers:
    workers.start(home)
    wait_ready(spool)
    return workers


# --- the task format ------------------------------------------------------------------------

def test_params_are_kept_and_koubous_keys_refused() -> None:
    params = {"seed": 7, "stop": ["END"], "tools": [{"type": "function"}], "n": 1,
              "x_vendor": {"anything": [1, 2]}, "response_format": JSON_SCHEMA}
    task = task_format.validate({"content": "hi", "params": params})
    assert task.params == params
    for key in ("messages", "model", "stream", "max_tokens", "max_completion_tokens"):
        with pytest.raises(InvalidTask, match=rf"params\.{key}: reserved"):
            task_format.validate({"content": "hi", "params": {key: 1}})
    with pytest.raises(InvalidTask, match=r"params\.n: expected 1"):
        task_format.validate({"content": "hi", "params": {"n": 2}})
    with pytest.raises(InvalidTask, match="params: expected an object"):
        task_format.validate({"content": "hi", "params": [1]})
    bad_schema = {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}
    with pytest.raises(InvalidTask, match="not a valid JSON Schema"):
        task_format.validate({"content": "hi", "params": {"response_format": bad_schema}})


def test_params_temperature_is_the_tasks_temperature() -> None:
    task = task_format.validate({"content": "hi", "params": {"temperature": 0.3, "top_p": 0.9}})
    assert task.temperature == 0.3 and task.params == {"top_p": 0.9}
    with pytest.raises(InvalidTask, match="temperature"):
        task_format.validate({"content": "hi", "temperature": 1, "params": {"temperature": 0.3}})
    with pytest.raises(InvalidTask, match="temperature"):
        task_format.validate({"content": "hi", "params": {"temperature": 9}})


def test_a_batch_body_beyond_messages_becomes_params() -> None:
    line = {"custom_id": "b1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                     "max_tokens": 9, "stream": False, "temperature": 0.1, "seed": 3,
                     "response_format": {"type": "json_object"}, "x_new": True}}
    task = task_format.validate(line)
    assert task.params == {"seed": 3, "response_format": {"type": "json_object"}, "x_new": True}
    assert task.max_tokens == 9 and task.temperature == 0.1
    line["body"]["n"] = 3
    with pytest.raises(InvalidTask, match=r"body\.n: expected 1"):
        task_format.validate(line)


# --- what the reply becomes ---------------------------------------------------------------------

def test_reply_fields_keep_what_the_server_said() -> None:
    reply = Reply("", "m", finish_reason="length", reasoning="thought",
                  tool_calls=[{"id": "c1"}], refusal=None, details={"session_id": "s"})
    assert reply_fields(reply) == {"content": "", "finish_reason": "length",
                                   "reasoning": "thought", "tool_calls": [{"id": "c1"}],
                                   "truncated": True, "session_id": "s"}
    assert reply_fields(Reply("ok", "m")) == {"content": "ok"}


def test_json_answers_parse_and_match_their_schema() -> None:
    assert parse_json_answer(Reply('{"a": 1}', "m"), SCHEMA) == {"a": 1}
    assert parse_json_answer(Reply("[1]", "m"), None) == [1]
    with pytest.raises(BackendError, match=r"at \$\.a: 'x' is not of type 'integer'") as exc:
        parse_json_answer(Reply('{"a": "x"}', "m"), SCHEMA)
    assert exc.value.kind == "invalid_output" and exc.value.retryable
    with pytest.raises(BackendError, match="cut off at max_tokens") as exc:
        parse_json_answer(Reply('{"a": ', "m", finish_reason="length"), SCHEMA)
    assert exc.value.kind == "invalid_output"


def test_claude_json_keeps_session_turns_cost_and_usage() -> None:
    out = json.dumps({"type": "result", "subtype": "success", "is_error": False, "result": "ok",
                      "session_id": "5f1c", "num_turns": 4, "duration_ms": 900,
                      "total_cost_usd": 0.02, "usage": {"input_tokens": 3, "output_tokens": 2}})
    reply = parse_output("claude-json", out, "claude-sonnet")
    assert reply.details == {"session_id": "5f1c", "num_turns": 4, "duration_ms": 900,
                             "subtype": "success"}
    assert reply.cost_usd == 0.02 and reply.usage["total_tokens"] == 5
    codex = "\n".join(json.dumps(e) for e in (
        {"type": "thread.started", "thread_id": "th-1"},
        {"type": "item.completed", "item": {"type": "agent_message", "text": "done"}}))
    assert parse_output("codex-jsonl", codex, "gpt-5-codex").details == {"session_id": "th-1"}


# --- through a worker and the fake server ------------------------------------------------------

def test_params_reach_the_server_verbatim(spool: Spool, fake_openai: FakeOpenAI,
                                          worker: Workers) -> None:
    params = {"response_format": {"type": "json_object"}, "stop": ["END"], "seed": 42,
              "top_p": 0.5, "logprobs": True, "top_logprobs": 2, "presence_penalty": 0.1,
              "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
              "tool_choice": "auto", "parallel_tool_calls": False,
              "x_unknown": {"nested": [1, "two", None]}}
    fake_openai.answer_next(content='{"ok": true}')
    outcome = run_one(spool, content="go", params=params, temperature=0.2, max_tokens=20)
    body = fake_openai.completions()[-1]
    assert {k: body[k] for k in params} == params
    assert body["model"] == "fake-model" and body["max_tokens"] == 20
    assert body["temperature"] == 0.2 and body["messages"] == [{"role": "user", "content": "go"}]
    result = outcome["result"]
    assert result["json"] == {"ok": True} and result["finish_reason"] == "stop"
    assert result["response"] == fake_openai.responses[-1]


@pytest.mark.parametrize("name", ["reasoning", "reasoning_content"])
def test_reasoning_comes_back_by_either_name(spool: Spool, fake_openai: FakeOpenAI,
                                             worker: Workers, name: str) -> None:
    fake_openai.answer_next(content="42", message={name: "six times seven"})
    result = run_one(spool, content="the answer?")["result"]
    assert result["content"] == "42" and result["reasoning"] == "six times seven"


def test_tool_calls_refusals_and_cut_answers_are_kept(spool: Spool, fake_openai: FakeOpenAI,
                                                      worker: Workers) -> None:
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "lookup", "arguments": "{\"q\": \"x\"}"}}]
    fake_openai.answer_next(content=None, finish_reason="tool_calls", message={"tool_calls": calls})
    result = run_one(spool, content="use a tool")["result"]
    assert result["tool_calls"] == calls and result["finish_reason"] == "tool_calls"
    assert result["content"] == "" and "truncated" not in result
    fake_openai.answer_next(content=None, message={"refusal": "I can't help with that."})
    assert run_one(spool, content="no")["result"]["refusal"] == "I can't help with that."
    fake_openai.answer_next(content="half an ans", finish_reason="length")
    outcome = run_one(spool, content="long")
    assert outcome["status"] == "completed"
    assert outcome["result"]["truncated"] is True and outcome["result"]["finish_reason"] == "length"


@pytest.mark.parametrize("reason", ["abort", "error", None])
def test_a_finish_reason_outside_openais_is_retried(spool: Spool, fake_openai: FakeOpenAI,
                                                    worker: Workers, reason: str | None) -> None:
    fake_openai.answer_next(content="partial", finish_reason=reason)
    outcome = run_one(spool, content="try", max_attempts=2)
    assert outcome["status"] == "completed" and outcome["result"]["attempts"] == 2
    fake_openai.answer_next(content="partial", finish_reason=reason)
    failed = run_one(spool, content="once", max_attempts=1)
    assert failed["error"]["kind"] == "backend" and repr(reason) in failed["error"]["message"]


def test_an_answer_off_the_schema_is_retried_with_the_reason(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, worker: Workers) -> None:
    fake_openai.answer_next(content='{"a": "one"}')
    fake_openai.answer_next(content='{"a": 1}')
    task_id = submit(spool, content="give a", params={"response_format": JSON_SCHEMA})
    outcome = _outcome(spool, task_id)
    assert outcome["status"] == "completed", outcome.get("error")
    assert outcome["result"]["json"] == {"a": 1} and outcome["result"]["attempts"] == 2
    second = fake_openai.completions()[-1]["messages"]
    assert second[0] == {"role": "user", "content": "give a"}
    assert "attempt 1" in second[-1]["content"]
    assert "'one' is not of type 'integer'" in second[-1]["content"]
    assert not (home / "outputs" / task_id).exists()  # the feedback went with the success


def test_json_that_never_fits_fails_as_invalid_output(spool: Spool, fake_openai: FakeOpenAI,
                                                      worker: Workers) -> None:
    fake_openai.answer = {"content": "not json at all"}
    outcome = run_one(spool, content="json please", max_attempts=2,
                      params={"response_format": JSON_SCHEMA})
    assert outcome["error"]["kind"] == "invalid_output" and outcome["error"]["attempts"] == 2
    assert "not the JSON response_format asked for" in outcome["error"]["message"]
    assert len(fake_openai.completions()) == 2


def test_batch_output_carries_the_servers_body(spool: Spool, fake_openai: FakeOpenAI,
                                               worker: Workers) -> None:
    fake_openai.answer = {"message": {"reasoning": "r"}, "body": {"system_fingerprint": "fp_1"}}
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "any", "messages": [{"role": "user", "content": f"item {i}"}],
                       "seed": i}} for i in range(3)]
    tasks = [task_format.validate(line) for line in lines]
    spool.submit(tasks)
    ids = [t.id for t in tasks]
    outcomes = wait_outcomes(spool, ids)
    sent = {r["choices"][0]["message"]["content"]: r for r in fake_openai.responses}
    for line in batch_format.output_lines(ids, outcomes):
        body = line["response"]["body"]
        assert body == sent[body["choices"][0]["message"]["content"]]
        assert body["system_fingerprint"] == "fp_1"
    seeds = sorted(r["seed"] for r in fake_openai.completions() if "seed" in r)
    assert seeds == [0, 1, 2]


def test_report_counts_truncated_and_invalid_outputs_per_craftsman(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    write_config(home, fake_openai.base_url, spool={"max_attempts": 2})
    workers.start(home)
    wait_ready(spool)
    fake_openai.answer_next(content="cut", finish_reason="length")
    run_one(spool, content="one")
    fake_openai.answer_next(content="{}")
    fake_openai.answer_next(content='{"a": 2}')
    run_one(spool, content="two", params={"response_format": JSON_SCHEMA})
    workers.terminate_all()
    shown = CliRunner().invoke(cli, ["report", "--json", "--home", str(home)])
    assert shown.exit_code == 0, shown.output
    answers = {a["craftsman"]: a for a in json.loads(shown.output)["answers"]}
    assert answers["local"] == {"craftsman": "local", "completed": 2, "truncated": 1,
                                "invalid_output": 1}
    text = CliRunner().invoke(cli, ["report", "--home", str(home)]).output
    assert "invalid outputs" in text
