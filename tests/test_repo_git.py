"""The git layer of repository tasks (koubou_spool.repo), with real git in tmp_path and no network."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from koubou_spool import repo
from koubou_spool.errors import ConfigError, InvalidTask
from koubou_spool.repo import git
from koubou_spool.repo.mirror import mirror_path
from koubou_spool.repo.policy import source_location
from koubou_spool.repo.worktree import journal_path, worktree_path

ROOT = Path(__file__).resolve().parent.parent


def g(cwd: Path, *args: str) -> str:
    """git as a user would run it, with an identity and local submodules allowed."""
    argv = ["git", "-c", "user.name=Tester", "-c", "user.email=tester@example.com", "-c",
            "init.defaultBranch=main", "-c", "protocol.file.allow=always", *args]
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def commit_file(repo_dir: Path, name: str, text: str, message: str) -> str:
    path = repo_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    g(repo_dir, "add", name)
    g(repo_dir, "commit", "-q", "-m", message)
    return g(repo_dir, "rev-parse", "HEAD")


@pytest.fixture(autouse=True)
def user_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No system or user git config of this machine leaks into a test."""
    user_home = tmp_path / "user"
    user_home.mkdir()
    monkeypatch.setenv("HOME", str(user_home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


@pytest.fixture
def home(isolated_env: Path) -> Path:
    isolated_env.mkdir(parents=True, exist_ok=True)
    return isolated_env


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A source repository with two commits on main, a tag v1 on the first, and uncommitted work."""
    src = tmp_path / "src" / "app"
    src.mkdir(parents=True)
    g(src, "init", "-q")
    commit_file(src, "README", "hello\n", "first")
    g(src, "tag", "v1")
    commit_file(src, "lib/calc.py", "def add(a, b):\n    return a + b\n", "second")
    (src / "README").write_text("the user's uncommitted edit\n")
    (src / "scratch.txt").write_text("untracked\n")
    return src


@pytest.fixture
def settings(tmp_path: Path) -> repo.RepoSettings:
    return repo.RepoSettings(allowed=(str(tmp_path / "src"),))


@pytest.fixture
def ws(home: Path, source: Path, settings: repo.RepoSettings) -> repo.Workspace:
    return repo.prepare(home, "t1", str(source), settings)


def registered(mirror: Path) -> list[str]:
    return [wt.path for wt in git.worktrees(mirror) if not wt.bare]


# --- settings and policy -------------------------------------------------------------------


def test_settings_parse_defaults_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    assert repo.RepoSettings.parse(None) == repo.RepoSettings()
    parsed = repo.RepoSettings.parse({"allowed": "~/src", "confidential": ["~/src/payroll"], "push": False,
                                      "verify_timeout_s": 30, "max_worktrees": 4,
                                      "author": "Bot <bot@example.com>"})
    assert parsed.allowed == ("~/src",) and parsed.push is False and parsed.max_worktrees == 4
    assert parsed.author == "Bot <bot@example.com>" and parsed.verify_timeout_s == 30.0
    for bad, key in (({"allowed": 3}, "repos.allowed"), ({"allowed": ["src"]}, "repos.allowed[0]"),
                     ({"push": "yes"}, "repos.push"), ({"verify_timeout_s": -1}, "repos.verify_timeout_s"),
                     ({"max_worktrees": 0}, "repos.max_worktrees"), ({"author": "bot"}, "repos.author")):
        with pytest.raises(ConfigError, match="^" + re.escape(key) + ": expected"):
            repo.RepoSettings.parse(bad)
    with caplog.at_level(logging.WARNING):
        repo.RepoSettings.parse({"alowed": []})
    assert "repos.alowed: unknown key" in caplog.text


def test_allowed_paths_match_whole_components_and_resolve_symlinks(tmp_path: Path) -> None:
    (tmp_path / "src" / "app").mkdir(parents=True)
    (tmp_path / "src-old" / "app").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "src" / "escape").symlink_to(tmp_path / "elsewhere")
    settings = repo.RepoSettings(allowed=(str(tmp_path / "src"), "~/code"))
    assert repo.allowed(str(tmp_path / "src" / "app"), settings)
    assert repo.allowed(str(tmp_path / "src"), settings)
    assert not repo.allowed(str(tmp_path / "src-old" / "app"), settings)
    assert not repo.allowed(str(tmp_path / "src" / "escape"), settings)  # judged where it points
    assert not repo.allowed(str(tmp_path / "src" / ".." / "src-old"), settings)
    assert not repo.allowed("src/app", settings)  # relative: to what?
    assert repo.allowed("~/code/x", settings) and not repo.allowed("~/codex", settings)
    assert repo.allowed(f"file://{tmp_path}/src/app", settings)


def test_allowed_urls_are_prefixes_ending_at_a_separator() -> None:
    settings = repo.RepoSettings(allowed=("git@github.com:me/", "https://git.example.com/team"),
                                 confidential=("git@github.com:me/payroll",))
    assert repo.allowed("git@github.com:me/app.git", settings)
    assert not repo.allowed("git@github.com:meanie/app.git", settings)
    assert repo.allowed("https://git.example.com/team/app.git", settings)
    assert repo.allowed("https://git.example.com/team.git", settings)
    assert not repo.allowed("https://git.example.com/teamster/app", settings)
    assert not repo.allowed("https://git.example.com/team/../other/app", settings)
    assert not repo.allowed("ext::sh -c touch% /tmp/pwned", settings)
    assert not repo.allowed("--upload-pack=touch /tmp/pwned", settings)
    assert repo.confidential("git@github.com:me/payroll.git", settings)
    assert not repo.confidential("git@github.com:me/app", settings)
    assert not repo.allowed("git@github.com:me/app", repo.RepoSettings())  # nothing by default


def test_a_repo_outside_allowed_is_refused_before_any_git(home: Path, source: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(git.subprocess, "Popen", lambda *a, **k: calls.append(a))
    with pytest.raises(repo.RepoRefused, match="not under repos.allowed"):
        repo.prepare(home, "t1", str(source), repo.RepoSettings(allowed=("/nowhere",)))
    assert calls == [] and not (home / "repos").exists()


def test_task_ids_that_name_no_directory_are_refused(home: Path, source: Path,
                                                     settings: repo.RepoSettings) -> None:
    for bad in ("..", ".", "a/b"):
        with pytest.raises(InvalidTask):
            repo.prepare(home, bad, str(source), settings)
    with pytest.raises(InvalidTask, match="branch"):
        repo.prepare(home, "t1", str(source), settings, branch="bad..name")


# --- mirror and worktree -------------------------------------------------------------------


def test_worktree_at_the_committed_base_and_the_source_untouched(home: Path, source: Path,
                                                                 ws: repo.Workspace) -> None:
    before = g(source, "status", "--porcelain")
    assert ws.path == home / "work" / "t1" and ws.branch == "koubou/t1"
    assert ws.mirror == mirror_path(home, str(source)) and ws.mirror.parent == home / "repos"
    assert ws.base_sha == g(source, "rev-parse", "HEAD") == git.head(ws.path)
    assert g(ws.path, "symbolic-ref", "HEAD") == "refs/heads/koubou/t1"
    assert (ws.path / "README").read_text() == "hello\n"  # the committed base, not the user's edit
    assert not (ws.path / "scratch.txt").exists()
    assert "branch" not in (ws.mirror / "config").read_text()  # no upstream tracking written
    assert registered(ws.mirror) == [str(ws.path)]
    assert json.loads(journal_path(home, "t1").read_text())["base_sha"] == ws.base_sha
    assert g(source, "status", "--porcelain") == before
    assert (source / "README").read_text() == "the user's uncommitted edit\n"
    assert g(source, "branch", "--list") == "* main"


def test_base_is_read_as_the_source_reads_it(home: Path, source: Path, settings: repo.RepoSettings) -> None:
    first = g(source, "rev-parse", "v1")
    for base in ("v1", "main~1", "HEAD~1", first, first[:10]):
        assert repo.prepare(home, "t1", str(source), settings, base=base).base_sha == first
    main = g(source, "rev-parse", "main")
    assert repo.prepare(home, "t1", str(source), settings, base="main").base_sha == main


def test_the_mirror_is_fetched_before_each_attempt(home: Path, source: Path, settings: repo.RepoSettings,
                                                   ws: repo.Workspace) -> None:
    newer = commit_file(source, "NEWS", "news\n", "third")
    assert repo.prepare(home, "t2", str(source), settings).base_sha == newer


def test_a_base_that_does_not_resolve_fails_in_gits_words(home: Path, source: Path,
                                                          settings: repo.RepoSettings) -> None:
    with pytest.raises(repo.BaseNotFound) as caught:
        repo.prepare(home, "t1", str(source), settings, base="no-such-branch")
    assert "fatal: Needed a single revision" in str(caught.value)
    assert "'no-such-branch'" in str(caught.value) and caught.value.returncode == 128
    assert not worktree_path(home, "t1").exists() and not journal_path(home, "t1").exists()


def test_a_path_that_is_no_repository_fails_in_gits_words(home: Path, tmp_path: Path,
                                                           settings: repo.RepoSettings) -> None:
    plain = tmp_path / "src" / "plain" / "deeper"
    plain.mkdir(parents=True)
    for path in (plain, plain.parent, tmp_path / "src" / "missing"):
        with pytest.raises(repo.NotARepository, match="not a git repository"):
            repo.prepare(home, "t1", str(path), settings)
    assert not git.is_repository(plain)


def test_inherited_git_variables_are_ignored(home: Path, source: Path, settings: repo.RepoSettings,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "bogus"))
    monkeypatch.setenv("GIT_INDEX_FILE", str(tmp_path / "bogus-index"))
    monkeypatch.setenv("GIT_WORK_TREE", str(tmp_path))
    ws = repo.prepare(home, "t1", str(source), settings)
    assert git.ls_files(ws.path) == ["README", "lib/calc.py"]


def test_every_attempt_starts_again_from_the_base(home: Path, source: Path, settings: repo.RepoSettings,
                                                  ws: repo.Workspace) -> None:
    (ws.path / "junk.txt").write_text("from attempt 1\n")
    repo.commit_changes(ws.path, "attempt 1", base_sha=ws.base_sha)
    (ws.path / "untracked").write_text("x")
    again = repo.prepare(home, "t1", str(source), settings)
    assert git.head(again.path) == ws.base_sha
    assert not (again.path / "junk.txt").exists() and not (again.path / "untracked").exists()
    assert registered(ws.mirror) == [str(ws.path)]


def test_a_branch_another_worktree_has_fails_in_gits_words(home: Path, source: Path,
                                                          settings: repo.RepoSettings) -> None:
    first = repo.prepare(home, "t1", str(source), settings, branch="shared")
    with pytest.raises(repo.GitError, match="already"):
        repo.prepare(home, "t2", str(source), settings, branch="shared")
    assert registered(first.mirror) == [str(first.path)] and git.branch_exists(first.mirror, "shared")
    assert not worktree_path(home, "t2").exists() and not journal_path(home, "t2").exists()


def superproject(tmp_path: Path) -> Path:
    """src/super, with src/lib as its submodule at vendor/lib."""
    sub = tmp_path / "src" / "lib"
    sub.mkdir(parents=True)
    g(sub, "init", "-q")
    commit_file(sub, "vendored.txt", "from the submodule\n", "lib")
    sup = tmp_path / "src" / "super"
    sup.mkdir()
    g(sup, "init", "-q")
    commit_file(sup, "main.txt", "main\n", "main")
    g(sup, "submodule", "add", "-q", "../lib", "vendor/lib")
    g(sup, "commit", "-q", "-m", "add the submodule")
    return sup


def test_a_submodule_is_initialized_in_the_worktree(home: Path, tmp_path: Path,
                                                    settings: repo.RepoSettings) -> None:
    sup = superproject(tmp_path)
    ws = repo.prepare(home, "t1", str(sup), settings)
    assert (ws.path / "vendor" / "lib" / "vendored.txt").read_text() == "from the submodule\n"
    repo.clean_up(home, "t1")
    assert registered(ws.mirror) == [] and list((home / "work").iterdir()) == []


def test_a_submodule_whose_server_never_answers_fails_within_the_fetch_timeout(
        home: Path, tmp_path: Path, settings: repo.RepoSettings) -> None:
    import socket
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the backlog), never answers
    sup = superproject(tmp_path)
    g(sup, "config", "-f", ".gitmodules", "submodule.vendor/lib.url",
      f"git://127.0.0.1:{silent.getsockname()[1]}/lib")
    g(sup, "commit", "-q", "-am", "the submodule from a server")
    started = time.monotonic()
    try:
        # before: `submodule update` had no time limit, and held the mirror's lock for good
        with pytest.raises(git.GitError, match="timed out after 2"):
            repo.prepare(home, "t1", str(sup), settings, fetch_timeout_s=2)
    finally:
        silent.close()
    assert time.monotonic() - started < 30
    mirror = mirror_path(home, str(sup))
    assert registered(mirror) == [] and not (home / "work" / "t1").exists()


def _prepare_many(home: Path, source: Path, settings: repo.RepoSettings, ids: list[str]) -> list:
    errors: list[BaseException] = []
    start = threading.Barrier(len(ids))

    def one(task_id: str) -> None:
        try:
            start.wait()
            repo.prepare(home, task_id, str(source), settings)
        except BaseException as exc:  # noqa: B036 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return errors


def test_eight_threads_make_worktrees_on_one_mirror_at_once(home: Path, source: Path,
                                                            settings: repo.RepoSettings) -> None:
    ids = [f"th{i}" for i in range(8)]
    assert _prepare_many(home, source, settings, ids) == []  # the first ones race to make the mirror
    mirror = mirror_path(home, str(source))
    assert sorted(registered(mirror)) == sorted(str(home / "work" / i) for i in ids)
    assert _prepare_many(home, source, settings, ids) == []  # again: resets and fetches race
    assert sorted(registered(mirror)) == sorted(str(home / "work" / i) for i in ids)


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from koubou_spool import repo
    home, source, allowed, task_id = sys.argv[1:]
    settings = repo.RepoSettings(allowed=(allowed,))
    for _ in range(2):
        ws = repo.prepare(Path(home), task_id, source, settings)
        (ws.path / "README").write_text(task_id)
        assert repo.commit_changes(ws.path, task_id, base_sha=ws.base_sha)
""")


def test_eight_processes_make_worktrees_on_one_mirror_with_clean_stderr(home: Path, source: Path,
                                                                        tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(home), str(source), str(tmp_path / "src"),
                               f"p{i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(8)]
    outcomes = [(proc.wait(timeout=120), *proc.communicate()) for proc in procs]
    assert [(code, err) for code, _, err in outcomes] == [(0, b"")] * 8
    mirror = mirror_path(home, str(source))
    assert len(registered(mirror)) == 8
    assert all(g(mirror, "log", "-1", "--format=%s", f"koubou/p{i}") == f"p{i}" for i in range(8))


# --- after the craftsman -------------------------------------------------------------------


def test_commit_changes_with_and_without_changes(ws: repo.Workspace) -> None:
    assert repo.commit_changes(ws.path, "nothing", base_sha=ws.base_sha) is None
    (ws.path / "lib" / "calc.py").write_text("def add(a, b):\n    return b + a\n")
    (ws.path / "lib" / "new.py").write_text("x = 1\n")
    message = repo.commit_message("# Fix the adder\n\nDetails follow.", "t1")
    sha = repo.commit_changes(ws.path, message, "Bot <bot@example.com>", base_sha=ws.base_sha)
    assert sha == git.head(ws.path) and g(ws.path, "rev-parse", "HEAD~1") == ws.base_sha
    assert g(ws.path, "log", "-1", "--format=%an <%ae>|%cn|%B") == \
        "Bot <bot@example.com>|Bot|# Fix the adder\n\nKoubou-Task: t1"
    changes = repo.summary(ws.path, ws.base_sha)
    assert (changes.files_changed, changes.insertions, changes.deletions) == (2, 2, 1)
    assert b"+    return b + a" in changes.patch and "new.py" in changes.patch_text
    assert repo.commit_changes(ws.path, "again", base_sha=ws.base_sha) == sha  # nothing new: HEAD


def test_the_agents_own_commits_are_kept(ws: repo.Workspace) -> None:
    agent_sha = commit_file(ws.path, "agent.txt", "by the agent\n", "the agent's commit")
    assert repo.commit_changes(ws.path, "t1", base_sha=ws.base_sha) == agent_sha
    (ws.path / "left-over.txt").write_text("not committed by the agent\n")
    sha = repo.commit_changes(ws.path, "t1", base_sha=ws.base_sha)
    assert g(ws.path, "rev-parse", "HEAD~1") == agent_sha and sha == git.head(ws.path)
    assert repo.summary(ws.path, ws.base_sha).files_changed == 2


def test_summary_counts_renames_and_binary_files(ws: repo.Workspace) -> None:
    g(ws.path, "mv", "README", "README.md")
    (ws.path / "logo.bin").write_bytes(bytes(range(256)))
    repo.commit_changes(ws.path, "t1", base_sha=ws.base_sha)
    changes = repo.summary(ws.path, ws.base_sha)
    assert (changes.files_changed, changes.insertions, changes.deletions) == (2, 0, 0)
    assert b"GIT binary patch" in changes.patch


GOOD_ANSWER = '''Here is the fix:

```diff
diff --git a/lib/calc.py b/lib/calc.py
--- a/lib/calc.py
+++ b/lib/calc.py
@@ -1,2 +1,3 @@
 def add(a, b):
+    """Add two numbers."""
     return a + b
```

It documents the function.
'''


def test_apply_diff_applies_a_fenced_diff(ws: repo.Workspace) -> None:
    assert repo.apply_diff(ws.path, GOOD_ANSWER) == ["lib/calc.py"]
    assert '"""Add two numbers."""' in (ws.path / "lib" / "calc.py").read_text()


def test_apply_diff_takes_a_bare_diff_with_miscounted_hunks_and_new_files(ws: repo.Workspace) -> None:
    answer = ("Sure.\n--- /dev/null\n+++ b/docs/notes.md\n@@ -0,0 +1,9 @@\n+# Notes\n+one line\n"
              "--- a/README\n+++ b/README\n@@ -1 +1 @@\n-hello\n+hello, world\n")
    assert repo.apply_diff(ws.path, answer) == ["README", "docs/notes.md"]
    assert (ws.path / "docs" / "notes.md").read_text() == "# Notes\none line\n"


def test_apply_diff_recounts_hunks_and_joins_fences(ws: repo.Workspace) -> None:
    (ws.path / "lib" / "calc.py").write_text("".join(f"line {i}\n" for i in range(1, 21)))
    g(ws.path, "add", "lib/calc.py")  # --3way works on the index: the base is staged, as after a checkout
    answer = ("First part:\n```diff\n--- a/lib/calc.py\n+++ b/lib/calc.py\n@@ -2,3 +2,3 @@\n line 2\n"
              "-line 3\n+line three\n line 4\n@@ -17,1 +17,1 @@\n line 17\n-line 18\n+line eighteen\n"
              " line 19\n```\nSecond part:\n```\n--- a/README\n+++ b/README\n@@ -1,5 +1,5 @@\n-hello\n"
              "+hi\n\n```\n")
    assert repo.apply_diff(ws.path, answer) == ["README", "lib/calc.py"]
    text = (ws.path / "lib" / "calc.py").read_text()
    assert "line three\n" in text and "line eighteen\n" in text and (ws.path / "README").read_text() == "hi\n"


@pytest.mark.parametrize("name", ["../outside.txt", "lib/../../outside.txt", "/tmp/outside.txt",
                                  ".git/hooks/post-commit"])
def test_apply_diff_refuses_paths_outside_the_worktree(ws: repo.Workspace, tmp_path: Path, name: str) -> None:
    outside = tmp_path / "home" / "outside.txt"
    outside.write_text("keep\n")
    answer = f"--- a/{name}\n+++ b/{name}\n@@ -1 +1 @@\n-keep\n+changed\n"
    if name.startswith("/"):
        answer = f"--- {name}\n+++ {name}\n@@ -1 +1 @@\n-keep\n+changed\n"
    with pytest.raises(repo.DiffRefused):
        repo.apply_diff(ws.path, answer)
    assert outside.read_text() == "keep\n" and g(ws.path, "status", "--porcelain") == ""


def test_apply_diff_refuses_a_path_through_a_symlink_out(ws: repo.Workspace, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("keep\n")
    (ws.path / "link").symlink_to(outside)
    for name in ("link/victim.txt", "link/new.txt"):
        answer = f"diff --git a/{name} b/{name}\n--- a/{name}\n+++ b/{name}\n@@ -1 +1 @@\n-keep\n+owned\n"
        with pytest.raises(repo.DiffRefused, match="symlink"):
            repo.apply_diff(ws.path, answer)
    creates_link = ("diff --git a/l b/l\nnew file mode 120000\n--- /dev/null\n+++ b/l\n@@ -0,0 +1 @@\n"
                    "+/etc\n\\ No newline at end of file\n")
    with pytest.raises(repo.DiffRefused, match="symbolic link"):
        repo.apply_diff(ws.path, creates_link)
    # an existing link retargeted, with git's mode line and without: before, both were applied
    (ws.path / "inside").symlink_to("lib")
    for header in ("index 1234567..89abcde 120000\n", ""):
        retargets = (f"diff --git a/inside b/inside\n{header}--- a/inside\n+++ b/inside\n"
                     "@@ -1 +1 @@\n-lib\n\\ No newline at end of file\n+/root/.ssh\n"
                     "\\ No newline at end of file\n")
        with pytest.raises(repo.DiffRefused, match="symbolic link"):
            repo.apply_diff(ws.path, retargets)
    assert os.readlink(ws.path / "inside") == "lib"
    renames_out = "diff --git a/README b/x\nsimilarity index 100%\nrename from README\nrename to ../x\n"
    with pytest.raises(repo.DiffRefused):
        repo.apply_diff(ws.path, renames_out)
    assert (outside / "victim.txt").read_text() == "keep\n" and sorted(os.listdir(outside)) == ["victim.txt"]


def test_apply_diff_fails_in_gits_words_when_it_does_not_apply(ws: repo.Workspace) -> None:
    answer = "--- a/README\n+++ b/README\n@@ -1 +1 @@\n-no such line\n+replacement\n"
    with pytest.raises(repo.DiffNotApplied) as caught:
        repo.apply_diff(ws.path, answer)
    assert str(caught.value).startswith("the diff does not apply: ") and "README" in caught.value.stderr
    with pytest.raises(repo.DiffRefused, match="no unified diff"):
        repo.apply_diff(ws.path, "I could not work out a fix, sorry.")


def test_verify_passes_and_fails_with_its_output_tail(ws: repo.Workspace) -> None:
    passed = repo.run_verify(["sh", "-c", "echo ok; pwd"], ws.path, 10)
    assert passed["exit_code"] == 0 and passed["timed_out"] is False
    assert passed["output_tail"] == f"ok\n{ws.path}\n" and passed["argv"] == ["sh", "-c", "echo ok; pwd"]
    failed = repo.run_verify([sys.executable, "-c", "import sys; print('x' * 100000); "
                              "sys.exit('FAILED: test_add')"], ws.path, 10)
    assert failed["exit_code"] == 1 and failed["output_tail"].endswith("FAILED: test_add\n")
    assert len(failed["output_tail"]) <= 4096
    missing = repo.run_verify(["no-such-verify-command"], ws.path, 10)
    assert missing["exit_code"] == 127 and "No such file" in missing["output_tail"]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_a_hanging_verify_is_killed_with_its_process_group(ws: repo.Workspace) -> None:
    script = "trap '' TERM; sleep 600 & echo $! > child.pid; echo started; wait"  # both ignore TERM
    started = time.monotonic()
    result = repo.run_verify(["sh", "-c", script], ws.path, 1.0)
    assert time.monotonic() - started < 2.0
    assert result["timed_out"] is True and result["exit_code"] == -signal.SIGKILL
    assert result["output_tail"] == "started\n" and 1.0 <= result["duration_s"] < 2.0
    child = int((ws.path / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while not _gone(child) and time.monotonic() < deadline:  # reaped by init, not by us
        time.sleep(0.05)
    assert _gone(child)


def test_push_to_the_source_leaves_its_work_untouched(home: Path, source: Path, ws: repo.Workspace) -> None:
    before = g(source, "status", "--porcelain")
    (ws.path / "pushed.txt").write_text("result\n")
    sha = repo.commit_changes(ws.path, "t1", base_sha=ws.base_sha)
    g(ws.path, "checkout", "-q", "--detach")  # an agent that left its branch: the result is pushed
    repo.push_result(home, ws, sha)
    assert g(source, "rev-parse", "koubou/t1") == sha
    assert (source / "README").read_text() == "the user's uncommitted edit\n"
    assert g(source, "status", "--porcelain") == before
    g(ws.path, "checkout", "-q", "koubou/t1")
    g(ws.path, "reset", "-q", "--hard", ws.base_sha)  # a retry's result does not descend from the first
    (ws.path / "retry.txt").write_text("a retry's result\n")
    repo.commit_changes(ws.path, "t1", base_sha=ws.base_sha)
    repo.push(ws.path, str(source), "koubou/t1")  # koubou/ branches are forced
    assert g(source, "rev-parse", "koubou/t1") == git.head(ws.path)
    repo.clean_up(home, "t1")
    assert git.branch_exists(ws.mirror, "koubou/t1")  # pushed: published, kept


def test_push_refusals_are_clear(home: Path, source: Path, settings: repo.RepoSettings) -> None:
    ws = repo.prepare(home, "t2", str(source), settings, branch="feature")
    diverged = g(source, "commit-tree", "v1^{tree}", "-p", "v1", "-m", "someone else's work")
    g(source, "branch", "feature", diverged)
    (ws.path / "f.txt").write_text("f\n")
    repo.commit_changes(ws.path, "t2", base_sha=ws.base_sha)
    with pytest.raises(repo.PushRefused, match="the branch there has commits the result does not"):
        repo.push(ws.mirror, str(source), "feature")
    ours = repo.prepare(home, "t3", str(source), settings)
    (ours.path / "f.txt").write_text("f\n")
    repo.commit_changes(ours.path, "t3", base_sha=ours.base_sha)
    g(source, "stash", "-q", "-u")
    g(source, "checkout", "-q", "-b", "koubou/t3")
    with pytest.raises(repo.PushRefused, match="it is the branch checked out there"):
        repo.push(ours.mirror, str(source), "koubou/t3")


# --- clean-up and recovery -----------------------------------------------------------------


CRASH = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from koubou_spool import repo
    home, source, allowed = sys.argv[1:]
    ws = repo.prepare(Path(home), "crashed", source, repo.RepoSettings(allowed=(allowed,)))
    (ws.path / "half-done.txt").write_text("the agent was here")
    os.kill(os.getpid(), signal.SIGKILL)  # before the commit
""")


def test_clean_up_after_a_crash_leaves_no_worktree_registered(home: Path, source: Path,
                                                              tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", CRASH, str(home), str(source), str(tmp_path / "src")],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    mirror = mirror_path(home, str(source))
    assert registered(mirror) == [str(home / "work" / "crashed")]
    assert json.loads(journal_path(home, "crashed").read_text())["branch"] == "koubou/crashed"
    assert repo.clean_up(home, "crashed") is True
    assert registered(mirror) == [] and list((home / "work").iterdir()) == []
    assert not journal_path(home, "crashed").exists() and not git.branch_exists(mirror, "koubou/crashed")
    assert g(mirror, "worktree", "list") == f"{mirror}  (bare)"
    assert repo.clean_up(home, "crashed") is False


def test_maintain_leaves_the_worktree_of_an_attempt_begun_after_it_read_the_claims(
        home: Path, source: Path, settings: repo.RepoSettings) -> None:
    repo.prepare(home, "r1", str(source), settings)  # a failed attempt's, kept; r1 pending

    def claims_then_a_claim() -> set[str]:
        live: set[str] = set()  # read now: nobody holds r1
        repo.prepare(home, "r1", str(source), settings)  # then a worker claims it: attempt 2
        (worktree_path(home, "r1") / "work.txt").write_text("attempt 2's\n")
        return live
    # before: maintain removed attempt 2's worktree and journal, mid-run
    assert repo.prune(home, claims_then_a_claim) == []
    assert (worktree_path(home, "r1") / "work.txt").exists() and journal_path(home, "r1").exists()
    assert repo.prune(home, set()) == ["r1"]  # stale again once nobody holds it
    assert not worktree_path(home, "r1").exists() and not journal_path(home, "r1").exists()


def test_clean_up_removes_a_directory_the_craftsman_made_read_only(
        home: Path, ws: repo.Workspace) -> None:
    (ws.path / "cache" / "deep").mkdir(parents=True)
    (ws.path / "cache" / "deep" / "built.o").write_text("x")
    (ws.path / "cache" / "deep").chmod(0o555)
    (ws.path / "cache").chmod(0o500)
    # As the workers' user, not root: root's CAP_DAC_OVERRIDE would remove it anyway.
    if os.geteuid() == 0:
        argv = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]
    else:
        argv = []
    cleaned = subprocess.run(
        [*argv, sys.executable, "-c", "import sys; from pathlib import Path; "
         "from koubou_spool.repo import worktree; worktree.clean_up(Path(sys.argv[1]), 't1')",
         str(home)], env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=60)
    assert cleaned.returncode == 0, cleaned.stderr
    # before: rmtree left cache/ behind, and the next attempt's `worktree add` failed on it
    assert not ws.path.exists()
    again = repo.prepare(home, "t1", str(ws.source), repo.RepoSettings(allowed=(ws.source,)))
    assert (again.path / "README").exists()


def test_clean_up_when_the_crash_came_mid_add(home: Path, source: Path, ws: repo.Workspace) -> None:
    # The journal was written, then the worker died inside `git worktree add`: a directory
    # with part of a checkout, and perhaps no registration yet.
    record = json.loads(journal_path(home, "t1").read_text())
    journal_path(home, "t2").write_text(json.dumps({**record, "task_id": "t2", "branch": "koubou/t2",
                                                    "path": str(home / "work" / "t2")}))
    (home / "work" / "t2").mkdir()
    (home / "work" / "t2" / "README").write_text("partial")
    repo.clean_up(home, "t2")
    assert not (home / "work" / "t2").exists() and not journal_path(home, "t2").exists()
    assert registered(ws.mirror) == [str(ws.path)]  # another task's worktree is left alone
    shutil_free = home / "work" / "t3"
    (shutil_free / "sub").mkdir(parents=True)  # no journal, no .git file: removed all the same
    assert repo.clean_up(home, "t3") and not shutil_free.exists()


def test_fifty_create_and_clean_up_cycles_leave_nothing(home: Path, source: Path,
                                                        settings: repo.RepoSettings) -> None:
    for i in range(50):
        ws = repo.prepare(home, f"c{i}", str(source), settings)
        (ws.path / "out.txt").write_text(str(i))
        repo.commit_changes(ws.path, f"cycle {i}", base_sha=ws.base_sha)
        repo.clean_up(home, f"c{i}")
    assert list((home / "work").iterdir()) == [] and list((home / "run" / "worktrees").iterdir()) == []
    assert registered(ws.mirror) == [] and not list((ws.mirror / "worktrees").glob("*"))
    assert g(ws.mirror, "for-each-ref", "refs/heads") == ""
    assert repo.live_worktrees(home) == 0


def test_maintain_prunes_worktrees_no_live_claim_owns(home: Path, source: Path,
                                                      settings: repo.RepoSettings) -> None:
    kept, stale = (repo.prepare(home, i, str(source), settings) for i in ("live", "dead"))
    assert repo.live_worktrees(home) == 2
    assert repo.stale_worktrees(home, {"live"}) == ["dead"]
    assert repo.stale_worktrees(home, {"live"}, min_age_s=3600) == []  # too young to judge
    shutil_dir = kept.mirror.with_name(kept.mirror.name + "+12345")  # a creator killed mid-way
    shutil_dir.mkdir()
    assert repo.prune(home, {"live"}) == ["dead"]
    assert registered(kept.mirror) == [str(kept.path)] and not stale.path.exists()
    assert not shutil_dir.exists()
    sizes = repo.mirrors_size(home)
    assert list(sizes) == [kept.mirror.name] and sizes[kept.mirror.name] > 0


def test_repo_context_lists_files_and_shows_the_named_ones(ws: repo.Workspace, tmp_path: Path) -> None:
    (ws.path / "big.txt").write_text("y" * 5000)
    g(ws.path, "add", "big.txt")
    context = repo.repo_context(ws.path, ["lib/calc.py", "missing.py", "../src/app/README", "big.txt"], 3000)
    assert context.file_list == ["README", "big.txt", "lib/calc.py"]
    assert context.files["lib/calc.py"] == "def add(a, b):\n    return a + b\n"
    assert context.notes == {"missing.py": "not in the repository",
                             "../src/app/README": "outside the repository"}
    assert context.files["big.txt"].endswith("[... truncated]") and len(context.text.encode()) <= 3000
    assert context.text.startswith("Files in the repository (3):\nREADME\nbig.txt\nlib/calc.py\n")


def test_source_locations(tmp_path: Path) -> None:
    assert source_location(f"{tmp_path}/a/../b") == str(tmp_path / "b")
    assert source_location("https://example.com/x.git/") == "https://example.com/x.git"
    with pytest.raises(repo.RepoRefused):
        source_location("ftp://example.com/x")
    assert mirror_path(tmp_path, "git@github.com:me/My App.git").name.startswith("My-App-")
