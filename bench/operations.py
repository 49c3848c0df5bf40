"""Benchmark of the operations features: prune, notice dispatcher, /metrics scrape.

    .venv/bin/python -m bench.operations                  # PostgreSQL and SQLite
    .venv/bin/python -m bench.operations --backend sqlite

For each backend, on a fresh, migrated database (PostgreSQL: optrack_bench_ops, created for
the run and dropped at the end; SQLite: a file in a temporary folder), it measures:

* prune: 50,000 operations that ended 100 days ago with 20 history rows each (1,000,000
  rows); ``worker.retention.prune`` with a 90-day cutoff deletes all but each one's last row
  (950,000 rows) in batches of 5,000, as ``optrack db prune --older-than 90d`` does. The time
  of every batch is printed, first to last: flat means each batch costs the same;
* dispatcher: a notice for 1,000 of those operations (``worker.notices.record_end``), then
  ``worker.notices.deliver_pending`` with the production policy, run by run until none is
  left, POSTing each to a webhook server on 127.0.0.1 (an ephemeral port) that answers 204;
* scrape: 10,000 active operations added (60,000 in all), then GET /metrics of
  ``worker.metrics.serve(build_registry(...))`` 20 times: median and max.

PostgreSQL's tables are analyzed after the load, as autovacuum would do on its own a minute
later. It prints a markdown table, the per-batch times and the command; the figures are
recorded in docs/operations.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from bench.databases import scratch_database
from worker.clock import FakeClock
from worker.db import HistoryEntry, TrackedOperation, make_engine, make_sessionmaker
from worker.metrics import build_registry, serve
from worker.migrate import upgrade
from worker.notices import DeliveryPolicy, WebhookChannel, deliver_pending, record_end
from worker.retention import prune

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_DATABASE = "optrack_bench_ops"

ENDED_OPERATIONS = 50_000
HISTORY_PER_OPERATION = 20
NOTICES = 1_000
ACTIVE_OPERATIONS = 10_000
PRUNE_BATCH = 5_000
SCRAPES = 20
INSERT_CHUNK = 1_000  # operations whose history goes in one transaction
DISPATCH = DeliveryPolicy()  # what the beat task deliver_notices uses
HTTP_TIMEOUT = 10.0

NOW = datetime.now(UTC).replace(microsecond=0)
ENDED_AT = NOW - timedelta(days=100)
CUTOFF = NOW - timedelta(days=90)


# --- the data ------------------------------------------------------------------------------


def _op_id(prefix: str, i: int) -> str:
    return f"comms_operation_01h9krwprkeee8fzqspv{prefix}{i:06d}"


def _ended_row(op: str) -> dict[str, Any]:
    steps = HISTORY_PER_OPERATION
    return dict(
        id=op,
        status="COMPLETED",
        tracked_at=ENDED_AT,
        ended_at=ENDED_AT,
        polls=steps,
        consecutive_errors=0,
        version=steps,
        total=1,
        queued=0,
        created=1,
        failed=0,
    )


def _history_row(op: str, seq: int) -> dict[str, Any]:
    return dict(
        operation_id=op,
        seq=seq,
        observed_at=ENDED_AT,
        remote_updated_at=ENDED_AT,
        status="PROCESSING",
        total=1,
        queued=1,
        created=0,
        failed=0,
    )


def _active_row(i: int) -> dict[str, Any]:
    return dict(
        id=_op_id("x", i),
        status="PROCESSING",
        tracked_at=NOW,
        polls=0,
        consecutive_errors=0,
        version=1,
    )


def load_ended(sessions: sessionmaker[Session]) -> None:
    """ENDED_OPERATIONS completed operations with HISTORY_PER_OPERATION history rows each."""
    ids = [_op_id("w", i) for i in range(ENDED_OPERATIONS)]
    steps = range(1, HISTORY_PER_OPERATION + 1)
    for start in range(0, len(ids), INSERT_CHUNK):
        chunk = ids[start : start + INSERT_CHUNK]
        with sessions.begin() as session:
            session.execute(insert(TrackedOperation), [_ended_row(op) for op in chunk])
            rows = [_history_row(op, seq) for op in chunk for seq in steps]
            session.execute(insert(HistoryEntry), rows)
    with sessions() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("ANALYZE"))
            session.commit()


def load_active(sessions: sessionmaker[Session]) -> None:
    """ACTIVE_OPERATIONS processing operations, due over the next minute."""
    with sessions.begin() as session:
        rows = [_active_row(i) for i in range(ACTIVE_OPERATIONS)]
        session.execute(insert(TrackedOperation), rows)


def queue_notices(sessions: sessionmaker[Session]) -> int:
    """A notice for NOTICES ended operations, as the transaction that ends each would write."""
    with sessions.begin() as session:
        ended = session.scalars(
            select(TrackedOperation)
            .where(TrackedOperation.ended_at.is_not(None))
            .order_by(TrackedOperation.id)
            .limit(NOTICES)
        )
        return sum(record_end(session, row, NOW) for row in ended)


# --- the webhook receiver ------------------------------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like any real receiver
    received = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with _Receiver.lock:
            _Receiver.received += 1
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def webhook_server() -> Iterator[str]:
    """A webhook receiver on 127.0.0.1 (a free port) answering 204; yields its URL."""
    _Receiver.received = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- the measurements ----------------------------------------------------------------------


def _tenths(times: list[float]) -> list[float]:
    """The median of each tenth of the run, first to last (a median: other work on a shared
    machine adds spikes to single batches)."""
    n = len(times)
    bounds = [round(n * i / 10) for i in range(11)]
    return [statistics.median(times[a:b]) for a, b in itertools.pairwise(bounds) if b > a]


def measure_prune(sessions: sessionmaker[Session]) -> tuple[str, list[float]]:
    """Prune, timing every batch (transaction) from the previous one's commit to its own."""
    times: list[float] = []
    mark = time.perf_counter()

    def on_batch(kind: str, deleted: int) -> None:
        nonlocal mark
        now = time.perf_counter()
        if kind == "history":
            times.append((now - mark) * 1000)
        mark = now

    start = mark
    result = prune(sessions, CUTOFF, PRUNE_BATCH, on_batch=on_batch)
    seconds = time.perf_counter() - start
    expected = ENDED_OPERATIONS * (HISTORY_PER_OPERATION - 1)
    if result.history_rows != expected:
        raise RuntimeError(f"prune deleted {result.history_rows} rows, expected {expected}")
    tenths = " ".join(f"{t:.0f}" for t in _tenths(times))
    figure = (
        f"{result.history_rows:,} of {ENDED_OPERATIONS * HISTORY_PER_OPERATION:,} rows in "
        f"{len(times)} batches: {seconds:.1f} s; batch first {times[0]:.0f} ms, median "
        f"{statistics.median(times):.0f} ms, last {times[-1]:.0f} ms, max {max(times):.0f} ms; "
        f"median per tenth of the run, first to last: {tenths} ms"
    )
    return figure, times


