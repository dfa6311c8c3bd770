"""Who may do what (PRODUCT.md §2), with real accounts: a workers' user, a member, an outsider.

The accounts are made with useradd/groupadd for this module and removed after it, so it needs
root. Every command runs as its account in a subprocess (tests/run_as.py). pytest's tmp_path
lives under a directory only root may enter, so the home is under a directory of our own in
/tmp (made by mkdtemp, removed after), which the accounts can reach.
"""

from __future__ import annotations

import json
import grp
import os
import pwd
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from koubou_spool.cli.koubou import cli

ROOT = Path(__file__).resolve().parent.parent
RUN_AS = Path(__file__).resolve().parent / "run_as.py"
SUBMIT = Path(sys.executable).parent / "koubou-submit"  # the installed console script
TIMEOUT = 120

# The modes of §2, spelled out here rather than imported: this is the contract.
MODES = {"": 0o2750, "config": 0o700, "tasks": 0o2750, "tasks/tmp": 0o3770,
         "tasks/pending": 0o3770, "tasks/in_progress": 0o2750, "tasks/completed": 0o2750,
         "tasks/failed": 0o2750, "db": 0o2750, "outputs": 0o2750, "run": 0o2750,
         "run/workers": 0o2750, "config/koubou.yaml": 0o600, "db/koubou.db": 0o640}


def _blocked(path: Path) -> tuple[Path, Path] | None:
    """The outermost directory on the way to `path` that others may not enter, and its child
    on that way; None when others can reach it."""
    real = path.resolve()
    chain = [*reversed(real.parents), real]
    for parent, child in zip(chain, chain[1:], strict=False):
        if not parent.stat().st_mode & stat.S_IXOTH:
            return parent, child
    return None


