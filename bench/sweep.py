"""Benchmark: freshness and cost of polling at scale, with real processes.

    .venv/bin/python -m bench.sweep                         # the three runs of docs/scale.md
    .venv/bin/python -m bench.sweep --run pg:10000:5        # one run: database:N:interval

Each run starts the sandbox API (a subprocess), beat and two Celery workers (concurrency 1
each) with default settings but ``OPTRACK_POLL_INTERVAL``, on PostgreSQL + Redis (``pg``) or
on the embedded default, SQLite and Celery's SQLAlchemy transport (``sqlite``). It creates N
PROCESSING operations (created over the last N/28 seconds, ten senders each) that move and
end at random moments of the run, tracks them with ``optrack track -``, and waits until the
tracker saw every one end. It prints, per run:

* requests per sweep while all N are active, against ceil(N / 1000), from the sandbox's log;
* the delay from each operation's true end (the sandbox's end instant) to the moment optrack
  recorded it (the ``observed_at`` of its final history row): p50, p95, max;
* rows written per sweep and busy seconds per sweep (the poll tasks' own counts and run
  times, from the workers' logs), the longest poll message;
* the workers' peak RSS (``VmHWM`` of every worker process).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import redis
import requests
from sqlalchemy import create_engine, text

from bench.databases import drop, recreate
from worker.migrate import upgrade

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BENCH_DB = "optrack_bench_sweep"
PG_URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{BENCH_DB}"
REDIS_URL = "redis://127.0.0.1:6379/13"
SID, TOKEN = "AC" + "b" * 32, "bench-token-not-a-secret"
CREATED_PER_SECOND = 28  # the account's operations per second of createdAt
SENDERS = 10
DEFAULT_RUNS = ("pg:10000:5", "pg:100000:30", "sqlite:10000:5")
SUCCEEDED = re.compile(r"Task optrack\.poll\[[^\]]+\] succeeded in ([0-9.]+)s: (\{.*\})")


@dataclass
class Result:
    database: str
    n: int
    interval: float
    requests_per_sweep: float = 0.0
    steady_sweeps: float = 0.0
    delays: list[float] | None = None
    missed: int = 0
    rows_per_sweep: float = 0.0
    busy_per_sweep: float = 0.0
    longest_message: float = 0.0
    peak_rss_mb: float = 0.0
    placement_seconds: float = 0.0


def optrack(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
        timeout=1200,
    )
    return done.stdout


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def listening(args: list[str], env: dict[str, str], log: Path) -> Iterator[str]:
    """`optrack ARGS` (a server given --port 0), its stderr in ``log``; yields the address it
    prints in its first line ("… listening on URL")."""
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        proc.wait()
        said = log.read_text()[-2000:]
        raise RuntimeError(f"optrack {args[0]} did not start: {line!r}\n{said}")
    try:
        yield line.split("listening on", 1)[1].strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def sandbox(env: dict[str, str], log: Path, *extra: str) -> AbstractContextManager[str]:
    """`optrack sandbox --port 0 EXTRA`; yields its base URL."""
    return listening(["sandbox", "--port", "0", "--seed", "0", *extra], env, log)


def workers_and_beat(
    stack: ExitStack, env: dict[str, str], home: Path, concurrency: int = 1
) -> list[subprocess.Popen[bytes]]:
    """Two Celery workers (``concurrency`` pool processes each, logs ``w1.log``/``w2.log``) and
    beat, in ``home``, stopped with ``stack``; returns the workers."""
    celery = [sys.executable, "-m", "celery", "-A", "worker.celery_app"]
    workers = [
        stack.enter_context(
            process(
                [
                    *celery,
                    "worker",
                    f"--hostname=w{i}@%h",
                    f"--concurrency={concurrency}",
                    "--loglevel=INFO",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
                env,
                home / f"w{i}.log",
            )
        )
        for i in (1, 2)
    ]
    beat = [*celery, "beat", "--loglevel=INFO", f"--schedule={home / 'schedule'}"]
    stack.enter_context(process(beat, env, home / "beat.log"))
    return workers


def peak_rss_mb(worker: subprocess.Popen[bytes]) -> float:
    """The largest VmHWM among a worker's processes, in MiB."""
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


