"""Routing, the policy guard, attachments and `koubou route` (README: Configuration; How it
keeps its promises). Pure parts."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from koubou_spool import config as config_module
from koubou_spool.craft import router
from koubou_spool.spool import task as task_format
from koubou_spool.craft.attach import read_attachments
from koubou_spool.craft.backends import BackendError, PolicyGuard, Reply, Request
from koubou_spool.craft.budget import BudgetSettings, estimate_prompt_tokens, reached, worst_case
from koubou_spool.cli.koubou import cli
from koubou_spool.errors import ConfigError, InvalidTask
from koubou_spool.craft.pricing import Price, price_of

CONFIG = {
    "craftsmen": {
        "local": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "gpt-oss-20b",
                  "local": True},
        "gpt5_high": {"backend": "openai", "base_url": "http://127.0.0.1:8/v1", "model": "gpt-5",
                      "reasoning_effort": "high", "price": {"input_per_mtok": 1.25,
                                                            "output_per_mtok": 10}},
        "gpt5_medium": {"backend": "openai", "base_url": "http://127.0.0.1:8/v1",
                        "model": "gpt-5", "reasoning_effort": "medium"},
        "echo": {"backend": "echo"},
    },
    "routing": {
        "sensitive_patterns": [r"(?i)password\s*[:=]", {"name": "aws-key", "pattern": r"AKIA[0-9A-Z]{16}"}],
        "difficulty_keywords": {"high": ["architecture", "distributed"],
                                "medium": ["refactor", "implement"], "low": ["fix"]},
        "rules": [{"if": "confidential", "then": "local"},
                  {"if": {"difficulty": "high"}, "then": "gpt5_high"},
                  {"if": {"difficulty": "medium"}, "then": "gpt5_medium"},
                  {"then": "local"}],
    },
}


@pytest.fixture
def config() -> config_module.Config:
    return config_module.parse(json.loads(json.dumps(CONFIG)))


def decide(config: config_module.Config, exhausted: bool = False, **fields: object) -> router.Route:
    fields.setdefault("content", "hello")
    return router.route(task_format.validate(fields), config, budget_exhausted=exhausted)


def test_rules_fire_in_order_on_keywords_and_declared_fields(config) -> None:
    high = decide(config, content="Design a distributed cache architecture")
    assert (high.craftsman, high.rule, high.difficulty) == ("gpt5_high", 2, "high")
    assert high.keywords == ("architecture", "distributed")
    assert decide(config, content="Refactor the parser").craftsman == "gpt5_medium"
    assert decide(config, content="fix a typo").craftsman == "local"
    assert decide(config, content="anything", difficulty="high").craftsman == "gpt5_high"


@pytest.mark.parametrize("fields", [
    {"content": "password: hunter2, design the architecture"},
    {"content": "design the architecture", "system": "db password = x"},
    {"content": "design the architecture", "context": {"env": "AKIAABCDEFGHIJKLMNOP"}},
    {"content": "design the architecture", "sensitivity": "confidential"},
    {"custom_id": "b1", "body": {"messages": [{"role": "user", "content": "architecture"},
                                              {"role": "user", "content": "Password: x"}]}},
])
def test_confidential_content_never_routes_to_a_cloud_craftsman(config, fields) -> None:
    for craftsman in ("auto", "gpt5_high"):
        task = dict(fields)
        if craftsman != "auto":
            task["craftsman"] = craftsman
        decision = router.route(task_format.validate(task), config)
        assert decision.confidential and decision.craftsman == "local", (fields, craftsman)


def test_the_matched_pattern_is_named_never_echoed(config) -> None:
    decision = decide(config, content="key AKIAABCDEFGHIJKLMNOP")
    assert decision.pattern == "aws-key"
    assert "AKIA" not in json.dumps(decision.__dict__, default=str)
    assert decide(config, content="password=1").pattern == "#1"


def test_confidential_without_a_local_craftsman_fails_with_policy(config) -> None:
    cloud_only = config_module.parse({"craftsmen": {
        "gpt5": {"backend": "openai", "base_url": "http://127.0.0.1:8/v1", "model": "gpt-5"}}})
    decision = decide(cloud_only, content="password: x")
    assert decision.craftsman is None and decision.kind == "policy"


def test_an_explicit_craftsman_is_honoured_unless_policy_forbids(config) -> None:
    assert decide(config, content="fix", craftsman="gpt5_high").craftsman == "gpt5_high"
    unknown = decide(config, craftsman="nope")
    assert unknown.craftsman is None and unknown.kind == "invalid"


@pytest.mark.parametrize("action, craftsman, kind", [
    ("local", "local", ""), ("defer", None, "defer"), ("fail", None, "budget")])
def test_when_the_budget_is_exhausted(config, action, craftsman, kind) -> None:
    exhausted = config_module.parse({**CONFIG, "budget": {"daily_usd": 1, "when_exhausted": action}})
    decision = decide(exhausted, exhausted=True, content="design the architecture")
    assert (decision.craftsman, decision.kind) == (craftsman, kind)
    assert decide(exhausted, exhausted=True, content="fix it").craftsman == "local"


def test_the_guard_refuses_confidential_requests_before_they_leave(config) -> None:
    sent = []

    class Inner:
        async def complete(self, request: Request) -> Reply:
            sent.append(request)
            return Reply("ok", "gpt-5")

        async def close(self) -> None:
            pass

    guard = PolicyGuard(Inner(), config.craftsmen["gpt5_high"], router.sensitive_patterns(config))
    for request in (Request([{"role": "user", "content": "hi"}], "m", 10, 5, confidential=True),
                    Request([{"role": "user", "content": "the password: 1"}], "m", 10, 5)):
        with pytest.raises(BackendError) as caught:
            asyncio.run(guard.complete(request))
        assert caught.value.kind == "policy"
    assert sent == []
    asyncio.run(guard.complete(Request([{"role": "user", "content": "fine"}], "m", 10, 5)))
    assert len(sent) == 1


def test_local_craftsmen_are_not_wrapped_by_the_guard(config) -> None:
    from koubou_spool.craft.backends import make_backend
    assert not isinstance(make_backend(config.craftsmen["local"]), PolicyGuard)
    assert isinstance(make_backend(config.craftsmen["gpt5_high"]), PolicyGuard)


def test_attachments_come_only_from_allowed_dirs_as_text(tmp_path: Path) -> None:
    allowed = tmp_path / "repo"
    allowed.mkdir()
    (allowed / "a.py").write_text("print('hi')\n")
    (allowed / "bin.dat").write_bytes(b"\x00\x01")
    outside = tmp_path / "secret.txt"
    outside.write_text("password: x")
    os.symlink(outside, allowed / "escape.txt")
    settings = {"allowed_dirs": [str(allowed)], "max_bytes": 100}
    [attached] = read_attachments([str(allowed / "a.py")], settings)
    assert attached.text == "print('hi')\n"
    for path, message in [(allowed / "escape.txt", "outside attach.allowed_dirs"),
                          (outside, "outside attach.allowed_dirs"),
                          (allowed / "bin.dat", "binary"),
                          (allowed / "missing", "cannot read"),
                          ("relative.txt", "absolute path")]:
        with pytest.raises(InvalidTask, match=message):
            read_attachments([str(path)], settings)
    (allowed / "big.txt").write_text("x" * 101)
    with pytest.raises(InvalidTask, match="over attach.max_bytes"):
        read_attachments([str(allowed / "big.txt")], settings)
    with pytest.raises(InvalidTask, match="attach.allowed_dirs"):
        read_attachments([str(allowed / "a.py")], {})


def test_attached_secrets_make_a_task_confidential(config, tmp_path: Path) -> None:
    task = task_format.validate({"content": "design the architecture"})
    decision = router.route(task, config, attachments=["password: x"])
    assert decision.confidential and decision.craftsman == "local"


def test_prices_from_config_from_genai_prices_or_unknown(config) -> None:
    assert price_of(config.craftsmen["gpt5_high"]).source == "config"
    looked_up = price_of(config_module.parse({"craftsmen": {"g": {
        "backend": "openai", "base_url": "https://api.openai.com/v1", "model": "gpt-5"}}}).craftsmen["g"])
    assert looked_up.source.startswith("genai-prices") and looked_up.output_per_mtok > 0
    assert price_of(config.craftsmen["local"]).cost(1000, 1000) == 0
    assert price_of(config.craftsmen["gpt5_medium"], "no-such-model-xyz") is None
    cached = Price(1.0, 10.0, 0.1)
    assert cached.cost(1_000_000, 0, cached_tokens=500_000) == pytest.approx(0.55)


def test_budget_arithmetic() -> None:
    settings = BudgetSettings.parse({"daily_usd": 1, "monthly_usd": 10, "timezone": "Asia/Tokyo"})
    # 2026-11-30T15:30Z is 2026-12-01 00:30 in Tokyo: a new day and a new month there
    assert settings.periods(1796052600.0) == ("2026-12-01", "2026-12")
    assert settings.periods(1796052600.0 - 3600) == ("2026-11-30", "2026-11")
    assert worst_case(Price(1.25, 10), 1000, 2000) == pytest.approx(0.02125)
    assert estimate_prompt_tokens([{"content": "x" * 300}]) >= 100
    assert reached((80, 95), 0.85, 1.0) == [80]
    with pytest.raises(ConfigError, match="budget.timezone"):
        BudgetSettings.parse({"timezone": "Mars/Olympus"})
    with pytest.raises(ConfigError, match="when_exhausted"):
        BudgetSettings.parse({"when_exhausted": "panic"})


def test_koubou_route_explains_each_rule(isolated_env: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["init"]).exit_code == 0
    (isolated_env / "config" / "koubou.yaml").write_text(yaml.safe_dump(
        {**CONFIG, "budget": {"daily_usd": 2, "monthly_usd": 20}}))
    cases = [("password: hunter2 in the architecture", "local", 1),
             ("Design a distributed system", "gpt5_high", 2),
             ("Implement the parser", "gpt5_medium", 3),
             ("Say hello", "local", 4)]
    for text, craftsman, rule in cases:
        result = runner.invoke(cli, ["route", text, "--json"])
        assert result.exit_code == 0, result.output
        facts = json.loads(result.stdout)
        assert (facts["craftsman"], facts["rule"]) == (craftsman, rule), text
        assert "hunter2" not in result.stdout
    text = runner.invoke(cli, ["route", "password: hunter2"]).stdout
    assert "matched sensitive pattern #1" in text and "hunter2" not in text
    assert "budget       day 0.0000 of 2 USD" in text
