"""The dashboard in headless Chromium: it loads with no console error, shows a task submitted
from the command line within a second without a reload, its cancel button cancels it, and it
shows each endpoint of a craftsman that has several."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp import CHROMIUM, Browser
from conftest import Workers, submit, wait_outcomes, write_config
from fake_openai import FakeOpenAI
from koubou_spool.spool.files import Spool
from serve_client import running

TOKEN = "dash-token"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    chromium = Browser(tmp_path / "profile")
    yield chromium
    chromium.close()


def submit_from_cli(home: Path, task_id: str) -> None:
    subprocess.run([sys.executable, "-m", "koubou_spool.cli.submit", "--home", str(home),
                    "--id", task_id, "summarise the changelog"], check=True, timeout=30,
                   capture_output=True)


def test_the_dashboard_is_live_and_its_cancel_button_cancels(
        home: Path, spool: Spool, browser: Browser, tmp_path: Path) -> None:
    env = {"KOUBOU_SERVE_TOKENS": TOKEN}
    with running(home, tmp_path / "serve.log", env=env) as server:
        browser.page("Page.navigate", url=f"{server.url}/#token={TOKEN}")
        browser.wait_for("document.getElementById('live')?.textContent === 'live'", 10)
        assert browser.evaluate("location.hash") == ""  # the token left the address bar
        submit_from_cli(home, "seen-live")
        took = browser.wait_for(
            "!!document.querySelector('#tasks tr[data-id=\"seen-live\"]')", 1.0)
        assert took < 1.0
        assert browser.evaluate(
            "document.getElementById('queue-pending').querySelector('b').textContent") == "1"
        browser.evaluate("document.querySelector('button.cancel[data-task=\"seen-live\"]')"
                         ".click()")
        browser.wait_for("document.querySelector('#tasks tr[data-id=\"seen-live\"]')"
                         "?.dataset.state === 'failed'", 5)
        browser.evaluate("document.querySelector('#tasks tr[data-id=\"seen-live\"]').click()")
        browser.wait_for("document.getElementById('detail-id').textContent === 'seen-live'", 5)
        prompt = browser.evaluate("document.getElementById('detail-prompt').textContent")
        error = browser.evaluate("document.getElementById('detail-error').textContent")
        errors = browser.errors()
    assert spool.outcome("seen-live")["error"]["kind"] == "cancelled"
    assert prompt == "summarise the changelog" and "cancelled" in error
    assert errors == [], json.dumps(errors, indent=1)[:2000]


def test_without_the_token_the_page_asks_for_it_and_shows_no_data(
        home: Path, spool: Spool, browser: Browser, tmp_path: Path) -> None:
    submit_from_cli(home, "hidden-task")
    env = {"KOUBOU_SERVE_TOKENS": TOKEN}
    with running(home, tmp_path / "serve.log", env=env) as server:
        browser.page("Page.navigate", url=server.url + "/")
        browser.wait_for("!document.getElementById('token-form').hidden", 10)
        assert not browser.evaluate("!!document.querySelector('#tasks tr[data-id]')")
        browser.evaluate(f"document.getElementById('token').value = '{TOKEN}';"
                         "document.querySelector('#token-form button').click()")
        browser.wait_for("!!document.querySelector('#tasks tr[data-id=\"hidden-task\"]')", 5)


def test_the_dashboard_shows_each_endpoint_of_a_craftsman(
        home: Path, spool: Spool, browser: Browser, tmp_path: Path, workers: Workers) -> None:
    fakes = [FakeOpenAI().start() for _ in range(2)]
    try:
        write_config(home, craftsmen={"local": {
            "backend": "openai", "model": "fake-model", "local": True,
            "endpoints": [{"base_url": f.base_url, "max_concurrent": 2} for f in fakes]}})
        workers.start(home)
        wait_outcomes(spool, [submit(spool, content="through an endpoint")])
        ledger = sqlite3.connect(home / "db" / "koubou.db", timeout=5)
        deadline = time.monotonic() + 10
        while not (ledger.execute("SELECT endpoints FROM workers").fetchone() or [None])[0]:
            assert time.monotonic() < deadline, "no heartbeat named the endpoints"
            time.sleep(0.1)
        env = {"KOUBOU_SERVE_TOKENS": TOKEN}
        with running(home, tmp_path / "serve.log", env=env) as server:
            browser.page("Page.navigate", url=f"{server.url}/#token={TOKEN}")
            browser.wait_for("document.querySelectorAll('#endpoints tr[data-endpoint]').length"
                             " === 2", 10)
            shown = browser.evaluate("[...document.querySelectorAll('#endpoints tr')].slice(1)"
                                     ".map((r) => [...r.cells].map((c) => c.textContent))")
            errors = browser.errors()
    finally:
        for fake in fakes:
            fake.stop()
    assert sorted(row[1] for row in shown) == sorted(f.base_url for f in fakes)
    assert {row[0] for row in shown} == {"local"} and {row[2] for row in shown} == {"ready"}
    assert errors == [], json.dumps(errors, indent=1)[:2000]
