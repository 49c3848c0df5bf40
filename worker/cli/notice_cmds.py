"""`optrack notices list | show ID | resend ID... | resend --since T [--until T]`."""

from __future__ import annotations

from datetime import datetime

import click
from rich.table import Table

from worker import outbox, reports
from worker.cli.common import ensure_schema, get_runtime, usage_error
from worker.cli.render import console
from worker.db import MAX_ROW_ID
from worker.errors import InvalidOperationId, NoticeNotFound
from worker.operation import validate_operation_id
from worker.reports.formats import to_json
from worker.runtime import Runtime

DEFAULT_LIMIT = 100
MAX_LIMIT = 100_000
NOTICE_ID = click.IntRange(1, MAX_ROW_ID)
WHEN = "2026-01-31, an ISO datetime, or a span ago (7d, 12h)"


def _period(since: str | None, until: str | None, now: datetime) -> reports.Period:
    try:
        return reports.Period.parse(since, until, now)
    except reports.BadPeriod as exc:
        raise usage_error(str(exc)) from None


def _runtime() -> Runtime:
    rt = get_runtime(click.get_current_context())
    ensure_schema(rt)
    return rt


@click.group("notices")
def notices_cmd() -> None:
    """Completion notices (the webhook and task sent when an operation ends): list, show, resend."""


@notices_cmd.command("list")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(outbox.STATUSES, case_sensitive=False),
    help="Only notices in this status (repeatable).",
)
@click.option("--since", metavar="WHEN", help=f"Ended at or after: {WHEN}.")
@click.option("--until", metavar="WHEN", help="Ended before (same forms as --since).")
@click.option("--operation", "operation_id", metavar="ID", help="Only this operation's notice.")
@click.option(
    "--limit",
    default=DEFAULT_LIMIT,
    show_default=True,
    type=click.IntRange(1, MAX_LIMIT),
    help="At most this many, the newest first.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(
    statuses: tuple[str, ...],
    since: str | None,
    until: str | None,
    operation_id: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List completion notices, the newest first, with where each stands."""
    if operation_id is not None:
        try:
            operation_id = validate_operation_id(operation_id)
        except InvalidOperationId as exc:
            raise usage_error(str(exc)) from None
    rt = _runtime()
    now = rt.clock.now()
    period = _period(since, until, now)
    wanted = outbox.Filter(
        outbox.statuses(statuses),  # click's Choice let only known ones through
        period.since,
        period.until,
        operation_id,
    )
    records: list[outbox.NoticeRecord] = []
    before: int | None = None
    with rt.sessions() as session:
        while True:  # pages of 1,000: memory stays flat whatever --limit
            found = outbox.page(
                session, wanted, now, min(outbox.MAX_PAGE, limit - len(records)), before
            )
            records += [outbox.record(row, now) for row in found.notices]
            before = found.before
            if before is None or len(records) >= limit:
                break
    if before is not None:
        click.echo(f"optrack: the newest {limit} shown; --limit for more", err=True)
    if as_json:
        click.echo(to_json({"notices": records}))
        return
    table = Table(title=f"{len(records)} notice(s)", title_justify="left")
    for column in ("id", "operation", "status", "ended (UTC)", "attempts", "next / delivered"):
        table.add_column(column)
    for r in records:
        table.add_row(
            str(r["id"]),
            r["operation_id"],
            r["status"] + (f": {r['last_error']}" if r["status"] == "failed" else ""),
            r["created_at"],
            str(r["attempts"]),
            r["delivered_at"] or r["next_attempt_at"] or "",
        )
    console().print(table)


@notices_cmd.command("show")
@click.argument("notice_id", type=NOTICE_ID, metavar="ID")
def show_cmd(notice_id: int) -> None:
    """Print one notice as JSON, with the final record of its operation that it carries."""
    rt = _runtime()
    with rt.sessions() as session:
        try:
            row = outbox.get(session, notice_id)
        except NoticeNotFound as exc:
            raise usage_error(f"{exc} (see `optrack notices list`)") from None
        click.echo(to_json(outbox.detail(row, rt.clock.now())))


@notices_cmd.command("resend")
@click.argument("notice_ids", nargs=-1, type=NOTICE_ID, metavar="[ID]...")
@click.option("--since", metavar="WHEN", help=f"Every notice ended at or after: {WHEN}.")
@click.option("--until", metavar="WHEN", help="... and before (default: now).")
def resend_cmd(notice_ids: tuple[int, ...], since: str | None, until: str | None) -> None:
    """Send notices again: by ID, or every one whose operation ended in a time range.

    They are owed again, due now, and the next dispatcher run sends them (a delivered one on
    every channel); one being sent right now is left to that send. Safe to run twice.
    """
    if notice_ids and (since or until):
        raise usage_error("give the notices' IDs or a time range (--since/--until), not both")
    if not notice_ids and since is None:
        raise usage_error("give the IDs of the notices to resend, or --since (and --until)")
    rt = _runtime()
    now = rt.clock.now()
    wanted = None
    if not notice_ids:
        period = _period(since, until, now)
        wanted = outbox.Filter(since=period.since, until=period.until)
    try:
        with rt.sessions.begin() as session:
            done = outbox.resend(
                session,
                now,
                ids=notice_ids or None,
                wanted=wanted,
                channel_here=rt.settings.notices_enabled,
            )
    except NoticeNotFound as exc:
        raise usage_error(f"{exc}; nothing was resent (see `optrack notices list`)") from None
    if done.resent:
        shown = ", ".join(map(str, done.resent[:20])) + (" …" if len(done.resent) > 20 else "")
        click.echo(f"resent {len(done.resent)} notice(s), due now: {shown}")
    else:
        click.echo("no notice to resend")
    if done.sending:
        shown = ", ".join(map(str, done.sending[:20])) + (" …" if len(done.sending) > 20 else "")
        click.echo(f"being sent now, left to that send: {shown}")


COMMANDS = (notices_cmd,)
