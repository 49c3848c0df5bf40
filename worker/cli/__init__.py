"""The `optrack` command line: a thin layer over the domain, tracking and report modules."""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from worker.cli import (
    dead_letter_cmds,
    http_cmds,
    ops_cmds,
    report_cmds,
    service_cmds,
    tracking_cmds,
)
from worker.errors import ConfigError, OptrackError


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
):
    cli.add_command(command)


def main() -> NoReturn:
    """Entry point: run the CLI; configuration errors exit 2, other optrack errors exit 1."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        click.echo(f"optrack: configuration error: {exc}", err=True)
        sys.exit(2)
    except OptrackError as exc:
        click.echo(f"optrack: {exc}", err=True)
        sys.exit(1)
    sys.exit(0)
