"""`optrack discover` and `optrack health`: the operations commands."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from typing import Any

import click

from worker import discovery, health
from worker.accounts import Accounts
from worker.cli.common import ensure_schema, get_runtime
from worker.credentials import DEFAULT_ACCOUNT, validate_account_name
from worker.durations import parse_duration

DEFAULT_WINDOW = "7d"
DEFAULT_MAX_LAG = "5m"
DEFAULT_MAX_BEAT_AGE = "1m"
EXIT_UNHEALTHY = 1


class Duration(click.ParamType[timedelta]):
    """A duration in the one grammar: 90, 90s, 15m, 1h30m, 7d."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


@click.command()
@click.option(
    "--window",
    type=DURATION,
    default=DEFAULT_WINDOW,
    show_default=True,
    help="Look at operations created this long ago or later.",
)
@click.option("--page-size", default=1000, show_default=True, type=click.IntRange(1, 1000))
@click.option("--account", "only", metavar="NAME", help="Only this account (default: every one).")
def discover(window: timedelta, page_size: int, only: str | None) -> None:
    """Track every PROCESSING operation of each account, under it (one run; exit 1 if one
    stopped early)."""
    rt = get_runtime(click.get_current_context())
    ensure_schema(rt)
    with rt.sessions() as session:
        store = Accounts(session)
        names = [store.get(validate_account_name(only)).name] if only else store.names()
    complete = True
    for name in names:
        result = discovery.discover(
            rt.sessions,
            rt.client_for(name),
            rt.clock.now(),
            window,
            page_size=page_size,
            recorder=rt.recorder,
            clock_allowance=rt.poll_policy.clock_allowance,
            account=name,
        )
        for op_id in result.added:
            click.echo(f"tracking {op_id} (account {name})")
        prefix = f"account {name}: " if len(names) > 1 or name != DEFAULT_ACCOUNT else ""
        click.echo(prefix + result.summary(), err=not result.complete)
        complete = complete and result.complete
    if not complete:
        sys.exit(1)


@click.command("health")
@click.option(
    "--max-lag",
    type=DURATION,
    default=DEFAULT_MAX_LAG,
    show_default=True,
    help="Unhealthy if a due poll is later than this.",
)
@click.option(
    "--max-beat-age",
    type=DURATION,
    default=DEFAULT_MAX_BEAT_AGE,
    show_default=True,
    help="Unhealthy if beat's tick last ran longer ago than this.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def health_cmd(max_lag: timedelta, max_beat_age: timedelta, as_json: bool) -> None:
    """Exit 0 if beat ticks, polls are on time and the credentials work; else 1 and why."""
    rt = get_runtime(click.get_current_context())
    problem = health.database_problem(rt.engine)
    if problem is not None:
        click.echo(f"unhealthy: {problem}", err=True)
        sys.exit(EXIT_UNHEALTHY)
    now = rt.clock.now()
    with rt.sessions() as session:
        report = health.check(
            session,
            now,
            account_sid=rt.settings.account_sid,
            max_beat_age=max_beat_age,
            max_lag=max_lag,
        )
    if as_json:
        click.echo(json.dumps(report.facts(), indent=2))
    if not report.ok:
        for line in report.problems:
            click.echo(f"unhealthy: {line}", err=True)
        sys.exit(EXIT_UNHEALTHY)
    if not as_json:
        assert report.beat_at is not None
        age = (now - report.beat_at).total_seconds()
        click.echo(f"ok: beat ticked {age:.0f}s ago, polling lag {report.lag:.0f}s")


COMMANDS = (discover, health_cmd)
