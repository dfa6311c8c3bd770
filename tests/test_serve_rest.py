"""`koubou serve`'s REST for the spool, /metrics, and the server-sent event stream /api/events."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx2 as httpx

from conftest import Workers, wait_ready
from fake_openai import FakeOpenAI
from koubou_spool.spool.files import Spool
from serve_client import running, serve_client


def test_submit_status_result_list_cancel_retry(home: Path, spool: Spool) -> None:
    async def steps() -> dict:
        async with serve_client(home) as client:
            seen = {"submit": await client.post("/api/tasks", json={
                "content": "review this", "id": "r1", "priority": 9, "type": "code_review"})}
            seen["again"] = await client.post("/api/tasks", json={"content": "x", "id": "r1"})
            seen["bad"] = await client.post("/api/tasks", json={"content": "x", "priority": "hi"})
            seen["status"] = await client.get("/api/tasks/r1")
            seen["result"] = await client.get("/api/tasks/r1/result")
            seen["list"] = await client.get("/api/tasks?state=pending&limit=5")
            seen["badstate"] = await client.get("/api/tasks?state=nowhere")
            seen["cancel"] = await client.post("/api/tasks/r1/cancel")
            seen["cancel2"] = await client.post("/api/tasks/r1/cancel")
            seen["retry"] = await client.post("/api/tasks/r1/retry")
            seen["retry2"] = await client.post("/api/tasks/r1/retry")
            seen["missing"] = await client.get("/api/tasks/nope")
            return seen

    seen = anyio.run(steps)
    assert seen["submit"].status_code == 201 and seen["submit"].json()["state"] == "pending"
    assert seen["again"].status_code == 200 and seen["again"].json()["new"] is False
    assert seen["bad"].status_code == 400 and "priority" in seen["bad"].json()["error"]["message"]
    status = seen["status"].json()
    assert status["state"] == "pending" and status["task"]["content"] == "review this"
    assert status["task"]["created_by"] == "serve"
    assert seen["result"].json()["state"] == "pending"
    assert [t["id"] for t in seen["list"].json()["tasks"]] == ["r1"]
    assert seen["badstate"].status_code == 400
    assert seen["cancel"].json()["cancelled"] is True
    assert seen["cancel2"].status_code == 409
    assert seen["retry"].json()["state"] == "pending"
    assert seen["retry2"].status_code == 400
    assert seen["missing"].status_code == 404
    assert spool.find("r1").state == "pending"


def test_a_submitted_task_with_wait_s_comes_back_done_and_reports_and_metrics_show_it(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    workers.start(home)
    wait_ready(spool)

    async def steps() -> dict:
        async with serve_client(home) as client:
            return {"done": await client.post("/api/tasks", json={"content": "hi", "wait_s": 30}),
                    "workers": await client.get("/api/workers"),
                    "report": await client.get("/api/report"),
                    "metrics": await client.get("/metrics")}

    seen = anyio.run(steps)
    done = seen["done"].json()
    assert done["state"] == "completed" and done["result"]["content"] == "echo: hi"
    assert seen["workers"].json()["workers"][0]["liveness"] == "alive"
    assert seen["report"].json()["tasks"]["by_state"]["completed"] >= 1
    assert seen["metrics"].headers["content-type"].startswith("text/plain")
    assert "koubou_" in seen["metrics"].text


def test_events_stream_a_task_submitted_from_the_command_line(
        home: Path, spool: Spool, tmp_path: Path) -> None:
    with running(home, tmp_path / "serve.log") as server:
        with httpx.stream("GET", server.url + "/api/events", timeout=10) as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            lines = events.iter_lines()
            assert next(lines).startswith("retry:")
            subprocess.run([sys.executable, "-m", "koubou_spool.cli.submit", "--home", str(home),
                            "--id", "from-cli", "hello"], check=True, timeout=30,
                           capture_output=True)
            sent = time.monotonic()
            for line in lines:
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    break
            took = time.monotonic() - sent
    assert event["id"] == "from-cli" and event["state"] == "pending"
    assert event["change"] == "added" and took < 1.0
