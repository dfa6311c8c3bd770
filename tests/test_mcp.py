"""`koubou-mcp` driven by the official SDK's stdio client, with a real worker behind it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from conftest import Workers, wait_ready
from fake_openai import FakeOpenAI
from koubou_spool.spool.files import Spool

TOOLS = {"delegate_task", "delegate_workflow", "get_task_status", "get_task_result",
         "list_tasks", "cancel_task", "get_worker_status", "get_report"}


def answer(result: Any) -> Any:
    """The JSON a tool returned (its text content)."""
    assert not getattr(result, "is_error", getattr(result, "isError", False)), result
    return json.loads(result.content[0].text)


async def session_run(home: Path, steps: Any) -> Any:
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "koubou_spool.integrations.mcp", "--home", str(home)])
    with anyio.fail_after(90):  # the client reaps the server process when the block exits
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await steps(session)


def test_tools_are_listed_with_descriptions_for_a_model(home: Path) -> None:
    async def steps(session: ClientSession) -> Any:
        return (await session.list_tools()).tools

    tools = {tool.name: tool for tool in anyio.run(session_run, home, steps)}
    assert set(tools) == TOOLS
    delegate = tools["delegate_task"]
    assert "confidential" in delegate.description and "wait_s" in delegate.description
    schema = (getattr(delegate, "input_schema", None) or delegate.inputSchema)
    assert {"content", "id", "sensitivity", "wait_s"} <= set(schema["properties"])


def test_pending_task_is_cancelled_then_a_delegated_task_completes(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    async def before_worker(session: ClientSession) -> Any:
        queued = answer(await session.call_tool(
            "delegate_task", {"content": "never runs", "id": "to-cancel", "wait_s": 0}))
        cancelled = answer(await session.call_tool("cancel_task", {"task_id": "to-cancel"}))
        again = answer(await session.call_tool("cancel_task", {"task_id": "to-cancel"}))
        result = answer(await session.call_tool("get_task_result", {"task_id": "to-cancel"}))
        missing = await session.call_tool("get_task_status", {"task_id": "nope"})
        return queued, cancelled, again, result, missing

    queued, cancelled, again, result, missing = anyio.run(session_run, home, before_worker)
    assert queued["id"] == "to-cancel" and queued["state"] == "pending"
    assert cancelled["cancelled"] is True and cancelled["error"]["kind"] == "cancelled"
    assert again["cancelled"] is False and "is failed; nothing to cancel" in again["message"]
    assert result["state"] == "failed" and result["error"]["kind"] == "cancelled"
    assert getattr(missing, "is_error", getattr(missing, "isError", False))
    assert "koubou list" in missing.content[0].text
    assert spool.outcome("to-cancel")["error"]["kind"] == "cancelled"
    assert not list(spool.pending.iterdir()) and not list(spool.in_progress.iterdir())

    workers.start(home)
    wait_ready(spool)

    async def with_worker(session: ClientSession) -> Any:
        done = answer(await session.call_tool(
            "delegate_task", {"content": "summarise the diff", "id": "via-mcp",
                              "type": "analysis", "sensitivity": "confidential"}))
        chained = answer(await session.call_tool(
            "delegate_task", {"content": "review: {{via-mcp}}", "after": ["via-mcp"],
                              "params": {"seed": 7, "x_vendor": True}, "sensitivity": "confidential"}))
        status = answer(await session.call_tool("get_task_status", {"task_id": "via-mcp"}))
        listed = answer(await session.call_tool("list_tasks", {"state": "completed"}))
        workers_now = answer(await session.call_tool("get_worker_status", {}))
        report = answer(await session.call_tool("get_report", {}))
        return done, chained, status, listed, workers_now, report

    done, chained, status, listed, workers_now, report = anyio.run(session_run, home, with_worker)
    assert done["state"] == "completed", done
    assert done["result"]["content"] == "echo: summarise the diff"
    assert done["result"]["craftsman"] == "local"
    assert done["result"]["finish_reason"] == "stop" and "response" not in done["result"]
    assert chained["result"]["content"] == "echo: review: echo: summarise the diff"
    sent = fake_openai.completions()[-1]
    assert sent["seed"] == 7 and sent["x_vendor"] is True
    assert status["state"] == "completed" and status["attempts"][0]["outcome"] == "completed"
    assert "via-mcp" in {t["id"] for t in listed["tasks"]}
    assert [w["liveness"] for w in workers_now["workers"]] == ["alive"]
    assert report["tasks"]["by_state"]["failed"] == 1  # the cancelled one
    assert report["tasks"]["by_state"]["completed"] >= 3
    assert report["failures_by_kind"] == {"cancelled": 1}


WORKFLOW = {"id": "digest", "defaults": {"sensitivity": "confidential"}, "steps": [
    {"name": "plan", "content": "plan it", "params": {"response_format": {"type": "json_object"}}},
    {"name": "a", "after": ["plan"], "content": "a {{plan.json.topic}}"},
    {"name": "b", "after": ["plan"], "content": "b {{plan.json.topic}}"},
    {"name": "both", "after": ["a", "b"], "content": "combine {{a}} and {{b}}"}]}


def test_a_workflow_as_json_runs_once_and_results_carry_json_and_cut_reasoning(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    from koubou_spool.integrations.mcp import REASONING_CHARS
    workers.start(home)
    wait_ready(spool)
    fake_openai.answer_next(content='{"topic": "caches"}',
                            message={"reasoning_content": "think " * REASONING_CHARS})
    cycle = {"id": "loop", "steps": [{"name": "x", "after": ["y"], "content": "x"},
                                     {"name": "y", "after": ["x"], "content": "y"}]}

    async def steps(session: ClientSession) -> Any:
        first = answer(await session.call_tool("delegate_workflow", {"workflow": WORKFLOW}))
        again = answer(await session.call_tool("delegate_workflow",
                                               {"workflow": WORKFLOW, "wait_s": 0}))
        plan = answer(await session.call_tool("get_task_result", {"task_id": "digest.plan"}))
        refused = await session.call_tool("delegate_workflow", {"workflow": cycle})
        return first, again, plan, refused

    first, again, plan, refused = anyio.run(session_run, home, steps)
    assert first["id"] == "digest" and first["new"] == 4
    assert [(s["name"], s["id"], s["state"]) for s in first["steps"]] == [
        ("plan", "digest.plan", "completed"), ("a", "digest.a", "completed"),
        ("b", "digest.b", "completed"), ("both", "digest.both", "completed")]
    [both] = first["results"]
    assert both["id"] == "digest.both" and "response" not in both["result"]
    assert both["result"]["content"] == "echo: combine echo: a caches and echo: b caches"
    assert again["new"] == 0 and {s["state"] for s in again["steps"]} == {"completed"}
    result = plan["result"]
    assert result["finish_reason"] == "stop" and result["json"] == {"topic": "caches"}
    assert result["reasoning"] == ("think " * REASONING_CHARS)[:REASONING_CHARS]
    assert "response" not in result
    assert getattr(refused, "is_error", getattr(refused, "isError", False))
    assert "cycle" in refused.content[0].text
    assert spool.outcome("loop.x") is None and not list(spool.pending.iterdir())
    assert len(fake_openai.completions()) == 4  # the second submission ran nothing
    assert spool.outcome("digest.a")["created_by"] == "mcp"


def test_delegate_and_cancel_leave_no_descriptor_open(home: Path) -> None:
    # Each call leaked one directory descriptor: EMFILE after about a thousand. Counting the
    # open descriptors shows it in a few hundred calls (fsync makes each call ~20 ms).
    from koubou_spool.integrations.mcp import Workshop
    workshop = Workshop(home, home / "config" / "koubou.yaml")

    async def calls() -> None:
        for i in range(300):
            await workshop.delegate({"content": f"task {i}", "id": f"t{i}"}, wait_s=0)
            if i % 10 == 0:
                workshop.cancel(f"t{i}")

    before = len(os.listdir("/proc/self/fd"))
    anyio.run(calls)
    assert len(os.listdir("/proc/self/fd")) - before < 10
