"""`koubou-mcp`: the spool as Model Context Protocol tools on stdio (README: MCP server for coding agents).

A coding agent delegates work to the craftsmen without leaving its session: it queues a task,
waits a bounded time (inotify, in a thread, well under the client's ~60 s tool timeout), and
comes back later with get_task_status / get_task_result for tasks still running.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


from ..errors import KoubouError
from ..service.workshop import Workshop
from ..spool import home as home_module

try:  # mcp 2 renamed FastMCP to MCPServer; the tool API is the same
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
except ImportError:  # pragma: no cover - mcp 1.x
    from mcp.server.fastmcp import FastMCP as MCPServer
    from mcp.server.fastmcp.exceptions import ToolError

log = logging.getLogger(__name__)

DEFAULT_WAIT_S = 20.0

INSTRUCTIONS = """\
koubou is a workshop of craftsmen: a local LLM and, if configured, cloud models and CLI agents.
Delegate self-contained work (reviews, drafts, summaries, boilerplate, analysis of text you
include) with delegate_task; keep work that needs your own tools or conversation. A task runs
on the craftsman its router picks. Poll slow tasks with get_task_status / get_task_result."""


# --- the MCP surface ---------------------------------------------------------------------

DELEGATE = """\
Queue a task for the workshop's craftsmen (LLMs) and wait up to wait_s seconds for its result.

Use it for self-contained work whose whole input you can put in `content` (or `files`): code
review, drafting docs or tests, summaries, refactoring suggestions, analysis. Returns the id and
state; when the task finished within wait_s, also its `result` (content, craftsman, model, usage)
or `error`. If it is still pending or in_progress, call get_task_result(id) later.

