"""Stands in for `claude -p` / `codex exec` on a repository task: edits files as its prompt says.

    python repo_agent.py [hang PIDFILE]

Reads the prompt on stdin and acts on its lines, in the worktree it runs in:
  WRITE path=text         write `text` (\\n for newlines) to path
  COMMIT message          commit what is staged and unstaged, as the agent itself
  FIX-FROM-VERIFY         if the prompt holds "missing: NAME" (a verify's output), create NAME
  SLEEP seconds           sleep (to be killed mid-run); SLEEP-ONCE: only in the task's first run
  CHILD-ONCE seconds      in the task's first run, leave a child sleeping that long (its pid in
                          the log's "child"), as an agent's build or shell may outlive it
  MANY n                  write n small files (so that koubou's commit takes a while)
  READ-SSH                write what it could read of ~/.ssh/id_rsa to ssh.txt ("unreadable")
  RM-HOME                 try to delete everything in $HOME, as a careless agent might
  POISON-GIT path         as a hostile agent would: a clean filter `cat path` in the mirror's
                          config for every *.txt, a hook, its worktree's gitdir pointed away;
                          what it could change goes to poison.txt ({name: written|refused})
It prints "done". With REPO_AGENT_LOG set, it writes there, per run, its prompt and KOUBOU_*
environment (<task>-<n>.json), outside the worktree so nothing of it is committed.
`hang PIDFILE` writes its pid to PIDFILE and sleeps, for kill tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    if sys.argv[1:2] == ["hang"]:
        Path(sys.argv[2]).write_text(str(os.getpid()))
        time.sleep(120)
        return
    prompt = sys.stdin.read()
    child = None
    for line in prompt.splitlines():
        command, _, rest = line.strip().partition(" ")
        if command == "WRITE":
            path, _, text = rest.partition("=")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text.replace("\\n", "\n"))
        elif command == "COMMIT":
            subprocess.run(["git", "add", "-A"], check=True)
            subprocess.run(["git", "-c", "user.name=agent", "-c", "user.email=agent@test",
                            "commit", "-q", "-m", rest], check=True)
        elif command == "MANY":
            Path("many").mkdir(exist_ok=True)
            for n in range(int(rest)):
                Path("many", f"{n}.txt").write_text(f"{n}\n")
        elif command == "READ-SSH":
            try:
                found = (Path.home() / ".ssh" / "id_rsa").read_text()
            except OSError:
                found = "unreadable"
            Path("ssh.txt").write_text(found)
        elif command == "POISON-GIT":
            _poison_git(rest)
        elif command == "RM-HOME":
            for entry in Path.home().iterdir():
                subprocess.run(["rm", "-rf", str(entry)], check=False)
        elif command == "FIX-FROM-VERIFY":
            for name in re.findall(r"missing: ([\w.-]+)", prompt)[-1:]:
                Path(name).write_text("fixed\n")
        elif command == "CHILD-ONCE" and not _ran_before():
            child = subprocess.Popen(["sleep", rest])
        elif command == "SLEEP" or (command == "SLEEP-ONCE" and not _ran_before()):
            _log(prompt, started=True, child=child)
            time.sleep(float(rest))
    _log(prompt)
    print("done")


def _poison_git(secret: str) -> None:
    """What koubou's own `git add -A`, run outside the sandbox after the agent, would obey."""
    admin = Path(Path(".git").read_text().split(": ", 1)[1].strip())
    common = (admin / (admin / "commondir").read_text().strip()).resolve()
    attempts = {
        "config": lambda: (common / "config").open("a").write(
            f'[filter "steal"]\n\tclean = cat {secret}\n'),
        "hook": lambda: (common / "hooks" / "post-commit").write_text(f"#!/bin/sh\ncat {secret}\n"),
        "commondir": lambda: (admin / "commondir").open("a").close(),
        ".git": lambda: Path(".git").open("a").close(),
    }
    changed = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            changed[name] = "written"
        except OSError:
            changed[name] = "refused"
    Path(".gitattributes").write_text("*.txt filter=steal\n")
    Path("poison.txt").write_text(json.dumps(changed))


def _ran_before() -> bool:
    folder = os.environ.get("REPO_AGENT_LOG")
    return bool(folder) and any(Path(folder).glob(f"{Path.cwd().name}-*.json"))


def _log(prompt: str, started: bool = False, child: subprocess.Popen | None = None) -> None:
    folder = os.environ.get("REPO_AGENT_LOG")
    if not folder:
        return
    task = Path.cwd().name
    runs = len(list(Path(folder).glob(f"{task}-*.json")))
    record = {"pid": os.getpid(), "cwd": os.getcwd(), "prompt": prompt, "started": started,
              "at": time.time(), "child": child.pid if child else None,
              "env": {k: v for k, v in os.environ.items() if k.startswith("KOUBOU_")}}
    # Whole or not at all: the tests read these while the agent runs (a reader once met an
    # empty file between the create and the write).
    staging = Path(folder, f".{task}-{runs + 1}.tmp")
    staging.write_text(json.dumps(record))
    os.replace(staging, Path(folder, f"{task}-{runs + 1}.json"))


if __name__ == "__main__":
    main()
