"""What differs between PostgreSQL and SQLite for the stores: lists of values of any length.

psycopg binds at most 65,535 parameters a statement and SQLite 32,766, so ``col IN (...)``
over a long list fails at the edge. ``in_many`` gives one ``col = ANY(:values)`` on PostgreSQL
(a single array parameter, whatever its length) and chunks of ``SQLITE_IN_CHUNK`` on SQLite;
the caller runs its statement once per clause and adds the results up.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import any_, cast
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

SQLITE_IN_CHUNK = 10_000


def is_postgresql(session: Session) -> bool:
    """True if ``session`` talks to PostgreSQL."""
    return session.get_bind().dialect.name == "postgresql"


def in_many(session: Session, column: Any, values: Sequence[Any]) -> Iterator[Any]:
    """``column IN values`` for any number of values, as one or more WHERE clauses."""
    if not values:
        return
    if is_postgresql(session):
        yield column == any_(cast(list(values), postgresql.ARRAY(column.type)))
        return
    for start in range(0, len(values), SQLITE_IN_CHUNK):
        yield column.in_(list(values[start : start + SQLITE_IN_CHUNK]))
