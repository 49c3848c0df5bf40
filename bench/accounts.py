"""Benchmark: many accounts in one deployment, with real processes (issue 20, item 7).

    .venv/bin/python -m bench.accounts                          # 1,000 accounts x 100, 30 s
    .venv/bin/python -m bench.accounts --accounts 50 --interval 10   # shorter

One sandbox serves every account (the environment's `default` and ``--accounts`` - 1 stored
ones, each its own SID, Auth Token, operations and request log); PostgreSQL + Redis, beat and
two Celery workers (``--concurrency`` pool processes each, default 1) with default settings but
``OPTRACK_POLL_INTERVAL``.
Each account gets ``--per-account`` PROCESSING operations created over the last few seconds
(28 a second), tracked under it, which end at random moments after three sweeps with every
operation active. It waits until every end is recorded and prints:

* requests per sweep while all are active, summed over the accounts' request logs, against
  Σ ⌈active/1000⌉ (one List page per account: the fewest that cover each account's operations
  with its own credentials);
* the delay from each true end to its recording: p50, p95, max;
* how long until every operation was seen and placed, and the ticks' run times;
* the workers' peak RSS.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

import redis
import requests
from cryptography.fernet import Fernet

from bench.databases import drop, recreate
from bench.sweep import (
    ADMIN_URL,
    create_operations,
    end_delays,
    pct,
    peak_rss_mb,
    sandbox,
    scalar,
    wait_until,
    workers_and_beat,
)
from worker import intake
from worker.accounts import Accounts
from worker.credentials import DEFAULT_ACCOUNT, Vault
from worker.migrate import upgrade
from worker.runtime import Runtime
from worker.settings import load_settings

BENCH_DB = "optrack_bench_accounts"  # its own database and Redis: bench.sweep may run beside
PG_URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{BENCH_DB}"
REDIS_URL = "redis://127.0.0.1:6379/12"
TICK = re.compile(r"Task optrack\.tick\[[^\]]+\] succeeded in ([0-9.]+)s")
POLL = re.compile(r"Task optrack\.poll\[[^\]]+\] succeeded in ([0-9.]+)s")
BATCH = 10  # operations of one account sharing a createdAt and an end


@dataclass(frozen=True)
class Customer:
    name: str
    sid: str
    token: str


@dataclass
class Result:
    accounts: int
    per_account: int
    interval: float
    concurrency: int
    requests_per_sweep: float = 0.0
    steady_sweeps: float = 0.0
    delays: list[float] = field(default_factory=list)
    missed: int = 0
    placement_seconds: float = 0.0
    ticks: list[float] = field(default_factory=list)
    polls: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    per_account_requests: list[float] = field(default_factory=list)


def customers(count: int) -> list[Customer]:
    """The environment's account first, then ``count`` - 1 stored ones."""
    return [
        Customer(
            DEFAULT_ACCOUNT if i == 0 else f"customer-{i:04d}",
            "AC" + f"{0xACC0 << 64 | i:032x}",
            f"bench-token-{i}-not-a-secret",
        )
        for i in range(count)
    ]


def run(count: int, per_account: int, interval: float, concurrency: int, tmp: Path) -> Result:
    result = Result(count, per_account, interval, concurrency)
    home = tmp / "accounts"
    home.mkdir()
    recreate(ADMIN_URL, BENCH_DB)
    redis.Redis.from_url(REDIS_URL).flushdb()
    upgrade(PG_URL)
    everyone = customers(count)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(
        OPTRACK_HOME=str(home),
        OPTRACK_DATABASE_URL=PG_URL,
        OPTRACK_BROKER_URL=REDIS_URL,
        OPTRACK_POLL_INTERVAL=str(interval),
        OPTRACK_SECRET_KEY=Fernet.generate_key().decode(),
        TWILIO_ACCOUNT_SID=everyone[0].sid,
        TWILIO_AUTH_TOKEN=everyone[0].token,
        PYTHONUNBUFFERED="1",
    )
    extra = [arg for c in everyone[1:] for arg in ("--account", f"{c.sid}:{c.token}")]
    with ExitStack() as stack:
        base_url = stack.enter_context(sandbox(env, home / "sandbox.log", *extra))
        root = base_url.removesuffix("/v1")
        env["OPTRACK_API_BASE_URL"] = base_url
        sessions = {}
        for c in everyone:
            sessions[c.name] = http = stack.enter_context(requests.Session())
            http.auth = (c.sid, c.token)
        # Ends come after placement and three sweeps with everything active; they spread
        # over eight intervals after that.
        warm = 60 + count * per_account / 2000
        t0 = time.time()
        first_end = t0 + warm + 3 * interval
        ends: dict[str, float] = {}
        owner: dict[str, str] = {}
        for i, c in enumerate(everyone):
            mine = create_operations(
                sessions[c.name],
                root,
                per_account,
                first_end,
                first_end + 8 * interval,
                batch=BATCH,
                seed=i,
            )
            ends.update(mine)
            owner.update(dict.fromkeys(mine, c.name))
        print(f"  {len(ends):,} operations created in {time.time() - t0:.0f}s", file=sys.stderr)
        add_and_track(env, everyone, owner)
        print(
            f"  {count:,} accounts added, all tracked at {time.time() - t0:.0f}s", file=sys.stderr
        )
        workers = workers_and_beat(stack, env, home, concurrency)
        placed = (
            "SELECT count(*) FROM tracked_operations WHERE status = 'PENDING' "
            "OR (group_id IS NULL AND status = 'PROCESSING')"
        )
        wait_until(lambda: scalar(PG_URL, placed) == 0, 1800, "every operation seen and placed")
        steady = time.time()
        result.placement_seconds = steady - t0
        print(f"  all seen and placed after {steady - t0:.0f}s", file=sys.stderr)
        if steady > first_end:
            print("  warning: ends began before placement finished", file=sys.stderr)
        ended = "SELECT count(*) FROM tracked_operations WHERE ended_at IS NOT NULL"
        wait_until(
            lambda: scalar(PG_URL, ended) == len(ends),
            max(ends.values()) - time.time() + 20 * interval + 300,
            "every end to be recorded",
            interval=2.0,
        )
        result.peak_rss_mb = max(peak_rss_mb(w) for w in workers)
        logs = {
            name: http.get(f"{root}/_sandbox/requests", timeout=60).json()["requests"]
            for name, http in sessions.items()
        }
    window_end = min(first_end, steady + 3 * interval)
    result.steady_sweeps = (window_end - steady) / interval
    if result.steady_sweeps > 0.5:
        counts = [
            sum(1 for r in log if steady <= r["t"] < window_end) / result.steady_sweeps
            for log in logs.values()
        ]
        result.requests_per_sweep = sum(counts)
        result.per_account_requests = sorted(counts)
    result.delays, result.missed = end_delays(PG_URL, ends, steady)
    for name in ("w1.log", "w2.log"):
        log = (home / name).read_text()
        result.ticks += [float(m) for m in TICK.findall(log)]
        result.polls += [float(m) for m in POLL.findall(log)]
    return result


