"""`koubou serve`'s gate: bearer tokens on every route, none in URLs, loopback only without a
token, body limits, ids that cannot leave their directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import httpx2 as httpx
import pytest
from click.testing import CliRunner
from starlette.routing import Mount

from koubou_spool.cli.koubou import cli
from koubou_spool.serve.app import routes
from koubou_spool.serve.guard import token_matches
from serve_client import running, serve_client

TOKEN = "s3cret-token"


def every_route() -> list[tuple[str, str]]:
    """(method, path) of each route in the table, with placeholders filled."""
    found = []
    for route in routes():
        if isinstance(route, Mount):
            found.append(("GET", "/static/dashboard.js"))
            continue
        path = route.path.replace("{model}", "local").replace("{file_id}", "file-x") \
            .replace("{batch_id}", "batch_x").replace("{task_id}", "t1")
        found += [(m, path) for m in sorted(route.methods - {"HEAD"})]
    return found


PUBLIC = {("GET", "/"), ("GET", "/static/dashboard.js"), ("GET", "/healthz")}


def test_with_tokens_every_route_but_the_data_free_page_is_401_without_one(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOUBOU_SERVE_TOKENS", f"other-token, {TOKEN}")

    async def steps() -> dict:
        answers = {}
        async with serve_client(home) as client:
            for method, path in every_route():
                answers[(method, path)] = await client.request(method, path)
            wrong = await client.get("/v1/models", headers={"authorization": "Bearer nope"})
            basic = await client.get("/v1/models", headers={"authorization": f"Basic {TOKEN}"})
            right = await client.get("/v1/models", headers={"authorization": f"Bearer {TOKEN}"})
            cancel = await client.post("/api/tasks/t1/cancel",
                                       headers={"authorization": f"Bearer {TOKEN}"})
        return answers | {"wrong": wrong, "basic": basic, "right": right, "cancel": cancel}

    answers = anyio.run(steps)
    assert len(every_route()) > 20
    for key, answer in answers.items():
        if key in PUBLIC or key in ("wrong", "basic", "right", "cancel"):
            continue
        assert answer.status_code == 401, (key, answer.text)
        assert answer.json()["error"]["code"] == "invalid_api_key"
        assert answer.headers["www-authenticate"] == "Bearer"
    assert answers["wrong"].status_code == 401 and answers["basic"].status_code == 401
    assert answers["right"].status_code == 200
    assert answers["cancel"].status_code == 404  # the dashboard's action, past the gate
    assert answers[("GET", "/")].status_code == 200
    assert TOKEN not in answers[("GET", "/")].text
    assert answers[("GET", "/healthz")].json() == {"ok": True}  # the home only with the token


def test_a_token_in_the_query_string_is_refused(home: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOUBOU_SERVE_TOKENS", TOKEN)

    async def steps() -> list[httpx.Response]:
        async with serve_client(home, token=TOKEN) as client:
            return [await client.get(f"/v1/models?{name}={TOKEN}")
                    for name in ("token", "access_token", "api_key")]

    for answer in anyio.run(steps):
        assert answer.status_code == 400 and "query string" in answer.json()["error"]["message"]


def test_tokens_are_compared_whole() -> None:
    assert token_matches("abc", ("x", "abc")) and not token_matches("ab", ("abc",))
    assert not token_matches("", ("abc",)) and not token_matches("abc", ())


def test_without_tokens_another_host_does_not_start(home: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", "--home", str(home), "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "refusing to listen on 0.0.0.0 without a token" in result.output
    assert "KOUBOU_SERVE_TOKENS" in result.output and "Traceback" not in result.output


def test_without_tokens_only_loopback_hosts_and_same_site_origins(home: Path) -> None:
    async def steps() -> list[httpx.Response]:
        async with serve_client(home) as client:
            return [await client.get("/v1/models", headers={"host": "evil.example:8787"}),
                    await client.post("/api/tasks/x/cancel",
                                      headers={"origin": "https://evil.example"}),
                    await client.get("/v1/models", headers={"host": "localhost:8787"}),
                    await client.get("/v1/models")]

    rebound, cross_site, by_name, plain = anyio.run(steps)
    assert rebound.status_code == 403 and cross_site.status_code == 403
    assert by_name.status_code == 200 and plain.status_code == 200


def test_a_body_over_the_limit_is_413(home: Path) -> None:
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}'

    async def chunks():  # noqa: ANN202 - no content-length: the limit holds while reading
        for start in range(0, len(big), 1000):
            yield big[start:start + 1000]

    async def steps() -> list[httpx.Response]:
        async with serve_client(home, max_body_bytes=2000) as client:
            return [await client.post("/v1/chat/completions", content=big),
                    await client.post("/v1/chat/completions", content=chunks()),
                    await client.post("/api/tasks", content=big)]

    for answer in anyio.run(steps):
        assert answer.status_code == 413, answer.text
        assert answer.json()["error"]["code"] == "body_too_large"


def test_ids_with_dot_dot_are_404(home: Path) -> None:
    (home / "secret").write_text("not for you")

    async def steps() -> list[httpx.Response]:
        async with serve_client(home) as client:
            return [await client.get("/v1/files/..%2Fsecret/content"),
                    await client.get("/v1/files/file-..%2F..%2Fsecret/content"),
                    await client.get("/v1/files/../secret"),
                    await client.get("/v1/batches/..%2F..%2Fsecret"),
                    await client.delete("/v1/files/..")]

    for answer in anyio.run(steps):
        assert answer.status_code == 404, answer.text
        assert "not for you" not in answer.text


def test_the_real_server_refuses_a_request_without_the_token(
        home: Path, tmp_path: Path) -> None:
    env = {"KOUBOU_SERVE_TOKENS": TOKEN}
    with running(home, tmp_path / "serve.log", "--host", "127.0.0.1", env=env) as server:
        assert httpx.get(server.url + "/v1/models").status_code == 401
        answer = httpx.get(server.url + "/v1/models", headers={"authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 200
        stopped = server.stop()
    assert stopped == 0 and TOKEN not in server.output()


def test_the_console_script_shows_serve_in_its_help() -> None:
    result = subprocess.run([sys.executable, "-m", "koubou_spool.cli.koubou", "--help"],
                            capture_output=True, text=True, timeout=60, check=True)
    assert "serve" in result.stdout


def test_an_upload_over_the_file_limit_is_413(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from koubou_spool.serve import app as app_module

    monkeypatch.setattr(app_module, "BATCH_FILE_BYTES", 1000)  # 200 MB in earnest
    monkeypatch.setattr(app_module, "MULTIPART_SLACK", 500)

    async def steps() -> httpx.Response:
        async with serve_client(home) as client:
            return await client.post("/v1/files", data={"purpose": "batch"},
                                     files={"file": ("big.jsonl", b"x" * 3000)})

    answer = anyio.run(steps)
    assert answer.status_code == 413 and not (home / "files").exists()
