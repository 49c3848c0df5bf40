"""Benchmark: what a full sweep costs with per-operation GETs and with List pages.

    .venv/bin/python -m bench.sweep                 # N = 1,000 and 10,000, both strategies
    .venv/bin/python -m bench.sweep --n 1000 --skip-lifetime

Runs the sandbox (a subprocess), beat and two worker processes (concurrency 1 each) on
PostgreSQL and Redis, exactly as in production. For each N and strategy it measures:

* a full sweep (all N operations due at once, every one refreshed): API requests, wall time,
  database transactions and rows written (pg_stat_database deltas), peak RSS of a worker;
* a whole life: N operations tracked from their start to their end, the API requests spent;
* adaptive cadence: requests over a fixed window when half the operations stand still, with
  the adaptive interval on and off.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory

import redis
from sqlalchemy import create_engine, text

from tests.processes import (
    Sandbox,
    base_env,
    beat_args,
    celery_process,
    sandbox_process,
    wait_for,
    worker_args,
)
from worker.migrate import upgrade

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BENCH_DB = "optrack_bench_sweep"
BENCH_URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{BENCH_DB}"
REDIS_URL = "redis://127.0.0.1:6379/13"


@dataclass
class Row:
    n: int
    strategy: str
    requests: int = 0
    seconds: float = 0.0
    transactions: int = 0
    rows_written: int = 0
    peak_rss_mb: float = 0.0
    lifetime_requests: int = 0
    lifetime_seconds: float = 0.0


def fresh_database() -> None:
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{BENCH_DB}"'))
    admin.dispose()
    upgrade(BENCH_URL)
    redis.Redis.from_url(REDIS_URL).flushdb()


def db_counters() -> tuple[int, int]:
    """(committed transactions, rows inserted + updated + deleted) of the bench database."""
    time.sleep(1.2)  # PostgreSQL 15 backends flush their statistics at most once a second
    engine = create_engine(ADMIN_URL)
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        row = conn.execute(
            text(
                "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted "
                "FROM pg_stat_database WHERE datname = :name"
            ),
            {"name": BENCH_DB},
        ).one()
    engine.dispose()
    return int(row[0]), int(row[1])


def peak_rss_mb(worker: subprocess.Popen[bytes]) -> float:
    """The largest VmHWM among the worker's pool processes, in MiB."""
    children = subprocess.run(
        ["pgrep", "-P", str(worker.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    peak = 0
    for pid in [str(worker.pid), *children]:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]))
    return peak / 1024


def track_all(ids: list[str]) -> None:
    engine = create_engine(BENCH_URL)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tracked_operations (id, status, tracked_at, next_poll_at, polls, "
                "consecutive_errors, version) VALUES (:id, 'PENDING', :now, :now, 0, 0, 1)"
            ),
            [{"id": op_id, "now": now} for op_id in ids],
        )
    engine.dispose()


def count(sql: str, **params: object) -> int:
    engine = create_engine(BENCH_URL)
    with engine.connect() as conn:
        value = conn.execute(text(sql), params).scalar_one()
    engine.dispose()
    return int(value)


@contextmanager
def stack(
    tmp: Path, strategy: str, poll_interval: float, max_interval: float, tick: float = 1.0
) -> Iterator[tuple[Sandbox, list[subprocess.Popen[bytes]]]]:
    env = base_env(
        tmp,
        OPTRACK_DATABASE_URL=BENCH_URL,
        OPTRACK_BROKER_URL=REDIS_URL,
        OPTRACK_POLL_STRATEGY=strategy,
        OPTRACK_POLL_INTERVAL=str(poll_interval),
        OPTRACK_POLL_MAX_INTERVAL=str(max_interval),
        OPTRACK_TICK_INTERVAL=str(tick),
    )
    with ExitStack() as stack, sandbox_process(env, tmp / "sandbox.log") as api:
        env["OPTRACK_API_BASE_URL"] = api.base_url
        workers = [
            stack.enter_context(
                celery_process(worker_args(f"w{i}", loglevel="WARNING"), env, tmp / f"w{i}.log")
            )
            for i in (1, 2)
        ]
        stack.enter_context(celery_process(beat_args(tmp / "schedule"), env, tmp / "beat.log"))
        yield api, workers


def bulk_create(api: Sandbox, n: int, **fields: object) -> list[str]:
    response = api.http.post(
        f"{api.root}/_sandbox/operations/bulk", json={"count": n, **fields}, timeout=60
    )
    response.raise_for_status()
    return list(response.json()["ids"])


def requests_since(api: Sandbox, t: float) -> int:
    return sum(1 for r in api.requests() if r["t"] >= t)