def fresh_pg() -> None:
    recreate(ADMIN_URL, BENCH_DB)
    redis.Redis.from_url(REDIS_URL).flushdb()


def create_operations(
    http: requests.Session,
    root: str,
    n: int,
    ends_from: float,
    ends_to: float,
    *,
    batch: int = 100,
    seed: int | None = None,
) -> dict[str, float]:
    """N operations of the account ``http`` authenticates as, created over the last N/28 s,
    in batches sharing a createdAt and an end (drawn from ``seed``, default N); returns each
    one's true end (epoch seconds)."""
    rng = random.Random(n if seed is None else seed)
    now = time.time()
    span = n / CREATED_PER_SECOND
    ends: dict[str, float] = {}
    for i in range(0, n, batch):
        created = now - span + span * i / n
        end = rng.uniform(ends_from, ends_to)
        response = http.post(
            f"{root}/_sandbox/operations/bulk",
            json={
                "count": min(batch, n - i),
                "total": SENDERS,
                "duration": end - created,
                "created_at": created,
            },
            timeout=60,
        )
        response.raise_for_status()
        ends.update(dict.fromkeys(response.json()["ids"], end))
    return ends


def scalar(url: str, sql: str) -> Any:
    engine = create_engine(url)
    with engine.connect() as conn:
        value = conn.execute(text(sql)).scalar()
    engine.dispose()
    return value


