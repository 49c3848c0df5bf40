"""Alembic environment: the URL comes from the caller or OPTRACK_DATABASE_URL, not the ini."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from worker.db import Base, ensure_sqlite_dirs, make_engine
from worker.dialect import sqlite_foreign_keys_off
from worker.settings import load_settings

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("database_url")
    if url:
        return str(url)
    settings = load_settings()
    ensure_sqlite_dirs(settings)
    return settings.database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


def _run(connection: Connection) -> None:
    # On SQLite a batch migration rebuilds a table (copy, drop, rename): with foreign keys on,
    # the drop would cascade into every child table. They are off for the migration, checked
    # before it commits, and the whole upgrade is one transaction (SQLite's DDL is).
    with sqlite_foreign_keys_off(connection) as check_foreign_keys:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,  # SQLite needs batch mode for ALTER TABLE
            compare_type=True,
            transactional_ddl=True,
        )
        with context.begin_transaction():
            context.run_migrations()
            check_foreign_keys()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
