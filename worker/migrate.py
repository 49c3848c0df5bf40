"""Run the Alembic migrations from code (`optrack db upgrade`, tests, the demo)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, inspect

from worker.errors import OptrackError

ROOT = Path(__file__).resolve().parent.parent


class MigrationError(OptrackError):
    """Raised when a migration would leave the database inconsistent; nothing was committed."""


def alembic_config(database_url: str) -> Config:
    """An Alembic Config for the project's migrations, pointed at ``database_url``."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database at ``database_url`` to ``revision``."""
    command.upgrade(alembic_config(database_url), revision)


def is_migrated(engine: Engine) -> bool:
    """True if the database behind ``engine`` has optrack's tables."""
    return inspect(engine).has_table("tracked_operations")


@contextmanager
def sqlite_foreign_keys_off(connection: Connection) -> Iterator[Callable[[], None]]:
    """Foreign keys off on a SQLite connection for a migration; yields the check to run
    before it commits. Elsewhere a no-op: PostgreSQL's ALTER TABLE never rebuilds a table."""
    if connection.dialect.name != "sqlite":
        yield lambda: None
        return
    if connection.in_transaction():
        # The pragma is a no-op inside a transaction: the cascade would go unnoticed.
        raise MigrationError("a SQLite migration must start outside a transaction")
    raw = connection.connection.driver_connection
    assert raw is not None
    raw.execute("PRAGMA foreign_keys=OFF")

    def check() -> None:
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:
            tables = sorted({str(row[0]) for row in broken})
            raise MigrationError(
                f"the migration would leave {len(broken)} row(s) pointing at nothing "
                f"(in {', '.join(tables)}); nothing was changed"
            )

    try:
        yield check
    finally:
        raw.execute("PRAGMA foreign_keys=ON")
