"""`optrack db`, `run`, `sandbox`, `demo`: the long-running and setup commands."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import click

from worker import liveness, migrate, retention
from worker.cli.common import LOG_LEVELS, FiniteRange, ensure_schema, get_runtime, usage_error
from worker.cli.http_cmds import auth_token
from worker.cli.ops_cmds import DURATION
from worker.db import ensure_sqlite_dirs


@click.group()
def db() -> None:
    """Database schema commands (Alembic owns the schema)."""


FORCE = click.option(
    "--force",
    is_flag=True,
    help="Migrate even while processes of another release still beat on the database.",
)


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@FORCE
def db_upgrade(revision: str, force: bool) -> None:
    """Create or migrate the database named by OPTRACK_DATABASE_URL (a SQLite file is backed
    up first, to a file named after the revision it was at)."""
    rt = get_runtime(click.get_current_context())
    ensure_sqlite_dirs(rt.settings)
    if not force:
        liveness.refuse_beside_other_releases(rt.engine, rt.clock.now())
    click.echo(migrate.upgrade(rt.settings.database_url, revision).summary())


@db.command("downgrade", context_settings={"ignore_unknown_options": True})
@click.argument("revision")
@FORCE
def db_downgrade(revision: str, force: bool) -> None:
    """Take the database back to REVISION (an id from `optrack db history`, or -1), to run the
    release before; a SQLite file is backed up first."""
    rt = get_runtime(click.get_current_context())
    if not force:
        liveness.refuse_beside_other_releases(rt.engine, rt.clock.now())
    click.echo(migrate.downgrade(rt.settings.database_url, revision).summary())


@db.command("current")
def db_current() -> None:
    """Show the database's revision, and whether it is this release's (head)."""
    rt = get_runtime(click.get_current_context())
    current = migrate.current_revision(rt.settings.database_url)
    head = migrate.head_revision()
    if current is None:
        click.echo(f"(empty): no optrack schema yet; this release's is {head}")
    elif current == head:
        click.echo(f"{current} (head)")
    else:
        click.echo(f"{current}; this release's is {head}: run `optrack db upgrade`")


@db.command("history")
def db_history() -> None:
    """List the revisions, newest first, marking the database's and this release's."""
    rt = get_runtime(click.get_current_context())
    for line in migrate.history(rt.settings.database_url):
        click.echo(line)


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
    """Delete old history, keeping each operation's row and its last history row, and the
    notices delivered longer ago than OPTRACK_NOTICE_RETENTION."""
    rt = get_runtime(click.get_current_context())
    ensure_schema(rt)
    now = rt.clock.now()
    result = retention.prune(rt.sessions, now - older_than, batch_size)
    click.echo(result.summary())
    before = now - rt.settings.notice_retention
    delivered = retention.prune_delivered_notices(rt.sessions, before, batch_size)
    click.echo(f"pruned {delivered} notice(s) delivered before {before.isoformat()}")


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
    # Before the embedded database is migrated: never under a running older release.
    liveness.refuse_beside_other_releases(rt.engine, rt.clock.now())
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
@click.option(
    "--account",
    "accounts",
    multiple=True,
    metavar="SID:TOKEN[:KEY_SID:KEY_SECRET]",
    help="One more account, with its own operations and faults (repeatable).",
)
@click.option(
    "--log-ids",
    is_flag=True,
    help="Log the operation IDs each answer carried (GET /_sandbox/requests), for benchmarks.",
)
@click.option(
    "--ulid-ids",
    is_flag=True,
    help="New operations' IDs carry their createdAt (ms) as ULIDs do; random IDs otherwise.",
)
def sandbox(
    host: str,
    port: int,
    seed: int,
    duration: float,
    accounts: tuple[str, ...],
    log_ids: bool,
    ulid_ids: bool,
) -> None:
    """Serve a faithful sandbox of the SenderPool Operations API (for demos and tests); the
    environment's account, and each --account beside it."""
    from worker.sandbox.server import parse_account, serve_forever

    try:
        extra = tuple(parse_account(text) for text in accounts)
    except ValueError as exc:
        raise usage_error(f"--account: {exc}") from None
    rt = get_runtime(click.get_current_context())
    first = rt.settings.account_sid or "AC" + "a" * 32
    sids = [first, *(sid for sid, _, _ in extra)]
    twice = sorted({sid for sid in sids if sids.count(sid) > 1})
    if twice:
        raise usage_error(f"--account: {', '.join(twice)} given twice (one account per SID)")
    serve_forever(
        host=host,
        port=port,
        account_sid=first,
        auth_token=rt.settings.auth_token or "sandbox-token",
        seed=seed,
        duration=duration,
        accounts=extra,
        log_ids=log_ids,
        ulid_ids=ulid_ids,
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
