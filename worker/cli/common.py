"""What the CLI commands share: the runtime in the click context and the schema check."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click
from sqlalchemy import inspect

from worker.errors import OptrackError
from worker.migrate import upgrade
from worker.runtime import Runtime
from worker.settings import ensure_sqlite_dirs, load_settings

F = TypeVar("F", bound=Callable[..., Any])


def get_runtime(ctx: click.Context) -> Runtime:
    """The runtime for this invocation, built once from the environment and closed at exit."""
    root = ctx.find_root()
    if not isinstance(root.obj, Runtime):
        root.obj = Runtime(load_settings())
        root.call_on_close(root.obj.close)
    return root.obj


def pass_runtime(func: F) -> F:
    """Decorator: pass the Runtime as the first argument of a command."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(get_runtime(click.get_current_context()), *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def ensure_schema(rt: Runtime) -> None:
    """Migrate an embedded SQLite database; on a server, ask for `optrack db upgrade`."""
    if rt.settings.database_url.startswith("sqlite"):
        ensure_sqlite_dirs(rt.settings)  # a fresh OPTRACK_HOME does not exist yet
        upgrade(rt.settings.database_url)
        return
    if not inspect(rt.engine).has_table("tracked_operations"):
        raise OptrackError("the database has no optrack tables yet; run `optrack db upgrade` first")


def usage_error(message: str) -> click.UsageError:
    """A usage error (exit 2) with our message."""
    return click.UsageError(message)
