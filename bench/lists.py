"""Benchmark: `optrack status --json` over many operations, its time and peak memory (a script).

Fills a fresh database with N PROCESSING operations (COPY on PostgreSQL, executemany on
SQLite), runs `optrack status --json > /dev/null` as a user would, and prints the wall time and
the child's peak RSS. `status` streams keyset pages of 1,000, so the peak stays near the
interpreter's own whatever N. The PostgreSQL database (optrack_bench_lists) is created for the
run and dropped at the end.

    .venv/bin/python -m bench.lists                  # 70,000 and 140,000 on both databases
    .venv/bin/python -m bench.lists --counts 70000 --skip-postgres
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.databases import scratch_database
from bench.reports import PG_ADMIN_URL, Dataset, load_postgres, load_sqlite
from worker.db import make_engine
from worker.migrate import upgrade

PG_DATABASE = "optrack_bench_lists"


def dataset(count: int, now: datetime) -> Dataset:
    """``count`` PROCESSING operations created a second apart (no history)."""
    start = now - timedelta(seconds=count + 60)
    rows: list[tuple[Any, ...]] = []
    for i in range(count):
        created = start + timedelta(seconds=i)
        seen = created + timedelta(seconds=30)
        state = ("PROCESSING", 10, 6, 4, 0, created, seen, created, seen, 1, 0, None, None, 2)
        rows.append((f"comms_operation_0lists{i:020d}", *state))
    return Dataset(rows, [], rows[0][0], rows[0][0], [])


@contextmanager
def pg_database() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database; dropped at exit."""
    with scratch_database(PG_ADMIN_URL, PG_DATABASE) as url:
        upgrade(url)
        yield url


def run_status(url: str) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of `optrack status --json` to /dev/null.

    The peak is the child's own VmHWM, sampled from /proc until it exits: getrusage's maxrss
    would count this parent's memory too (the child starts as a copy of it before exec).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env["OPTRACK_DATABASE_URL"] = url
    started = time.monotonic()
    peak_kib = 0
    with open(os.devnull, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "status", "--json"], env=env, stdout=sink
        )
        while process.poll() is None:
            peak_kib = max(peak_kib, _hwm_kib(process.pid))
            time.sleep(0.01)
    if process.returncode != 0:
        raise SystemExit(f"optrack status --json failed ({process.returncode})")
    return time.monotonic() - started, peak_kib / 1024


def _hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def measure(label: str, url: str, count: int) -> None:
    engine = make_engine(url)
    data = dataset(count, datetime.now(UTC))
    (load_postgres if engine.dialect.name == "postgresql" else load_sqlite)(engine, data)
    engine.dispose()
    seconds, rss = run_status(url)
    print(f"| {label} | {count:,} | {seconds:.1f} s | {rss:.0f} MiB |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[70_000, 140_000])
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args(argv)
    print("| database | operations | `status --json` | peak RSS |")
    print("|---|---:|---:|---:|")
    for count in args.counts:
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{Path(folder) / 'bench.sqlite'}"
            upgrade(url)
            measure("SQLite", url, count)
        if not args.skip_postgres:
            with pg_database() as url:
                measure("PostgreSQL", url, count)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
