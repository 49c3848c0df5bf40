"""Alembic owns the schema: migrations produce exactly the models' schema, up and down."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from worker.db import Base, make_engine
from worker.migrate import alembic_config


def test_migrated_schema_matches_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert diff == []


def test_downgrade_and_upgrade_again(db_url: str) -> None:
    config = alembic_config(db_url)
    command.downgrade(config, "base")
    engine = make_engine(db_url)
    assert not inspect(engine).has_table("tracked_operations")
    command.upgrade(config, "head")
    assert inspect(engine).has_table("operation_history")
    engine.dispose()
