"""The demo: sandbox API + a real worker with embedded beat, a few operations tracked to the end.

Everything is embedded (SQLite database, Celery's SQLAlchemy transport on SQLite), under
``.optrack/demo``, recreated at each run. Two accounts: the environment's (``default``) and
``acme``, added as `optrack accounts add` does, reached with an API key. The sandbox throws a
429 with Retry-After at acme (which pauses acme alone), a 503 with an HTTP-date Retry-After
and a 500 at the default account, so the demo shows them being honored.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
from cryptography.fernet import Fernet

from worker import intake
from worker.accounts import Accounts
from worker.cli.render import console, status_table
from worker.cli.report_cmds import history_view
from worker.credentials import Vault
from worker.errors import THROTTLE_STATUSES, OptrackError
from worker.migrate import upgrade
from worker.reports import queries
from worker.repository import Repository
from worker.runtime import Runtime
from worker.sandbox import Fault, SandboxServer
from worker.settings import load_settings

DEMO_HOME = Path(".optrack") / "demo"
DEMO_TOKEN = "demo-token-not-a-secret"
DEMO_SID = "AC" + "d" * 32
DEMO_PORT = 8080
ACME = "acme"
ACME_SID = "AC" + "e" * 32
ACME_KEY = "SK" + "e" * 32
ACME_SECRET = "demo-acme-key-secret-not-a-secret"


def _demo_env(base_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(
        {
            "OPTRACK_HOME": str(DEMO_HOME),
            "OPTRACK_API_BASE_URL": base_url,
            "TWILIO_ACCOUNT_SID": DEMO_SID,
            "TWILIO_AUTH_TOKEN": DEMO_TOKEN,
            "OPTRACK_POLL_INTERVAL": "1",
            "OPTRACK_TICK_INTERVAL": "1",
            # Made for this run: it seals acme's secret in the demo's database.
            "OPTRACK_SECRET_KEY": Fernet.generate_key().decode(),
        }
    )
    return env


def run_demo(timeout: float = 180.0, *, serve: bool = False, port: int = DEMO_PORT) -> None:
    """Run the whole demo in the foreground and print status and history at the end.

    The dashboard is served for the demo's run on 127.0.0.1 (``port``, or a free one if it is
    taken); with ``serve`` it stays up after the end, with the worker, until Ctrl-C.
    """
    shutil.rmtree(DEMO_HOME, ignore_errors=True)
    DEMO_HOME.mkdir(parents=True)
    out = console()
    with SandboxServer(account_sid=DEMO_SID, auth_token=DEMO_TOKEN, seed=0) as api:
        acme = api.add_account(ACME_SID, "demo-acme-token-unused")
        api.add_api_key(ACME_SID, ACME_KEY, ACME_SECRET)
        ops = [
            api.add_operation(total=12, duration=15.0, fail_ratio=0.0, outcome="COMPLETED"),
            api.add_operation(total=30, duration=25.0, fail_ratio=0.1, outcome="COMPLETED"),
        ]
        theirs = [acme.add_operation(total=20, duration=20.0, fail_ratio=0.0, outcome="CANCELED")]
        # Consumed by the first API requests of each account, in this order.
        acme.add_fault(Fault(kind="status", status=429, retry_after="3"))
        api.add_fault(Fault(kind="status", status=500))
        api.add_fault(Fault(kind="status", status=503, retry_after="2", retry_after_form="date"))
        env = _demo_env(api.base_url)
        rt = Runtime(load_settings(env))
        upgrade(rt.settings.database_url)
        with rt.sessions.begin() as session:
            sealed = Vault(rt.settings.secret_keys).seal(ACME_SECRET)
            Accounts(session).add(ACME, ACME_SID, ACME_KEY, sealed, rt.clock.now())
        ids = [op.id for op in ops + theirs]
        with ExitStack() as stack:
            link = _dashboard(stack, rt, port)
            intake.track(rt.sessions, [op.id for op in ops], rt.clock.now())
            intake.track(rt.sessions, [op.id for op in theirs], rt.clock.now(), ACME)
            out.print(
                f"sandbox API on {api.base_url}; tracking {len(ids)} operations of 2 accounts "
                f"(default: {len(ops)}, {ACME}: {len(theirs)}, by its API key)"
            )
            click.echo(f"dashboard: {link}")
            log_path = DEMO_HOME / "worker.log"
            log_file = stack.enter_context(log_path.open("w"))
            worker = subprocess.Popen(
                [sys.executable, "-m", "worker", "run", "--concurrency", "2"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            stack.callback(_stop, worker)
            _wait_until_ended(rt, ids, timeout, worker)
            requests = {"default": api.requests_log(), ACME: acme.requests_log()}
            _print_results(rt, ids, requests)
            out.print(f"worker log: {log_path}; database: {rt.settings.database_url}")
            if serve:
                _keep_serving(link)
    rt.close()


def _dashboard(stack: ExitStack, rt: Runtime, port: int) -> str:
    """Serve the dashboard for the demo; the link carries a token made for this run only."""
    from worker.http import create_app
    from worker.http.server import running

    token = secrets.token_urlsafe(24)
    app = create_app(rt, token=token)
    try:
        served = stack.enter_context(running(app, "127.0.0.1", port))
    except OSError:  # the usual port is taken: any free one will do
        served = stack.enter_context(running(app, "127.0.0.1", 0))
    return f"{served.url}/#token={token}"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _keep_serving(link: str) -> None:
    click.echo(f"the dashboard stays up at {link}; Ctrl-C to stop")
    # SIGTERM too (a supervisor, or a shell's background job): stop the worker on the way out.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=20)
    except subprocess.TimeoutExpired:
        worker.kill()


def _wait_until_ended(
    rt: Runtime, ids: list[str], timeout: float, worker: subprocess.Popen[bytes]
) -> None:
    start = time.monotonic()
    last = ""
    while True:
        with rt.sessions() as session:
            rows = [Repository(session).get(op_id) for op_id in ids]
        line = ", ".join(
            f"{r.id[-6:]}: {r.status} {r.created or 0}+{r.failed or 0}/{r.total or '?'}"
            for r in rows
            if r is not None
        )
        if line != last:
            click.echo(f"[{time.monotonic() - start:5.1f}s] {line}")
            last = line
        if all(r is not None and r.ended for r in rows):
            return
        if worker.poll() is not None:
            raise OptrackError(f"the worker exited early ({worker.returncode}); see its log")
        if time.monotonic() - start > timeout:
            raise OptrackError(f"the demo's operations did not end within {timeout:.0f}s")
        time.sleep(0.5)


def _print_results(rt: Runtime, ids: list[str], requests: dict[str, list[dict[str, Any]]]) -> None:
    out = console()
    with rt.sessions() as session:
        out.print(status_table(queries.progress_states(session, ids)))
        for op_id in ids:
            out.print(history_view(queries.operation_history(session, op_id, rt.clock.now())))
    each = ", ".join(f"{name}: {len(log)}" for name, log in requests.items())
    out.print(f"API requests: {sum(len(log) for log in requests.values())} ({each})")
    for name, log in requests.items():  # a pause is its account's: gaps within its own log
        for line in describe_faults(log):
            out.print(f"  account {name}: {line}")


def describe_faults(requests: list[dict[str, Any]]) -> list[str]:
    """One sentence per error answer: how long the API was left alone after it."""
    lines = []
    for i, entry in enumerate(requests):
        status, path, at = entry["status"], str(entry["path"]), float(entry["t"])
        later = requests[i + 1 :]
        if status in THROTTLE_STATUSES and later:
            gap = float(later[0]["t"]) - at
            lines.append(f"HTTP {status} on {path}: no API request for {gap:.1f}s")
        elif status == 500:
            same = [r for r in later if r["path"] == path]
            gap_text = (
                f"its next poll {float(same[0]['t']) - at:.1f}s later" if same else "no retry"
            )
            lines.append(f"HTTP {status} on {path}: not retried in place; {gap_text}")
    return lines