def measure_dispatcher(sessions: sessionmaker[Session]) -> str:
    queued = queue_notices(sessions)
    max_runs = queued // DISPATCH.batch + 2
    delivered = 0
    with webhook_server() as url:
        channel = WebhookChannel(url, "bench-secret", timeout=HTTP_TIMEOUT)
        try:
            start = time.perf_counter()
            for _ in range(max_runs):
                report = deliver_pending(sessions, FakeClock(NOW), [channel], DISPATCH)
                if report.failed:
                    raise RuntimeError(f"delivery failed: {report.failed[0]}")
                if not report.delivered:
                    break
                delivered += len(report.delivered)
            seconds = time.perf_counter() - start
        finally:
            channel.close()
    if delivered != queued or _Receiver.received != queued:
        raise RuntimeError(f"{queued} queued, {delivered} delivered, {_Receiver.received} got")
    return (
        f"{delivered:,} notices in runs of {DISPATCH.batch}: {seconds:.2f} s "
        f"({delivered / seconds:.0f}/s)"
    )


def measure_scrape(sessions: sessionmaker[Session]) -> str:
    load_active(sessions)
    server = serve(build_registry(sessions, FakeClock(NOW), multiproc_dir=None), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.port}/metrics"
    timings = []
    try:
        with requests.Session() as http:
            for _ in range(SCRAPES):
                start = time.perf_counter()
                http.get(url, timeout=HTTP_TIMEOUT).raise_for_status()
                timings.append((time.perf_counter() - start) * 1000)
    finally:
        server.close()
    total = ENDED_OPERATIONS + ACTIVE_OPERATIONS
    return (
        f"{total:,} operations, {SCRAPES} scrapes: median {statistics.median(timings):.1f} ms, "
        f"max {max(timings):.1f} ms"
    )


def bench_backend(url: str) -> tuple[list[tuple[str, str]], list[float]]:
    """Migrate, load, measure in order (each step uses the data the previous one left).

    Returns the table rows and the prune's batch times (ms).
    """
    upgrade(url)
    engine = make_engine(url)
    try:
        sessions = make_sessionmaker(engine)
        load_ended(sessions)
        pruned, batch_times = measure_prune(sessions)
        rows = [
            ("prune", pruned),
            ("dispatcher (webhook)", measure_dispatcher(sessions)),
            ("/metrics scrape", measure_scrape(sessions)),
        ]
        return rows, batch_times
    finally:
        engine.dispose()


# --- the databases -------------------------------------------------------------------------


@contextmanager
def sqlite_database() -> Iterator[str]:
    """A SQLite file in a temporary folder, removed at the end."""
    with tempfile.TemporaryDirectory() as folder:
        yield f"sqlite:///{Path(folder) / 'bench.sqlite'}"


# --- the command ---------------------------------------------------------------------------


def _command() -> str:
    python = os.path.relpath(sys.executable)
    python = sys.executable if python.startswith("..") else python
    return " ".join([python, "-m", "bench.operations", *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["pg", "sqlite"], help="one backend (default both)")
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    args = parser.parse_args(argv)
    databases = {
        "postgresql": lambda: scratch_database(args.pg_admin_url, PG_DATABASE),
        "sqlite": sqlite_database,
    }
    if args.backend is not None:
        wanted = "postgresql" if args.backend == "pg" else args.backend  # "pg" matched nothing
        databases = {k: v for k, v in databases.items() if k == wanted}
    lines = ["| backend | measurement | figure |", "|---|---|---|"]
    batches: dict[str, list[float]] = {}
    for backend, database in databases.items():
        with database() as url:
            rows, batches[backend] = bench_backend(url)
            for measurement, figure in rows:
                lines.append(f"| {backend} | {measurement} | {figure} |")
                print(lines[-1], file=sys.stderr, flush=True)  # progress
    print("\n".join(lines))
    for backend, times in batches.items():
        print(f"\n{backend}: prune batch times in ms, first to last ({len(times)} batches)")
        for start in range(0, len(times), 20):
            print(" ".join(f"{t:5.0f}" for t in times[start : start + 20]))
    print(f"\ncommand: `{_command()}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