def _why_not(cover: tuple[Path, Path] | None) -> str | None:
    if os.geteuid() != 0:
        return ("needs root to create throwaway accounts with useradd: bin/koubou-test run as "
                "root enables it")
    missing = [tool for tool in ("useradd", "userdel", "groupadd", "groupdel", "unshare", "mount")
               if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (util-linux, passwd) to run commands as other accounts"
    if cover is not None:
        prefix = Path(sys.prefix).resolve()
        for part in (cover[1], *[p for p in prefix.parents if cover[1] in p.parents], prefix):
            if not part.stat().st_mode & stat.S_IXOTH:
                return (f"other accounts cannot reach the interpreter through {part}, even with "
                        f"{cover[0]} covered")
    return None


@dataclass
class Accounts:
    """The throwaway accounts and a way to run commands as them."""

    base: Path
    group: str
    owner: str
    member: str
    outsider: str
    cover: tuple[Path, Path] | None

    def run(self, user: str, *argv: str, umask: int = 0o022,
            check: bool = False) -> subprocess.CompletedProcess:
        """Run argv as `user` and wait for it."""
        proc = subprocess.run(self.argv(user, argv, umask), env=self.env(user), cwd=self.base,
                              capture_output=True, text=True, timeout=TIMEOUT)
        if check:
            assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
        return proc

    def start(self, user: str, *argv: str, umask: int = 0o022) -> subprocess.Popen:
        """Start argv as `user`; the caller reaps it."""
        log = open(self.base / f"{user}-{len(os.listdir(self.base))}.log", "wb")
        return subprocess.Popen(self.argv(user, argv, umask), env=self.env(user),
                                cwd=self.base, stdout=log, stderr=subprocess.STDOUT)

    def koubou(self, user: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """`koubou ARGS` as `user`."""
        return self.run(user, sys.executable, "-m", "koubou_spool.cli.koubou", *args, **kwargs)

    def python(self, user: str, code: str) -> dict:
        """Run Python code as `user`; it prints one JSON object."""
        proc = self.run(user, sys.executable, "-c", code, check=True)
        return json.loads(proc.stdout)

    def argv(self, user: str, argv: tuple[str, ...], umask: int) -> list[str]:
        wrapper = [sys.executable, str(RUN_AS), user, f"{umask:o}"]
        if self.cover is None:
            return [*wrapper, "--", *argv]
        directory, child = self.cover
        return ["unshare", "--mount", "--propagation", "private", *wrapper, "--cover",
                str(directory), "--via", str(child), "--stash", str(self.base / "stash"), "--",
                *argv]

    def env(self, user: str) -> dict[str, str]:
        return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "LANG": "C.UTF-8",
                "HOME": str(self.base), "USER": user, "PYTHONPATH": str(ROOT),
                "PYTHONDONTWRITEBYTECODE": "1", "NO_PROXY": "127.0.0.1,localhost"}


def _useradd(*args: str) -> None:
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", *args],
                   check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def accounts() -> Iterator[Accounts]:
    """A group with the workers' user and a member, an outsider, and a directory they reach."""
    # base_prefix: in a virtualenv the interpreter and its library are the base's (e.g. pyenv's
    # under /root), which the accounts must reach; the venv's own prefix may be open already.
    cover = _blocked(Path(sys.base_prefix))
    reason = _why_not(cover)
    if reason:
        pytest.skip(reason)
    tag = f"kbt{os.getpid() % 100000}"
    names = {"group": tag, "owner": f"{tag}o", "member": f"{tag}m", "outsider": f"{tag}x"}
    base = Path(tempfile.mkdtemp(prefix="koubou-perms-"))
    base.chmod(0o755)
    (base / "stash").mkdir()
    made_users: list[str] = []
    try:
        subprocess.run(["groupadd", names["group"]], check=True, capture_output=True, timeout=30)
        _useradd("--gid", names["group"], names["owner"])  # the workers' user, as in the README
        made_users.append(names["owner"])
        _useradd("--no-user-group", "--groups", names["group"], names["member"])
        made_users.append(names["member"])
        _useradd("--no-user-group", names["outsider"])
        made_users.append(names["outsider"])
        yield Accounts(base=base, cover=cover, **names)
    finally:
        for user in made_users:
            subprocess.run(["userdel", user], capture_output=True, timeout=30)
        subprocess.run(["groupdel", names["group"]], capture_output=True, timeout=30)
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class TeamHome:
    """A home shared by the group, with tasks a member submitted every way, all run."""

    path: Path
    init: subprocess.CompletedProcess


def _owner_area(accounts: Accounts, name: str) -> Path:
    area = accounts.base / name
    area.mkdir()
    shutil.chown(area, accounts.owner, accounts.group)
    return area / "home"


def _command_craftsman(accounts: Accounts, home: Path) -> None:
    """The default config plus a command craftsman that leaves a file in outputs/<id>/."""
    config_path = home / "config" / "koubou.yaml"
    config = yaml.safe_load(config_path.read_text())
    script = "import sys; open('note.txt', 'w').write('made'); print(sys.stdin.read()[-20:])"
    config["craftsmen"]["agent"] = {"backend": "command", "argv": [sys.executable, "-c", script]}
    config_path.write_text(yaml.safe_dump(config))  # root writes in place: owner and mode stay


@pytest.fixture(scope="module")
def team(accounts: Accounts) -> TeamHome:
    """init --group as the workers' user; a member submits by koubou-submit, by cp and by cp
    with umask 077; a worker drains the queue. Every account has umask 000 where it can."""
    home = _owner_area(accounts, "team")
    init = accounts.koubou(accounts.owner, "init", "--home", str(home), "--group",
                           accounts.group, umask=0o000, check=True)
    _command_craftsman(accounts, home)
    member = accounts.member
    submit = [str(SUBMIT), "--home", str(home), "--craftsman", "echo"]
    accounts.run(member, *submit, "--id", "by-submit", "hello from the member", umask=0o000,
                 check=True)
    accounts.run(member, *submit[:3], "--craftsman", "agent", "--id", "by-agent",
                 "an agent's task", umask=0o000, check=True)
    drop = accounts.base / "drop.json"
    drop.write_text(json.dumps({"content": "copied in", "craftsman": "echo"}))
    drop.chmod(0o644)
    pending = home / "tasks" / "pending"
    accounts.run(member, "cp", str(drop), str(pending / "by-cp.json"), check=True)
    accounts.run(member, "cp", str(drop), str(pending / "private.json"), umask=0o077, check=True)
    accounts.koubou(accounts.owner, "worker", "--home", str(home), "--drain", umask=0o000,
                    check=True)
    return TeamHome(home, init)


# --- the modes ------------------------------------------------------------------------------

def test_init_gives_every_path_its_mode_and_the_group(accounts: Accounts, team: TeamHome) -> None:
    for relative, mode in MODES.items():
        info = (team.path / relative).stat()
        assert stat.S_IMODE(info.st_mode) == mode, f"{relative}: {stat.S_IMODE(info.st_mode):o}"
        assert info.st_gid == (team.path / "").stat().st_gid
    assert team.path.owner() == accounts.owner and team.path.group() == accounts.group
    assert "repaired" not in team.init.stderr  # a new home has nothing to repair


def test_nothing_in_the_home_is_open_to_others_after_umask_000(team: TeamHome) -> None:
    seen = 0
    for directory, dirs, files in os.walk(team.path):
        for name in dirs + files:
            info = os.lstat(os.path.join(directory, name))
            seen += 1
            if not stat.S_ISLNK(info.st_mode):
                assert info.st_mode & 0o007 == 0, f"{directory}/{name}: {info.st_mode:o}"
    outputs = team.path / "outputs" / "by-agent"
    assert (outputs / "note.txt").read_text() == "made"  # the agent ran, under its own umask
    assert stat.S_IMODE((outputs / "note.txt").stat().st_mode) == 0o640
    assert seen > 20


# --- a member -------------------------------------------------------------------------------

def test_a_member_reads_the_results_of_what_she_submitted(accounts: Accounts,
                                                         team: TeamHome) -> None:
    home = ["--home", str(team.path)]
    result = accounts.koubou(accounts.member, "result", "by-submit", *home, check=True)
    assert result.stdout.strip().endswith("hello from the member")
    assert accounts.koubou(accounts.member, "result", "by-cp", *home,
                           check=True).stdout.strip().endswith("copied in")
    status = json.loads(accounts.koubou(accounts.member, "status", "by-agent", "--json", *home,
                                        check=True).stdout)
    assert status["state"] == "completed" and status["attempts"], status  # ledger read
    listed = accounts.koubou(accounts.member, "list", *home, check=True).stdout
    assert "by-submit" in listed and "by-cp" in listed
    report = json.loads(accounts.koubou(accounts.member, "report", "--json", *home,
                                        check=True).stdout)
    assert report["tasks"]["by_state"]["completed"] >= 3, report["tasks"]  # from the ledger, read-only


def test_a_dropped_file_the_workers_cannot_read_fails_with_its_reason(
        accounts: Accounts, team: TeamHome) -> None:
    found = json.loads(accounts.koubou(accounts.member, "status", "private.json", "--json",
                                       "--home", str(team.path), check=True).stdout)
    assert found["state"] == "failed" and found["rejected"]
    assert "not readable by the workers' user (mode 0600" in found["error"]["message"]
    assert accounts.member in found["error"]["message"]


def test_a_member_cannot_write_the_ledger_or_an_outcome(accounts: Accounts,
                                                       team: TeamHome) -> None:
    tried = accounts.python(accounts.member, f"""
import json, os, sqlite3
home = {str(team.path)!r}
tried = {{}}
def attempt(name, action):
    try:
        action()
        tried[name] = "done"
    except (OSError, sqlite3.Error) as exc:
        tried[name] = type(exc).__name__ + ": " + str(exc)
def forge():
    conn = sqlite3.connect(home + "/db/koubou.db", timeout=1)
    conn.execute("INSERT INTO tasks (id, status, cost_usd) VALUES ('forged', 'completed', 0)")
    conn.commit()
def forge_spend():
    conn = sqlite3.connect(home + "/db/koubou.db", timeout=1)
    conn.execute("DELETE FROM reservations")
    conn.commit()
attempt("ledger insert", forge)
attempt("ledger delete", forge_spend)
attempt("outcome append", lambda: open(home + "/tasks/completed/by-submit.json", "a"))
attempt("outcome replace", lambda: os.rename(home + "/tasks/completed/by-submit.json",
                                            home + "/tasks/completed/x.json"))
attempt("outcome create", lambda: open(home + "/tasks/completed/forged.json", "x"))
attempt("config read", lambda: open(home + "/config/koubou.yaml"))
print(json.dumps(tried))
""")
    assert "readonly database" in tried.pop("ledger insert")
    assert "readonly database" in tried.pop("ledger delete")
    assert all(v.startswith("PermissionError") for v in tried.values()), tried
    with closing(sqlite3.connect(team.path / "db" / "koubou.db")) as conn:
        assert conn.execute("SELECT COUNT(*) FROM tasks WHERE id = 'forged'").fetchone() == (0,)


def test_members_read_the_ledger_while_a_worker_holds_it(accounts: Accounts,
                                                        team: TeamHome) -> None:
    home = ["--home", str(team.path)]
    worker = accounts.start(accounts.owner, sys.executable, "-m", "koubou_spool.cli.koubou",
                            "worker", *home, umask=0o000)
    try:
        done = accounts.run(accounts.member, str(SUBMIT), *home, "--craftsman", "echo", "--id",
                            "while-running", "--wait", "--timeout", "60", "live", check=True)
        assert done.stdout.strip().endswith("live")
        db = team.path / "db"
        for name in ("koubou.db-wal", "koubou.db-shm"):  # the worker's connection keeps them
            info = (db / name).stat()
            assert stat.S_IMODE(info.st_mode) == 0o640 and info.st_gid == db.stat().st_gid
        status = json.loads(accounts.koubou(accounts.member, "status", "--json", *home,
                                            check=True).stdout)
        assert [w["liveness"] for w in status["workers"]] == ["alive"]
        assert "heartbeat_at" in status["workers"][0]  # a row of the ledger, read through WAL
        report = json.loads(accounts.koubou(accounts.member, "report", "--json", *home,
                                            check=True).stdout)
        assert report["tasks"]["by_state"]["completed"] >= 4
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0


def test_members_read_the_ledger_when_no_one_holds_it(accounts: Accounts,
                                                     team: TeamHome) -> None:
    db = team.path / "db" / "koubou.db"
    # The last writer to close checkpoints and deletes -wal and -shm; a member may not create
    # them again, so she reads the database file alone (complete without a -wal).
    accounts.python(accounts.owner, f"""
import json, sqlite3
conn = sqlite3.connect({str(db)!r})
conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
conn.close()
print("{{}}")
""")
    assert not Path(f"{db}-wal").exists() and not Path(f"{db}-shm").exists()
    home = ["--home", str(team.path)]
    report = json.loads(accounts.koubou(accounts.member, "report", "--json", *home,
                                        check=True).stdout)
    assert report["tasks"]["by_state"]["completed"] >= 3
    status = json.loads(accounts.koubou(accounts.member, "status", "by-submit", "--json", *home,
                                        check=True).stdout)
    assert status["attempts"][0]["outcome"] == "completed"
    assert not Path(f"{db}-wal").exists()  # the member wrote nothing, not even a -shm


def test_members_are_told_who_may_cancel(accounts: Accounts, team: TeamHome) -> None:
    proc = accounts.koubou(accounts.member, "cancel", "by-submit", "--home", str(team.path))
    assert proc.returncode == 4 and len(proc.stderr.strip().splitlines()) == 1
    assert f"only the workers' user {accounts.owner} writes there" in proc.stderr


# --- an outsider ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["status"], ["list"], ["result", "by-submit"], ["report"], ["workers"],
    ["wait", "by-submit", "--timeout", "1"], ["cancel", "by-submit"], ["retry", "private"],
    ["submit", "let me in"],
], ids=lambda argv: argv[0])
def test_an_outsider_gets_one_sentence_naming_the_group(accounts: Accounts, team: TeamHome,
                                                       argv: list[str]) -> None:
    if argv[0] == "submit":
        proc = accounts.run(accounts.outsider, str(SUBMIT), "--home", str(team.path), *argv[1:])
    else:
        proc = accounts.koubou(accounts.outsider, *argv, "--home", str(team.path))
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"usermod -aG {accounts.group} {accounts.outsider}" in lines[0]
    assert proc.stdout == ""


