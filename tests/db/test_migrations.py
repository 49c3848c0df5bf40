"""Alembic owns the schema: migrations produce exactly the models' schema, and keep every row.

Every revision is filled with realistic rows in every table it has
(``tests/support/migration_data.py``), then migrated to head, one step down and up again, on
SQLite and PostgreSQL: every row and every value survives, and each column a migration adds
holds its declared value.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from tests.support.migration_data import (
    ADDED_COLUMN_VALUES,
    DERIVED_COLUMNS,
    Snapshot,
    fill,
    snapshot,
)
from tests.support.services import PG_ADMIN_URL, port_open, service_missing
from worker.db import SCHEMA_REVISION, Base, make_engine
from worker.dialect import sqlite_foreign_keys_off
from worker.errors import MigrationError
from worker.migrate import alembic_config, upgrade


def _revisions() -> list[str]:
    """Every revision, oldest first."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


REVISIONS = _revisions()
HEAD = REVISIONS[-1]


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database (no tables), on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'optrack.sqlite'}"
        return
    if not port_open("127.0.0.1", 5432):
        service_missing("PostgreSQL on 127.0.0.1:5432")
    name = f"optrack_m_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _current(url: str) -> str | None:
    engine = make_engine(url)
    with engine.connect() as conn:
        revision = MigrationContext.configure(conn).get_current_revision()
    engine.dispose()
    return revision


def _assert_kept(before: Snapshot, after: Snapshot, step: str) -> None:
    """Every row of every table both sides have is still there with the same values; a
    column that only ``after`` has holds its declared value."""
    for table in before.keys() & after.keys():
        old, new = before[table], after[table]
        assert new.keys() == old.keys(), f"{step}: rows of {table} lost or added"
        for key, row in old.items():
            for column, value in new[key].items():
                if column in row:
                    assert value == row[column], f"{step}: {table}{key}.{column} changed"
                elif (table, column) in ADDED_COLUMN_VALUES:
                    expected = ADDED_COLUMN_VALUES[table, column]
                    assert value == expected, f"{step}: {table}{key}.{column} = {value!r}"
                else:
                    assert (table, column) in DERIVED_COLUMNS, (
                        f"{step}: {table}.{column} was added without a declared value"
                    )


def _assert_derived(before: Snapshot, after: Snapshot) -> None:
    """0004 keeps a backoff in progress as not_before; 0004's downgrade makes all due."""
    for key, row in after.get("tracked_operations", {}).items():
        old = before["tracked_operations"][key]
        if "not_before" in row and "not_before" not in old:
            backoff = old["next_poll_at"] if old["consecutive_errors"] > 0 else None
            assert row["not_before"] == backoff, f"{key}: not_before"
        if "next_poll_at" in row and "next_poll_at" not in old:
            due = old["not_before"] or old["tracked_at"]
            assert row["next_poll_at"] == due, f"{key}: next_poll_at"


def test_migrated_schema_matches_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert diff == []


@pytest.mark.parametrize("revision", REVISIONS)
def test_a_database_of_every_revision_upgrades_with_every_row(
    empty_url: str, revision: str
) -> None:
    upgrade(empty_url, revision)
    filled = fill(empty_url)
    before = snapshot(empty_url)
    assert all(before[table] for table in filled), "every table holds rows"

    upgrade(empty_url)
    at_head = snapshot(empty_url)
    assert _current(empty_url) == HEAD
    _assert_kept(before, at_head, f"{revision} → head")
    _assert_derived(before, at_head)

    # One step down and up again, with the data.
    command.downgrade(alembic_config(empty_url), "-1")
    below = snapshot(empty_url)
    _assert_kept(at_head, below, "head → -1")
    _assert_derived(at_head, below)
    upgrade(empty_url)
    _assert_kept(below, snapshot(empty_url), "-1 → head")


@pytest.mark.parametrize("revision", REVISIONS[1:])
def test_each_migration_goes_down_and_up_again_with_every_row(
    empty_url: str, revision: str
) -> None:
    upgrade(empty_url, revision)
    fill(empty_url)
    before = snapshot(empty_url)

    command.downgrade(alembic_config(empty_url), "-1")
    below = snapshot(empty_url)
    _assert_kept(before, below, f"{revision} → -1")
    _assert_derived(before, below)

    upgrade(empty_url, revision)
    again = snapshot(empty_url)
    _assert_kept(below, again, f"-1 → {revision}")
    _assert_derived(below, again)


def test_a_sqlite_migration_that_leaves_a_dangling_row_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optrack.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn, sqlite_foreign_keys_off(conn) as check:
        conn.exec_driver_sql(
            "INSERT INTO operation_history (operation_id, seq, observed_at, remote_updated_at,"
            " status, total, queued, created, failed)"
            " VALUES ('nobody', 1, '2026-01-01', '2026-01-01', 'PROCESSING', 1, 1, 0, 0)"
        )
        with pytest.raises(MigrationError, match=r"1 row.*operation_history"):
            check()
        conn.rollback()
    with engine.connect() as conn:  # the pool's connection has its foreign keys back on
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_the_models_know_the_head_revision() -> None:
    assert SCHEMA_REVISION == HEAD
