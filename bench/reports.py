"""Benchmark of the reports on SQLite and PostgreSQL (a script, not a test).

Fills a fresh database with OPERATIONS operations and HISTORY history rows (bulk: executemany
on SQLite, COPY on PostgreSQL), then times the report queries of worker.reports. The
PostgreSQL database (optrack_bench_reports) is created for the run and dropped at the end.

    .venv/bin/python -m bench.reports                      # 10,000 operations, 1,000,000 rows
    .venv/bin/python -m bench.reports --operations 1000 --history 100000 --skip-postgres

The figures and the command are recorded in docs/reports.md.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from bench.databases import scratch_database
from worker import reports
from worker.db import make_engine, make_sessionmaker
from worker.migrate import upgrade

NOW = datetime(2026, 6, 1, tzinfo=UTC)
SPREAD = timedelta(days=30)  # operations were tracked over the 30 days before NOW
LONG_HISTORY = 10_000  # one operation with a long history, to time `history` on it too
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_DATABASE = "optrack_bench_reports"

OP_COLUMNS = (
    "id, status, total, queued, created, failed, remote_created_at, remote_updated_at, "
    "tracked_at, last_polled_at, polls, consecutive_errors, "
    "last_error, ended_at, version"
)
HISTORY_COLUMNS = (
    "operation_id, seq, observed_at, remote_updated_at, status, total, queued, created, failed"
)


@dataclass(frozen=True)
class Dataset:
    """Generated rows, in column order, with the IDs the timings use."""

    operations: list[tuple[Any, ...]]
    history: list[tuple[Any, ...]]
    long_id: str
    typical_id: str
    active_ids: list[str]


def _op_id(i: int) -> str:
    return f"comms_operation_0bench{i:020d}"


def _status(rng: random.Random) -> str:
    roll = rng.random()
    for status, share in (
        ("COMPLETED", 0.70),
        ("CANCELED", 0.08),
        ("PROCESSING", 0.15),
        ("NOT_FOUND", 0.03),
    ):
        if roll < share:
            return status
        roll -= share
    return "PENDING"


def generate(n_ops: int, n_history: int, seed: int = 7) -> Dataset:
    """Operations spread over 30 days; their history rows sum to exactly ``n_history``."""
    rng = random.Random(seed)
    statuses = [_status(rng) for _ in range(n_ops)]
    statuses[0] = "COMPLETED"
    with_history = [i for i, s in enumerate(statuses) if s not in ("PENDING", "NOT_FOUND")]
    long_rows = min(LONG_HISTORY, n_history // 2)
    share, extra = divmod(n_history - long_rows, max(len(with_history) - 1, 1))
    rows_of = {i: share + (1 if k <= extra else 0) for k, i in enumerate(with_history) if k}
    rows_of[0] = long_rows
    operations: list[tuple[Any, ...]] = []
    history: list[tuple[Any, ...]] = []
    active: list[str] = []
    for i, status in enumerate(statuses):
        op_id = _op_id(i)
        tracked = NOW - SPREAD + SPREAD * (i / n_ops)
        if status == "PROCESSING" and rng.random() < 0.6:
            tracked = NOW - timedelta(minutes=rng.uniform(5, 120))  # recent: still running
        created_at = tracked - timedelta(seconds=rng.uniform(0, 10))
        n_rows = rows_of.get(i, 0)
        total = rng.randint(10, 1000)
        fail_ratio = rng.uniform(0, 0.1)
        reach = {"CANCELED": rng.uniform(0.2, 0.9), "PROCESSING": rng.uniform(0.1, 0.9)}
        last_fraction = reach.get(status, 1.0)
        moment = created_at
        step = max((NOW - created_at).total_seconds() / max(n_rows, 1) / 2, 1.0)
        last: tuple[Any, ...] | None = None
        for k in range(n_rows):
            moment += timedelta(seconds=rng.uniform(0.2, 1.0) * step)
            done = round(total * last_fraction * (k + 1) / n_rows)
            failed = round(done * fail_ratio)
            final = k == n_rows - 1 and status in ("COMPLETED", "CANCELED")
            last = (
                op_id,
                k + 2,
                moment,
                moment,
                status if final else "PROCESSING",
                total,
                0 if status == "COMPLETED" and final else total - done,
                done - failed,
                failed,
            )
            history.append(last)
        errors = 2 if rng.random() < 0.01 else 0
        ended = last[3] if last and status in ("COMPLETED", "CANCELED") else None
        if status == "NOT_FOUND":
            ended = tracked + timedelta(seconds=5)
        if status in ("PENDING", "PROCESSING"):
            active.append(op_id)
        operations.append(
            (
                op_id,
                status,
                last[5] if last else None,
                last[6] if last else None,
                last[7] if last else None,
                last[8] if last else None,
                created_at if last else None,
                last[3] if last else None,
                tracked,
                last[2] if last else None,
                n_rows,
                errors,
                "ServerError: HTTP 500" if errors else None,
                ended,
                n_rows + 1,
            )
        )
    typical = next(_op_id(i) for i in with_history[1:] if statuses[i] == "PROCESSING")
    return Dataset(operations, history, _op_id(0), typical, active[:20])


def _sqlite_time(value: Any) -> Any:
    # The storage format of SQLAlchemy's SQLite DateTime (naive UTC), which UTCDateTime uses.
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


def load_sqlite(engine: Engine, data: Dataset) -> None:
    """executemany through the driver, in one transaction."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("BEGIN")
        marks = ", ".join("?" * len(OP_COLUMNS.split(",")))
        cursor.executemany(
            f"INSERT INTO tracked_operations ({OP_COLUMNS}) VALUES ({marks})",
            ([_sqlite_time(v) for v in row] for row in data.operations),
        )
        cursor.executemany(
            f"INSERT INTO operation_history ({HISTORY_COLUMNS}) VALUES ({', '.join('?' * 9)})",
            ([_sqlite_time(v) for v in row] for row in data.history),
        )
        cursor.execute("COMMIT")
        cursor.execute("ANALYZE")
    finally:
        raw.close()


