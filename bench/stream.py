"""Benchmark: a live stream of operations handed to optrack over HTTP, with real processes.

    .venv/bin/python -m bench.stream                              # PostgreSQL + Redis, 8/s, 10 min
    .venv/bin/python -m bench.stream --database sqlite --rate 2   # the embedded default
    .venv/bin/python -m bench.stream --minutes 3 --interval 5     # shorter

It starts the sandbox API (logging which operations each answer carried), `optrack serve`,
beat and two Celery workers (concurrency 1 each) with default settings but
``OPTRACK_POLL_INTERVAL``. For ``--minutes`` it creates operations in the sandbox at ``--rate``
a second, each with a lifetime drawn from ``--mix``, and hands each one to optrack at once
with ``POST /api/v1/operations``, as a service does after creating it. Then it waits until
every end is recorded, and prints:

* end-seen lag (true end → the ``observed_at`` of the final history row): p50/p95/max,
  per minute of the run and overall;
* intake lag (handed over → the first API answer that carried it);
* the gap between two answers that carried the same PROCESSING operation (handing-over
  to the first answer included): p50/p99/max, against the interval;
* requests per interval against ⌈active/1000⌉ (the fewest List pages that cover every active
  operation), and their ratio over the run; of them, List first pages, List pages after the
  first, and GETs;
* the workers' peak RSS.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import requests
from sqlalchemy import create_engine, text

from bench.databases import drop
from bench.sweep import (
    ADMIN_URL,
    BENCH_DB,
    PG_URL,
    REDIS_URL,
    SID,
    TOKEN,
    fresh_pg,
    listening,
    pct,
    peak_rss_mb,
    sandbox,
    wait_until,
    workers_and_beat,
)
from worker.migrate import upgrade

HTTP_TOKEN = "bench-stream-" + "x" * 24
SENDERS = 10
DEFAULT_MIX = "20:0.3,60:0.4,180:0.2,600:0.1"  # lifetime seconds : share


@dataclass
class Handed:
    created: float  # epoch seconds, also when it was handed over (within a few ms)
    handed: float
    end: float


@dataclass
class Result:
    database: str
    rate: float
    minutes: float
    interval: float
    ops: dict[str, Handed] = field(default_factory=dict)
    end_lag: list[float] = field(default_factory=list)
    end_lag_by_minute: dict[int, list[float]] = field(default_factory=dict)
    intake_lag: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    requests: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # List first / next pages, GETs
    minimum: int = 0
    per_interval: list[tuple[int, int]] = field(default_factory=list)  # (requests, minimum)
    peak_rss_mb: float = 0.0
    unrecorded: int = 0


def parse_mix(text_: str) -> tuple[list[float], list[float]]:
    lifetimes, weights = [], []
    for part in text_.split(","):
        seconds, share = part.split(":")
        lifetimes.append(float(seconds))
        weights.append(float(share))
    return lifetimes, weights


def utc_seconds(value: Any) -> float:
    if isinstance(value, str):  # SQLite gives text
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


def run(args: argparse.Namespace, tmp: Path) -> Result:
    result = Result(args.database, args.rate, args.minutes, args.interval)
    home = tmp / args.database
    home.mkdir()
    if args.database == "pg":
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
        OPTRACK_POLL_INTERVAL=str(args.interval),
        OPTRACK_HTTP_TOKEN=HTTP_TOKEN,
        TWILIO_ACCOUNT_SID=SID,
        TWILIO_AUTH_TOKEN=TOKEN,
        PYTHONUNBUFFERED="1",
    )
    lifetimes, weights = parse_mix(args.mix)
    rng = random.Random(0)
    api = requests.Session()
    api.auth = (SID, TOKEN)
    intake = requests.Session()
    intake.headers["Authorization"] = f"Bearer {HTTP_TOKEN}"
    with ExitStack() as stack:
        base_url = stack.enter_context(sandbox(env, home / "sandbox.log", "--log-ids"))
        root = base_url.removesuffix("/v1")
        env["OPTRACK_API_BASE_URL"] = base_url
        served = stack.enter_context(
            listening(["serve", "--port", "0", "--loglevel", "WARNING"], env, home / "serve.log")
        )
        workers = workers_and_beat(stack, env, home)
        wait_until(
            lambda: all("ready." in (home / f"w{i}.log").read_text() for i in (1, 2)),
            120,
            "the workers to start",
        )
        start = time.time()
        stop_at = start + args.minutes * 60
        n = 0
        while (now := time.time()) < stop_at:
            due = start + n / args.rate
            if now < due:
                time.sleep(due - now)
                continue
            lifetime = rng.choices(lifetimes, weights)[0] * rng.uniform(0.8, 1.2)
            created = time.time()
            made = api.post(
                f"{root}/_sandbox/operations/bulk",
                json={"count": 1, "total": SENDERS, "duration": lifetime, "created_at": created},
                timeout=30,
            )
            made.raise_for_status()
            op_id = made.json()["ids"][0]
            handed = intake.post(f"{served}/api/v1/operations", json={"ids": [op_id]}, timeout=30)
            handed.raise_for_status()
            result.ops[op_id] = Handed(created, time.time(), created + lifetime)
            n += 1
        print(f"  {n:,} operations handed over in {time.time() - start:.0f}s", file=sys.stderr)
        last_end = max(op.end for op in result.ops.values())
        engine = create_engine(db_url)

        def ended() -> int:
            with engine.connect() as conn:
                sql = "SELECT count(*) FROM tracked_operations WHERE ended_at IS NOT NULL"
                return int(conn.execute(text(sql)).scalar_one())

        try:
            wait_until(
                lambda: ended() >= n,
                last_end - time.time() + 10 * args.interval + 120,
                "every end to be recorded",
                interval=2.0,
            )
        except RuntimeError as exc:
            print(f"  {exc}", file=sys.stderr)
        result.peak_rss_mb = max(peak_rss_mb(w) for w in workers)
        log = api.get(f"{root}/_sandbox/requests", timeout=120).json()["requests"]
        if args.keep_log is not None:
            args.keep_log.write_text(json.dumps(log))
        with engine.connect() as conn:
            finals = conn.execute(
                text(
                    "SELECT operation_id, observed_at FROM operation_history "
                    "WHERE status IN ('COMPLETED', 'CANCELED')"
                )
            ).all()
        engine.dispose()
    measure(result, log, finals, start, args.interval)
    return result


def measure(
    result: Result, log: list[dict[str, Any]], finals: Any, start: float, interval: float
) -> None:
    ops = result.ops
    by_minute: dict[int, list[float]] = defaultdict(list)
    seen_end = set()
    for op_id, observed in finals:
        op = ops[op_id]
        lag = utc_seconds(observed) - op.end
        result.end_lag.append(lag)
        by_minute[int((op.end - start) // 60)].append(lag)
        seen_end.add(op_id)
    result.unrecorded = len(ops) - len(seen_end)
    result.end_lag.sort()
    result.end_lag_by_minute = {m: sorted(v) for m, v in sorted(by_minute.items())}

    looks: dict[str, list[float]] = defaultdict(list)
    for entry in log:
        for op_id in entry.get("ids", ()):
            if op_id in ops:
                looks[op_id].append(entry["t"])
    for op_id, op in ops.items():
        times = sorted(looks.get(op_id, ()))
        if times:
            result.intake_lag.append(times[0] - op.handed)
        # While PROCESSING: from the handing-over, each look until the end.
        previous = op.handed
        for t in times:
            if t > op.end:
                break
            result.gaps.append(t - previous)
            previous = t
    result.intake_lag.sort()
    result.gaps.sort()

    # Requests per interval while the stream ran, against the fewest pages covering the active.
    starts = sorted(op.handed for op in ops.values())
    ends = sorted(op.end for op in ops.values())
    stream_end = max(starts)
    times = sorted(e["t"] for e in log)
    t = start
    while t + interval <= stream_end:
        middle = t + interval / 2
        active = bisect.bisect_right(starts, middle) - bisect.bisect_right(ends, middle)
        asked = bisect.bisect_left(times, t + interval) - bisect.bisect_left(times, t)
        result.per_interval.append((asked, math.ceil(active / 1000)))
        t += interval
    result.requests = sum(a for a, _ in result.per_interval)
    result.minimum = sum(m for _, m in result.per_interval)
    kinds: dict[str, int] = defaultdict(int)
    for entry in log:
        if start <= entry["t"] < t:  # the intervals counted above
            kinds[request_kind(entry)] += 1
    result.kinds = dict(kinds)


def request_kind(entry: dict[str, Any]) -> str:
    """A logged request as the cost breakdown names it."""
    if not entry["path"].rstrip("/").endswith("/Operations"):
        return "GET"
    return "List next page" if "pageToken" in entry["query"] else "List first page"


def trio(values: list[float], high: float = 0.95) -> str:
    if not values:
        return "n/a"
    return f"{pct(values, 0.5):.1f} / {pct(values, high):.1f} / {max(values):.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--database", choices=("pg", "sqlite"), default="pg")
    parser.add_argument("--rate", type=float, default=8.0, help="operations handed a second")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=5.0, help="OPTRACK_POLL_INTERVAL")
    parser.add_argument("--mix", default=DEFAULT_MIX, help="lifetime seconds:share, ...")
    parser.add_argument(
        "--keep-log", type=Path, help="write the sandbox's request log (JSON) to this file"
    )
    args = parser.parse_args()
    with TemporaryDirectory() as tmp_name:
        result = run(args, Path(tmp_name))
    if args.database == "pg":
        drop(ADMIN_URL, BENCH_DB)

    r = result
    where = "PostgreSQL + Redis" if r.database == "pg" else "SQLite, embedded broker"
    print(f"\n$ python -m bench.stream {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"{os.cpu_count()} cores; sandbox, optrack serve, beat, 2 workers (concurrency 1); "
        f"{where}; {len(r.ops):,} operations at {r.rate:g}/s for {r.minutes:g} min, "
        f"interval {r.interval:g} s, lifetimes {args.mix}\n"
    )
    print("| minute of the end | ends | end-seen lag p50 / p95 / max |")
    print("|---|---|---|")
    for minute, lags in r.end_lag_by_minute.items():
        print(f"| {minute} | {len(lags):,} | {trio(lags)} |")
    print(f"| all | {len(r.end_lag):,} | {trio(r.end_lag)} |\n")
    ratio = r.requests / r.minimum if r.minimum else float("nan")
    busiest = max((a for a, _ in r.per_interval), default=0)
    print("| measure | figure |")
    print("|---|---|")
    print(
        f"| intake lag (handed → first answer carrying it) p50 / p95 / max | {trio(r.intake_lag)} |"
    )
    print(
        f"| gap between two looks at a PROCESSING operation p50 / p99 / max "
        f"| {trio(r.gaps, 0.99)} (interval {r.interval:g} s) |"
    )
    over = sum(1 for g in r.gaps if g > r.interval)
    share = over / max(1, len(r.gaps))
    print(f"| gaps over the interval | {over:,} of {len(r.gaps):,} ({share:.1%}) |")
    print(
        f"| requests while the stream ran / ⌈active/1000⌉ summed per interval "
        f"| {r.requests:,} / {r.minimum:,} = {ratio:.1f} times (busiest interval {busiest}) |"
    )
    kinds = ", ".join(
        f"{r.kinds.get(k, 0):,} {k}" for k in ("List first page", "List next page", "GET")
    )
    print(f"| of them | {kinds} |")
    print(f"| ends never recorded | {r.unrecorded} |")
    print(f"| worker peak RSS | {r.peak_rss_mb:.0f} MiB |")


if __name__ == "__main__":
    main()