def test_an_outsider_can_read_nothing(accounts: Accounts, team: TeamHome) -> None:
    tried = accounts.python(accounts.outsider, f"""
import errno, json, os
home = {str(team.path)!r}
tried = {{}}
for name, path in (("outcome", "/tasks/completed/by-submit.json"), ("ledger", "/db/koubou.db"),
                   ("pending", "/tasks/pending/new.json")):
    try:
        open(home + path, "x" if name == "pending" else "rb")
        tried[name] = "opened"
    except OSError as exc:
        tried[name] = errno.errorcode[exc.errno]
try:
    os.listdir(home)
    tried["list"] = "listed"
except OSError as exc:
    tried["list"] = errno.errorcode[exc.errno]
print(json.dumps(tried))
""")
    assert tried == {"outcome": "EACCES", "ledger": "EACCES", "pending": "EACCES",
                     "list": "EACCES"}


# --- repair ---------------------------------------------------------------------------------

def test_init_again_repairs_modes_and_says_what_it_changed(accounts: Accounts) -> None:
    home = _owner_area(accounts, "repair")
    owner = accounts.owner
    accounts.koubou(owner, "init", "--home", str(home), check=True)
    assert home.group() == accounts.group  # the owner's primary group by default
    outcome = home / "tasks" / "completed" / "old.json"
    outcome.write_text("{}")
    shutil.chown(outcome, owner, accounts.group)
    for path, mode in ((home, 0o755), (home / "tasks" / "pending", 0o777),
                       (home / "config", 0o755), (outcome, 0o644)):
        os.chmod(path, mode)
    doctor = accounts.koubou(owner, "doctor", "--json", "--home", str(home))
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    named = " ".join(p["message"] for p in checks["permissions"]["problems"])
    for path in (home, home / "tasks" / "pending", home / "config", outcome):
        assert f"{path} has mode" in named, named
    again = accounts.koubou(owner, "init", "--home", str(home), umask=0o000, check=True)
    assert again.stdout.strip() == str(home)
    assert f"repaired {home}: mode 0755 -> 2750" in again.stderr
    assert f"repaired {home}/tasks/pending: mode 0777 -> 3770" in again.stderr
    assert f"repaired {home}/config: mode 0755 -> 0700" in again.stderr
    assert f"repaired {outcome}: mode 0644 -> 0640" in again.stderr
    for relative, mode in MODES.items():
        assert stat.S_IMODE((home / relative).stat().st_mode) == mode, relative
    assert stat.S_IMODE(outcome.stat().st_mode) == 0o640
    doctor = accounts.koubou(owner, "doctor", "--json", "--home", str(home))
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["permissions"]["status"] == "ok", checks["permissions"]
    third = accounts.koubou(owner, "init", "--home", str(home), check=True)
    assert "repaired" not in third.stderr


