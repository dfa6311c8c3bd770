"""Tasks that build on each other: `{{ID}}` references checked at submit and filled at claim."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Workers, submit, wait_outcomes, wait_ready, write_config
from fake_openai import FakeOpenAI
from koubou_spool.errors import InvalidTask
from koubou_spool.spool import task as task_format
from koubou_spool.spool.files import Spool


def test_references_are_checked_against_after_at_submit() -> None:
    task_format.validate({"content": "{{a}} {{a.json.k.0}} {{a.diff}}", "after": ["a"]})
    with pytest.raises(InvalidTask, match=r"\{\{b\}\}: b is not in after \(a\)"):
        task_format.validate({"content": "{{a}} and {{b}}", "after": ["a"]})
    with pytest.raises(InvalidTask, match=r"\{\{c\.json\.x\}\}: c is not in after"):
        task_format.validate({"content": "x", "system": "{{c.json.x}}", "after": ["a"]})
    with pytest.raises(InvalidTask, match=r"\{\{a\.text\}\}: a reference to a is"):
        task_format.validate({"content": "{{a.text}}", "after": ["a"]})
    # Without `after` braces are the prompt's own (templates under review, say).
    assert task_format.validate({"content": "render {{name}}"}).content == "render {{name}}"


def test_references_are_filled_from_the_dependencies_results() -> None:
    after = ["plan", "plan.v2"]  # ids may hold dots: the longest id that fits is meant
    results = {"plan": {"content": "P1"},
               "plan.v2": {"content": "{}", "json": {"steps": ["s0", {"k": 2}], "ok": True}}}
    text = "{{plan}} | {{plan.v2}} | {{plan.v2.json.steps.0}} | {{plan.v2.json.steps.1}} | " \
           "{{plan.v2.json.ok}}"
    assert task_format.fill_references(text, after, results, {}) == \
        'P1 | {} | s0 | {"k": 2} | true'
    assert task_format.fill_references("{{d.json.n}}", ["d"], {"d": {"content": '{"n": 5}'}},
                                       {}) == "5"  # JSON content of a task that did not ask
    assert task_format.fill_references("{{d.diff}}", ["d"], {"d": {}}, {"d": "+x"}) == "+x"
    with pytest.raises(InvalidTask, match=r"\{\{plan\.v2\.json\.steps\.7\}\}: .* no field steps\.7"):
        task_format.fill_references("{{plan.v2.json.steps.7}}", after, results, {})
    with pytest.raises(InvalidTask, match="the result of plan is not JSON"):
        task_format.fill_references("{{plan.json.x}}", after, results, {})
    with pytest.raises(InvalidTask, match="plan has no diff"):
        task_format.fill_references("{{plan.diff}}", after, results, {"plan": None})


def test_a_confidential_result_never_reaches_a_cloud_craftsman(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cloud = FakeOpenAI(model="gpt-5").start()
    try:
        monkeypatch.setenv("KOUBOU_TEST_CLOUD_KEY", "sk-test")
        write_config(home, fake_openai.base_url, craftsmen={
            "cloud": {"backend": "openai", "base_url": cloud.base_url, "model": "gpt-5",
                      "api_key_env": "KOUBOU_TEST_CLOUD_KEY", "retries": 0}})
        workers.start(home)
        wait_ready(spool)
        secret = submit(spool, id="secret", content="the merger plan", sensitivity="confidential")
        public = submit(spool, content="polish: {{secret}}", after=[secret], craftsman="cloud",
                        sensitivity="public")
        outcomes = wait_outcomes(spool, [secret, public])
        assert outcomes[public]["error"]["kind"] == "policy"
        assert cloud.completions() == []
    finally:
        cloud.stop()


def test_a_task_runs_as_soon_as_its_dependency_completes(home: Path, spool: Spool,
                                                         workers: Workers) -> None:
    workers.start(home)
    child = submit(spool, craftsman="echo", content="second", after=["first"])
    wait_ready(spool)
    submit(spool, id="first", craftsman="echo", content="first")
    # No other file arrives to wake the worker: the outcome of `first` alone must.
    outcomes = wait_outcomes(spool, [child, "first"], timeout=10)
    assert outcomes[child]["status"] == "completed"
