"""Scratch PostgreSQL databases for the benchmarks: created for a run, dropped after it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text


def _execute(admin_url: str, *statements: str) -> None:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        admin.dispose()


def url_of(admin_url: str, name: str) -> str:
    """The URL of database ``name`` on the server of ``admin_url``."""
    return admin_url.rsplit("/", 1)[0] + "/" + name


def recreate(admin_url: str, name: str) -> str:
    """Drop database ``name`` if a run left it, create it empty, return its URL."""
    _execute(
        admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"'
    )
    return url_of(admin_url, name)


def drop(admin_url: str, name: str) -> None:
    """Drop database ``name`` (its connections cut)."""
    _execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def scratch_database(admin_url: str, name: str) -> Iterator[str]:
    """A fresh, empty database ``name``: its URL, dropped at exit whatever happens."""
    url = recreate(admin_url, name)
    try:
        yield url
    finally:
        drop(admin_url, name)