def test_a_group_the_workers_user_is_not_in_is_refused(accounts: Accounts) -> None:
    home = _owner_area(accounts, "strange-group")
    other = grp.getgrgid(pwd.getpwnam(accounts.outsider).pw_gid).gr_name
    proc = accounts.koubou(accounts.owner, "init", "--home", str(home), "--group", other)
    assert proc.returncode == 4 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"sudo usermod -aG {other} {accounts.owner}" in proc.stderr


def test_only_the_workers_user_may_init_a_home(accounts: Accounts, team: TeamHome) -> None:
    proc = accounts.koubou(accounts.member, "init", "--home", str(team.path))
    assert proc.returncode == 4
    assert f"only the workers' user {accounts.owner} may run `koubou init`" in proc.stderr


def test_modes_are_explicit_whatever_the_umask_of_the_caller(tmp_path: Path) -> None:
    """Any account (no root needed): init and a submission under umask 000."""
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KOUBOU_HOME": str(home)}
    for argv in (["-m", "koubou_spool.cli.koubou", "init"],
                 ["-m", "koubou_spool.cli.submit", "--id", "t1", "hello"]):
        subprocess.run([sys.executable, *argv], env=env, umask=0, check=True,
                       capture_output=True, timeout=TIMEOUT)
    for relative, mode in MODES.items():
        assert stat.S_IMODE((home / relative).stat().st_mode) == mode, relative
    assert stat.S_IMODE((home / "tasks" / "pending" / "t1.json").stat().st_mode) == 0o640
    assert home.stat().st_gid == pwd.getpwuid(os.geteuid()).pw_gid


def test_an_unknown_group_is_named(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["init", "--home", str(tmp_path / "h"), "--group",
                                      "no-such-group-kb"])
    assert result.exit_code == 2 and "groupadd no-such-group-kb" in result.stderr
    assert not (tmp_path / "h").exists()
