"""`koubou doctor`'s look at a running `koubou serve`: is it this home's, and does it take the
token this environment has? A server that is not running is no problem (serve is optional)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from ..config import Config
from ..errors import ConfigError
from ..ops.doctor import ERROR, WARNING, Check, Problem
from . import settings as serve_settings

NAME = "serve"


def check(home: Path, config: Config, timeout: float) -> Check:
    """The serve check of doctor."""
    try:
        settings = serve_settings.load(config)
    except ConfigError as exc:
        return Check(NAME, [Problem(ERROR, str(exc))])
    problems = []
    if not serve_settings.is_loopback(settings.host) and not settings.tokens():
        problems.append(Problem(ERROR, f"serve.host is {settings.host} but "
                                       f"{settings.tokens_env} is empty: `koubou serve` will "
                                       "refuse to start; set tokens or use 127.0.0.1"))
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    base = f"http://{'[' + host + ']' if ':' in host else host}:{settings.port}"
    tokens = settings.tokens()
    status, body = _get(base + "/healthz", tokens[0] if tokens else None, timeout)
    if status is None:
        return Check(NAME, problems)  # not running here: nothing to check
    if status != 200:
        problems.append(Problem(ERROR, f"{base}/healthz answered {status}: is that koubou serve?"))
        return Check(NAME, problems)
    served = (_json(body) or {}).get("home")
    if served and Path(served) != home:
        problems.append(Problem(WARNING, f"the server at {base} serves another home ({served})"))
    status, _ = _get(base + "/v1/models", tokens[0] if tokens else None, timeout)
    if status == 401:
        what = f"the token in {settings.tokens_env}" if tokens else "requests without a token"
        problems.append(Problem(ERROR, f"the server at {base} refuses {what}; set "
                                       f"{settings.tokens_env} as the server has it"))
    elif status != 200:
        problems.append(Problem(ERROR, f"{base}/v1/models answered {status}; see the server's log"))
    return Check(NAME, problems)


def _get(url: str, token: str | None, timeout: float) -> tuple[int | None, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                     if token else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with opener.open(request, timeout=timeout) as answer:
            return answer.status, answer.read(65536)
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (urllib.error.URLError, OSError):
        return None, b""


def _json(data: bytes) -> dict | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