def full_sweep(n: int, strategy: str, tmp: Path) -> Row:
    """All N due at once (second sweep, so warm): its requests, time and writes."""
    fresh_database()
    row = Row(n, strategy)
    # A short tick, so the measured time is the sweep's own, not the wait for the next tick.
    with stack(tmp, strategy, poll_interval=3600, max_interval=3600, tick=0.2) as (api, workers):
        ids = bulk_create(api, n, total=100, duration=36000)
        track_all(ids)
        polled = "SELECT count(*) FROM tracked_operations WHERE last_polled_at >= :t"
        start = datetime.now(UTC)
        wait_for(lambda: count(polled, t=start) == n, 600, "the first sweep", interval=0.2)
        # The measured sweep: everything due again now.
        tx0, rows0 = db_counters()
        t0 = time.time()
        start = datetime.now(UTC)
        engine = create_engine(BENCH_URL)
        with engine.begin() as conn:
            conn.execute(text("UPDATE tracked_operations SET next_poll_at = :t"), {"t": start})
        engine.dispose()
        wait_for(lambda: count(polled, t=start) == n, 600, "the full sweep", interval=0.05)
        row.seconds = time.time() - t0
        tx1, rows1 = db_counters()
        row.requests = requests_since(api, t0)
        row.transactions, row.rows_written = tx1 - tx0, rows1 - rows0 - n  # minus our UPDATE
        row.peak_rss_mb = max(peak_rss_mb(w) for w in workers)
    return row


def lifetime(row: Row, tmp: Path, duration: float) -> None:
    """N operations from tracking to their end: the requests it took."""
    fresh_database()
    with stack(tmp, row.strategy, poll_interval=5, max_interval=5) as (api, _):
        ids = bulk_create(api, row.n, total=50, duration=duration)
        t0 = time.time()
        track_all(ids)
        ended = "SELECT count(*) FROM tracked_operations WHERE ended_at IS NOT NULL"
        wait_for(lambda: count(ended) == row.n, 1200, "every operation to end", interval=0.5)
        row.lifetime_seconds = time.time() - t0
        row.lifetime_requests = requests_since(api, t0)


def adaptive(n: int, tmp: Path, window: float) -> list[tuple[str, int]]:
    """Requests over ``window`` s with half the operations standing still, cadence on/off."""
    results = []
    for label, max_interval in (("fixed 5 s", 5.0), ("adaptive 5-120 s", 120.0)):
        fresh_database()
        with stack(tmp, "fetch", poll_interval=5, max_interval=max_interval) as (api, _):
            moving = bulk_create(api, n // 2, total=100000, duration=3600)
            # Created long ago and almost done: their stats stand still for the whole window.
            still = bulk_create(
                api, n - n // 2, total=2, duration=10**6, created_at=time.time() - 600
            )
            t0 = time.time()
            track_all(moving + still)
            time.sleep(window)  # a fixed window of real polling, counted by the sandbox
            results.append((label, requests_since(api, t0)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--strategies", nargs="+", default=["fetch", "list"])
    parser.add_argument("--skip-lifetime", action="store_true")
    parser.add_argument("--skip-adaptive", action="store_true")
    parser.add_argument("--life", type=float, default=60.0, help="operation duration, s")
    args = parser.parse_args()
    rows: list[Row] = []
    with TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for n in args.n:
            for strategy in args.strategies:
                print(f"N={n} {strategy}: full sweep…", file=sys.stderr, flush=True)
                row = full_sweep(n, strategy, tmp)
                if not args.skip_lifetime:
                    print(f"N={n} {strategy}: whole life…", file=sys.stderr, flush=True)
                    lifetime(row, tmp, args.life)
                rows.append(row)
        adaptive_rows = [] if args.skip_adaptive else adaptive(1000, tmp, window=60)
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)'))
    admin.dispose()

    print(f"\n$ {' '.join(['python', '-m', 'bench.sweep', *sys.argv[1:]])}")
    cores = os.cpu_count()
    print(f"{cores} cores; sandbox, beat, 2 workers (concurrency 1); PostgreSQL + Redis\n")
    header = (
        "| N | strategy | requests/sweep | sweep wall time | transactions/sweep "
        "| rows written/sweep | worker peak RSS | requests, whole life | whole life |"
    )
    print(header)
    print("|" + "---|" * 9)
    for r in rows:
        life = (
            f"{r.lifetime_requests:,} | {r.lifetime_seconds:.0f} s"
            if r.lifetime_requests
            else "- | -"
        )
        print(
            f"| {r.n:,} | {r.strategy} | {r.requests:,} | {r.seconds:.2f} s | {r.transactions:,} "
            f"| {r.rows_written:,} | {r.peak_rss_mb:.0f} MiB | {life} |"
        )
    for n in args.n:
        by = {r.strategy: r for r in rows if r.n == n}
        if {"fetch", "list"} <= set(by) and by["list"].lifetime_requests:
            ratio = by["fetch"].lifetime_requests / by["list"].lifetime_requests
            print(f"\nN={n:,}: list spends {ratio:.0f}x fewer requests over the whole life")
    if adaptive_rows:
        print("\nAdaptive cadence, 1,000 operations (half standing still), 60 s window, fetch:")
        for label, requests in adaptive_rows:
            print(f"  {label}: {requests:,} requests")


if __name__ == "__main__":
    main()
