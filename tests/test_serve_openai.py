"""`koubou serve`'s OpenAI-compatible API: models, chat completions (durable, plain and streamed),
model names and errors as §11 says, through a real worker and the loopback fake."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import anyio
import httpx2 as httpx  # the HTTP client the openai package installs
import openai
import pytest
import yaml

from conftest import Workers, wait_ready, write_config
from fake_openai import FakeOpenAI
from koubou_spool.spool.files import Spool
from serve_client import running, serve_client

CHAT = {"model": "local", "messages": [{"role": "user", "content": "hello there"}]}


def test_models_lists_the_craftsmen_and_auto(home: Path) -> None:
    async def steps() -> tuple:
        async with serve_client(home) as client:
            return (await client.get("/v1/models")).json(), await client.get("/v1/models/nope")

    listed, missing = anyio.run(steps)
    assert [m["id"] for m in listed["data"]] == ["echo", "local", "auto"]
    assert listed["data"][1]["koubou"] == {"backend": "openai", "model": "fake-model",
                                           "local": True}
    assert missing.status_code == 404 and "echo, local, auto" in missing.json()["error"]["message"]


def test_a_completion_is_a_task_answered_when_a_worker_finishes_it(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    async def queue_then_answer() -> httpx.Response:
        async with serve_client(home) as client:
            request = asyncio.ensure_future(client.post(
                "/v1/chat/completions", json=CHAT | {"temperature": 0.5, "seed": 7}))
            while not spool.names("pending"):  # queued before any worker exists: durable
                await asyncio.sleep(0.01)
            workers.start(home)
            return await request

    answer = anyio.run(queue_then_answer)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    task_id = answer.headers["x-koubou-task-id"]
    assert body["object"] == "chat.completion" and body["id"] == f"chatcmpl-{task_id}"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "echo: hello there"}
    assert body["choices"][0]["finish_reason"] == "stop" and body["model"] == "fake-model"
    assert body["usage"]["total_tokens"] > 0
    outcome = spool.outcome(task_id)
    assert outcome["status"] == "completed" and outcome["created_by"] == "serve"
    assert outcome["body"]["seed"] == 7 and "model" not in outcome["body"]
    assert outcome["params"] == {"seed": 7}  # temperature has a task field of its own
    assert fake_openai.completions()[-1]["messages"] == CHAT["messages"]


def test_the_openai_client_plain_streamed_and_twenty_at_once(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers,
        tmp_path: Path) -> None:
    workers.start(home)
    wait_ready(spool)
    with running(home, tmp_path / "serve.log") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        plain = client.chat.completions.create(model="fake-model", messages=CHAT["messages"])
        assert plain.choices[0].message.content == "echo: hello there"
        stream = client.chat.completions.create(model="auto", messages=CHAT["messages"],
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "echo: hello there"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage.total_tokens > 0

        async def twenty() -> list:
            aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused",
                                         max_retries=0)
            return await asyncio.gather(*(aclient.chat.completions.create(
                model="local", messages=[{"role": "user", "content": f"number {i}"}])
                for i in range(20)))

        answers = asyncio.run(twenty())
        assert sorted(a.choices[0].message.content for a in answers) == sorted(
            f"echo: number {i}" for i in range(20))
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="gpt-9", messages=CHAT["messages"])
        assert "local" in str(missing.value) and "auto" in str(missing.value)


def test_unfinished_within_wait_s_is_504_naming_the_task_and_the_task_goes_on(
        home: Path, spool: Spool) -> None:
    async def steps() -> httpx.Response:
        async with serve_client(home, wait_s=0.2) as client:
            return await client.post("/v1/chat/completions", json=CHAT)

    answer = anyio.run(steps)
    task_id = answer.headers["x-koubou-task-id"]
    assert answer.status_code == 504 and task_id in answer.json()["error"]["message"]
    assert spool.find(task_id).state == "pending"


def test_the_same_idempotency_key_waits_for_the_same_task(home: Path, spool: Spool) -> None:
    async def steps() -> list[httpx.Response]:
        async with serve_client(home, wait_s=0.1) as client:
            return [await client.post("/v1/chat/completions", json=CHAT,
                                      headers={"idempotency-key": "k1"}) for _ in range(2)]

    first, second = anyio.run(steps)
    assert first.headers["x-koubou-task-id"] == second.headers["x-koubou-task-id"]
    assert len(spool.names("pending")) == 1


def test_bad_bodies_are_400_in_openais_error_shape(home: Path) -> None:
    async def steps() -> list[httpx.Response]:
        async with serve_client(home) as client:
            return [await client.post("/v1/chat/completions", content=b"{not json"),
                    await client.post("/v1/chat/completions", json={"model": "local"}),
                    await client.post("/v1/chat/completions", json=CHAT | {"n": 2}),
                    await client.post("/v1/chat/completions", json=CHAT | {"max_tokens": -1})]

    for answer in anyio.run(steps):
        assert answer.status_code == 400, answer.text
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}


@pytest.fixture
def cloud() -> FakeOpenAI:
    fake = FakeOpenAI(model="gpt-5").start()
    yield fake
    fake.stop()


def with_cloud(home: Path, local: FakeOpenAI, cloud: FakeOpenAI, **extra: object) -> None:
    write_config(home, local.base_url, **extra)
    path = home / "config" / "koubou.yaml"
    config = yaml.safe_load(path.read_text())
    config["craftsmen"]["cloud"] = {
        "backend": "openai", "base_url": cloud.base_url, "model": "gpt-5", "retries": 0,
        "api_key_env": "KOUBOU_TEST_CLOUD_KEY", "max_tokens": 1000,
        "price": {"input_per_mtok": 100.0, "output_per_mtok": 100.0}}
    path.write_text(yaml.safe_dump(config))


def test_confidential_naming_the_cloud_is_403_and_a_spent_budget_429(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, cloud: FakeOpenAI, workers: Workers,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOUBOU_TEST_CLOUD_KEY", "sk-test")
    with_cloud(home, fake_openai, cloud, budget={"daily_usd": 0.01, "when_exhausted": "fail"})
    workers.start(home)
    wait_ready(spool)
    secret = {"role": "user", "content": "the db password: hunter2, check it"}

    async def steps() -> list[httpx.Response]:
        async with serve_client(home) as client:
            return [await client.post("/v1/chat/completions",
                                      json={"model": "cloud", "messages": [secret]}),
                    await client.post("/v1/chat/completions",
                                      json={"model": "gpt-5", "messages": CHAT["messages"]}),
                    await client.post("/v1/chat/completions",
                                      json={"model": "auto", "messages": [secret]})]

    policy, budget, routed = anyio.run(steps)
    assert policy.status_code == 403, policy.text
    assert policy.json()["error"]["code"] == "policy"
    assert budget.status_code == 429, budget.text
    assert budget.json()["error"]["code"] == "budget"
    assert routed.status_code == 200 and routed.json()["model"] == "fake-model"
    assert "hunter2" not in json.dumps(cloud.requests)


def test_a_stream_keeps_alive_while_it_waits_and_ends_with_the_timeout_naming_the_task(
        home: Path, spool: Spool) -> None:
    async def steps() -> tuple:
        async with serve_client(home, wait_s=0.5, keepalive_s=0.1) as client:
            answer = await client.post("/v1/chat/completions", json=CHAT | {"stream": True})
            return answer, answer.text

    answer, text = anyio.run(steps)
    task_id = answer.headers["x-koubou-task-id"]
    assert answer.status_code == 200 and answer.headers["content-type"].startswith(
        "text/event-stream")
    assert text.count(": keep-alive") >= 3
    events = [json.loads(line[6:]) for line in text.splitlines()
              if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "timeout" and task_id in events[-1]["error"]["message"]
    assert text.rstrip().endswith("data: [DONE]")
    assert spool.find(task_id).state == "pending"


def test_a_named_craftsman_is_served_or_refused_never_swapped() -> None:
    from koubou_spool.craft.router import Route
    from koubou_spool.integrations import chat

    assert chat.refusal(Route("local", "rule 1"), "auto") is None
    assert chat.refusal(Route("local", "asked for"), "local") is None
    assert chat.refusal(Route("local", "rule", confidential=True), "cloud").kind == "policy"
    assert chat.refusal(Route("local", "budget exhausted, so local"), "cloud").kind == "budget"
    assert chat.refusal(Route(None, "cloud waits for the next period", "defer"),
                        "auto").kind == "budget"
    assert chat.refusal(Route(None, "no local craftsman", "policy"), "auto").kind == "policy"
