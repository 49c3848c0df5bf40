"""`optrack track`, `status`: enqueue IDs and read back what is known (history: report_cmds)."""

from __future__ import annotations

import json
import sys

import click

from worker import dead_letters, intake
from worker.accounts import Accounts
from worker.cli.common import (
    account_option,
    checked_account,
    ensure_schema,
    get_runtime,
    usage_error,
)
from worker.cli.render import console, pause_line, status_table
from worker.cli.report_cmds import follow
from worker.credentials import DEFAULT_ACCOUNT, validate_account_name
from worker.errors import InvalidOperationId
from worker.operation import validate_operation_id
from worker.records import operation_record
from worker.reports import queries
from worker.reports.formats import account_record, to_json

WAIT_REREAD = 0.5  # seconds between reads of the database while `track --wait` waits
STATUS_PAGE = 1000  # operations read and printed at a time by `status`


def read_ids(args: tuple[str, ...]) -> list[str]:
    """IDs from the arguments; `-` reads whitespace-separated IDs from stdin."""
    ids: list[str] = []
    for arg in args:
        if arg == "-":
            ids.extend(sys.stdin.read().split())
        else:
            ids.append(arg)
    return ids


@click.command()
@click.argument("operation_ids", nargs=-1, required=True, metavar="ID... | -")
@click.option("--wait", is_flag=True, help="Then show progress bars until they all end.")
@click.option(
    "--account",
    default=DEFAULT_ACCOUNT,
    show_default=True,
    metavar="NAME",
    help="The account whose credentials poll them (`optrack accounts`).",
)
def track(operation_ids: tuple[str, ...], wait: bool, account: str) -> None:
    """Start tracking operation IDs (`-` reads them from stdin) under an account; invalid IDs,
    an unknown account or an ID tracked under another account write nothing."""
    validate_account_name(account)
    ids = read_ids(operation_ids)
    if not ids:
        raise usage_error("no operation ID given (stdin was empty)")
    problems = []
    for op_id in ids:
        try:
            validate_operation_id(op_id)
        except InvalidOperationId as exc:
            problems.append(str(exc))
    if problems:
        raise usage_error("nothing was tracked, because:\n  " + "\n  ".join(problems))
    rt = get_runtime(click.get_current_context())
    ensure_schema(rt)
    result = intake.track(rt.sessions, ids, rt.clock.now(), account)
    shown = "" if account == DEFAULT_ACCOUNT else f" (account {account})"
    for op_id in result.added:
        click.echo(f"tracking {op_id}{shown}")
    for op_id in result.already_tracked:
        click.echo(f"already tracked {op_id} (nothing to do)")
    if wait:
        # Re-read often: the wait should end as soon as the last end is recorded.
        follow(rt, list(dict.fromkeys(ids)), WAIT_REREAD)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (fields as in the README).")
@account_option("Only this account's operations and pause (default: every account's).")
def status(as_json: bool, account: str | None) -> None:
    """Show every tracked operation: status, stats, polling schedule, last error."""
    rt = get_runtime(click.get_current_context())
    ensure_schema(rt)
    account = checked_account(rt, account)
    pause = rt.gate.current()
    now = rt.clock.now()
    # Streamed a page at a time: memory stays flat however many operations are tracked.
    with rt.sessions() as session:
        letters = dead_letters.waiting(session)
        total = queries.count_operations(session, account)
        pauses = Accounts(session).pauses(rt.settings.account_sid)
    pauses = [(name, row) for name, row in pauses if account in (None, name)]
    pages = queries.operation_pages(rt.sessions, STATUS_PAGE, account)
    if as_json:
        head = {
            "account": account_record(pause, now),  # the default account's, as before
            "accounts": [{"name": name, **account_record(row, now)} for name, row in pauses],
            "dead_letters": letters,
        }
        click.echo(to_json(head)[:-2] + ',\n  "operations": [')
        first = True
        for page in pages:
            for row in page:
                click.echo(("    " if first else "  , ") + json.dumps(operation_record(row)))
                first = False
        click.echo("  ]\n}")
        return
    out = console()
    for name, paused in pauses:  # each account's own pause and credentials, by its name
        line = pause_line(paused, now)
        if line:
            shown = "\n".join(f"account {name}: {part}" for part in line.splitlines())
            out.print(f"[bold red]{shown}[/]")
    if letters:
        out.print(
            f"[bold yellow]{letters} dead letter(s): task messages given up on; "
            "see `optrack dead-letters`[/]"
        )
    for number, page in enumerate(pages):
        out.print(status_table(page, total=total, header=number == 0))
    if total == 0:
        out.print(status_table((), total=0))


COMMANDS = (track, status)
__all__ = ["COMMANDS"]
