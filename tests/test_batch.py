"""OpenAI Batch compatibility: output lines, the progress line, and a 200-line round trip."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

from conftest import Workers
from fake_openai import FakeOpenAI
from koubou_spool.integrations import batch


def test_failed_outcome_becomes_a_batch_error_line() -> None:
    line = batch.output_line("req-1", {"id": "req-1", "status": "failed", "error": {
        "kind": "backend", "message": "HTTP 400: too long", "attempts": 1, "at": "x"}})
    assert line == {"id": "batch_req_req-1", "custom_id": "req-1", "response": None,
                    "error": {"code": "backend", "message": "HTTP 400: too long"}}


def test_progress_line_shows_counts_rate_and_eta() -> None:
    line = batch.progress_line(done=45, failed=5, total=200, elapsed=10.0, width=20)
    assert "50/200" in line and "45 done, 5 failed" in line
    assert "5.0/s" in line and "ETA 00:30" in line and line.startswith("[#####...")
    assert "ETA --:--" in batch.progress_line(0, 0, 10, 0.0)


def test_batch_of_200_round_trips_joined_on_custom_id(
        home: Path, fake_openai: FakeOpenAI, workers: Workers, tmp_path: Path) -> None:
    custom_ids = [f"req-{n:03d}" for n in range(200)]
    random.Random(7).shuffle(custom_ids)  # output follows input order, not id order
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({
        "custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "fake-model", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": f"question {cid}"}]}}) + "\n" for cid in custom_ids))
    out = tmp_path / "out.jsonl"
    workers.start(home)
    run = subprocess.run(
        ["koubou-submit", "--home", str(home), "--batch", str(source), "--wait",
         "--timeout", "120", "--output", str(out)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr
    assert "200/200 (200 done, 0 failed)" in run.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == custom_ids
    for line in lines:
        assert line["error"] is None and line["id"].startswith("batch_req_")
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"]
        body = response["body"]
        assert body["object"] == "chat.completion" and body["model"] == "fake-model"
        message = body["choices"][0]["message"]
        assert message == {"role": "assistant", "content": f"echo: question {line['custom_id']}"}
        assert body["usage"]["total_tokens"] == (body["usage"]["prompt_tokens"]
                                                 + body["usage"]["completion_tokens"])
    assert len(fake_openai.completions()) == 200


def test_output_needs_batch_and_wait(home: Path, tmp_path: Path) -> None:
    run = subprocess.run(["koubou-submit", "--home", str(home), "--output", str(tmp_path / "o"),
                          "hello"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 2 and "--batch FILE --wait" in run.stderr
