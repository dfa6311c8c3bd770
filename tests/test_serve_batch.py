"""The durable Batch API of `koubou serve`, driven by the official openai client: files, batches,
statuses, request_counts, output and error files, cancel, expiry, pagination, and a resume line by
line after kill -9 of the server and of a worker."""

from __future__ import annotations

import io
import json
import sqlite3
import time
from collections import Counter
from pathlib import Path

import anyio
import openai
import pytest

from conftest import Workers, wait_ready, write_config
from fake_openai import FakeOpenAI
from koubou_spool.spool.files import Spool
from serve_client import Server, running, serve_client

FINAL = ("completed", "failed", "expired", "cancelled")


def batch_file(custom_ids: list[str], model: str = "local") -> bytes:
    lines = [{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": model, "messages": [{"role": "user", "content": f"say {cid}"}]}}
             for cid in custom_ids]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def client_of(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=2)


def wait_batch(client: openai.OpenAI, batch_id: str, timeout: float = 120,
               until: tuple[str, ...] = FINAL):  # noqa: ANN201 - openai's Batch
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until or time.monotonic() > deadline:
            return batch
        time.sleep(0.2)  # the client's own workflow: retrieve until done


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_the_openai_batch_workflow_joins_on_custom_id_with_an_error_file(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers,
        tmp_path: Path) -> None:
    ids = ["plain", "with space", "a/b/c", "../not-a-path", "ユニコード", "last one"]
    fake_openai.reject_next = 1  # one line is refused by the server: it lands in the error file
    workers.start(home, "--concurrency", "1")
    wait_ready(spool)
    with running(home, tmp_path / "serve.log") as server:
        client = client_of(server.url)
        uploaded = client.files.create(file=("in.jsonl", batch_file(ids)), purpose="batch")
        assert uploaded.purpose == "batch" and uploaded.bytes > 0
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h", metadata={"run": "t1"})
        assert batch.status == "validating" and batch.metadata == {"run": "t1"}
        done = wait_batch(client, batch.id)
        assert done.status == "completed", done
        assert (done.request_counts.total, done.request_counts.completed,
                done.request_counts.failed) == (6, 5, 1)
        output = jsonl(client.files.content(done.output_file_id).text)
        errors = jsonl(client.files.content(done.error_file_id).text)
        listed = client.batches.list(limit=10)
        assert [b.id for b in listed.data] == [batch.id]
        assert client.files.retrieve(uploaded.id).id == uploaded.id
        assert client.files.delete(uploaded.id).deleted
    assert len(output) == 5 and len(errors) == 1
    assert {line["custom_id"] for line in output + errors} == set(ids)
    for line in output:
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert body["choices"][0]["message"]["content"] == f"echo: say {line['custom_id']}"
    assert errors[0]["response"]["status_code"] == 502
    assert "maximum context length" in errors[0]["response"]["body"]["error"]["message"]


@pytest.mark.slow
def test_1000_lines_resume_after_kill_9_of_serve_and_of_a_worker(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers,
        tmp_path: Path) -> None:
    # kill -9 of processes loses nothing from the page cache: fsync is for machine crashes, and
    # without it the test does not queue behind the shared disk.
    write_config(home, fake_openai.base_url, spool={"fsync": False})
    fake_openai.latency_s = 0.005
    ids = [f"line {n}/{'x' * (n % 7)}" for n in range(1000)]
    worker = workers.start(home)
    wait_ready(spool)
    server = Server(home, tmp_path / "serve.log").wait_ready()
    try:
        client = client_of(server.url)
        uploaded = client.files.create(file=("big.jsonl", io.BytesIO(batch_file(ids))),
                                       purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id,
                                      endpoint="/v1/chat/completions", completion_window="24h")
        wait_until = time.monotonic() + 60
        while client.batches.retrieve(batch.id).request_counts.completed < 150:
            assert time.monotonic() < wait_until
            time.sleep(0.05)
        server.kill()  # kill -9 of koubou serve mid-batch
        worker.kill()  # and of the worker, with tasks in flight
        worker.wait(timeout=10)
        workers.start(home)
        server = Server(home, tmp_path / "serve.log").wait_ready()
        client = client_of(server.url)
        done = wait_batch(client, batch.id, timeout=400)
        assert done.status == "completed", done
        output = jsonl(client.files.content(done.output_file_id).text)
    finally:
        server.kill()
    assert done.request_counts.completed == 1000 and done.request_counts.failed == 0
    assert done.error_file_id is None
    assert [line["custom_id"] for line in output] == ids  # input order, joined on custom_id
    for line in output:
        assert line["response"]["body"]["choices"][0]["message"]["content"] == \
            f"echo: say {line['custom_id']}"
    assert len([n for n in spool.names("completed") if n.startswith("batch_")]) == 1000
    conn = sqlite3.connect(home / "db" / "koubou.db")
    finished = Counter(row[0] for row in conn.execute(
        "SELECT task_id FROM attempts WHERE outcome = 'completed' AND task_id LIKE 'batch_%'"))
    conn.close()
    assert len(finished) == 1000 and set(finished.values()) == {1}  # no line completed twice
    asked = Counter(m["messages"][0]["content"] for m in fake_openai.completions())
    assert len([c for c in asked if c.startswith("say line")]) == 1000


def test_a_cancelled_batch_keeps_its_finished_lines(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers,
        tmp_path: Path) -> None:
    fake_openai.latency_s = 0.1
    workers.start(home, "--concurrency", "1")
    wait_ready(spool)
    ids = [f"c{n}" for n in range(30)]
    with running(home, tmp_path / "serve.log") as server:
        client = client_of(server.url)
        uploaded = client.files.create(file=("c.jsonl", batch_file(ids)), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id,
                                      endpoint="/v1/chat/completions", completion_window="24h")
        while client.batches.retrieve(batch.id).request_counts.completed < 3:
            time.sleep(0.05)
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling"
        done = wait_batch(client, batch.id)
        output = jsonl(client.files.content(done.output_file_id).text)
        errors = jsonl(client.files.content(done.error_file_id).text)
    assert done.status == "cancelled" and done.cancelled_at >= done.cancelling_at
    assert len(output) >= 3 and len(output) + len(errors) == 30
    assert done.request_counts.completed == len(output)
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert {line["custom_id"] for line in output + errors} == set(ids)


def test_lines_not_run_within_the_window_fail_as_batch_expired(home: Path) -> None:
    async def steps() -> tuple:
        async with serve_client(home) as client:
            up = (await client.post("/v1/files", data={"purpose": "batch"},
                                    files={"file": ("e.jsonl", batch_file(["a", "b"]))})).json()
            batch = (await client.post("/v1/batches", json={
                "input_file_id": up["id"], "endpoint": "/v1/chat/completions",
                "completion_window": "1s"})).json()
            with anyio.fail_after(20):
                while batch["status"] not in FINAL:
                    await anyio.sleep(0.1)
                    batch = (await client.get(f"/v1/batches/{batch['id']}")).json()
            errors = (await client.get(f"/v1/files/{batch['error_file_id']}/content")).text
            return batch, jsonl(errors)

    batch, errors = anyio.run(steps)
    assert batch["status"] == "expired" and batch["expired_at"] and not batch["output_file_id"]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("a", "batch_expired"), ("b", "batch_expired")]
    assert batch["request_counts"] == {"total": 2, "completed": 0, "failed": 2}


