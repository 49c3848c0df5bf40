"""The dashboard in a real browser (Playwright driving Debian's Chromium) over the real stack:
sandbox, worker, beat and `optrack serve` as processes on Redis and PostgreSQL.

Operations are tracked through the API while the page is open; the page must show them,
move their progress bars and turn them COMPLETED by itself, without a reload.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.processes import (
    Sandbox,
    Served,
    base_env,
    beat_args,
    celery_process,
    sandbox_process,
    serve_process,
    wait_for,
    worker_args,
)
from tests.support.services import IN_CI, TOKEN

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
HTTP_TOKEN = "dash-" + "b0ard" * 6
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]  # what this machine needs: its closed network refuses what Chromium fetches by itself


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Debian Chromium through Playwright (never a downloaded browser build)."""
    if not CHROMIUM.exists() or shutil.which("chromium") is None:
        if IN_CI:
            pytest.fail("/usr/bin/chromium is missing (CI=true; .ci/run installs it)")
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def stack(tmp_path: Path, redis_url: str, pg_url: str) -> Iterator[tuple[Sandbox, Served]]:
    env = base_env(
        tmp_path,
        OPTRACK_DATABASE_URL=pg_url,
        OPTRACK_BROKER_URL=redis_url,
        OPTRACK_POLL_INTERVAL="1",
        OPTRACK_TICK_INTERVAL="0.5",
        OPTRACK_HTTP_TOKEN=HTTP_TOKEN,
    )
    with ExitStack() as stack, sandbox_process(env, tmp_path / "sandbox.log") as api:
        env["OPTRACK_API_BASE_URL"] = api.base_url
        worker_log = tmp_path / "w1.log"
        stack.enter_context(celery_process(worker_args("w1"), env, worker_log))
        stack.enter_context(celery_process(beat_args(tmp_path / "sched"), env, tmp_path / "b.log"))
        served = stack.enter_context(serve_process(env, tmp_path / "serve.log"))
        # The page's first wait must not also cover a worker still starting on a busy machine.
        wait_for(lambda: "ready." in worker_log.read_text(), 60, "the worker to be ready")
        yield api, served


@pytest.fixture(autouse=True)
def logs_on_failure(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """A failed browser wait says only what it waited for: show what the processes did."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for log in sorted(tmp_path.glob("*.log")):
            print(f"--- {log.name} (last 40 lines) ---")
            print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))


def done_of(page: Any, op_id: str) -> tuple[int, str]:
    """(created + failed, status) shown on the page for one operation."""
    row = page.locator(f'.op[data-op="{op_id}"]')
    return int(row.locator('[data-role="bar"]').get_attribute("data-done")), str(
        row.get_attribute("data-status")
    )


def test_the_dashboard_follows_operations_to_completed_without_a_reload(
    browser: Any, stack: tuple[Sandbox, Served], tmp_path: Path
) -> None:
    api, served = stack
    slow = api.create(total=40, duration=14)
    quick = api.create(total=6, duration=4)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    page.goto(f"{served.url}/#token={HTTP_TOKEN}")
    page.wait_for_selector("#main:not([hidden])")
    assert page.url == f"{served.url}/", "the token stayed in the address bar"
    assert page.evaluate("sessionStorage.getItem('optrack-token')") == HTTP_TOKEN
    page.evaluate("window.__sameDocument = true")  # gone if the page ever reloads
    page.wait_for_function("document.body.dataset.stream === 'open'")  # /api/v1/events

    tracked = requests.post(
        f"{served.url}/api/v1/operations",
        json={"ids": [slow, quick]},
        headers={"Authorization": f"Bearer {HTTP_TOKEN}"},
        timeout=10,
    )
    assert tracked.json() == {"added": [slow, quick], "already_tracked": []}

    row = f'.op[data-op="{slow}"]'
    page.wait_for_selector(row, timeout=30_000)
    # A bar that has started: some done, not all.
    page.wait_for_function(
        """id => { const b = document.querySelector(`.op[data-op="${id}"] [data-role=bar]`);
                   return b && +b.dataset.done > 0 && +b.dataset.done < +b.dataset.total; }""",
        arg=slow,
        timeout=30_000,
    )
    first, status = done_of(page, slow)
    assert status == "PROCESSING"
    page.wait_for_function(
        """([id, before]) => {
             const b = document.querySelector(`.op[data-op="${id}"] [data-role=bar]`);
             return b && +b.dataset.done > before; }""",
        arg=[slow, first],
        timeout=30_000,
    )
    moved, _ = done_of(page, slow)
    assert moved > first
    eta = page.locator(f"{row} .eta").inner_text()
    assert eta.startswith(("ETA ", "ended ")), eta

    page.click(row)  # its history chart
    page.wait_for_selector(f'#history[data-op="{slow}"] svg polyline[data-series="created"]')

    page.wait_for_selector(f'{row}[data-status="COMPLETED"]', timeout=60_000)
    page.wait_for_selector(f'.op[data-op="{quick}"][data-status="COMPLETED"]', timeout=30_000)
    final, status = done_of(page, slow)
    assert (final, status) == (40, "COMPLETED")
    assert page.locator(f'#history[data-op="{slow}"] .status').inner_text() == "COMPLETED"
    assert page.locator('[data-card="completed"] .value').inner_text() == "2"
    widths = page.eval_on_selector_all(
        f"{row} .seg", "segs => segs.map(s => parseFloat(s.style.width))"
    )
    assert abs(sum(widths) - 100) < 0.01

    page.click('#status-legend button[data-status="COMPLETED"]')  # that status's operations
    page.wait_for_selector(f'#status-rows tr[data-op="{quick}"]')
    assert page.locator("#status-rows tr").count() == 2

    assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    assert int(page.evaluate("document.body.dataset.refreshed")) > 3
    assert int(page.evaluate("document.body.dataset.events")) > 3  # redrawn on events
    # Quiet now: the page waits on the stream instead of reading the API every 2 s.
    reads = sum(url.endswith("/api/v1/account") for url in asked)
    page.wait_for_timeout(6000)
    assert sum(url.endswith("/api/v1/account") for url in asked) - reads <= 1
    assert page.evaluate("document.body.dataset.stream") == "open"
    shot = Path(os.environ.get("OPTRACK_SCREENSHOT", tmp_path / "dashboard.png"))
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert errors == []
    # Everything the page loaded came from optrack itself: no CDN, no other host.
    assert asked and all(url.startswith(served.url + "/") for url in asked)
    context.close()


def test_the_dashboard_asks_for_the_token_and_forgets_a_wrong_one(
    browser: Any, stack: tuple[Sandbox, Served]
) -> None:
    _, served = stack
    page = browser.new_page()
    page.goto(f"{served.url}/")  # no token at all: the form
    page.wait_for_selector("#token-form:not([hidden])")
    assert page.is_hidden("#main")

    page.goto("about:blank")  # a new document: only the fragment would not reload the page
    page.goto(f"{served.url}/#token=not-the-token")
    page.wait_for_selector("#token-form:not([hidden])")
    assert "refused" in page.inner_text("#token-why")
    assert page.evaluate("sessionStorage.getItem('optrack-token')") is None

    page.fill("#token-input", HTTP_TOKEN)
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("#main:not([hidden])")
    page.wait_for_selector('[data-card="operations"]')
    assert page.evaluate("sessionStorage.getItem('optrack-token')") == HTTP_TOKEN
    html = page.content()
    assert HTTP_TOKEN not in html and TOKEN not in html  # not written into the page
    page.close()