def wait_until(check: Any, timeout: float, what: str, interval: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


def run(database: str, n: int, interval: float, tmp: Path) -> Result:
    result = Result(database, n, interval)
    home = tmp / f"{database}-{n}"
    home.mkdir()
    if database == "pg":
        fresh_pg()
        db_url, broker = PG_URL, REDIS_URL
    else:
        db_url = f"sqlite:///{home / 'optrack.sqlite'}"
        broker = f"sqla+sqlite:///{home / 'broker.sqlite'}"
    upgrade(db_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(
        OPTRACK_HOME=str(home),
        OPTRACK_DATABASE_URL=db_url,
        OPTRACK_BROKER_URL=broker,
        OPTRACK_POLL_INTERVAL=str(interval),
        TWILIO_ACCOUNT_SID=SID,
        TWILIO_AUTH_TOKEN=TOKEN,
        PYTHONUNBUFFERED="1",
    )
    http = requests.Session()
    http.auth = (SID, TOKEN)
    with ExitStack() as stack:
        base_url = stack.enter_context(sandbox(env, home / "sandbox.log"))
        root = base_url.removesuffix("/v1")
        env["OPTRACK_API_BASE_URL"] = base_url
        # Ends come after a few full sweeps: placing N takes a while, then 3 sweeps are
        # measured with all N active; the ends spread over 8 intervals after that.
        warm = 30 + n / 1000
        t0 = time.time()
        first_end = t0 + warm + 3 * interval
        ends = create_operations(http, root, n, first_end, first_end + 8 * interval)
        print(f"  {n:,} operations created in {time.time() - t0:.0f}s", file=sys.stderr)
        optrack(env, "track", "-", stdin="\n".join(ends))
        workers = workers_and_beat(stack, env, home)
        placed = (
            "SELECT count(*) FROM tracked_operations WHERE status = 'PENDING' "
            "OR (group_id IS NULL AND status = 'PROCESSING')"
        )
        wait_until(lambda: scalar(db_url, placed) == 0, 1200, "every operation seen and placed")
        steady = time.time()
        result.placement_seconds = steady - t0
        print(f"  all seen and placed after {steady - t0:.0f}s", file=sys.stderr)
        ended = "SELECT count(*) FROM tracked_operations WHERE ended_at IS NOT NULL"
        last_end = max(ends.values())
        wait_until(
            lambda: scalar(db_url, ended) == n,
            last_end - time.time() + 20 * interval + 120,
            "every end to be recorded",
            interval=2.0,
        )
        result.peak_rss_mb = max(peak_rss_mb(w) for w in workers)
        log = http.get(f"{root}/_sandbox/requests", timeout=60).json()["requests"]
    # Steady state: from placement until the first end, every operation active.
    window_end = min(first_end, steady + 3 * interval)
    full = [r for r in log if steady <= r["t"] < window_end]
    result.steady_sweeps = (window_end - steady) / interval
    if result.steady_sweeps > 0.5:
        result.requests_per_sweep = len(full) / result.steady_sweeps
    result.delays, result.missed = end_delays(db_url, ends, steady)
    sweeps = (time.time() - steady) / interval
    rows = busy = longest = 0.0
    for name in ("w1.log", "w2.log"):
        for match in SUCCEEDED.finditer((home / name).read_text()):
            seconds, counts = float(match.group(1)), json.loads(match.group(2).replace("'", '"'))
            rows += counts.get("rows_written", 0) + 1  # + the group's own row
            busy += seconds
            longest = max(longest, seconds)
    result.rows_per_sweep = rows / sweeps
    result.busy_per_sweep = busy / sweeps
    result.longest_message = longest
    return result


def end_delays(db_url: str, ends: dict[str, float], steady: float) -> tuple[list[float], int]:
    """Seconds from each true end to its recording; ends before ``steady`` are left out."""
    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT operation_id, observed_at FROM operation_history "
                "WHERE status IN ('COMPLETED', 'CANCELED')"
            )
        ).all()
    engine.dispose()
    delays = []
    missed = 0
    for op_id, observed in rows:
        if isinstance(observed, str):  # SQLite gives text
            observed = datetime.fromisoformat(observed)
        if observed.tzinfo is None:
            observed = observed.replace(tzinfo=UTC)
        end = ends[op_id]
        if end < steady:
            missed += 1
            continue
        delays.append(observed.timestamp() - end)
    return sorted(delays), missed


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, math.ceil(p * len(values)) - 1)] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", help="database:N:interval, e.g. pg:10000:5")
    args = parser.parse_args()
    results = []
    with TemporaryDirectory() as tmp_name:
        for spec in args.run or DEFAULT_RUNS:
            database, n, interval = spec.split(":")
            print(f"{spec}…", file=sys.stderr, flush=True)
            results.append(run(database, int(n), float(interval), Path(tmp_name)))
    drop(ADMIN_URL, BENCH_DB)

    print(f"\n$ python -m bench.sweep {' '.join(sys.argv[1:])}".rstrip())
    print(f"{os.cpu_count()} cores; sandbox, beat, 2 workers (concurrency 1), default settings\n")
    print(
        "| database | N | interval | requests/sweep (ceil(N/1000)) | end delay p50 / p95 / max "
        "| rows written/sweep | busy s/sweep | longest message | worker peak RSS |"
    )
    print("|" + "---|" * 9)
    for r in results:
        d = r.delays or []
        print(
            f"| {'PostgreSQL + Redis' if r.database == 'pg' else 'SQLite, embedded broker'} "
            f"| {r.n:,} | {r.interval:g} s | {r.requests_per_sweep:.1f} ({math.ceil(r.n / 1000)}) "
            f"| {pct(d, 0.5):.1f} / {pct(d, 0.95):.1f} / {max(d, default=float('nan')):.1f} s "
            f"| {r.rows_per_sweep:,.0f} | {r.busy_per_sweep:.1f} | {r.longest_message:.1f} s "
            f"| {r.peak_rss_mb:.0f} MiB |"
        )
    for r in results:
        print(
            f"{r.database} {r.n:,}: placed in {r.placement_seconds:.0f}s, "
            f"{r.steady_sweeps:.1f} sweeps measured with all active, "
            f"{len(r.delays or [])} ends measured ({r.missed} before placement), "
            f"median delay {statistics.median(r.delays) if r.delays else float('nan'):.1f}s"
        )


if __name__ == "__main__":
    main()