def load_postgres(engine: Engine, data: Dataset) -> None:
    """COPY FROM STDIN, then ANALYZE so the planner knows the tables."""
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cursor:  # type: ignore[attr-defined]
            with cursor.copy(f"COPY tracked_operations ({OP_COLUMNS}) FROM STDIN") as copy:
                for row in data.operations:
                    copy.write_row(row)
            with cursor.copy(f"COPY operation_history ({HISTORY_COLUMNS}) FROM STDIN") as copy:
                for row in data.history:
                    copy.write_row(row)
        raw.commit()
        raw.autocommit = True  # type: ignore[attr-defined]
        with raw.cursor() as cursor:  # type: ignore[attr-defined]
            cursor.execute("ANALYZE")
    finally:
        raw.close()


def timings(sessions: sessionmaker[Session], data: Dataset) -> dict[str, Callable[[], Any]]:
    """The measured calls: what `report`, `history` and a `watch` refresh run."""

    def run(fn: Callable[[Session], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with sessions() as session:
                return fn(session)

        return call

    stuck = reports.DEFAULT_STUCK_AFTER
    week = reports.Period(since=NOW - timedelta(days=7))
    return {
        "report, every list in full (--json)": run(
            lambda s: reports.summarize(s, reports.Period(), stuck, NOW)
        ),
        "report --since 7d": run(lambda s: reports.summarize(s, week, stuck, NOW)),
        "report --status PROCESSING": run(
            lambda s: reports.summarize(s, reports.Period(), stuck, NOW, ("PROCESSING",))
        ),
        "history (typical op)": run(lambda s: reports.operation_history(s, data.typical_id, NOW)),
        f"history ({LONG_HISTORY:,} rows)": run(
            lambda s: reports.operation_history(s, data.long_id, NOW)
        ),
        "watch refresh (20 ops)": run(lambda s: reports.progress(s, data.active_ids)),
    }


def measure(fn: Callable[[], Any], repeat: int) -> tuple[float, float, float]:
    """(first run, median, max) in milliseconds; the first run pays the cold caches."""
    runs = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1000)
    return runs[0], statistics.median(runs[1:]), max(runs[1:])


@dataclass
class Result:
    """One backend's load time and query timings."""

    backend: str
    load_seconds: float
    rows: dict[str, tuple[float, float, float]]


def bench_backend(name: str, url: str, data: Dataset, repeat: int) -> Result:
    """Migrate, load, time; the caller owns creating and dropping the database."""
    upgrade(url)
    engine = make_engine(url)
    try:
        start = time.perf_counter()
        (load_postgres if name == "postgresql" else load_sqlite)(engine, data)
        loaded = time.perf_counter() - start
        sessions = make_sessionmaker(engine)
        rows = {label: measure(fn, repeat) for label, fn in timings(sessions, data).items()}
        return Result(name, loaded, rows)
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--operations", type=int, default=10_000)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs after the first")
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-sqlite", action="store_true")
    args = parser.parse_args(argv)
    out = Console()
    start = time.perf_counter()
    data = generate(args.operations, args.history)
    out.print(
        f"generated {len(data.operations):,} operations and {len(data.history):,} history rows "
        f"in {time.perf_counter() - start:.1f} s"
    )
    results: list[Result] = []
    if not args.skip_sqlite:
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{Path(folder) / 'bench.sqlite'}"
            results.append(bench_backend("sqlite", url, data, args.repeat))
    if not args.skip_postgres:
        with scratch_database(args.pg_admin_url, PG_DATABASE) as url:
            results.append(bench_backend("postgresql", url, data, args.repeat))
    table = Table(
        title=f"reports on {len(data.operations):,} operations / {len(data.history):,} history "
        f"rows (ms; median and max of {args.repeat} runs after a first, cold one)",
        title_justify="left",
    )
    table.add_column("backend")
    table.add_column("query")
    for column in ("first", "median", "max"):
        table.add_column(column, justify="right")
    slowest = 0.0
    for result in results:
        for label, (first, median, longest) in result.rows.items():
            table.add_row(result.backend, label, f"{first:.1f}", f"{median:.1f}", f"{longest:.1f}")
            slowest = max(slowest, first, longest)
        table.add_section()
    out.print(table)
    for result in results:
        out.print(f"{result.backend}: bulk load took {result.load_seconds:.1f} s")
    python = os.path.relpath(sys.executable)
    python = sys.executable if python.startswith("..") else python
    out.print("command: " + " ".join([python, "-m", "bench.reports", *sys.argv[1:]]))
    verdict = "under" if slowest < 1000 else "OVER"
    out.print(f"slowest run: {slowest:.0f} ms ({verdict} the 1 s target)")
    return 0 if slowest < 1000 else 1


if __name__ == "__main__":
    sys.exit(main())
