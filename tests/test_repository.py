"""Repository tasks end to end: real git, real worker processes, a test agent standing in for
`claude -p`, and the loopback fake OpenAI server answering with diffs (README: Repository tasks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import log_of, submit, wait_outcomes, wait_ready
from koubou_spool.spool import home as home_module
from koubou_spool.spool.files import Spool

AGENT = str(Path(__file__).parent / "repo_agent.py")
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}).stdout.strip()


def make_source(path: Path, files: int = 3) -> str:
    """A repository with one commit; returns its sha."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    for n in range(files):
        (path / f"file{n}.txt").write_text(f"line {n}\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "base")
    return git(path, "rev-parse", "HEAD")


@pytest.fixture
def repo_home(isolated_env: Path, tmp_path: Path, fake_openai, monkeypatch) -> Path:
    """A home with a command agent (`agent`), an LLM (`local`) and a cloud LLM (`cloud`), and
    repos.allowed covering tmp_path/src."""
    home_module.init(isolated_env)
    log = tmp_path / "agent-log"
    log.mkdir()
    monkeypatch.setenv("REPO_AGENT_LOG", str(log))
    write_repo_config(isolated_env, tmp_path, fake_openai.base_url)
    return isolated_env


def write_repo_config(home: Path, tmp_path: Path, base_url: str, **repos: object) -> None:
    config = {
        "craftsmen": {
            "agent": {"backend": "command", "argv": [sys.executable, AGENT], "output": "text",
                      "local": True, "max_concurrent": 8, "timeout_s": 60},
            "local": {"backend": "openai", "base_url": base_url, "model": "fake-model",
                      "local": True, "max_concurrent": 4, "timeout_s": 10, "retries": 0},
            "cloud": {"backend": "openai", "base_url": base_url, "model": "cloud-model",
                      "api_key_env": "KOUBOU_TEST_CLOUD_KEY", "max_concurrent": 4,
                      "timeout_s": 10, "retries": 0},
            "echo": {"backend": "echo", "max_concurrent": 4},
        },
        "routing": {"rules": [{"then": "agent"}]},
        "spool": {"heartbeat_s": 1, "lease_s": 10, "grace_s": 0.5, "stop_grace_s": 10},
        "repos": {"allowed": [str(tmp_path / "src")], "verify_timeout_s": 20, **repos},
    }
    (home / "config" / "koubou.yaml").write_text(yaml.safe_dump(config))


def agent_runs(tmp_path: Path, task_id: str) -> list[dict]:
    runs = sorted((tmp_path / "agent-log").glob(f"{task_id}-*.json"),
                  key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    return [json.loads(p.read_text()) for p in runs]


def test_an_agent_task_becomes_a_commit_on_a_branch_pushed_to_the_source(
        repo_home: Path, tmp_path: Path, workers) -> None:
    source = tmp_path / "src" / "app"
    base = make_source(source)
    (source / "file0.txt").write_text("the user's own uncommitted edit\n")
    (source / "scratch.txt").write_text("untracked\n")
    spool = Spool.open(repo_home)
    workers.start(repo_home)
    task_id = submit(spool, content="Add a greeting\nWRITE hello.txt=hi\\n", repo=str(source),
                     verify=[sys.executable, "-c", "import pathlib,sys; "
                             "sys.exit(0 if pathlib.Path('hello.txt').exists() else 1)"])
    outcome = wait_outcomes(spool, [task_id], timeout=60)[task_id]
    assert outcome["status"] == "completed", outcome
    repo = outcome["result"]["repo"]
    assert repo["base_sha"] == base and repo["branch"] == f"koubou/{task_id}"
    assert repo["files_changed"] == 1 and repo["insertions"] == 1 and repo["pushed"] is True
    assert repo["verify"]["exit_code"] == 0
    # The branch is in the source repository, its commit's parent is the base.
    assert git(source, "rev-parse", f"koubou/{task_id}") == repo["commit"]
    assert git(source, "rev-parse", f"{repo['commit']}^") == base
    message = git(source, "log", "-1", "--format=%B", repo["commit"])
    assert message.startswith("Add a greeting") and f"Koubou-Task: {task_id}" in message
    assert git(source, "show", f"{repo['commit']}:hello.txt") == "hi"
    # The user's working tree is as it was.
    assert (source / "file0.txt").read_text() == "the user's own uncommitted edit\n"
    assert (source / "scratch.txt").exists() and not (source / "hello.txt").exists()
    assert git(source, "rev-parse", "HEAD") == base
    patch = (repo_home / repo["patch"]).read_text()
    assert "+hi" in patch
    # The agent ran in the worktree, told where it is; the worktree is gone now.
    run, = agent_runs(tmp_path, task_id)
    assert run["env"]["KOUBOU_WORKTREE"] == str(repo_home / "work" / task_id)
    assert run["env"]["KOUBOU_BASE_SHA"] == base
    assert not (repo_home / "work" / task_id).exists()


def test_eight_tasks_on_one_repository_over_two_workers(repo_home: Path, tmp_path: Path,
                                                        workers) -> None:
    source = tmp_path / "src" / "app"
    base = make_source(source)
    spool = Spool.open(repo_home)
    procs = [workers.start(repo_home), workers.start(repo_home)]
    ids = [submit(spool, content=f"Task {n}\nWRITE out{n}.txt={n}", repo=str(source))
           for n in range(8)]
    outcomes = wait_outcomes(spool, ids, timeout=120)
    for task_id, outcome in outcomes.items():
        assert outcome["status"] == "completed", outcome
        commit = outcome["result"]["repo"]["commit"]
        assert git(source, "rev-parse", f"koubou/{task_id}") == commit
        assert git(source, "rev-parse", f"{commit}^") == base
    branches = git(source, "branch", "--list", "koubou/*").split("\n")
    assert len(branches) == 8
    for proc in procs:
        assert "could not lock" not in log_of(proc) and "index.lock" not in log_of(proc)


def test_a_failing_verify_is_retried_from_the_base_with_its_output_in_the_prompt(
        repo_home: Path, tmp_path: Path, workers) -> None:
    source = tmp_path / "src" / "app"
    make_source(source)
    counter = tmp_path / "verify-runs"
    verify = [sys.executable, "-c", (
        "import pathlib, sys\n"
        f"c = pathlib.Path({str(counter)!r}); n = int(c.read_text()) + 1 if c.exists() else 1\n"
        "c.write_text(str(n))\n"
        "if n < 3 or not pathlib.Path('fixed.txt').exists():\n"
        "    print(f'round {n}: missing: fixed.txt'); sys.exit(1)\n")]
    spool = Spool.open(repo_home)
    workers.start(repo_home)
    task_id = submit(spool, content="Make verify pass\nFIX-FROM-VERIFY", repo=str(source),
                     verify=verify, max_attempts=3)
    outcome = wait_outcomes(spool, [task_id], timeout=90)[task_id]
    assert outcome["status"] == "completed", outcome
    assert outcome["result"]["attempts"] == 3
    runs = agent_runs(tmp_path, task_id)
    assert len(runs) == 3
    assert "round" not in runs[0]["prompt"]
    assert "round 2: missing: fixed.txt" in runs[2]["prompt"]  # the second attempt's output
    assert git(source, "show", f"koubou/{task_id}:fixed.txt") == "fixed"


def test_a_verify_that_fails_every_time_fails_the_task_as_verify(repo_home: Path, tmp_path: Path,
                                                                workers) -> None:
    source = tmp_path / "src" / "app"
    make_source(source)
    spool = Spool.open(repo_home)
    workers.start(repo_home)
    task_id = submit(spool, content="Nothing helps", repo=str(source), max_attempts=2,
                     verify=[sys.executable, "-c", "print('tests: 3 failed'); raise SystemExit(1)"])
    outcome = wait_outcomes(spool, [task_id], timeout=60)[task_id]
    assert outcome["status"] == "failed"
    assert outcome["error"]["kind"] == "verify" and outcome["error"]["attempts"] == 2
    assert "tests: 3 failed" in outcome["error"]["message"]


def test_a_hanging_verify_is_killed_with_its_process_group(repo_home: Path, tmp_path: Path,
                                                          workers, fake_openai) -> None:
    write_repo_config(repo_home, tmp_path, fake_openai.base_url, verify_timeout_s=2)
    source = tmp_path / "src" / "app"
    make_source(source)
    pidfile = tmp_path / "grandchild.pid"
    spool = Spool.open(repo_home)
    workers.start(repo_home)
    started = time.monotonic()
    task_id = submit(spool, content="Hang", repo=str(source), max_attempts=1, verify=[
        sys.executable, "-c",
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(child.pid)); time.sleep(600)\n"])
    outcome = wait_outcomes(spool, [task_id], timeout=60)[task_id]
    assert outcome["status"] == "failed" and outcome["error"]["kind"] == "verify"
    assert "timed out" in outcome["error"]["message"]
    assert time.monotonic() - started < 30
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


DIFF_OK = """Here is the change:
```diff
--- a/file1.txt
+++ b/file1.txt
@@ -1 +1,2 @@
 line 1
+line 1b
```
"""
DIFF_BAD = """```diff
--- a/file1.txt
+++ b/file1.txt
@@ -1 +1,2 @@
 no such line
+added
```
"""
DIFF_OUTSIDE = """```diff
--- /dev/null
+++ b/../outside.txt
@@ -0,0 +1 @@
+escaped
```
"""


def test_an_llm_answers_with_a_diff_that_fails_then_one_that_applies(
        repo_home: Path, tmp_path: Path, workers, fake_openai) -> None:
    source = tmp_path / "src" / "app"
    base = make_source(source)
    fake_openai.answer_next(content=DIFF_BAD)
    fake_openai.answer_next(content=DIFF_OK)
    spool = Spool.open(repo_home)
    workers.start(repo_home)
    task_id = submit(spool, content="Add line 1b to file1.txt", repo=str(source),
                     craftsman="local", files=["file1.txt"], max_attempts=3)
    outcome = wait_outcomes(spool, [task_id], timeout=60)[task_id]
    assert outcome["status"] == "completed", outcome
    assert outcome["result"]["attempts"] == 2
    commit = outcome["result"]["repo"]["commit"]
    assert git(source, "show", f"{commit}:file1.txt") == "line 1\nline 1b"
    assert git(source, "rev-parse", f"{commit}^") == base
    first, second = fake_openai.completions()[-2:]
    prompt = json.dumps(first["messages"])
    assert "file1.txt" in prompt and "line 1" in prompt  # the file list and the named file
    assert "could not be applied" in json.dumps(second["messages"])  # git's word, next time


def test_a_diff_reaching_outside_the_worktree_is_refused(repo_home: Path, tmp_path: Path,
                                                         workers, fake_openai) -> None:
    source = tmp_path / "src" / "app"
    make_source(source)
    fake_openai.answer = {"content": DIFF_OUTSIDE}
    spool = Spool.open(repo_home)
    workers.start(repo_home)
    task_id = submit(spool, content="Escape", repo=str(source), craftsman="local",
                     max_attempts=2)
    outcome = wait_outcomes(spool, [task_id], timeout=60)[task_id]
    assert outcome["status"] == "failed" and outcome["error"]["kind"] == "invalid_output"
    assert not (repo_home / "work" / "outside.txt").exists()
    assert not any(p.name == "outside.txt" for p in tmp_path.rglob("outside.txt"))


def test_repositories_that_cannot_be_worked_on_fail_with_the_reason(
        repo_home: Path, tmp_path: Path, workers) -> None:
    source = tmp_path / "src" / "app"
    make_source(source)
    elsewhere = tmp_path / "elsewhere"
    make_source(elsewhere)
    not_a_repo = tmp_path / "src" / "plain"
    not_a_repo.mkdir()
    spool = Spool.open(repo_home)
    workers.start(repo_home)
    ids = {"outside": submit(spool, content="x", repo=str(elsewhere)),
           "base": submit(spool, content="x", repo=str(source), base="no-such-ref"),
           "plain": submit(spool, content="x", repo=str(not_a_repo))}
    outcomes = wait_outcomes(spool, list(ids.values()), timeout=60)
    outside = outcomes[ids["outside"]]["error"]
    assert outside["kind"] == "policy" and "repos.allowed" in outside["message"]
    base = outcomes[ids["base"]]["error"]
    assert base["kind"] == "invalid" and "no-such-ref" in base["message"]
    plain = outcomes[ids["plain"]]["error"]
    assert plain["kind"] == "invalid" and "not a git repository" in plain["message"].lower()
    assert not list((tmp_path / "agent-log").iterdir())  # no craftsman was called
    assert not (repo_home / "repos").exists() or not any(
        "elsewhere" in p.name for p in (repo_home / "repos").iterdir())


def test_a_task_on_a_confidential_repository_runs_locally(repo_home: Path, tmp_path: Path,
                                                          workers, fake_openai,
                                                          monkeypatch) -> None:
    monkeypatch.setenv("KOUBOU_TEST_CLOUD_KEY", "sk-test-not-a-real-key")
    write_repo_config(repo_home, tmp_path, fake_openai.base_url,
                      confidential=[str(tmp_path / "src" / "payroll")])
    source = tmp_path / "src" / "payroll"
    make_source(source)
    fake_openai.answer = {"content": DIFF_OK}
    spool = Spool.open(repo_home)
    workers.start(repo_home)
    task_id = submit(spool, content="Add a line", repo=str(source), craftsman="cloud")
    # a repository no setting names, but a file the task names holds a secret
    named = tmp_path / "src" / "app"
    make_source(named)
    (named / "settings.py").write_text('db_password = "hunter2"\n')
    git(named, "add", "-A")
    git(named, "commit", "-q", "-m", "settings")
    secret = submit(spool, content="Add a line", repo=str(named), craftsman="cloud",
                    files=["settings.py"])
    outcomes = wait_outcomes(spool, [task_id, secret], timeout=60)
    for outcome in outcomes.values():
        assert outcome["status"] == "completed", outcome
        # before, the named file was not scanned: the second went to cloud (refused there)
        assert outcome["result"]["craftsman"] != "cloud"
    assert all(r.get("model") != "cloud-model" for r in fake_openai.completions())


def test_a_repository_with_a_submodule_gets_it_in_the_worktree(repo_home: Path, tmp_path: Path,
                                                               workers) -> None:
    library = tmp_path / "src" / "lib"
    make_source(library, files=1)
    source = tmp_path / "src" / "app"
    make_source(source)
    git(source, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(library), "lib")
    git(source, "commit", "-q", "-m", "add lib")
    spool = Spool.open(repo_home)
    workers.start(repo_home)
    check = [sys.executable, "-c", "import pathlib,sys; "
             "sys.exit(0 if pathlib.Path('lib/file0.txt').read_text() == 'line 0\\n' else 1)"]
    task_id = submit(spool, content="WRITE notes.txt=uses lib", repo=str(source), verify=check)
    outcome = wait_outcomes(spool, [task_id], timeout=60)[task_id]
    assert outcome["status"] == "completed", outcome
    assert outcome["result"]["repo"]["verify"]["exit_code"] == 0


def test_kill_9_during_the_agents_run_kills_the_agent_and_the_retry_starts_clean(
        repo_home: Path, tmp_path: Path, workers) -> None:
    source = tmp_path / "src" / "app"
    base = make_source(source)
    spool = Spool.open(repo_home)
    first = workers.start(repo_home)
    task_id = submit(spool, content="Slow work\nWRITE half.txt=half\nCHILD-ONCE 60\n"
                     "SLEEP-ONCE 60\nWRITE done.txt=done", repo=str(source), id="slow-one")
    deadline = time.monotonic() + 30
    while not agent_runs(tmp_path, task_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    run, = agent_runs(tmp_path, task_id)
    assert run["started"]
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    deadline = time.monotonic() + 10
    while _alive(run["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(run["pid"]), "the agent outlived its worker"
    assert _alive(run["child"])  # the agent's own child outlives both, until the take-over
    # A new worker takes the claim over, and stops what still runs for it; the next attempt
    # starts from the base again.
    second = workers.start(repo_home)
    outcome = wait_outcomes(spool, [task_id], timeout=90)[task_id]
    assert not _alive(run["child"]), "the agent's child outlived the take-over"
    assert "stopped 1 process(es) left running for slow-one.json" in log_of(second)
    assert outcome["status"] == "completed", log_of(second)
    assert outcome["result"]["attempts"] == 2
    commit = outcome["result"]["repo"]["commit"]
    assert git(source, "rev-parse", f"{commit}^") == base  # exactly one result commit
    assert git(source, "show", "--stat", "--format=", commit).count("|") == 2  # half, done
    mirror, = (repo_home / "repos").glob("*.git")
    listed = git(mirror, "worktree", "list")
    assert str(repo_home / "work" / task_id) not in listed


def test_after_fifty_tasks_no_worktree_is_left_but_those_of_failed_tasks(
        repo_home: Path, tmp_path: Path, workers) -> None:
    source = tmp_path / "src" / "app"
    make_source(source)
    spool = Spool.open(repo_home)
    workers.start(repo_home)
    workers.start(repo_home)
    wait_ready(spool)
    ok = [submit(spool, content=f"WRITE n{n}.txt={n}", repo=str(source)) for n in range(48)]
    bad = [submit(spool, content="fails", repo=str(source), max_attempts=1,
                  verify=[sys.executable, "-c", "raise SystemExit(1)"]) for _ in range(2)]
    outcomes = wait_outcomes(spool, ok + bad, timeout=240)
    assert all(outcomes[i]["status"] == "completed" for i in ok)
    assert all(outcomes[i]["error"]["kind"] == "verify" for i in bad)
    left = sorted(p.name for p in (repo_home / "work").iterdir())
    assert left == sorted(bad)


def test_koubou_submit_repo_base_verify(repo_home: Path, tmp_path: Path, workers) -> None:
    source = tmp_path / "src" / "app"
    make_source(source)
    git(source, "tag", "v1")
    (source / "later.txt").write_text("after v1\n")
    git(source, "add", "-A")
    git(source, "commit", "-q", "-m", "after v1")
    umask = os.umask(0o022)  # the worker's, inherited: what git and the outputs get by default
    try:
        workers.start(repo_home)
    finally:
        os.umask(umask)
    check = "python3 -c 'import pathlib,sys; sys.exit(pathlib.Path(\"later.txt\").exists())'"
    done = subprocess.run(
        ["koubou-submit", "--home", str(repo_home), "--repo", "src/app", "--base", "v1",
         "--verify", check, "--id", "from-cli", "--wait", "--timeout", "60", "--json",
         "WRITE cli.txt=from the command line"],
        cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    repo = outcome["result"]["repo"]
    assert repo["base"] == "v1" and repo["base_sha"] == git(source, "rev-parse", "v1")
    assert repo["verify"]["argv"][:2] == ["python3", "-c"] and repo["verify"]["exit_code"] == 0
    assert outcome["repo"] == str(source)  # the relative path was made absolute
    assert git(source, "show", "koubou/from-cli:cli.txt") == "from the command line"
    refused = subprocess.run(["koubou-submit", "--home", str(repo_home), "--verify", "true", "x"],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "go with --repo" in refused.stderr
    doctor = subprocess.run(["koubou", "doctor", "--home", str(repo_home), "--json"],
                            capture_output=True, text=True, timeout=60)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["repositories"]["status"] == "ok"
    assert any(p["message"].startswith("1 mirrors, ") for p in checks["repositories"]["problems"])
    # §2 whatever the umask: before, the mirror and outputs/<id>/ were others' to read (0644)
    assert checks["permissions"]["problems"] == []


def test_a_push_the_source_will_always_refuse_fails_at_once_and_keeps_no_branch(
        repo_home: Path, tmp_path: Path, workers) -> None:
    source = tmp_path / "src" / "app"
    make_source(source)
    spool = Spool.open(repo_home)
    workers.start(repo_home)
    task_id = submit(spool, content="WRITE a.txt=a", repo=str(source), branch="main")
    outcome = wait_outcomes(spool, [task_id], timeout=60)[task_id]
    # before: retried, the agent run three times for a refusal no retry could change
    assert outcome["status"] == "failed" and outcome["error"]["attempts"] == 1
    assert "it is the branch checked out there" in outcome["error"]["message"]
    assert len(agent_runs(tmp_path, task_id)) == 1
    mirror, = (repo_home / "repos").glob("*.git")
    assert git(mirror, "branch", "--list", "main") != ""  # kept with the failed worktree
    done = subprocess.run(["koubou", "maintain", "--home", str(repo_home), "--purge-after", "0s"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # before: journalled as pushed, so the branch nothing was pushed from stayed for good
    assert git(mirror, "branch", "--list", "main") == ""


@pytest.mark.parametrize("task_id", ["a.lock", "x..y", "a."])
def test_an_id_that_makes_no_branch_name_is_refused_at_submit_unless_a_branch_is_given(
        task_id: str) -> None:
    from koubou_spool.errors import InvalidTask
    from koubou_spool.spool import task as task_format
    fields = {"content": "c", "repo": "/src/app", "id": task_id}
    # before: queued, then failed by the worker over a branch the user never named
    with pytest.raises(InvalidTask, match=f"koubou/{task_id}.*give it a `branch`"):
        task_format.validate(fields)
    assert task_format.validate({**fields, "branch": "feature"}).branch == "feature"
    assert task_format.validate({"content": "c", "id": task_id}).id == task_id  # no repo: fine


def test_the_open_pr_hook_calls_gh_for_a_pushed_branch(tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "gh-argv.json"
    (fake_bin / "gh").write_text(f"#!{sys.executable}\nimport json, sys\n"
                                 f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    (fake_bin / "gh").chmod(0o755)
    outcome = {"id": "t1", "status": "completed", "content": "Fix the parser\nmore",
               "result": {"repo": {"repo": str(tmp_path), "base": "main", "base_sha": "a" * 40,
                                   "branch": "koubou/t1", "pushed": True, "files_changed": 2,
                                   "insertions": 5, "deletions": 1,
                                   "verify": {"argv": ["pytest"], "duration_s": 1.5}}}}
    path = tmp_path / "t1.json"
    path.write_text(json.dumps(outcome))
    hook = Path(__file__).parent.parent / "bin" / "koubou-open-pr"
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "KOUBOU_OUTCOME_FILE": str(path)}
    subprocess.run([str(hook)], env=env, check=True, timeout=30)
    argv = json.loads(record.read_text())
    assert argv[:4] == ["pr", "create", "--head", "koubou/t1"]
    assert argv[argv.index("--title") + 1] == "Fix the parser"
    assert argv[argv.index("--base") + 1] == "main"
    record.unlink()
    outcome["status"] = "failed"
    path.write_text(json.dumps(outcome))
    subprocess.run([str(hook)], env=env, check=True, timeout=30)
    assert not record.exists()


def test_koubou_status_shows_a_running_tasks_worktree_and_a_finished_ones_branch(
        repo_home: Path, tmp_path: Path, workers) -> None:
    source = tmp_path / "src" / "app"
    make_source(source)
    spool = Spool.open(repo_home)
    workers.start(repo_home)
    task_id = submit(spool, content="Slow\nSLEEP-ONCE 3\nWRITE s.txt=s", repo=str(source),
                     verify=[sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while not agent_runs(tmp_path, task_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    running = subprocess.run(["koubou", "status", "--home", str(repo_home), task_id],
                             capture_output=True, text=True, timeout=30).stdout
    assert f"worktree {repo_home / 'work' / task_id}" in running
    wait_outcomes(spool, [task_id], timeout=60)
    done = subprocess.run(["koubou", "status", "--home", str(repo_home), task_id],
                          capture_output=True, text=True, timeout=30).stdout
    assert f"branch   koubou/{task_id} at " in done and "(pushed)" in done
    assert "verify   " in done and "exit 0" in done


def test_the_report_counts_repository_tasks_per_repository(repo_home: Path, tmp_path: Path,
                                                           workers) -> None:
    source = tmp_path / "src" / "app"
    make_source(source)
    spool = Spool.open(repo_home)
    workers.start(repo_home)
    passing = [sys.executable, "-c", "pass"]
    ids = [submit(spool, content=f"WRITE r{n}.txt={n}", repo=str(source), verify=passing)
           for n in range(2)]
    ids.append(submit(spool, content="fails", repo=str(source), max_attempts=2,
                      verify=[sys.executable, "-c", "raise SystemExit(1)"]))
    wait_outcomes(spool, ids, timeout=90)
    workers.terminate_all()  # the ledger records are all written when the workers exit
    shown = subprocess.run(["koubou", "report", "--home", str(repo_home), "--json"],
                           capture_output=True, text=True, timeout=30)
    row, = json.loads(shown.stdout)["repositories"]
    assert row["repo"] == str(source) and row["tasks"] == 3 and row["completed"] == 2
    assert row["verified"] == 3 and row["verify_passed"] == 2 and row["attempts"] == 4
    text = subprocess.run(["koubou", "report", "--home", str(repo_home)], capture_output=True,
                          text=True, timeout=30).stdout
    assert "repository" in text and "2/3" in text


def one_worktree(repo_home: Path, tmp_path: Path, base_url: str) -> tuple[Path, Spool]:
    """A home with repos.max_worktrees: 1, and its source repository."""
    write_repo_config(repo_home, tmp_path, base_url, max_worktrees=1)
    source = tmp_path / "src" / "app"
    make_source(source)
    return source, Spool.open(repo_home)


def test_max_worktrees_makes_repository_tasks_wait_without_spending_attempts(
        repo_home: Path, tmp_path: Path, workers, fake_openai) -> None:
    source, spool = one_worktree(repo_home, tmp_path, fake_openai.base_url)
    workers.start(repo_home)
    workers.start(repo_home)
    ids = [submit(spool, content=f"SLEEP 0.5\nWRITE w{n}.txt={n}", repo=str(source))
           for n in range(4)]
    outcomes = wait_outcomes(spool, ids, timeout=120)
    assert all(o["status"] == "completed" and o["result"]["attempts"] == 1
               for o in outcomes.values())
    spans = []
    for task_id in ids:
        runs = agent_runs(tmp_path, task_id)
        spans.append((min(r["at"] for r in runs), max(r["at"] for r in runs)))
    spans.sort()
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:], strict=False))


@pytest.mark.slow
def test_a_repository_task_waiting_for_a_worktree_holds_up_no_other_task(
        repo_home: Path, tmp_path: Path, workers, fake_openai) -> None:
    source, spool = one_worktree(repo_home, tmp_path, fake_openai.base_url)
    workers.start(repo_home)
    running = submit(spool, content="SLEEP 8\nWRITE a.txt=a", repo=str(source), id="holds-it")
    deadline = time.monotonic() + 30
    while not agent_runs(tmp_path, running) and time.monotonic() < deadline:
        time.sleep(0.05)
    waiting = submit(spool, content="WRITE b.txt=b", repo=str(source), priority=9)
    text = submit(spool, content="no repository here")  # the same craftsman, behind it
    outcome = wait_outcomes(spool, [text], timeout=6)[text]
    assert outcome["status"] == "completed"
    assert spool.outcome(running) is None and spool.outcome(waiting) is None
    outcomes = wait_outcomes(spool, [running, waiting], timeout=60)
    assert all(o["status"] == "completed" and o["result"]["attempts"] == 1
               for o in outcomes.values())


def test_mcp_delegate_task_takes_a_repository_task(repo_home: Path, tmp_path: Path,
                                                   workers) -> None:
    import anyio
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    source = tmp_path / "src" / "app"
    make_source(source)
    workers.start(repo_home)
    params = StdioServerParameters(command=sys.executable, args=[
        "-m", "koubou_spool.integrations.mcp", "--home", str(repo_home)])

    async def delegate() -> dict:
        with anyio.fail_after(90):
            async with stdio_client(params) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    done = await session.call_tool("delegate_task", {
                        "content": "WRITE mcp.txt=from mcp", "repo": str(source),
                        "verify": [sys.executable, "-c", "pass"], "id": "via-mcp",
                        "wait_s": 45})
                    return json.loads(done.content[0].text)

    answer = anyio.run(delegate)
    assert answer["state"] == "completed", answer
    assert answer["result"]["repo"]["branch"] == "koubou/via-mcp"
    assert git(source, "show", "koubou/via-mcp:mcp.txt") == "from mcp"


def test_after_a_kill_9_koubou_maintain_leaves_no_stale_worktree(repo_home: Path, tmp_path: Path,
                                                                  workers) -> None:
    source = tmp_path / "src" / "app"
    base = make_source(source)
    spool = Spool.open(repo_home)
    first = workers.start(repo_home)
    task_id = submit(spool, content="WRITE a.txt=a\nSLEEP-ONCE 60", repo=str(source), id="killed")
    deadline = time.monotonic() + 30
    while not agent_runs(tmp_path, task_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    mirror, = (repo_home / "repos").glob("*.git")
    assert str(repo_home / "work" / task_id) in git(mirror, "worktree", "list")
    done = subprocess.run(["koubou", "maintain", "--home", str(repo_home)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "requeued 1" in done.stdout + done.stderr and "1 worktrees" in done.stdout + done.stderr
    assert git(mirror, "worktree", "list").count("\n") == 0  # the mirror's own entry only
    assert not (repo_home / "work" / task_id).exists()
    workers.start(repo_home)
    outcome = wait_outcomes(spool, [task_id], timeout=60)[task_id]
    assert outcome["status"] == "completed" and outcome["result"]["attempts"] == 2
    assert git(source, "rev-parse", f"{outcome['result']['repo']['commit']}^") == base


def verify_pids(path: Path, count: int, timeout: float = 30) -> list[int]:
    """The pids the task's verify wrote, once it has started `count` times."""
    deadline = time.monotonic() + timeout
    while len(lines := (path.read_text().split() if path.exists() else [])) < count:
        assert time.monotonic() < deadline, f"the verify did not start {count} times"
        time.sleep(0.05)
    return [int(line) for line in lines]


def running(pid: int) -> bool:
    """Whether a process runs (a zombie waiting for its new parent to reap it does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_verify_is_stopped_by_a_kill_9_takeover_and_by_a_cancel(
        repo_home: Path, tmp_path: Path, workers) -> None:
    source = tmp_path / "src" / "app"
    make_source(source)
    spool = Spool.open(repo_home)
    pids = tmp_path / "verify-pids"
    verify = [sys.executable, "-c", f"import os, time; open({str(pids)!r}, 'a').write("
              "f'{os.getpid()}\\n'); time.sleep(60)"]
    first = workers.start(repo_home)
    task_id = submit(spool, content="WRITE a.txt=a", repo=str(source), verify=verify)
    [killed_run] = verify_pids(pids, 1)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    workers.start(repo_home)  # takes the dead worker's claim over, and stops what it left
    cancelled_run = verify_pids(pids, 2)[1]  # the second attempt's verify
    # before: it ran on, with no claim in its environment, in a worktree since made afresh
    assert not running(killed_run)
    done = subprocess.run(["koubou", "--home", str(repo_home), "cancel", task_id],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    outcome = wait_outcomes(spool, [task_id], timeout=30)[task_id]
    assert outcome["error"]["kind"] == "cancelled"
    deadline = time.monotonic() + 10  # before: until its own end, 60 s on
    while running(cancelled_run):
        assert time.monotonic() < deadline, "the cancelled attempt's verify still runs"
        time.sleep(0.05)


def test_a_sandboxed_agent_cannot_reach_home_or_ssh_but_works_in_its_worktree(
        repo_home: Path, tmp_path: Path, workers, fake_openai, monkeypatch) -> None:
    from koubou_spool.craft.backends import sandbox
    why = sandbox.problem()
    if why is not None:
        pytest.skip(f"the bwrap sandbox cannot run here: {why}")
    hidden = [p for p in (AGENT, sys.executable, sys.prefix) if Path(p).resolve().is_relative_to("/tmp")]
    if hidden:
        pytest.skip(f"{hidden[0]} is under /tmp, which the sandbox replaces with a private one; "
                    "run the tests from a checkout and Python outside /tmp")
    home = tmp_path / "user-home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("PRIVATE KEY\n")
    (home / "precious.txt").write_text("keep me\n")
    (home / ".agent-login").mkdir()
    monkeypatch.setenv("HOME", str(home))
    config = yaml.safe_load((repo_home / "config" / "koubou.yaml").read_text())
    config["craftsmen"]["agent"].update(
        sandbox="bwrap", sandbox_binds=[str(tmp_path / "agent-log"), "~/.agent-login"])
    (repo_home / "config" / "koubou.yaml").write_text(yaml.safe_dump(config))
    source = tmp_path / "src" / "app"
    base = make_source(source)
    spool = Spool.open(repo_home)
    workers.start(repo_home)
    task_id = submit(spool, content="Be careless\nREAD-SSH\nRM-HOME\nWRITE boxed.txt=inside\n"
                     "COMMIT the agent's own commit\nWRITE after.txt=after\n"
                     f"POISON-GIT {home / '.ssh' / 'id_rsa'}", repo=str(source))
    outcome = wait_outcomes(spool, [task_id], timeout=60)[task_id]
    assert outcome["status"] == "completed", outcome
    assert (home / "precious.txt").read_text() == "keep me\n"
    assert (home / ".ssh" / "id_rsa").exists()
    commit = outcome["result"]["repo"]["commit"]
    assert git(source, "show", f"{commit}:ssh.txt") == "unreadable"
    assert git(source, "show", f"{commit}:boxed.txt") == "inside"
    log = git(source, "log", "--format=%s", f"{base}..{commit}").splitlines()
    assert log[-1] == "the agent's own commit" and len(log) == 2  # its own, then koubou's
    # Before, the mirror's config was the agent's to write: koubou's `git add -A`, outside the
    # sandbox, ran its filter and committed the key as after.txt.
    assert git(source, "show", f"{commit}:after.txt") == "after"
    assert json.loads(git(source, "show", f"{commit}:poison.txt")) == dict.fromkeys(
        ("config", "hook", "commondir", ".git"), "refused")
    mirror, = (repo_home / "repos").glob("*.git")
    assert "steal" not in (mirror / "config").read_text()


def test_kill_9_during_koubous_commit_publishes_no_half_made_commit(
        repo_home: Path, tmp_path: Path, workers) -> None:
    source = tmp_path / "src" / "app"
    base = make_source(source)
    spool = Spool.open(repo_home)
    first = workers.start(repo_home)
    task_id = submit(spool, content="Many files\nMANY 4000", repo=str(source), id="mid-commit")
    deadline = time.monotonic() + 60
    admin = None
    while time.monotonic() < deadline:  # koubou's `git add -A` holds the worktree's index.lock
        mirrors = list((repo_home / "repos").glob("*.git"))
        admin = mirrors[0] / "worktrees" / task_id if mirrors else None
        if agent_runs(tmp_path, task_id) and admin and (admin / "index.lock").exists():
            break
        time.sleep(0.001)
    else:
        pytest.fail("koubou's commit was not caught in the act")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert not list(spool.completed.iterdir())
    workers.start(repo_home)
    outcome = wait_outcomes(spool, [task_id], timeout=120)[task_id]
    assert outcome["status"] == "completed" and outcome["result"]["attempts"] == 2
    commit = outcome["result"]["repo"]["commit"]
    assert git(source, "rev-parse", f"{commit}^") == base  # one result commit, on the base
    assert outcome["result"]["repo"]["files_changed"] == 4000
    mirror, = (repo_home / "repos").glob("*.git")
    assert git(mirror, "worktree", "list").count("\n") == 0