def add_and_track(env: dict[str, str], everyone: list[Customer], owner: dict[str, str]) -> None:
    """What `optrack accounts add` and `optrack track --account` do for each account, in one
    process (a thousand CLI starts would take longer than the run)."""
    rt = Runtime(load_settings(env))
    try:
        vault = Vault(rt.settings.secret_keys)
        with rt.sessions.begin() as session:
            store = Accounts(session)
            for c in everyone[1:]:
                store.add(c.name, c.sid, None, vault.seal(c.token), rt.clock.now())
        by_account: dict[str, list[str]] = {}
        for op_id, name in owner.items():
            by_account.setdefault(name, []).append(op_id)
        for name, ids in by_account.items():
            intake.track(rt.sessions, ids, rt.clock.now(), name)
    finally:
        rt.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1000, help="accounts (default 1000)")
    parser.add_argument("--per-account", type=int, default=100, help="operations each (100)")
    parser.add_argument("--interval", type=float, default=30.0, help="poll interval (30 s)")
    parser.add_argument(
        "--concurrency", type=int, default=1, help="pool processes of each of the 2 workers (1)"
    )
    args = parser.parse_args()
    with TemporaryDirectory() as tmp_name:
        r = run(args.accounts, args.per_account, args.interval, args.concurrency, Path(tmp_name))
    drop(ADMIN_URL, BENCH_DB)

    d = r.delays
    minimum = args.accounts * math.ceil(args.per_account / 1000)
    print(f"\n$ python -m bench.accounts {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"{os.cpu_count()} cores; sandbox, beat, 2 workers (concurrency {r.concurrency}), "
        "PostgreSQL + Redis\n"
    )
    print(
        "| accounts x operations | interval | requests/sweep (Σ ⌈active/1000⌉) "
        "| end delay p50 / p95 / max | placed after | tick p50 / max | worker peak RSS |"
    )
    print("|" + "---|" * 7)
    ticks = sorted(r.ticks)
    print(
        f"| {r.accounts:,} x {r.per_account:,} | {r.interval:g} s "
        f"| {r.requests_per_sweep:,.1f} ({minimum:,}) "
        f"| {pct(d, 0.5):.1f} / {pct(d, 0.95):.1f} / {max(d, default=float('nan')):.1f} s "
        f"| {r.placement_seconds:.0f} s "
        f"| {pct(ticks, 0.5):.2f} / {max(ticks, default=float('nan')):.2f} s "
        f"| {r.peak_rss_mb:.0f} MiB |"
    )
    spread = r.per_account_requests
    print(
        f"\n{r.steady_sweeps:.1f} sweeps measured with all active; requests per account per "
        f"sweep: min {min(spread, default=0):.2f}, median "
        f"{statistics.median(spread) if spread else float('nan'):.2f}, "
        f"max {max(spread, default=0):.2f}; "
        f"{len(d):,} ends measured ({r.missed} before placement); "
        f"{sum(1 for x in d if x > r.interval)} over the interval"
    )
    polls = sorted(r.polls)
    print(
        f"{len(polls):,} poll messages, run time p50 {pct(polls, 0.5) * 1000:.0f} ms, "
        f"p95 {pct(polls, 0.95) * 1000:.0f} ms, busy {sum(polls):.0f} s of the workers' time"
    )


if __name__ == "__main__":
    main()
