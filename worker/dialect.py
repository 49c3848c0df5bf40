"""What differs between SQLite and PostgreSQL, in one place: no dialect check lives elsewhere.

The INSERT that knows ON CONFLICT, lists of any length, FOR UPDATE SKIP LOCKED, one snapshot
for a report, seconds between two datetimes, and percentiles.

Lists: psycopg binds at most 65,535 parameters a statement and SQLite 32,766, so ``col IN
(...)`` over a long list fails at the edge. ``in_many`` gives one ``col = ANY(:values)`` on
PostgreSQL (a single array parameter, whatever its length) and chunks of ``SQLITE_IN_CHUNK``
on SQLite; the caller runs its statement once per clause and adds the results up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    DateTime,
    Float,
    Integer,
    Select,
    Table,
    TypeDecorator,
    any_,
    bindparam,
    cast,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from worker.errors import MigrationError

SQLITE_IN_CHUNK = 10_000


def is_postgresql(session: Session) -> bool:
    """True if ``session`` talks to PostgreSQL (else SQLite)."""
    return session.get_bind().dialect.name == "postgresql"


def insert(session: Session) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT DO NOTHING / DO UPDATE."""
    return (postgresql if is_postgresql(session) else sqlite).insert


def skip_locked(stmt: Select[Any], session: Session) -> Select[Any]:
    """``stmt`` FOR UPDATE SKIP LOCKED on PostgreSQL; SQLite's single write lock serializes
    the claim that uses it already."""
    return stmt.with_for_update(skip_locked=True) if is_postgresql(session) else stmt


def in_many(session: Session, column: Any, values: Sequence[Any]) -> Iterator[Any]:
    """``column IN values`` for any number of values, as one or more WHERE clauses."""
    if not values:
        return
    if is_postgresql(session):
        yield column == any_(cast(list(values), postgresql.ARRAY(column.type)))
        return
    for start in range(0, len(values), SQLITE_IN_CHUNK):
        yield column.in_(list(values[start : start + SQLITE_IN_CHUNK]))


def update_many(session: Session, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Bulk UPDATE of ``table`` by its ``id``; every dict holds ``id`` and the same columns.

    PostgreSQL: one ``UPDATE ... FROM unnest(arrays)``, one array per column, so neither
    per-row statements nor a huge SQL text. SQLite: one executemany.
    """
    if not rows:
        return
    names = [n for n in rows[0] if n != "id"]
    if not is_postgresql(session):
        stmt = (
            update(table)
            .where(table.c.id == bindparam("_id"))
            .values({n: bindparam(n) for n in names})
        )
        session.connection().execute(stmt, [{**r, "_id": r["id"]} for r in rows])
        return
    arrays = ", ".join(f"CAST(:{n} AS {_pg_array_type(table.c[n].type)})" for n in ["id", *names])
    sql = (
        f"UPDATE {table.name} AS t SET "
        + ", ".join(f"{n} = v.{n}" for n in names)
        + f" FROM unnest({arrays}) AS v(id, {', '.join(names)}) WHERE t.id = v.id"
    )
    session.execute(text(sql), {n: [r[n] for r in rows] for n in ["id", *names]})


def _pg_array_type(column_type: Any) -> str:
    """The PostgreSQL array type of a column's values."""
    if isinstance(column_type, TypeDecorator):  # UTCDateTime: judged by what it stores
        column_type = column_type.impl
    if isinstance(column_type, DateTime):
        return "timestamptz[]"
    if isinstance(column_type, BigInteger):
        return "bigint[]"
    if isinstance(column_type, Integer):
        return "integer[]"
    return "text[]"


def try_advisory_lock(session: Session, key: int) -> bool:
    """Take the lock ``key`` for this transaction; False if another one holds it. SQLite's
    write lock, taken when the transaction began, already serializes writers: True."""
    if not is_postgresql(session):
        return True
    return bool(session.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": key}))


def one_snapshot(session: Session) -> None:
    """Read every figure of this transaction from one snapshot (PostgreSQL: REPEATABLE READ;
    SQLite's transaction is one snapshot already)."""
    if is_postgresql(session):
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})


class seconds_between(FunctionElement[float]):
    """SQL: seconds from the first datetime argument to the second, as a float."""

    type = Float()
    name = "seconds_between"
    inherit_cache = True


@compiles(seconds_between, "postgresql")
def _seconds_pg(element: seconds_between, compiler: SQLCompiler, **kw: Any) -> str:
    start, end = (compiler.process(arg, **kw) for arg in element.clauses)
    return f"CAST(EXTRACT(EPOCH FROM ({end} - {start})) AS DOUBLE PRECISION)"


@compiles(seconds_between, "sqlite")
def _seconds_sqlite(element: seconds_between, compiler: SQLCompiler, **kw: Any) -> str:
    start, end = (compiler.process(arg, **kw) for arg in element.clauses)
    return f"((julianday({end}) - julianday({start})) * 86400.0)"


def percentiles(
    session: Session,
    value: ColumnElement[float],
    where: Sequence[ColumnElement[bool]],
    points: Sequence[float],
) -> tuple[int, list[float | None], float | None]:
    """The count, the ``points`` percentiles (linear interpolation between ranks, as
    PostgreSQL's percentile_cont) and the maximum of ``value`` over the rows ``where`` holds."""
    if is_postgresql(session):
        row = session.execute(
            select(
                func.count(),
                *(func.percentile_cont(p).within_group(value) for p in points),
                func.max(value),
            ).where(*where)
        ).one()
        values = [None if v is None else float(v) for v in row[1:-1]]
        return int(row[0]), values, None if row[-1] is None else float(row[-1])
    count, longest = session.execute(select(func.count(), func.max(value)).where(*where)).one()
    count = int(count)
    if count == 0:
        return 0, [None for _ in points], None
    # SQLite has no percentile_cont: rank the values once (one sort), read the two around
    # rank k = (n-1)·p for each p, and interpolate between them as percentile_cont does.
    ranks = [(count - 1) * p for p in points]
    wanted = {n for k in ranks for n in (math.floor(k), min(math.floor(k) + 1, count - 1))}
    ranked = (
        select(value.label("value"), (func.row_number().over(order_by=value) - 1).label("rank"))
        .where(*where)
        .subquery()
    )
    stmt = select(ranked.c.rank, ranked.c.value).where(ranked.c.rank.in_(sorted(wanted)))
    by_rank = {int(rank): float(v) for rank, v in session.execute(stmt)}
    found: list[float | None] = []
    for k in ranks:
        low = math.floor(k)
        high = min(low + 1, count - 1)
        found.append(by_rank[low] + (k - low) * (by_rank[high] - by_rank[low]))
    return count, found, float(longest)


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