@pytest.mark.parametrize("content, code", [
    (batch_file(["same", "same"]), "invalid_request"),
    (batch_file(["m"], model="no-such-model"), "model_not_found"),
    (b"not json\n", "invalid_request"),
    (b"", "empty_file"),
])
def test_an_invalid_input_file_fails_the_batch_naming_the_line(
        home: Path, spool: Spool, content: bytes, code: str) -> None:
    async def steps() -> dict:
        async with serve_client(home) as client:
            up = (await client.post("/v1/files", data={"purpose": "batch"},
                                    files={"file": ("bad.jsonl", content)})).json()
            batch = (await client.post("/v1/batches", json={"input_file_id": up["id"]})).json()
            with anyio.fail_after(20):
                while batch["status"] not in FINAL:
                    await anyio.sleep(0.05)
                    batch = (await client.get(f"/v1/batches/{batch['id']}")).json()
            return batch

    batch = anyio.run(steps)
    assert batch["status"] == "failed" and batch["failed_at"]
    assert batch["errors"]["data"][0]["code"] == code
    assert not spool.names("pending")  # nothing of a failed batch is queued


def test_batches_are_listed_newest_first_in_pages(home: Path) -> None:
    async def steps() -> tuple:
        async with serve_client(home) as client:
            up = (await client.post("/v1/files", data={"purpose": "batch"},
                                    files={"file": ("p.jsonl", batch_file(["p"]))})).json()
            made = [(await client.post("/v1/batches", json={"input_file_id": up["id"]})).json()
                    ["id"] for _ in range(5)]
            first = (await client.get("/v1/batches?limit=2")).json()
            second = (await client.get(f"/v1/batches?limit=2&after={first['last_id']}")).json()
            last = (await client.get(f"/v1/batches?limit=2&after={second['last_id']}")).json()
            bad = await client.post("/v1/batches", json={"input_file_id": "file-nope"})
            window = await client.post("/v1/batches", json={"input_file_id": up["id"],
                                                            "completion_window": "soon"})
            return made, first, second, last, bad, window

    made, first, second, last, bad, window = anyio.run(steps)
    newest = list(reversed(made))
    assert [b["id"] for b in first["data"]] == newest[:2] and first["has_more"]
    assert [b["id"] for b in second["data"]] == newest[2:4] and second["has_more"]
    assert [b["id"] for b in last["data"]] == newest[4:] and not last["has_more"]
    assert bad.status_code == 404 and window.status_code == 400


