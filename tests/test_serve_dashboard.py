"""The dashboard in headless Chromium: it loads with no console error, shows a task submitted
from the command line within a second without a reload, and its cancel button cancels it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp import CHROMIUM, Browser
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
