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
