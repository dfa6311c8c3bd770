"""The gate every request passes: bearer tokens, no tokens in URLs, body size limits, and (for a
tokenless server on loopback) the Host and Origin checks that keep web pages out.

A pure ASGI middleware, so streamed responses pass through untouched.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..integrations.chat import error_body
from .settings import is_loopback

# Names under which clients put credentials in URLs; a token there lands in logs and history.
QUERY_CREDENTIALS = {"token", "access_token", "api_key", "api-key", "apikey", "key", "bearer",
                     "auth", "authorization"}
# The dashboard's page and its assets hold no data; everything they show comes from /api with the
# token, which the page asks for. A health probe answers only "ok".
PUBLIC = ("/", "/static/", "/healthz")


class BodyTooLarge(Exception):
    """The request body passed its limit while it was being read (the app answers 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is over the limit of {limit} bytes")
        self.limit = limit


def _public(path: str) -> bool:
    return any(path == p or (p.endswith("/") and p != "/" and path.startswith(p)) for p in PUBLIC)


def token_matches(given: str, tokens: tuple[str, ...]) -> bool:
    """Constant time against every token, so the time taken says nothing about which is near."""
    found = False
    for token in tokens:
        found |= hmac.compare_digest(given.encode(), token.encode())
    return found


class Guard:
    """ASGI middleware: 401/400/403/413 before the app sees a request it must not."""

    def __init__(self, app: Any, tokens: Callable[[], tuple[str, ...]],
                 body_limit: Callable[[str, str], int]) -> None:
        self.app = app
        self.tokens = tokens
        self.body_limit = body_limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self._refusal(scope)
        if refused is not None:
            await _answer(send, *refused)
            return
        limit = self.body_limit(scope["method"], scope["path"])
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _answer(send, 413, too_large(limit))
            return
        await self._limited(scope, receive, send, limit)

    def _refusal(self, scope: dict) -> tuple[int, dict, dict] | None:
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
        if any(name.lower() in QUERY_CREDENTIALS for name, _ in query):
            return 400, error_body("credentials are not accepted in the query string (they end "
                                   "up in logs); send the header Authorization: Bearer TOKEN",
                                   "invalid_request_error", code="token_in_query"), {}
        tokens = self.tokens()
        if not tokens:
            scope["koubou.authorized"] = True
            return _local_only(scope)
        auth = _header(scope, b"authorization") or ""
        scheme, _, given = auth.partition(" ")
        authorized = scheme.lower() == "bearer" and token_matches(given.strip(), tokens)
        scope["koubou.authorized"] = authorized
        if not authorized and not _public(scope["path"]):
            return 401, error_body("a valid bearer token is required (header Authorization: "
                                   "Bearer TOKEN)", "invalid_request_error",
                                   code="invalid_api_key"), {"www-authenticate": "Bearer"}
        return None

    async def _limited(self, scope: dict, receive: Callable, send: Callable, limit: int) -> None:
        seen, started = 0, False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if not started:
                await _answer(send, 413, too_large(limit))


def _local_only(scope: dict) -> tuple[int, dict, dict] | None:
    """Without tokens the server is loopback-only; refuse what a web page could send it.

    A page on another site can make the browser send requests to 127.0.0.1 (or to a name it
    rebinds there), so the Host must be a loopback name and a cross-site Origin is refused.
    """
    host = _host_of(_header(scope, b"host") or "")
    if host and not is_loopback(host):
        return 403, error_body(f"Host {host!r} is not loopback; a server without tokens answers "
                               "only to localhost", "permission_error", code="host"), {}
    origin = _header(scope, b"origin")
    if origin and origin != "null" and not is_loopback(urlsplit(origin).hostname or ""):
        return 403, error_body("cross-site requests are refused", "permission_error",
                               code="origin"), {}
    return None


def _host_of(value: str) -> str:
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def too_large(limit: int) -> dict:
    return error_body(f"the request body is over the limit of {limit} bytes",
                      "invalid_request_error", code="body_too_large")


async def _answer(send: Callable, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
