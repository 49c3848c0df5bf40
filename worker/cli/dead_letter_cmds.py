"""`optrack dead-letters [--json]` and `optrack dead-letters replay ID... | --all`."""

from __future__ import annotations

import uuid

import click
from kombu.exceptions import KombuError
from rich.table import Table

from worker import dead_letters
from worker.cli.common import MAX_ROW_ID, ensure_schema, get_runtime, usage_error
from worker.cli.render import console
from worker.errors import OptrackError
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
    from worker.celery_app import app  # the broker only when a message is sent

    with rt.sessions() as session:
        letters = dead_letters.to_replay(session, None if every else letter_ids)
    missing = sorted(set(letter_ids) - {x.id for x in letters})
    if missing:
        raise usage_error(
            f"no dead letter waiting with id {', '.join(map(str, missing))} "
            "(see `optrack dead-letters --replayed`)"
        )
    for letter in letters:
        task_id = str(uuid.uuid4())
        try:
            app.send_task(letter.task, args=letter.args, task_id=task_id)
        except (KombuError, OSError) as exc:
            raise OptrackError(f"dead letter {letter.id} not replayed: broker error {exc}") from exc
        # Marked after the send: a crash in between leaves it listed, and a second replay is
        # harmless (tracking an ID twice changes nothing; a stale poll token does nothing).
        with rt.sessions.begin() as session:
            dead_letters.mark_replayed(session, letter.id, task_id, rt.clock.now())
        click.echo(f"replayed dead letter {letter.id} ({letter.task}) as {task_id}")
    if not letters:
        click.echo("no dead letter to replay")


COMMANDS = (dead_letters_cmd,)