def test_a_file_upload_needs_purpose_batch(home: Path) -> None:
    write_config(home)

    async def steps() -> int:
        async with serve_client(home) as client:
            return (await client.post("/v1/files", data={"purpose": "fine-tune"},
                                      files={"file": ("x.jsonl", b"{}\n")})).status_code

    assert anyio.run(steps) == 400


def test_a_batch_killed_while_queueing_resumes_without_queueing_a_line_twice(
        home: Path, spool: Spool) -> None:
    from koubou_spool.integrations.batches import Batches, Files
    from koubou_spool.service.workshop import Workshop

    workshop = Workshop(home, home / "config" / "koubou.yaml")
    made = Files(home).create("r.jsonl", "batch", io.BytesIO(batch_file([f"r{n}" for n in
                                                                          range(10)])))
    batches = Batches(workshop)
    batch = batches.create(made["id"], "/v1/chat/completions", "24h", None)
    tasks = batches.validate(batch["id"])
    batches.queue(tasks[:4])  # the server died here: 4 lines queued, the batch still validating
    assert batches.stored(batch["id"])["status"] == "validating"

    async def steps() -> dict:
        async with serve_client(home) as client:  # starting again resumes it
            with anyio.fail_after(20):
                while True:
                    found = (await client.get(f"/v1/batches/{batch['id']}")).json()
                    if found["status"] == "in_progress":
                        return found
                    await anyio.sleep(0.05)

    found = anyio.run(steps)
    assert found["request_counts"] == {"total": 10, "completed": 0, "failed": 0}
    queued = sorted(n for n in spool.names("pending") if n.startswith(batch["id"]))
    assert queued == [f"{batch['id']}-{n:06d}.json" for n in range(1, 11)]


def test_a_file_over_the_line_limit_fails_the_batch(home: Path, spool: Spool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from koubou_spool.integrations import batches

    monkeypatch.setattr(batches, "MAX_LINES", 3)  # 50,000 in earnest: the same code path

    async def steps() -> dict:
        async with serve_client(home) as client:
            up = (await client.post("/v1/files", data={"purpose": "batch"}, files={
                "file": ("big.jsonl", batch_file([f"l{n}" for n in range(5)]))})).json()
            batch = (await client.post("/v1/batches", json={"input_file_id": up["id"]})).json()
            with anyio.fail_after(20):
                while batch["status"] not in FINAL:
                    await anyio.sleep(0.05)
                    batch = (await client.get(f"/v1/batches/{batch['id']}")).json()
            return batch

    batch = anyio.run(steps)
    assert batch["status"] == "failed"
    assert batch["errors"]["data"][0] == {"code": "too_many_lines", "line": 4, "param": None,
                                          "message": "a batch holds at most 3 requests"}
    assert not spool.names("pending")
