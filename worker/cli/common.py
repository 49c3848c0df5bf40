"""What the CLI commands share: the runtime in the click context and the schema check."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from worker.accounts import Accounts
from worker.credentials import validate_account_name
from worker.db import ensure_sqlite_dirs
from worker.errors import OptrackError
from worker.migrate import is_migrated, upgrade
from worker.repository import Repository
from worker.runtime import Runtime
from worker.settings import load_settings


def get_runtime(ctx: click.Context) -> Runtime:
    """The runtime for this invocation, built once from the environment and closed at exit."""
    root = ctx.find_root()
    if not isinstance(root.obj, Runtime):
        root.obj = Runtime(load_settings())
        root.call_on_close(root.obj.close)
    return root.obj


def ensure_schema(rt: Runtime) -> None:
    """Migrate an embedded SQLite database (backed up first, said on stderr); on a server, ask
    for `optrack db upgrade`."""
    if rt.settings.database_url.startswith("sqlite"):
        ensure_sqlite_dirs(rt.settings)  # a fresh OPTRACK_HOME does not exist yet
        migration = upgrade(rt.settings.database_url)
        if migration.backup is not None:
            click.echo(f"optrack: {migration.summary()}", err=True)
        return
    if not is_migrated(rt.engine):
        raise OptrackError("the database has no optrack tables yet; run `optrack db upgrade` first")


FC = TypeVar("FC", bound=Callable[..., Any] | click.Command)


def account_option(help_text: str) -> Callable[[FC], FC]:
    """``--account NAME``: only that account's operations (default: every account's)."""
    return click.option("--account", metavar="NAME", default=None, help=help_text)


def checked_account(rt: Runtime, name: str | None) -> str | None:
    """``name`` if it names an account, else exit 2 saying so (None: every account)."""
    if name is None:
        return None
    validate_account_name(name)
    with rt.sessions() as session:
        return Accounts(session).get(name).name


def refuse_others(rt: Runtime, operation_ids: Sequence[str], account: str) -> None:
    """Exit 2 naming each of ``operation_ids`` tracked under another account than
    ``account`` (an untracked one is left to the command)."""
    with rt.sessions() as session:
        owners = Repository(session).accounts_of(list(operation_ids))
    others = [
        f"{op_id} is tracked under account {owner!r}"
        for op_id, owner in owners.items()
        if owner != account
    ]
    if others:
        raise usage_error(f"not of account {account!r}: " + "; ".join(others))


def usage_error(message: str) -> click.UsageError:
    """A usage error (exit 2) with our message."""
    return click.UsageError(message)


# What --loglevel takes (Celery's and uvicorn's names alike); anything else is a usage error.
LOG_LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False)


class FiniteRange(click.FloatRange):
    """A FloatRange that also refuses nan (which compares false to both ends) and infinities."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number
