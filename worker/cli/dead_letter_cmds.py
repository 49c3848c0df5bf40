"""`optrack dead-letters [--json]` and `optrack dead-letters replay ID... | --all`."""

from __future__ import annotations

import click
from rich.table import Table

from worker import dead_letters
from worker import replay as replaying
from worker.cli.common import ensure_schema, get_runtime, usage_error
from worker.cli.render import console
from worker.db import MAX_ROW_ID
from worker.errors import NotWaiting
from worker.reports.formats import to_json


@click.group("dead-letters", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--replayed", is_flag=True, help="Also list the letters replayed already.")
@click.pass_context
def dead_letters_cmd(ctx: click.Context, as_json: bool, replayed: bool) -> None:
    """List the task messages optrack gave up on (dead letters); `replay` sends them again."""
    if ctx.invoked_subcommand is not None:
        return
    rt = get_runtime(ctx)
    ensure_schema(rt)
    with rt.sessions() as session:
        letters = dead_letters.letters(session, replayed=replayed)
    if as_json:
        listed: dead_letters.LettersRecord = {
            "dead_letters": [dead_letters.as_json(x) for x in letters]
        }
        click.echo(to_json(listed))
        return
    table = Table(title=f"{len(letters)} dead letter(s)", title_justify="left")
    for column in ("id", "task", "deliveries", "since (UTC)", "reason", "args"):
        table.add_column(column)
    for letter in letters:
        args = to_json(letter.args).replace("\n", "").replace("  ", "")
        table.add_row(
            str(letter.id),
            letter.task,
            str(letter.deliveries),
            letter.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            letter.reason,
            args if len(args) <= 80 else args[:79] + "…",
        )
    console().print(table)


@dead_letters_cmd.command("replay")
@click.argument("letter_ids", nargs=-1, type=click.IntRange(1, MAX_ROW_ID), metavar="ID...")
@click.option("--all", "every", is_flag=True, help="Replay every letter not replayed yet.")
def replay(letter_ids: tuple[int, ...], every: bool) -> None:
    """Send dead letters again as new messages (a new task id, a new delivery count)."""
    if bool(letter_ids) == every:
        raise usage_error("give the IDs of the letters to replay, or --all")
    rt = get_runtime(click.get_current_context())
    ensure_schema(rt)
    from worker.celery_app import publisher  # the broker only when a message is sent

    send = publisher(rt.settings)
    try:
        done = 0
        for replayed in replaying.replay(
            rt.sessions, None if every else letter_ids, send, rt.clock
        ):
            done += 1
            click.echo(
                f"replayed dead letter {replayed.letter_id} ({replayed.task}) as {replayed.task_id}"
            )
    except NotWaiting as exc:
        raise usage_error(f"{exc} (see `optrack dead-letters --replayed`)") from None
    if not done:
        click.echo("no dead letter to replay")


COMMANDS = (dead_letters_cmd,)
