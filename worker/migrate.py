"""Run the Alembic migrations from code (`optrack db upgrade`, tests, the demo)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine, inspect

from worker.errors import OptrackError

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(database_url: str) -> Config:
    """An Alembic Config for the project's migrations, pointed at ``database_url``."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database at ``database_url`` to ``revision``; OptrackError if there is none."""
    config = alembic_config(database_url)
    try:
        # Alembic asserts on some unknown names ("", "head+1"): both mean "no such revision".
        ScriptDirectory.from_config(config).get_revisions(revision)
    except (CommandError, AssertionError):
        raise OptrackError(
            f"no migration {revision!r}: give head, base or a revision id (alembic history)"
        ) from None
    try:
        command.upgrade(config, revision)
    except CommandError as exc:  # a relative step back ("-1") is no upgrade
        raise OptrackError(f"cannot upgrade to {revision!r}: {exc}") from None


def is_migrated(engine: Engine) -> bool:
    """True if the database behind ``engine`` has optrack's tables."""
    return inspect(engine).has_table("tracked_operations")
