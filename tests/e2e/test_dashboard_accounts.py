# ruff: noqa: F811  (browser: test_dashboard's fixture, imported, then named by each test)
"""The dashboard's account filter and per-account table, in Chromium, against the real app.

The app is served on a real socket over a migrated SQLite database; operations are tracked
under two accounts, and the page is read with the all-access token and with a scoped one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_dashboard import browser  # noqa: F401  (the fixture, used by name)
from tests.support.processes import base_env
from worker.accounts import Accounts
from worker.clock import FakeClock
from worker.credentials import Vault
from worker.http import create_app
from worker.http.server import running
from worker.repository import Repository
from worker.runtime import Runtime
from worker.settings import load_settings
from worker.tokens import Tokens

HTTP_TOKEN = "dash-" + "acc0unts" * 4
KEY = "x8r0ZrkNVk8w3cQbWJ0XoVh0yW7yQ6mQ2m3sV9b8a1c="
ACME_OP = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
DEFAULT_OP = "comms_operation_01h9krwprkeee8fzqspvwy6nq9"


@pytest.fixture
def served(tmp_path: Path, sqlite_url: str, clock: FakeClock) -> Iterator[tuple[str, str]]:
    """(the app's URL, a token of acme only)."""
    env = base_env(tmp_path, OPTRACK_DATABASE_URL=sqlite_url, OPTRACK_HTTP_TOKEN=HTTP_TOKEN)
    rt = Runtime(load_settings(env), clock=clock)
    with rt.sessions.begin() as session:
        sealed = Vault((KEY,)).seal("acme-secret")
        Accounts(session).add("acme", "AC" + "ac" * 16, None, sealed, clock.now())
        Repository(session).add([ACME_OP], clock.now(), "acme")
        Repository(session).add([DEFAULT_OP], clock.now())
        scoped, _ = Tokens(session).add("acme-dash", ["acme"], True, clock.now())
    with running(create_app(rt, token=HTTP_TOKEN)) as server:
        yield server.url, scoped
    rt.close()


def shown_ops(page: Any) -> list[str]:
    return sorted(page.eval_on_selector_all(".op", "rows => rows.map(r => r.dataset.op)"))


def test_the_account_filter_and_table(
    browser: Any, served: tuple[str, str], tmp_path: Path
) -> None:
    url, scoped = served
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{url}/#token={HTTP_TOKEN}")
    page.wait_for_selector("#account-rows tr[data-account='acme']")
    names = page.eval_on_selector_all(
        "#account-rows tr", "rows => rows.map(r => r.dataset.account)"
    )
    assert names == ["acme", "default"]
    page.wait_for_selector(f'.op[data-op="{ACME_OP}"]')
    page.wait_for_selector(f'.op[data-op="{DEFAULT_OP}"]')
    assert shown_ops(page) == [ACME_OP, DEFAULT_OP]

    page.select_option("#account-filter", "acme")
    page.wait_for_selector(f'.op[data-op="{DEFAULT_OP}"]', state="detached")
    assert shown_ops(page) == [ACME_OP]
    shot = Path(os.environ.get("OPTRACK_SCREENSHOT", tmp_path / "accounts.png"))
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.select_option("#account-filter", "")
    page.wait_for_selector(f'.op[data-op="{DEFAULT_OP}"]')

    # A token of acme alone: one row, its operations only, no deployment-wide banner.
    other = context.new_page()  # a tab of its own: its own sessionStorage
    other.on("pageerror", lambda exc: errors.append(str(exc)))
    other.goto(f"{url}/#token={scoped}")
    other.wait_for_selector("#account-rows tr[data-account='acme']")
    other.wait_for_selector(f'.op[data-op="{ACME_OP}"]')
    assert other.eval_on_selector_all("#account-rows tr", "rows => rows.length") == 1
    assert shown_ops(other) == [ACME_OP]
    assert other.is_hidden("#offline") and other.is_hidden("#account")
    assert errors == []
    context.close()
