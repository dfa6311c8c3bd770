"""Tasks that build on each other: `{{ID}}` references filled at claim, workflow files queued
all or nothing, `koubou-submit --after/--param/--workflow`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import Workers, submit, wait_outcomes, wait_ready, write_config
from fake_openai import FakeOpenAI
from koubou_spool.cli.koubou import cli
from koubou_spool.cli.submit import submit as submit_command
from koubou_spool.errors import InvalidTask
from koubou_spool.spool import task as task_format
from koubou_spool.spool import workflow as workflow_format
from koubou_spool.spool.files import Spool

COMBINE = {"id": "digest", "steps": [
    {"name": "a", "content": "summarise part one"},
    {"name": "b", "content": "summarise part two"},
    {"name": "both", "after": ["a", "b"], "content": "Combine [{{a}}] with [{{b}}]",
     "system": "You merge summaries; b said {{b}}"}]}


def write_workflow(tmp_path: Path, document: dict) -> str:
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return str(path)


def run_submit(home: Path, *args: str) -> tuple[int, str, str]:
    done = CliRunner().invoke(submit_command, [*args, "--home", str(home)])
    return done.exit_code, done.stdout, done.stderr


# --- references --------------------------------------------------------------------------------

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


# --- the workflow file ---------------------------------------------------------------------------

def test_a_workflow_becomes_tasks_with_ids_after_and_references() -> None:
    flow = workflow_format.build(dict(COMBINE, defaults={"craftsman": "local", "priority": 7}))
    assert [t.id for t in flow.tasks] == ["digest.a", "digest.b", "digest.both"]
    both = flow.tasks[2]
    assert both.after == ["digest.a", "digest.b"] and both.priority == 7
    assert both.content == "Combine [{{digest.a}}] with [{{digest.b}}]"
    assert both.system == "You merge summaries; b said {{digest.b}}"
    assert flow.leaves == ["digest.both"] and flow.steps["digest.a"] == "a"


@pytest.mark.parametrize("document, message", [
    ({"id": "w", "steps": [{"name": "a", "content": "x", "after": ["zz"]}]},
     "step a runs after 'zz', which is no step"),
    ({"id": "w", "steps": [{"name": "a", "content": "x", "after": ["b"]},
                           {"name": "b", "content": "y", "after": ["a"]}]},
     "cycle: a -> b -> a"),
    ({"id": "w", "steps": [{"name": "a", "content": "x"}, {"name": "a", "content": "y"}]},
     "a second step named 'a'"),
    ({"id": "w", "steps": [{"name": "a", "content": "x", "priority": "high"}]},
     "step a: priority: expected an integer"),
    ({"id": "w", "steps": [{"name": "a", "content": "x"},
                           {"name": "b", "content": "{{c}}", "after": ["a"]}]},
     r"step b: \{\{c\}\}: c is not in after"),
    ({"id": "w", "steps": [{"name": "a", "content": "x", "id": "mine"}]}, "no id of its own"),
    ({"id": "w", "step": []}, "unknown key 'step'"),
    ({"id": "w", "steps": []}, "non-empty list of steps"),
    ({"id": "../w", "steps": [{"name": "a", "content": "x"}]}, "id: expected"),
])
def test_a_bad_workflow_is_refused_whole(document: dict, message: str) -> None:
    with pytest.raises(InvalidTask, match=message):
        workflow_format.build(document, "flow.yaml")


def test_a_bad_workflow_file_queues_nothing(home: Path, spool: Spool, tmp_path: Path) -> None:
    document = {"id": "w", "steps": [{"name": "a", "content": "x"},
                                     {"name": "b", "content": "y", "after": ["nope"]}]}
    code, _, err = run_submit(home, "--workflow", write_workflow(tmp_path, document))
    assert code == 2 and "nope" in err
    assert list(spool.pending.iterdir()) == []
    code, _, err = run_submit(home, "--workflow", write_workflow(tmp_path, COMBINE), "hello")
    assert code == 2 and "--workflow takes its tasks from the file" in err


def test_submit_after_and_param_options(home: Path, spool: Spool) -> None:
    code, out, err = run_submit(home, "--after", "x1", "--after", "x2", "--param", "seed=7",
                                "--param", 'stop=["END"]', "--id", "t1", "use {{x1}}")
    assert code == 0, err
    queued = json.loads((spool.pending / "t1.json").read_text())
    assert queued["after"] == ["x1", "x2"] and queued["params"] == {"seed": 7, "stop": ["END"]}
    code, _, err = run_submit(home, "--after", "x1", "use {{x3}}")
    assert code == 2 and "{{x3}}: x3 is not in after" in err
    code, _, err = run_submit(home, "--param", "stop=END", "x")
    assert code == 2 and "not JSON" in err
    code, _, err = run_submit(home, "--param", "model=\"m\"", "x")
    assert code == 2 and "params.model: reserved" in err


# --- through real workers -------------------------------------------------------------------------

def test_a_third_task_combines_two_parallel_results(home: Path, spool: Spool,
                                                    fake_openai: FakeOpenAI, workers: Workers,
                                                    tmp_path: Path) -> None:
    fake_openai.latency_s = 0.3
    workers.start(home)
    wait_ready(spool)
    path = write_workflow(tmp_path, COMBINE)
    code, out, err = run_submit(home, "--workflow", path, "--wait", "--timeout", "60")
    assert code == 0, err
    for step in ("a", "b", "both"):
        assert f"step {step}: completed" in err
    bodies = {r["messages"][-1]["content"]: r for r in fake_openai.completions()}
    assert fake_openai.max_in_flight >= 2  # a and b ran at once
    combined = "Combine [echo: summarise part one] with [echo: summarise part two]"
    assert bodies[combined]["messages"][0] == {
        "role": "system", "content": "You merge summaries; b said echo: summarise part two"}
    assert out == f"echo: {combined}\n"  # the result of the step nothing runs after
    outcome = spool.outcome("digest.both")
    assert outcome["content"] == "Combine [{{digest.a}}] with [{{digest.b}}]"  # kept as given
    code, out, err = run_submit(home, "--workflow", path)  # the same workflow again
    assert code == 0 and err == "" and out.count("(already completed)") == 3
    assert len(fake_openai.completions()) == 3
    shown = CliRunner().invoke(cli, ["status", "digest", "--home", str(home)])
    assert shown.exit_code == 0 and "workflow digest: 3 steps" in shown.output
    assert "  both: completed" in shown.output


def test_failures_in_a_workflow(home: Path, spool: Spool, fake_openai: FakeOpenAI,
                                workers: Workers, tmp_path: Path) -> None:
    document = {"id": "wf", "defaults": {"max_attempts": 1}, "steps": [
        {"name": "plan", "content": "plan it", "params": {"response_format":
                                                          {"type": "json_object"}}},
        {"name": "use", "after": ["plan"], "content": "do {{plan.json.steps}}"},
        {"name": "doomed", "content": "this one fails"},
        {"name": "orphan", "after": ["doomed"], "content": "never runs"},
        {"name": "free", "content": "independent"}]}
    fake_openai.answer_next(content='{"goal": "x"}')
    workers.start(home)
    wait_ready(spool)
    flow = workflow_format.build(document)
    spool.submit(flow.tasks[:2])  # plan first, so the fake's scripted answer is its
    assert wait_outcomes(spool, ["wf.plan"])["wf.plan"]["result"]["json"] == {"goal": "x"}
    fake_openai.reject_next = 1
    spool.submit(flow.tasks[2:3])
    wait_outcomes(spool, ["wf.doomed"])
    spool.submit(flow.tasks[3:])
    outcomes = wait_outcomes(spool, [t.id for t in flow.tasks])
    assert outcomes["wf.use"]["error"]["kind"] == "invalid"
    assert "{{wf.plan.json.steps}}" in outcomes["wf.use"]["error"]["message"]
    assert "no field steps" in outcomes["wf.use"]["error"]["message"]
    assert outcomes["wf.doomed"]["error"]["kind"] == "backend"
    assert outcomes["wf.orphan"]["error"]["kind"] == "dependency"
    assert outcomes["wf.free"]["status"] == "completed"


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


def test_the_example_workflow_is_valid() -> None:
    path = Path(__file__).parent.parent / "config" / "workflow.example.yaml"
    flow = workflow_format.load(path.read_bytes(), str(path))
    assert [flow.steps[t.id] for t in flow.tasks] == ["plan", "impl_a", "impl_b", "impl_c",
                                                       "review"]
    assert flow.leaves == ["review-cache.review"]
    assert "{{review-cache.impl_c}}" in flow.tasks[-1].content
