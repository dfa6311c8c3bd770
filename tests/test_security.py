"""What a hostile file or caller cannot do: hidden or `..` ids, reads outside the home."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import Workers, read_json, wait_file, wait_ready
from koubou_spool.errors import InvalidTask, KoubouError, TaskNotFound
from koubou_spool.integrations.mcp import Workshop
from koubou_spool.spool import task as task_format
from koubou_spool.spool.files import Spool


@pytest.mark.parametrize("bad", [".", "..", ".hidden", "../x", "a/b", ""])
def test_an_id_may_not_start_with_a_dot_nor_name_another_directory(bad: str) -> None:
    with pytest.raises(InvalidTask, match="not starting with a dot"):
        task_format.validate({"content": "x", "id": bad})
    with pytest.raises(InvalidTask, match=r"after\[0\]: expected a task id"):
        task_format.validate({"content": "x", "after": [bad]})
    with pytest.raises(InvalidTask, match="custom_id"):
        task_format.validate({"custom_id": bad, "body": {"messages": [
            {"role": "user", "content": "x"}]}})
    assert task_format.id_from_name(f"{bad}.json") is None


def test_a_dropped_file_with_a_dot_dot_id_is_rejected_not_run_in_the_home(
        home: Path, spool: Spool, workers: Workers) -> None:
    # The agent would write into its working directory: outputs/<id>/, the home itself for "..".
    config = yaml.safe_load((home / "config" / "koubou.yaml").read_text())
    config["craftsmen"]["agent"] = {"backend": "command", "argv": [
        sys.executable, "-c", "open('pwned', 'w').write('x')"]}
    (home / "config" / "koubou.yaml").write_text(yaml.safe_dump(config))
    workers.start(home)
    wait_ready(spool)
    for name, task_id in (("dots.json", ".."), ("hidden.json", ".hidden")):
        (spool.pending / name).write_text(json.dumps(
            {"id": task_id, "content": "x", "craftsman": "agent"}))
        wait_file(spool.failed, name + ".error.json")
        error = read_json(spool.failed / (name + ".error.json"))["error"]
        assert error["kind"] == "invalid" and "not starting with a dot" in error["message"]
    assert not (home / "pwned").exists() and not (home / "outputs" / "pwned").exists()


def test_mcp_tools_never_read_outside_the_home(home: Path, tmp_path: Path) -> None:
    # tasks/completed/../../../outside.json is tmp_path/outside.json, beside the home
    (tmp_path / "outside.json").write_text(json.dumps(
        {"id": "x", "status": "completed", "result": {"content": "SECRET"}}))
    workshop = Workshop(home, home / "config" / "koubou.yaml")
    for call in (workshop.status, workshop.result, workshop.cancel):
        with pytest.raises(KoubouError) as caught:
            call("../../../outside")
        assert "SECRET" not in str(caught.value)
        assert isinstance(caught.value, InvalidTask), call


@pytest.mark.parametrize("key", ["../../../outside", "../../../outside.json", ".", ".."])
def test_the_spool_finds_only_ids_and_names_inside_its_directories(
        spool: Spool, tmp_path: Path, key: str) -> None:
    (tmp_path / "outside.json").write_text(json.dumps({"id": "x", "status": "completed"}))
    with pytest.raises(TaskNotFound):
        spool.find(key)
    with pytest.raises(TaskNotFound):
        spool.outcome(key)


def _swap_after_check(monkeypatch: pytest.MonkeyPatch, checked: Path, swap: object) -> None:
    """Run `swap` right after the attachment's path is resolved and checked: the race window."""
    real_resolve = Path.resolve

    def resolve(self: Path, strict: bool = False) -> Path:
        resolved = real_resolve(self, strict)
        if resolved == checked:
            swap()
        return resolved

    monkeypatch.setattr(Path, "resolve", resolve)


