"""`optrack db`, `run`, `sandbox`, `demo`: the long-running and setup commands."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import click

from worker import retention
from worker.cli.common import LOG_LEVELS, FiniteRange, ensure_schema, get_runtime
from worker.cli.http_cmds import auth_token
from worker.cli.ops_cmds import DURATION
from worker.migrate import upgrade


@click.group()
def db() -> None:
    """Database schema commands (Alembic owns the schema)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(revision: str) -> None:
    """Create or migrate the database named by OPTRACK_DATABASE_URL."""
    rt = get_runtime(click.get_current_context())
    upgrade(rt.settings.database_url, revision)
    click.echo(f"database at revision {revision}")


@db.command("prune")
@click.option(
    "--older-than",
    type=DURATION,
    required=True,
    help="Drop the history of operations that ended longer ago than this (e.g. 90d).",
)
@click.option(
    "--batch-size",
    default=retention.DEFAULT_BATCH,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="History rows (or notices) read per transaction; those that may go are deleted.",
)
def db_prune(older_than: timedelta, batch_size: int) -> None:
    """Delete old history, keeping each operation's row and its last history row."""
    rt = get_runtime(click.get_current_context())
    ensure_schema(rt)
    result = retention.prune(rt.sessions, rt.clock.now() - older_than, batch_size)
    click.echo(result.summary())


@click.command()
@click.option(
    "--concurrency",
    "-c",
    default=2,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Worker processes.",
)
@click.option("--loglevel", "-l", default="INFO", show_default=True, type=LOG_LEVELS)
@click.option("--serve", is_flag=True, help="Also run `optrack serve` (API and dashboard).")
@click.option("--no-auth", is_flag=True, help="With --serve: no token (loopback only).")
def run(concurrency: int, loglevel: str, serve: bool, no_auth: bool) -> None:
    """Run a Celery worker with beat embedded: the one-machine default."""
    from worker.celery_app import app

    rt = get_runtime(click.get_current_context())
    ensure_schema(rt)
    server = None
    if serve:
        # Checked here, so a missing token stops `run` before the worker starts (exit 2).
        auth_token(rt.settings, rt.settings.http_host, no_auth)
        # Its own process: the worker forks its pool, which must not inherit a serving loop.
        server = subprocess.Popen(
            [sys.executable, "-m", "worker", "serve", f"--loglevel={loglevel}"]
            + (["--no-auth"] if no_auth else [])
        )
    rt.close()  # the worker's processes build their own connections after forking
    app.use_settings(rt.settings)  # read once: the app does not read the environment again
    try:
        app.worker_main(
            [
                "worker",
                "--beat",
                f"--concurrency={concurrency}",
                f"--loglevel={loglevel}",
                "--hostname=optrack@%h",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port",
    default=8900,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port (0 picks a free one).",
)
@click.option(
    "--seed",
    default=5,
    show_default=True,
    type=click.IntRange(0, 10_000),
    help="Operations created at start.",
)
@click.option(
    "--duration",
    default=30.0,
    show_default=True,
    type=FiniteRange(0.1, 86400.0),
    help="Seconds a seeded operation runs.",
)
def sandbox(host: str, port: int, seed: int, duration: float) -> None:
    """Serve a faithful sandbox of the SenderPool Operations API (for demos and tests)."""
    from worker.sandbox.server import serve_forever

    rt = get_runtime(click.get_current_context())
    serve_forever(
        host=host,
        port=port,
        account_sid=rt.settings.account_sid or "AC" + "a" * 32,
        auth_token=rt.settings.auth_token or "sandbox-token",
        seed=seed,
        duration=duration,
    )


@click.command()
@click.option(
    "--timeout",
    default=180.0,
    show_default=True,
    type=FiniteRange(1.0, 86400.0),
    help="Give up after seconds.",
)
@click.option("--serve", is_flag=True, help="Keep the dashboard up after the end, until Ctrl-C.")
@click.option(
    "--port",
    default=8080,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port of the dashboard (a free one if taken).",
)
def demo(timeout: float, serve: bool, port: int) -> None:
    """Run sandbox + worker + beat, track a few operations to the end, print their history."""
    from worker.demo import run_demo

    run_demo(timeout=timeout, serve=serve, port=port)


COMMANDS = (db, run, sandbox, demo)
