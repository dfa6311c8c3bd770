"""Stands in for CLI agents in tests: `claude -p --output-format json`, `codex exec --json`.

    python fake_agent.py claude|codex|fail|hang [PIDFILE]|args [--evil] [PROMPT...]|flood STREAM

Reads the prompt on stdin (`args`: in its arguments, and says whether --evil was an option).
`hang` starts a child that would outlive it, writes the child's pid to PIDFILE, and sleeps: the
worker's timeout must kill the whole process group. `flood` writes 10 MB to stdout or stderr,
then answers "done".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def main() -> None:
    mode = sys.argv[1]
    prompt = sys.stdin.read()
    if mode == "args":
        parser = argparse.ArgumentParser()
        parser.add_argument("--evil", action="store_true")
        parser.add_argument("prompt", nargs="*")
        args = parser.parse_args(sys.argv[2:])
        print(json.dumps({"evil": args.evil, "prompt": " ".join(args.prompt)}))
    elif mode == "flood":
        stream = sys.stdout if sys.argv[2] == "stdout" else sys.stderr
        for _ in range(10 * 1024):
            stream.write("x" * 1023 + "\n")
        stream.flush()
        print("done")
    elif mode == "claude":
        print(json.dumps({"type": "result", "subtype": "success", "is_error": False,
                          "result": f"claude: {prompt.strip()[-40:]}", "total_cost_usd": 0.0123,
                          "session_id": "0b7c-session", "num_turns": 3,
                          "usage": {"input_tokens": 10, "cache_read_input_tokens": 5,
                                    "cache_creation_input_tokens": 0, "output_tokens": 7}}))
    elif mode == "codex":
        events = [{"type": "thread.started", "thread_id": "t1"}, {"type": "turn.started"},
                  {"type": "item.completed", "item": {"id": "i1", "type": "reasoning",
                                                      "text": "thinking"}},
                  {"type": "item.completed", "item": {"id": "i2", "type": "agent_message",
                                                      "text": f"codex: {prompt.strip()[-40:]}"}},
                  {"type": "turn.completed", "usage": {"input_tokens": 1000,
                                                       "cached_input_tokens": 400,
                                                       "output_tokens": 200}}]
        for event in events:
            print(json.dumps(event))
    elif mode == "fail":
        print("something went wrong in the agent", file=sys.stderr)
        sys.exit(3)
    elif mode == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        with open(sys.argv[2], "w") as out:
            out.write(str(child.pid))
        time.sleep(120)


if __name__ == "__main__":
    main()