@pytest.mark.parametrize("swapped", ["file", "directory"])
def test_an_attachment_swapped_for_a_link_after_its_check_is_not_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swapped: str) -> None:
    from koubou_spool.craft.attach import read_attachments
    allowed, outside = tmp_path / "repo", tmp_path / "private"
    (allowed / "src").mkdir(parents=True)
    outside.mkdir()
    (outside / "notes.txt").write_text("OPENAI_API_KEY=sk-secret")  # as /proc/self/environ
    attached = allowed / "src" / "notes.txt"
    attached.write_text("harmless")
    if swapped == "file":
        def swap() -> None:
            attached.unlink()
            attached.symlink_to(outside / "notes.txt")
    else:
        def swap() -> None:
            attached.unlink()
            (allowed / "src").rmdir()
            (allowed / "src").symlink_to(outside)
    _swap_after_check(monkeypatch, attached, swap)
    with pytest.raises(InvalidTask, match="files: cannot read"):
        read_attachments([str(attached)], {"allowed_dirs": [str(allowed)]})


def test_an_attachment_is_judged_by_what_was_opened(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Checked as a regular file, then replaced by a FIFO: the opened descriptor is what counts.
    import os
    from koubou_spool.craft.attach import read_attachments
    allowed = tmp_path / "repo"
    allowed.mkdir()
    attached = allowed / "a.txt"
    attached.write_text("text")
    _swap_after_check(monkeypatch, attached, lambda: (attached.unlink(), os.mkfifo(attached)))
    with pytest.raises(InvalidTask, match="not a regular file"):
        read_attachments([str(attached)], {"allowed_dirs": [str(allowed)]})
    outside = tmp_path / "secret.txt"
    outside.write_text("password: x")
    monkeypatch.undo()
    attached.unlink()
    attached.symlink_to(outside)  # a link leading out is refused before anything is opened
    with pytest.raises(InvalidTask, match="outside attach.allowed_dirs"):
        read_attachments([str(attached)], {"allowed_dirs": [str(allowed)]})


AGENT = str(Path(__file__).parent / "fake_agent.py")


def _agent(argv: list[str]) -> object:
    from koubou_spool.config import parse
    return parse({"craftsmen": {"agent": {"backend": "command", "local": True,
                                          "argv": argv}}}).craftsmen["agent"]


def _run_agent(craftsman: object, prompt: str, *, confidential: bool = False,
               model: str = "m") -> object:
    import asyncio
    from koubou_spool.craft.backends import Request, make_backend
    request = Request(messages=[{"role": "user", "content": prompt}], model=model,
                      max_tokens=10, timeout_s=20, confidential=confidential)
    return asyncio.run(make_backend(craftsman).complete(request))


def test_a_prompt_in_argv_that_starts_with_a_dash_is_not_an_option() -> None:
    craftsman = _agent([sys.executable, AGENT, "args", "{prompt}"])
    reply = _run_agent(craftsman, "--evil")  # a prompt of one word, as models write them
    assert json.loads(reply.content) == {"evil": False, "prompt": "--evil"}


def test_a_confidential_prompt_is_never_put_in_an_argv(tmp_path: Path) -> None:
    from koubou_spool.craft.backends import BackendError
    marker = tmp_path / "started"
    craftsman = _agent([sys.executable, "-c", f"open({str(marker)!r}, 'w')", "{prompt}"])
    with pytest.raises(BackendError) as caught:
        _run_agent(craftsman, "password: hunter2", confidential=True)
    assert caught.value.kind == "policy" and not caught.value.retryable
    assert "stdin" in str(caught.value) and "hunter2" not in str(caught.value)
    assert not marker.exists()  # refused before anything ran


def test_task_values_never_become_options_of_an_agent() -> None:
    from koubou_spool.craft.backends import BackendError, make_backend
    from koubou_spool.errors import ConfigError
    with pytest.raises(BackendError) as caught:  # a task's model override, e.g. "--yolo"
        _run_agent(_agent([sys.executable, AGENT, "args", "--model", "{model}"]), "x",
                   model="--evil")
    assert caught.value.kind == "invalid"
    with pytest.raises(ConfigError, match=r"after \{prompt\}"):  # `--` would swallow --json
        make_backend(_agent(["agent", "{prompt}", "--json"]))
