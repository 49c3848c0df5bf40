"""Benchmark of the HTTP API on SQLite and PostgreSQL (a script, not a test).

Loads bench.reports' data set (10,000 operations, 200,000 history rows by default) into a
fresh database, serves the app with uvicorn on a free loopback port, and times real requests
over a socket (requests, one keep-alive connection): a page of 1,000 operations at the start
and deep in the list, a walk of every page, one history, the dashboard's refresh (account,
report, progress), /healthz, and POSTs of 10,000 IDs (new, then already tracked).
The PostgreSQL database (optrack_bench_http) is created for the run and dropped at the end.

    .venv/bin/python -m bench.http
    .venv/bin/python -m bench.http --operations 2000 --history 40000 --skip-postgres

The figures and the command are recorded in docs/http.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from rich.console import Console
from rich.table import Table

from bench.databases import scratch_database
from bench.reports import NOW, PG_ADMIN_URL, Dataset, generate, load_postgres, load_sqlite
from bench.reports import measure as measure_ms
from worker.clock import FakeClock
from worker.db import make_engine
from worker.http import create_app
from worker.http.server import running
from worker.migrate import upgrade
from worker.runtime import Runtime
from worker.settings import load_settings

PG_DATABASE = "optrack_bench_http"
TOKEN = "bench-" + "x" * 32


def _ok(response: requests.Response) -> requests.Response:
    response.raise_for_status()
    return response


def timings(http: requests.Session, base: str, data: Dataset) -> dict[str, Callable[[], Any]]:
    """The measured requests."""
    api = base + "/api/v1"
    deep = _ok(http.get(f"{api}/operations", params={"limit": 1000}, timeout=60)).json()
    for _ in range(8):  # the cursor of the ninth page (of ten at 10,000 operations)
        if deep["next"] is None:
            break
        params = {"limit": 1000, "cursor": deep["next"]}
        deep = _ok(http.get(f"{api}/operations", params=params, timeout=60)).json()
    deep_cursor = deep["next"]

    def get(path: str, **params: Any) -> Callable[[], Any]:
        return lambda: _ok(http.get(base + path, params=params, timeout=60))

    def walk() -> int:
        pages, cursor = 0, None
        while True:
            params: dict[str, Any] = {"limit": 1000}
            if cursor:
                params["cursor"] = cursor
            page = _ok(http.get(f"{api}/operations", params=params, timeout=60)).json()
            pages += 1
            cursor = page["next"]
            if cursor is None:
                return pages

    def dashboard() -> None:
        for path in ("/account", "/report?limit=0", "/progress?limit=50"):
            _ok(http.get(api + path, timeout=60))

    return {
        "GET /operations?limit=1000 (first page)": get("/api/v1/operations", limit=1000),
        "GET /operations?limit=1000 (a deep page, by cursor)": get(
            "/api/v1/operations", limit=1000, cursor=deep_cursor
        ),
        f"walk every page of 1,000 ({len(data.operations):,} operations)": walk,
        "GET /operations?status=PROCESSING&limit=100": get(
            "/api/v1/operations", status="PROCESSING", limit=100
        ),
        "GET /operations/{id}/history (typical)": get(
            f"/api/v1/operations/{data.typical_id}/history"
        ),
        "GET /report (lists capped at 100)": get("/api/v1/report"),
        "dashboard refresh (account + report + progress)": dashboard,
        # 503 here (no beat ticks in a benchmark): the same queries as a 200.
        "GET /healthz": lambda: http.get(base + "/healthz", timeout=60),
    }


def post_ids(http: requests.Session, base: str, n: int) -> tuple[float, float]:
    """(ms to track n new IDs, ms to post the same n again: all already tracked)."""
    ids = [f"comms_operation_0{i:025d}" for i in range(n)]
    times = []
    for _ in range(2):
        start = time.perf_counter()
        _ok(http.post(base + "/api/v1/operations", json={"ids": ids}, timeout=120))
        times.append((time.perf_counter() - start) * 1000)
    return times[0], times[1]


def bench_backend(name: str, url: str, data: Dataset, repeat: int) -> list[tuple[str, ...]]:
    """Migrate, load, serve, time; the caller owns creating and dropping the database."""
    upgrade(url)
    engine = make_engine(url)
    (load_postgres if name == "postgresql" else load_sqlite)(engine, data)
    engine.dispose()
    settings = load_settings({"OPTRACK_DATABASE_URL": url, "OPTRACK_HTTP_TOKEN": TOKEN})
    rt = Runtime(settings, clock=FakeClock(NOW))
    rows: list[tuple[str, ...]] = []
    try:
        with running(create_app(rt, token=TOKEN)) as server, requests.Session() as http:
            http.headers["Authorization"] = f"Bearer {TOKEN}"
            for label, fn in timings(http, server.url, data).items():
                first, median, longest = measure_ms(fn, repeat)
                rows.append((name, label, f"{first:.1f}", f"{median:.1f}", f"{longest:.1f}"))
            new, again = post_ids(http, server.url, 10_000)
            rows.append((name, "POST 10,000 new IDs", f"{new:.1f}", "", ""))
            rows.append(
                (name, "POST the same 10,000 again (already tracked)", f"{again:.1f}", "", "")
            )
    finally:
        rt.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--operations", type=int, default=10_000)
    parser.add_argument("--history", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=10, help="timed runs after the first")
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-sqlite", action="store_true")
    args = parser.parse_args(argv)
    out = Console()
    data = generate(args.operations, args.history)
    rows: list[tuple[str, ...]] = []
    if not args.skip_sqlite:
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{Path(folder) / 'bench.sqlite'}"
            rows += bench_backend("sqlite", url, data, args.repeat)
    if not args.skip_postgres:
        with scratch_database(args.pg_admin_url, PG_DATABASE) as url:
            rows += bench_backend("postgresql", url, data, args.repeat)
    table = Table(
        title=f"HTTP API on {len(data.operations):,} operations / {len(data.history):,} history "
        f"rows (ms per request over loopback; median and max of {args.repeat} after a first)",
        title_justify="left",
    )
    for column in ("backend", "request"):
        table.add_column(column)
    for column in ("first", "median", "max"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    out.print(table)
    python = os.path.relpath(sys.executable)
    python = sys.executable if python.startswith("..") else python
    out.print("command: " + " ".join([python, "-m", "bench.http", *sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
