"""The `optrack` command line: a thin layer over the domain, tracking and report modules."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

import click

from worker.cli import (
    account_cmds,
    dead_letter_cmds,
    http_cmds,
    notice_cmds,
    ops_cmds,
    report_cmds,
    service_cmds,
    token_cmds,
    tracking_cmds,
    wait_cmds,
)
from worker.db import DB_UNREACHABLE
from worker.errors import AccountError, ConfigError, OptrackError, TokenError
from worker.health import unreachable


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="optrack")
def cli() -> None:
    """Track Twilio Comms SenderPool operations to the end and keep their stats history."""


for command in (
    *tracking_cmds.COMMANDS,
    *report_cmds.COMMANDS,
    *service_cmds.COMMANDS,
    *ops_cmds.COMMANDS,
    *http_cmds.COMMANDS,
    *dead_letter_cmds.COMMANDS,
    *notice_cmds.COMMANDS,
    *wait_cmds.COMMANDS,
    *account_cmds.COMMANDS,
    *token_cmds.COMMANDS,
):
    cli.add_command(command)


def main(args: Sequence[str] | None = None) -> NoReturn:
    """Entry point: run the CLI and exit with ``exit_code``."""
    sys.exit(exit_code(args))


def exit_code(args: Sequence[str] | None = None) -> int:
    """Run the CLI on ``args`` (default: sys.argv); usage and configuration errors are 2, other
    optrack errors and a database that does not answer 1, each said in one line on stderr."""
    try:
        code = cli.main(args=list(args) if args is not None else None, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except ConfigError as exc:
        click.echo(f"optrack: configuration error: {exc}", err=True)
        return 2
    except (AccountError, TokenError) as exc:  # a name wrongly given, a change refused: usage
        click.echo(f"optrack: {exc}", err=True)
        return 2
    except OptrackError as exc:
        click.echo(f"optrack: {exc}", err=True)
        return 1
    except DB_UNREACHABLE as exc:
        # Said as `optrack health` says it, not as a driver's traceback of a hundred lines.
        click.echo(f"optrack: {unreachable(exc)}", err=True)
        return 1
    return code if isinstance(code, int) else 0
