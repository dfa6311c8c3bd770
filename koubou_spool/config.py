"""Settings from config/koubou.yaml (README: Configuration): craftsmen, routing and spool knobs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

BACKENDS = ("openai", "echo", "command")
TOKEN_LIMIT_PARAMS = ("max_tokens", "max_completion_tokens")
OUTPUT_FORMATS = ("text", "claude-json", "codex-jsonl")
KNOWN_KEYS = {"backend", "model", "base_url", "local", "max_concurrent", "max_rpm", "max_tpm",
              "timeout_s", "max_tokens", "temperature", "reasoning_effort", "token_limit_param",
              "retries", "api_key_env", "system", "price", "provider", "latency_ms", "argv",
              "output", "max_output_bytes", "max_cost_usd"}


@dataclass(frozen=True)
class Craftsman:
    """One craftsman: where it lives, what it may receive and what it costs."""

    name: str
    backend: str
    model: str = ""
    base_url: str = ""
    local: bool = False
    max_concurrent: int = 1
    max_rpm: int | None = None
    max_tpm: int | None = None
    timeout_s: float = 300.0
    max_tokens: int = 2048
    temperature: float | None = None
    reasoning_effort: str | None = None
    token_limit_param: str = "max_tokens"
    retries: int = 2
    api_key_env: str | None = None
    system: str | None = None
    price: dict[str, float] | None = None  # per million tokens; None: looked up by model
    max_cost_usd: float | None = None  # a call's worst case when tokens cannot bound it
    provider: str | None = None  # genai-prices provider id, when base_url does not tell
    latency_ms: float = 0.0
    argv: tuple[str, ...] = ()
    output: str = "text"
    max_output_bytes: int = 4 * 1024 * 1024

    def api_key(self) -> str:
        """The API key from the environment; local servers get a placeholder the client requires."""
        if not self.api_key_env:
            return "not-needed"
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(f"craftsman {self.name}: environment variable {self.api_key_env} "
                              "is not set; export it before starting the worker")
        return key


@dataclass(frozen=True)
class SpoolSettings:
    """The `spool:` section."""

    fsync: bool = True
    heartbeat_s: float = 10.0
    lease_s: float = 60.0
    max_attempts: int = 3
    max_task_bytes: int = 1_048_576
    grace_s: float = 3.0
    stop_grace_s: float = 30.0


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    craftsmen: dict[str, Craftsman]
    spool: SpoolSettings = SpoolSettings()
    routing: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    hooks: dict[str, Any] = field(default_factory=dict)
    attach: dict[str, Any] = field(default_factory=dict)
    repos: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _number(section: str, key: str, value: Any, *, integer: bool = False, low: float = 0) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < low:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{section}.{key}: expected {what} of at least {low:g}, got {value!r}")
    return value


def _price(where: str, price: Any) -> dict[str, float] | None:
    if price is None:
        return None
    keys = ("input_per_mtok", "output_per_mtok", "cache_read_per_mtok")
    if not isinstance(price, dict) or not set(price) <= set(keys):
        raise ConfigError(f"{where}.price: expected {{input_per_mtok, output_per_mtok}} "
                          f"(optional cache_read_per_mtok), got {price!r}")
    return {k: float(_number(where, f"price.{k}", v)) for k, v in price.items()}


def _command(where: str, spec: dict) -> tuple[tuple[str, ...], str]:
    argv = spec.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ConfigError(f"{where}.argv: expected a non-empty list of strings (never a shell "
                          f"line), got {argv!r}")
    output = spec.get("output", "text")
    if output not in OUTPUT_FORMATS:
        raise ConfigError(f"{where}.output: expected one of {', '.join(OUTPUT_FORMATS)}, "
                          f"got {output!r}")
    return tuple(argv), output


def _optional_int(where: str, key: str, value: Any) -> int | None:
    return None if value is None else _number(where, key, value, integer=True, low=1)


def _craftsman(name: str, spec: Any) -> Craftsman:
    where = f"craftsmen.{name}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {spec!r}")
    unknown = set(spec) - KNOWN_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown setting {sorted(unknown)[0]!r}; known: "
                          + ", ".join(sorted(KNOWN_KEYS)))
    backend = spec.get("backend")
    if backend not in BACKENDS:
        raise ConfigError(f"{where}.backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "openai" and not (spec.get("base_url") and spec.get("model")):
        raise ConfigError(f"{where}: an openai craftsman needs base_url and model")
    argv, output = _command(where, spec) if backend == "command" else ((), "text")
    limit_param = spec.get("token_limit_param", "max_tokens")
    if limit_param not in TOKEN_LIMIT_PARAMS:
        raise ConfigError(f"{where}.token_limit_param: expected one of "
                          f"{', '.join(TOKEN_LIMIT_PARAMS)}, got {limit_param!r}")
    return Craftsman(
        name=name, backend=backend, model=str(spec.get("model", backend)),
        base_url=str(spec.get("base_url", "")),
        local=bool(spec.get("local", backend == "echo")),
        max_concurrent=_number(where, "max_concurrent", spec.get("max_concurrent", 1),
                               integer=True, low=1),
        max_rpm=_optional_int(where, "max_rpm", spec.get("max_rpm")),
        max_tpm=_optional_int(where, "max_tpm", spec.get("max_tpm")),
        timeout_s=float(_number(where, "timeout_s", spec.get("timeout_s", 300), low=0.001)),
        max_tokens=_number(where, "max_tokens", spec.get("max_tokens", 2048), integer=True, low=1),
        temperature=spec.get("temperature"),
        reasoning_effort=spec.get("reasoning_effort"),
        token_limit_param=limit_param,
        retries=_number(where, "retries", spec.get("retries", 2), integer=True),
        api_key_env=spec.get("api_key_env"),
        system=spec.get("system"),
        price=_price(where, spec.get("price")),
        max_cost_usd=None if spec.get("max_cost_usd") is None else float(
            _number(where, "max_cost_usd", spec["max_cost_usd"])),
        provider=spec.get("provider"),
        latency_ms=float(_number(where, "latency_ms", spec.get("latency_ms", 0))),
        argv=argv, output=output,
        max_output_bytes=_number(where, "max_output_bytes",
                                 spec.get("max_output_bytes", 4 * 1024 * 1024), integer=True, low=1),
    )


def _spool(spec: Any) -> SpoolSettings:
    if spec is None:
        return SpoolSettings()
    if not isinstance(spec, dict):
        raise ConfigError(f"spool: expected a mapping of settings, got {spec!r}")
    defaults = SpoolSettings()
    unknown = set(spec) - set(defaults.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"spool: unknown setting {sorted(unknown)[0]!r}; known: "
                          + ", ".join(defaults.__dataclass_fields__))
    values = {}
    for key, value in spec.items():
        if key == "fsync":
            if not isinstance(value, bool):
                raise ConfigError(f"spool.fsync: expected true or false, got {value!r}")
            values[key] = value
        else:
            integer = key in ("max_attempts", "max_task_bytes")
            values[key] = _number("spool", key, value, integer=integer, low=1 if integer else 0)
    return SpoolSettings(**values)


def parse(data: Any, path: Path | None = None) -> Config:
    """Build a Config from the decoded YAML document."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping at the top level")
    craftsmen = data.get("craftsmen") or {}
    if not isinstance(craftsmen, dict):
        raise ConfigError("craftsmen: expected a mapping of name to settings")
    return Config(
        craftsmen={str(name): _craftsman(str(name), spec) for name, spec in craftsmen.items()},
        spool=_spool(data.get("spool")),
        routing=data.get("routing") or {},
        budget=data.get("budget") or {},
        hooks=data.get("hooks") or {},
        attach=data.get("attach") or {},
        repos=data.get("repos") or {},
        path=path,
    )


def load(path: Path) -> Config:
    """Read and check a config file; a missing file is an error that says to run `koubou init`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no config at {path}; run `koubou init` to create the home") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse(data, path)


DEFAULT_CONFIG = (Path(__file__).parent / "koubou.yaml").read_text(encoding="utf-8")
