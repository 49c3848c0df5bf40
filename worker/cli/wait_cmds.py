"""`optrack wait`: block until operations end, with a timeout and an exit code that says how."""

from __future__ import annotations

import json
from datetime import timedelta

import click

from worker import intake, waiting
from worker.cli.common import (
    account_option,
    checked_account,
    ensure_schema,
    get_runtime,
    refuse_others,
    usage_error,
)
from worker.cli.ops_cmds import DURATION
from worker.cli.tracking_cmds import read_ids
from worker.credentials import DEFAULT_ACCOUNT
from worker.db import DB_UNREACHABLE
from worker.errors import InvalidOperationId, NotTracked
from worker.health import unreachable
from worker.operation import validate_operation_id
from worker.records import operation_record
from worker.reports import OperationState

MAX_FAILED = 2**31 - 1  # a sender count is an INTEGER column


def _line(op: OperationState) -> str:
    counts = f"{op.created or 0}+{op.failed or 0}/{'?' if op.total is None else op.total}"
    return f"{op.status} {op.id} {counts}"


def _summary(result: waiting.WaitResult, timeout: timedelta | None) -> str:
    if result.outcome is waiting.Outcome.TIMEOUT:
        ended = "".join(f"; {op_id} ended {why}" for op_id, why in result.unmet.items())
        return f"timed out after {timeout}: still active: {', '.join(result.pending)}{ended}"
    if result.outcome is waiting.Outcome.UNMET:
        return "; ".join(f"{op_id} ended {why}" for op_id, why in result.unmet.items())
    return f"{len(result.operations)} operation(s) ended as asked"


@click.command()
@click.argument("operation_ids", nargs=-1, required=True, metavar="ID... | -")
@click.option(
    "--for",
    "wait_for",
    type=click.Choice([w.value for w in waiting.WaitFor]),
    default=waiting.WaitFor.ENDED.value,
    show_default=True,
    help="ended: any end counts; completed: only COMPLETED does.",
)
@click.option(
    "--timeout", type=DURATION, default=None, help="Give up after this long (exit 124): 90s, 15m."
)
@click.option(
    "--max-failed",
    type=click.IntRange(0, MAX_FAILED),
    default=None,
    help="An end with more failed senders than this does not count (exit 1).",
)
@click.option("--track", "track_first", is_flag=True, help="Track the IDs not tracked yet first.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome and records as JSON.")
@account_option(
    "The IDs' account: --track tracks under it (else `default`); an ID of another is refused."
)
def wait(
    operation_ids: tuple[str, ...],
    wait_for: str,
    timeout: timedelta | None,
    max_failed: int | None,
    track_first: bool,
    as_json: bool,
    account: str | None,
) -> None:
    """Block until every operation has ended (`-` reads IDs from stdin).

    Exit 0: each ended as asked; 1: one ended otherwise (CANCELED, NOT_FOUND, too many
    failed); 2: usage (an invalid or untracked ID); 124: the timeout came first; 3: the
    database does not answer.
    """
    ctx = click.get_current_context()
    ids = list(dict.fromkeys(read_ids(operation_ids)))
    if not ids:
        raise usage_error("no operation ID given (stdin was empty)")
    problems = []
    for op_id in ids:
        try:
            validate_operation_id(op_id)
        except InvalidOperationId as exc:
            problems.append(str(exc))
    if problems:
        raise usage_error("nothing to wait for, because:\n  " + "\n  ".join(problems))
    condition = waiting.Condition(waiting.WaitFor(wait_for), max_failed)
    rt = get_runtime(ctx)

    def ended(op: OperationState) -> None:
        if not as_json:
            click.echo(_line(op))

    try:
        ensure_schema(rt)
        account = checked_account(rt, account)
        if account is not None:
            refuse_others(rt, ids, account)
        if track_first:
            added = intake.track(rt.sessions, ids, rt.clock.now(), account or DEFAULT_ACCOUNT).added
            for op_id in added:
                click.echo(f"optrack wait: tracking {op_id}", err=True)
        result = waiting.wait(rt.sessions, ids, condition, timeout, rt.clock, on_end=ended)
    except NotTracked as exc:
        raise usage_error(f"{exc} (or wait with --track)") from None
    except DB_UNREACHABLE as exc:
        click.echo(f"optrack wait: {unreachable(exc)}", err=True)
        ctx.exit(waiting.EXIT_UNREACHABLE)
    if as_json:
        payload = {
            "outcome": result.outcome.value,
            "exit_code": result.exit_code,
            "waited_seconds": round(result.waited.total_seconds(), 3),
            "operations": [
                {**operation_record(op), "unmet": result.unmet.get(op.id)}
                for op in result.operations
            ],
        }
        click.echo(json.dumps(payload, indent=2))
    else:
        for op in result.operations:
            if not op.ended:
                click.echo(_line(op))
        click.echo(f"optrack wait: {_summary(result, timeout)}", err=True)
    ctx.exit(result.exit_code)


COMMANDS = (wait,)
__all__ = ["COMMANDS"]
