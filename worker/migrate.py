"""Run the Alembic migrations from code (`optrack db …`, the embedded default, tests, the demo).

Before a SQLite file changes revision it is copied with SQLite's online backup API to a file
named after the revision it was at (``optrack.sqlite.at-0003_reports.bak``), so a failed or
regretted upgrade is undone by copying it back.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy import Engine, inspect
from sqlalchemy.engine import make_url

from worker.db import make_engine
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
# What Alembic takes for a revision: an id or its prefix, head, base, or a step (-1, head-1).
REVISION = re.compile(r"[A-Za-z0-9_]+(?:[+-][0-9]+)?|[+-][0-9]+")


@dataclass(frozen=True)
class Migration:
    """What one upgrade or downgrade did: the revisions before and after, and the backup."""

    before: str | None
    after: str | None
    backup: Path | None = None

    def summary(self) -> str:
        """One line for the user: what changed, and where the backup is."""
        if self.before == self.after:
            return f"database already at revision {self.after}"
        line = f"database migrated from revision {self.before or '(empty)'} to {self.after}"
        if self.backup is not None:
            line += f"; backup of revision {self.before}: {self.backup}"
        return line


def alembic_config(database_url: str) -> Config:
    """An Alembic Config for the project's migrations, pointed at ``database_url``."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


def head_revision() -> str:
    """The newest revision this release knows."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def history(database_url: str) -> list[str]:
    """One line per revision, newest first: ``0004 <- 0003_reports: poll groups … (current)``."""
    current = current_revision(database_url)
    lines = []
    for script in ScriptDirectory.from_config(alembic_config(database_url)).walk_revisions():
        marks = [
            m for m, on in (("head", script.is_head), ("current", script.revision == current)) if on
        ]
        line = f"{script.down_revision or '(base)'} -> {script.revision}: {script.doc}"
        lines.append(line + (f" ({', '.join(marks)})" if marks else ""))
    return lines


def current_revision(database_url: str) -> str | None:
    """The revision the database is at (None: no optrack schema yet)."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def upgrade(database_url: str, revision: str = "head") -> Migration:
    """Bring the database at ``database_url`` to ``revision``, backing a SQLite file up first."""
    return _migrate(database_url, revision, command.upgrade)


def downgrade(database_url: str, revision: str) -> Migration:
    """Take the database back to ``revision`` (an id, or ``-1``), backing a SQLite file up."""
    return _migrate(database_url, revision, command.downgrade)


def _migrate(database_url: str, revision: str, run: Callable[[Config, str], None]) -> Migration:
    config = alembic_config(database_url)
    target = _resolve(config, revision)
    before = current_revision(database_url)
    if before is not None and target == before:
        return Migration(before, before)
    backup = backup_sqlite(database_url, before) if before is not None else None
    try:
        run(config, revision)
    except (
        CommandError,
        RevisionError,
    ) as exc:  # an unknown revision, a downgrade past base: the user's input
        raise ConfigError(f"cannot migrate to {revision!r}: {exc}") from exc
    return Migration(before, current_revision(database_url), backup)


def _resolve(config: Config, revision: str) -> str | None:
    """The revision id ``revision`` names (``head``, an id or its prefix; None for a relative
    step such as ``-1``). An unknown name is the user's mistake, found before any backup."""
    if not REVISION.fullmatch(revision):
        raise ConfigError(f"{revision!r} is not a revision (see `optrack db history`)")
    if revision.startswith(("-", "+")) or revision == "base":
        return None
    try:
        script = ScriptDirectory.from_config(config).get_revision(revision)
    except (CommandError, RevisionError) as exc:
        raise ConfigError(f"no revision {revision!r} (see `optrack db history`): {exc}") from exc
    return script.revision if script is not None else None


def sqlite_path(database_url: str) -> Path | None:
    """The file of a SQLite database URL (None: another backend, or in memory)."""
    url = make_url(database_url)
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        return None
    return Path(str(url.database))


def backup_sqlite(database_url: str, revision: str) -> Path | None:
    """Copy a SQLite database, consistently even while others write, next to it, to a file
    named after ``revision``; never overwrites an earlier backup. None: not a SQLite file."""
    path = sqlite_path(database_url)
    if path is None or not path.exists():
        return None
    target = path.with_name(f"{path.name}.at-{revision}.bak")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.at-{revision}.{n}.bak")
    source = sqlite3.connect(path)
    copy = sqlite3.connect(target)
    try:
        with copy:
            source.backup(copy)
    finally:
        copy.close()
        source.close()
    return target


def is_migrated(engine: Engine) -> bool:
    """True if the database behind ``engine`` has optrack's tables."""
    return inspect(engine).has_table("tracked_operations")