Fields: content (required, the prompt); id (optional, [A-Za-z0-9._-], not starting with a dot;
reusing an id queues nothing and reports the existing task, so retries are safe); type
(code_review, documentation, analysis, ...); priority 1-10 (10 first); difficulty
low|medium|high|auto (routing input); sensitivity: `confidential` means the content must never
leave local craftsmen (use it for secrets, credentials, private data or proprietary code),
`public` allows cloud craftsmen, `auto` (default) lets the router decide by scanning for
secrets; craftsman (a name, or auto); model; system (system prompt); context (object given to
the model); files (paths on this machine whose text is attached); max_tokens; params
(chat-completions body fields sent as they are, e.g. {"response_format": {"type":
"json_object"}, "seed": 7}; the result then has `json`); after (ids of tasks to run after;
{{ID}} in content or system is that task's result, {{ID.json.key}} a field of its JSON). A
repository task: repo (a path or URL under the config's repos.allowed), base (ref), branch
(default koubou/ID), verify (argv list run in the worktree; exit 0 passes), push (true/false);
its result's `repo` names the branch and commit, and files are then paths in the repository.
wait_s defaults to 20 and is capped at 50 (tool calls time out near 60 s); 0 returns at once."""

WORKFLOW = """\
Queue a workflow: named steps, each a task, run in the order their `after` lists give (steps in
parallel where nothing orders them), and wait up to wait_s seconds for them.

workflow is an object: {"id": "digest-42" (optional; step ids are <id>.<name>), "defaults":
{task fields every step starts from}, "steps": [{"name": "a", "content": "..."}, {"name":
"both", "after": ["a", "b"], "content": "Combine {{a}} and {{b}}"}]}. A step takes the fields
delegate_task takes (params, repo, ...); `after` names steps, and {{step}}, {{step.json.key}} or
{{step.diff}} in content or system is that step's result. All or nothing: an unknown step, a
cycle or a bad field queues no step. Queued again with the same id, it queues nothing new and
reports the steps as they are. Returns each step's state and the results of the steps nothing
runs after; poll unfinished ones with get_task_result(<id>.<name>). wait_s as delegate_task."""

REASONING_CHARS = 4000  # of a result's reasoning, in what a tool returns to the agent


@contextmanager
def _told() -> Iterator[None]:
    """KoubouError reaches the model as the tool's error text (the SDK hides other errors)."""
    try:
        yield
    except KoubouError as exc:
        raise ToolError(str(exc)) from None


def _for_agent(answer: dict[str, Any]) -> dict[str, Any]:
    """A tool's answer without the server's raw body, which repeats the result, and with the
    reasoning cut to a bound: the agent's context is the scarce thing."""
    result = answer.get("result")
    if isinstance(result, dict):
        result = {k: v for k, v in result.items() if k != "response"}
        if isinstance(result.get("reasoning"), str):
            result["reasoning"] = result["reasoning"][:REASONING_CHARS]
        answer = dict(answer, result=result)
    return answer


def build_server(workshop: Workshop) -> MCPServer:
    """The MCP server with the koubou tools bound to a home."""
    server = MCPServer("koubou", instructions=INSTRUCTIONS)
    _delegation_tools(server, workshop)
    _task_tools(server, workshop)
    _workshop_tools(server, workshop)
    return server


def _delegation_tools(server: MCPServer, workshop: Workshop) -> None:
    """The tools that hand work over: one task, or a workflow of them."""

    @server.tool(description=DELEGATE)
    async def delegate_task(content: str, id: str | None = None, type: str | None = None,
                            priority: int | None = None, difficulty: str | None = None,
                            sensitivity: str | None = None, craftsman: str | None = None,
                            model: str | None = None, system: str | None = None,
                            context: dict[str, Any] | None = None,
                            files: list[str] | None = None, max_tokens: int | None = None,
                            params: dict[str, Any] | None = None,
                            after: list[str] | None = None, repo: str | None = None,
                            base: str | None = None, branch: str | None = None,
                            verify: list[str] | None = None, push: bool | None = None,
                            wait_s: float = DEFAULT_WAIT_S) -> dict[str, Any]:
        fields = {"content": content, "id": id, "type": type, "priority": priority,
                  "difficulty": difficulty, "sensitivity": sensitivity, "craftsman": craftsman,
                  "model": model, "system": system, "context": context, "files": files,
                  "max_tokens": max_tokens, "params": params, "after": after, "repo": repo,
                  "base": base, "branch": branch, "verify": verify, "push": push,
                  "created_by": "mcp"}
        with _told():
            return _for_agent(await workshop.delegate(fields, wait_s))

    @server.tool(description=WORKFLOW)
    async def delegate_workflow(workflow: dict[str, Any],
                                wait_s: float = DEFAULT_WAIT_S) -> dict[str, Any]:
        with _told():
            answer = await workshop.delegate_workflow(workflow, wait_s, created_by="mcp")
        return dict(answer, results=[_for_agent(r) for r in answer["results"]])


def _task_tools(server: MCPServer, workshop: Workshop) -> None:
    """The tools about one task or the list of them."""

    @server.tool(description="A task's state (pending, in_progress, completed, failed), its "
                             "attempts so far, and its result or error when finished.")
    def get_task_status(task_id: str) -> dict[str, Any]:
        with _told():
            return workshop.status(task_id)

    @server.tool(description="The result of a finished task (content, craftsman, model, usage, "
                             "cost; finish_reason, json, reasoning, tool_calls when the server "
                             "gave them) or its error; for an unfinished task, its state. "
                             "Does not wait.")
    def get_task_result(task_id: str) -> dict[str, Any]:
        with _told():
            return _for_agent(workshop.result(task_id))

    @server.tool(description="Tasks newest first, optionally only one state (pending, "
                             "in_progress, completed, failed); limit defaults to 20.")
    def list_tasks(state: str | None = None, limit: int = 20) -> dict[str, Any]:
        with _told():
            return {"tasks": workshop.list(state, limit)}

    @server.tool(description="Cancel a pending or running task: it moves to failed/ with "
                             "error kind `cancelled`; a running request is aborted and its "
                             "result discarded. Finished tasks are left as they are.")
    def cancel_task(task_id: str) -> dict[str, Any]:
        with _told():
            return workshop.cancel(task_id)


def _workshop_tools(server: MCPServer, workshop: Workshop) -> None:
    """The tools about the workshop as a whole: its workers and its report."""

    @server.tool(description="Queue depths, the workers serving the spool (liveness, heartbeat "
                             "age, tasks in flight, done and failed), and today's spend vs budget. "
                             "Check it when a task stays pending: no live worker means nothing runs.")
    def get_worker_status() -> dict[str, Any]:
        with _told():
            return workshop.workers()

    @server.tool(description="Usage report: tasks by state/type/craftsman/model, queue wait and "
                             "run time (mean, p50, p95), tokens, cost and budget left. Period: "
                             "day YYYY-MM-DD, month YYYY-MM or since ISO time; default today.")
    def get_report(day: str | None = None, month: str | None = None,
                   since: str | None = None) -> dict[str, Any]:
        with _told():
            return workshop.report(day, month, since)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: serve MCP on stdio (stdout is the protocol; logs go to stderr)."""
    parser = argparse.ArgumentParser(prog="koubou-mcp", description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="The spool home (default: $KOUBOU_HOME, /var/koubou "
                                       "if writable, else ~/.local/share/koubou).")
    parser.add_argument("--config", help="Config file (default: HOME/config/koubou.yaml).")
    parser.add_argument("--log-level", default="warning",
                        choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    home = home_module.resolve(args.home)
    workshop = Workshop(home, home_module.config_path(home, args.config))
    build_server(workshop).run("stdio")


if __name__ == "__main__":
    main()
