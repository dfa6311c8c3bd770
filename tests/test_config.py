"""The config is checked whole when it is read (README: Configuration): one sentence per
problem, exit 4, never a traceback; unknown keys warned about by name; `koubou doctor` lists
every problem."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from koubou_spool import config as config_module
from koubou_spool import config_check
from koubou_spool.cli.koubou import cli
from koubou_spool.cli.submit import submit
from koubou_spool.craft.budget import BudgetSettings
from koubou_spool.errors import ConfigError
from koubou_spool.spool import home as home_module

REPO = Path(__file__).resolve().parent.parent


def document(local: str = "", echo: str = "backend: echo",
             rules: str = "[{if: confidential, then: local}, {then: local}]", more: str = "") -> str:
    """A good config, with text spliced into the `local` craftsman, `echo`, the rules, or after."""
    return f"""\
craftsmen:
  local: {{backend: openai, base_url: "http://127.0.0.1:9/v1", model: m, local: true{local}}}
  echo: {{{echo}}}
routing:
  rules: {rules}
{more}"""


DURATION = "a duration in seconds greater than 0 (a number, or one with a unit: 500ms, 30s, 5m, 2h, 1d)"
# (what is wrong, the file, what follows the file's path in the one sentence printed)
BAD_CONFIGS: list[tuple[str, str | bytes, str]] = [
    ("max_concurrent zero", document(local=", max_concurrent: 0"),
     ": craftsmen.local.max_concurrent: expected a whole number of at least 1, found 0 (a number)"),
    ("max_concurrent a word", document(local=", max_concurrent: three"),
     ': craftsmen.local.max_concurrent: expected a whole number of at least 1, found "three" '
     "(a string)"),
    ("max_tokens zero", document(local=", max_tokens: 0"),
     ": craftsmen.local.max_tokens: expected a whole number of at least 1, found 0 (a number)"),
    ("retries negative", document(local=", retries: -1"),
     ": craftsmen.local.retries: expected a whole number of at least 0, found -1 (a number)"),
    ("timeout negative", document(local=", timeout_s: -1"),
     f": craftsmen.local.timeout_s: expected {DURATION}, found -1 (a number)"),
    ("timeout not a duration", document(local=", timeout_s: soon"),
     f': craftsmen.local.timeout_s: expected {DURATION}, found "soon" (a string)'),
    ("temperature a word", document(local=", temperature: hot"),
     ': craftsmen.local.temperature: expected a number from 0 to 2, found "hot" (a string)'),
    ("negative price", document(local=", price: {input_per_mtok: -1, output_per_mtok: 0}"),
     ": craftsmen.local.price.input_per_mtok: expected a price in USD per million tokens of at "
     "least 0, found -1 (a number)"),
    ("price a list", document(local=", price: [1, 2]"),
     ": craftsmen.local.price: expected {input_per_mtok, output_per_mtok} (optional "
     "cache_read_per_mtok), found [1, 2] (a list)"),
    ("unknown backend", document(echo="backend: ollama"),
     ': craftsmen.echo.backend: expected one of openai, echo, command, found "ollama" (a string)'),
    ("no backend", document(echo="latency_ms: 5"),
     ": craftsmen.echo.backend: expected one of openai, echo, command, found nothing"),
    ("base_url without scheme", document().replace('"http://127.0.0.1:9/v1"', "127.0.0.1:9"),
     ": craftsmen.local.base_url: expected an http:// or https:// URL such as "
     'http://localhost:1234/v1, found "127.0.0.1:9" (a string)'),
    ("endpoints beside base_url", document(local=", endpoints: [{base_url: 'http://127.0.0.1:8/v1'}]"),
     ": craftsmen.local.endpoints: expected either endpoints or base_url, not both (a lone "
     'base_url is one endpoint), found [{"base_url": "http://127.0.0.1:8/v1"}] (a list)'),
    ("no endpoints", document().replace('base_url: "http://127.0.0.1:9/v1"', "endpoints: []"),
     ": craftsmen.local.endpoints: expected at least one endpoint, found [] (a list)"),
    ("endpoint without scheme", document().replace(
        'base_url: "http://127.0.0.1:9/v1"', "endpoints: [{base_url: '127.0.0.1:9'}]"),
     ": craftsmen.local.endpoints[0].base_url: expected an http:// or https:// URL such as "
     'http://localhost:1234/v1, found "127.0.0.1:9" (a string)'),
    ("endpoint with zero slots", document().replace(
        'base_url: "http://127.0.0.1:9/v1"',
        "endpoints: [{base_url: 'http://127.0.0.1:9/v1', max_concurrent: 0}]"),
     ": craftsmen.local.endpoints[0].max_concurrent: expected a whole number of at least 1, "
     "found 0 (a number)"),
    ("endpoint twice", document().replace(
        'base_url: "http://127.0.0.1:9/v1"',
        "endpoints: [{base_url: 'http://127.0.0.1:9/v1'}, {base_url: 'http://127.0.0.1:9/v1'}]"),
     ": craftsmen.local.endpoints[1].base_url: expected each endpoint's base_url once, found "
     '"http://127.0.0.1:9/v1" (a string)'),
    ("endpoint weight zero", document().replace(
        'base_url: "http://127.0.0.1:9/v1"',
        "endpoints: [{base_url: 'http://127.0.0.1:9/v1', weight: 0}]"),
     ": craftsmen.local.endpoints[0].weight: expected a number greater than 0, found 0 (a number)"),
    ("endpoints of an echo craftsman", document(echo="backend: echo, endpoints: [{base_url: 'http://127.0.0.1:9/v1'}]"),
     ": craftsmen.echo.endpoints: expected no endpoints (only an openai craftsman has them), "
     'found [{"base_url": "http://127.0.0.1:9/v1"}] (a list)'),
    ("openai without model", document().replace(", model: m", ""),
     ": craftsmen.local.model: expected a value (an openai craftsman needs base_url and model), "
     "found nothing"),
    ("argv a shell line", document(echo="backend: command, argv: claude -p"),
     ": craftsmen.echo.argv: expected a command as a list of strings such as [notify-send, "
     'koubou] (never a shell line), found "claude -p" (a string)'),
    ("unknown output", document(echo="backend: command, argv: [claude], output: xml"),
     ': craftsmen.echo.output: expected one of text, claude-json, codex-jsonl, found "xml" '
     "(a string)"),
    ("a key where its variable's name belongs", document(local=", api_key_env: sk-live-123"),
     ": craftsmen.local.api_key_env: expected the name of an environment variable such as "
     "OPENAI_API_KEY (the secret itself stays in the environment), found a string (not shown)"),
    ("craftsman named auto", document(echo="backend: echo").replace("  echo:", "  auto:"),
     ': craftsmen: expected craftsman names of letters, digits, \'.\', \'_\' or \'-\' (and not '
     'auto, which asks the router), found "auto" (a string)'),
    ("craftsmen a list", "craftsmen: [local, echo]\n",
     ': craftsmen: expected a mapping of at least one craftsman (name: settings), found ["local", '
     '"echo"] (a list)'),
    ("no craftsmen", "spool: {fsync: true}\n",
     ": craftsmen: expected a mapping of at least one craftsman (name: settings), found nothing"),
    ("rule naming no craftsman", document(rules="[{then: gpt5}]"),
     ': routing.rules[0].then: expected a configured craftsman (local, echo), found "gpt5" '
     "(a string)"),
    ("rule on an unknown word", document(rules="[{if: secret, then: local}]"),
     ": routing.rules[0].if: expected confidential, public, high, medium, low or a mapping of "
     'sensitivity, difficulty, type (for a task type: {type: NAME}), found "secret" (a string)'),
    ("rule on an unknown fact", document(rules="[{if: {level: high}, then: local}]"),
     ": routing.rules[0].if: expected conditions on sensitivity, difficulty or type, found "
     '"level" (a string)'),
    ("rules a mapping", document(rules="{then: local}"),
     ": routing.rules: expected a list of rules such as [{if: confidential, then: local}], found "
     '{"then": "local"} (a mapping)'),
    ("pattern that does not compile", document().replace(
        "routing:\n", "routing:\n  sensitive_patterns: ['(unclosed']\n"),
     ': routing.sensitive_patterns[0]: expected a regular expression, found "(unclosed" '
     "(a string), which does not compile: missing ), unterminated subpattern at position 0"),
    ("difficulty keywords a list", document().replace(
        "routing:\n", "routing:\n  difficulty_keywords: [fix, design]\n"),
     ': routing.difficulty_keywords: expected a mapping of settings, found ["fix", "design"] '
     "(a list)"),
    ("negative daily budget", document(more="budget: {daily_usd: -5}\n"),
     ": budget.daily_usd: expected an amount in USD of at least 0, found -5 (a number)"),
    ("bad time zone", document(more="budget: {timezone: Mars/Olympus}\n"),
     ": budget.timezone: expected an IANA time zone such as Asia/Tokyo or UTC, found "
     '"Mars/Olympus" (a string)'),
    ("alert over 100", document(more="budget: {daily_usd: 1, alert_percent: [80, 150]}\n"),
     ": budget.alert_percent[1]: expected a percentage greater than 0 and at most 100, found 150 "
     "(a number)"),
    ("alert a word", document(more="budget: {daily_usd: 1, alert_percent: high}\n"),
     ": budget.alert_percent[0]: expected a percentage greater than 0 and at most 100, found "
     '"high" (a string)'),
    ("alert command a shell line", document(more="budget: {alert_command: notify-send koubou}\n"),
     ": budget.alert_command: expected a command as a list of strings such as [notify-send, "
     'koubou] (never a shell line), found "notify-send koubou" (a string)'),
    ("unknown when_exhausted", document(more="budget: {when_exhausted: panic}\n"),
     ': budget.when_exhausted: expected one of local, defer, fail, found "panic" (a string)'),
    ("budget a list", document(more="budget: [10, 100]\n"),
     ": budget: expected a mapping of settings, found [10, 100] (a list)"),
    ("on_finish a path", document(more="hooks: {on_finish: /usr/local/bin/notify}\n"),
     ": hooks.on_finish: expected a command as a list of strings such as [notify-send, koubou] "
     '(never a shell line), found "/usr/local/bin/notify" (a string)'),
    ("fsync a word", document(more="spool: {fsync: maybe}\n"),
     ': spool.fsync: expected true or false, found "maybe" (a string)'),
    ("heartbeat zero", document(more="spool: {heartbeat_s: 0}\n"),
     f": spool.heartbeat_s: expected {DURATION}, found 0 (a number)"),
    ("lease shorter than the heartbeat", document(more="spool: {lease_s: 5}\n"),
     ": spool.lease_s: expected more than spool.heartbeat_s (10 s: a live worker's lease must "
     "outlast its heartbeat), found 5 (a number)"),
    ("max_attempts zero", document(more="spool: {max_attempts: 0}\n"),
     ": spool.max_attempts: expected a whole number of at least 1, found 0 (a number)"),
    ("max_task_bytes a fraction", document(more="spool: {max_task_bytes: 1.5}\n"),
     ": spool.max_task_bytes: expected a whole number of at least 1, found 1.5 (a number)"),
    ("spool a list", document(more="spool: [fsync]\n"),
     ': spool: expected a mapping of settings, found ["fsync"] (a list)'),
    ("serve port out of range", document(more="serve: {port: 70000}\n"),
     ": serve.port: expected a whole number from 1 to 65535, found 70000 (a number)"),
    ("cluster host with a space", document(more="cluster: {host: 'my host'}\n"),
     ": cluster.host: expected a host name of letters, digits, '.', '-' and '_' (at most 63), "
     'found "my host" (a string)'),
    ("cluster serve a mapping", document(more="cluster: {serve: {echo: 2}}\n"),
     ': cluster.serve: expected a list of craftsman names, found {"echo": 2} (a mapping)'),
    ("cluster serve unknown", document(more="cluster: {serve: [echo, gpu]}\n"),
     ': cluster.serve[1]: expected a configured craftsman (local, echo), found "gpu" (a string)'),
    ("cluster lease zero", document(more="cluster: {lease_s: 0}\n"),
     f": cluster.lease_s: expected {DURATION}, found 0 (a number)"),
    ("cluster dsn_env a DSN", document(more="cluster: {dsn_env: 'postgresql://h/db'}\n"),
     ": cluster.dsn_env: expected the name of an environment variable such as OPENAI_API_KEY "
     "(the secret itself stays in the environment), found a string (not shown)"),
    ("verify timeout not a duration", document(more="repos: {verify_timeout_s: forever}\n"),
     f': repos.verify_timeout_s: expected {DURATION}, found "forever" (a string)'),
    ("unparsable YAML", document(more="budget: {daily_usd: 1\n"),
     " is not valid YAML: expected ',' or '}', but got '<stream end>' at line 7, column 1"),
    ("a tab in the indentation", document(more="budget:\n\tdaily_usd: 1\n"),
     " is not valid YAML: found character '\\t' that cannot start any token at line 7, column 1"),
    ("a date that does not exist", document(more="metadata: {since: 2026-13-45}\n"),
     " is not valid YAML: month must be in 1..12"),
    ("a list at the top level", "- craftsmen\n- routing\n",
     ": the top level: expected a mapping of sections (craftsmen, routing, budget, spool, ...), "
     'found ["craftsmen", "routing"] (a list)'),
    ("bytes that are not UTF-8", document().encode() + b"# caf\xe9\n",
     " is not UTF-8 text (byte 0xe9 on line 6); save it as UTF-8"),
    ("an empty file", "",
     " holds no settings; it needs at least a craftsmen: section (`koubou init` writes a "
     "commented one into a new home)"),
    ("only comments", "# craftsmen: later\n",
     " holds no settings; it needs at least a craftsmen: section (`koubou init` writes a "
     "commented one into a new home)"),
]
COMMANDS = {"worker": ["worker", "--drain"], "maintain": ["maintain"],
            "doctor": ["doctor", "--timeout", "0.5"]}


def write(home: Path, content: str | bytes) -> Path:
    """An initialised home whose config file holds exactly these bytes."""
    home_module.init(home)
    path = home / "config" / "koubou.yaml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def test_there_are_enough_bad_configs() -> None:
    assert len(BAD_CONFIGS) >= 25 and len({name for name, _, _ in BAD_CONFIGS}) == len(BAD_CONFIGS)


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name, content, said", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_a_bad_config_is_one_sentence_and_exit_4(isolated_env: Path, command: str, name: str,
                                                 content: str | bytes, said: str) -> None:
    path = write(isolated_env, content)
    result = CliRunner().invoke(cli, COMMANDS[command], prog_name="koubou")
    no_traceback(result)
    assert result.exit_code == 4, result.output
    [line] = result.stderr.splitlines()
    if command == "doctor":  # the problem is listed with the others; the verdict is one line
        problem = said[2:] if said.startswith(": ") else f"{path}{said}"
        assert result.stdout.splitlines().count(f"  error: {problem}") == 1, result.stdout
        assert line == f"koubou: doctor found problems in {isolated_env}"
    else:
        assert line == f"koubou: {path}{said}"
    assert "sk-live-123" not in result.output


@pytest.mark.parametrize("args", [["status"], ["list"], ["report"], ["workers"], ["metrics"],
                                  ["route", "hello"], ["info"], ["ledger", "rebuild"],
                                  ["wait", "some-id"], ["cancel", "some-id"], ["top", "--once"]])
def test_every_command_says_the_same_sentence(isolated_env: Path, args: list[str]) -> None:
    path = write(isolated_env, document(more="budget: {alert_percent: high}\n"))
    result = CliRunner().invoke(cli, args, prog_name="koubou")
    no_traceback(result)
    assert result.exit_code == 4, result.output
    assert result.stderr.splitlines() == [
        f"koubou: {path}: budget.alert_percent[0]: expected a percentage greater than 0 and at "
        'most 100, found "high" (a string)']


def test_koubou_submit_says_it_too(isolated_env: Path) -> None:
    path = write(isolated_env, document(local=", max_concurrent: 0"))
    result = CliRunner().invoke(submit, ["hello", "--wait", "--timeout", "1"],
                                prog_name="koubou-submit")
    no_traceback(result)
    assert result.exit_code == 4
    assert result.stderr == (f"koubou-submit: {path}: craftsmen.local.max_concurrent: expected a "
                             "whole number of at least 1, found 0 (a number)\n")


def test_doctor_lists_every_problem_at_once(isolated_env: Path) -> None:
    write(isolated_env, document(local=", max_concurrent: 0, timeout_s: -1, max_concurent: 2",
                                 rules="[{then: nobody}]",
                                 more="budget: {daily_usd: -1, timezone: Nowhere}\n"))
    result = CliRunner().invoke(cli, ["doctor"], prog_name="koubou")
    assert result.exit_code == 4
    lines = result.stdout.splitlines()
    start = lines.index("error    config") + 1
    listed = lines[start:next(i for i in range(start, len(lines)) if not lines[i].startswith(" "))]
    assert [line.split(":")[1].strip() for line in listed] == [
        "craftsmen.local.max_concurrent", "craftsmen.local.timeout_s", "budget.daily_usd",
        "budget.timezone", "routing.rules[0].then", "craftsmen.local.max_concurent"]
    assert listed[-1] == ("  warning: craftsmen.local.max_concurent: unknown setting, ignored; "
                          "did you mean max_concurrent?")
    first = CliRunner().invoke(cli, ["maintain"], prog_name="koubou")
    assert first.stderr.splitlines()[-1].endswith(
        "(and 4 more problems; `koubou doctor` lists them all)")


def test_a_lone_alert_percent_is_a_list_of_one(isolated_env: Path) -> None:
    write(isolated_env, document(more="budget: {daily_usd: 1, alert_percent: 80}\n"))
    config = config_module.load(isolated_env / "config" / "koubou.yaml")
    assert config.budget["alert_percent"] == [80]
    assert BudgetSettings.parse(config.budget).alert_percent == (80,)
    result = CliRunner().invoke(cli, ["maintain"], prog_name="koubou")
    assert result.exit_code == 0, result.output


def test_an_unknown_key_warns_by_name_and_does_not_fail(isolated_env: Path) -> None:
    path = write(isolated_env, document(local=", max_concurent: 3", more="budgett: {}\n"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "koubou_spool.cli.koubou", "maintain"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (f"{path}: craftsmen.local.max_concurent: unknown setting, ignored; did you mean "
            "max_concurrent?") in result.stderr
    assert f"{path}: budgett: unknown setting, ignored; did you mean budget?" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_typo_that_breaks_the_config_is_warned_about_before_the_error(isolated_env: Path) -> None:
    write(isolated_env, document(echo="bakend: echo"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "koubou_spool.cli.koubou", "worker", "--drain"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 4
    lines = result.stderr.splitlines()
    assert lines[0].endswith("craftsmen.echo.bakend: unknown setting, ignored; did you mean "
                             "backend?")
    assert lines[-1].endswith("craftsmen.echo.backend: expected one of openai, echo, command, "
                              "found nothing")
    assert "Traceback" not in result.stderr


# --- the pure check ------------------------------------------------------------------------------

def test_check_normalizes_durations_and_lone_values() -> None:
    checked, found = config_check.check(yaml.safe_load(document(
        local=", timeout_s: 5m", more="spool: {lease_s: 2m, heartbeat_s: 500ms}\n"
                                      "attach: {allowed_dirs: ~/src}\n"
                                      "repos: {allowed: ~/src, verify_timeout_s: 1h}\n")))
    assert found.problems == [] and found.warnings == []
    assert checked["craftsmen"]["local"]["timeout_s"] == 300
    assert checked["spool"] == {"lease_s": 120, "heartbeat_s": 0.5}
    assert checked["attach"]["allowed_dirs"] == ["~/src"]
    assert checked["repos"] == {"allowed": ["~/src"], "verify_timeout_s": 3600}


def test_check_collects_rather_than_stops() -> None:
    _, found = config_check.check({"craftsmen": {"a": {"backend": "nope", "max_tokens": -1}},
                                   "spool": {"fsync": 1, "lease_s": -1}, "extra": 1})
    assert [p.split(":")[0] for p in found.problems] == [
        "craftsmen.a.backend", "craftsmen.a.max_tokens", "spool.fsync", "spool.lease_s"]
    assert found.warnings == ["extra: unknown setting, ignored (known: craftsmen, routing, "
                              "budget, hooks, attach, spool, repos, serve, cluster)"]


def test_a_list_that_contains_itself_is_shown_not_followed() -> None:
    _, found = config_check.check(yaml.safe_load(document(more="spool: &a [*a]\n")))
    assert found.problems == ["spool: expected a mapping of settings, found [[...]] (a list)"]


def test_the_craftsman_schema_covers_every_craftsman_setting() -> None:
    names = {f.name for f in fields(config_module.Craftsman)} - {"name"}
    assert set(config_check.CRAFTSMAN_FIELDS) == names
    assert set(config_check.SPOOL_FIELDS) == {f.name for f in fields(config_module.SpoolSettings)}


def test_parse_raises_config_error_with_every_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        config_module.parse({"craftsmen": {"e": {"backend": "echo", "max_concurrent": 0}},
                             "budget": {"daily_usd": "ten"}})
    assert len(caught.value.problems) == 2
    assert str(caught.value).endswith("(and 1 more problem; `koubou doctor` lists them all)")


def _readme_config() -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return next(b for b in blocks if b.startswith("craftsmen:"))


@pytest.mark.parametrize("text", [
    (REPO / "config" / "koubou.example.yaml").read_text(),
    config_module.DEFAULT_CONFIG,
    _readme_config(),
], ids=["example", "packaged default", "README"])
def test_the_shipped_configs_pass_without_warnings(text: str) -> None:
    _, found = config_check.check(yaml.safe_load(text))
    assert found.problems == [] and found.warnings == []


def test_endpoints_take_what_they_leave_unset_from_their_craftsman() -> None:
    config = config_module.parse(yaml.safe_load(document().replace(
        'base_url: "http://127.0.0.1:9/v1"',
        "max_concurrent: 3, api_key_env: GPU_KEY, endpoints: [{base_url: 'http://127.0.0.1:8/v1'}, "
        "{base_url: 'http://127.0.0.1:9/v1', max_concurrent: 1, weight: 2}]")))
    local = config.craftsmen["local"]
    assert [(e.base_url, e.max_concurrent, e.api_key_env, e.weight) for e in local.endpoints] == [
        ("http://127.0.0.1:8/v1", 3, "GPU_KEY", 1.0), ("http://127.0.0.1:9/v1", 1, "GPU_KEY", 2.0)]
    assert local.max_concurrent == 4  # the craftsman's capacity is the sum
