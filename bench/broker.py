"""Benchmark: messages a second through a worker on the embedded broker, kombu's transport
against optrack's (``worker.broker``).

    .venv/bin/python -m bench.broker                  # 500 messages, both transports
    .venv/bin/python -m bench.broker -n 2000 --concurrency 4

Each run publishes N messages of a task that does nothing but count itself (a byte appended
to a file) onto a fresh SQLite broker file, then starts ``celery -A bench.broker worker``
(prefork, optrack's Celery settings: JSON, late acks, prefetch 1) and times the messages from
the first one run to the last: the broker's rate, not the publisher's or the start-up's. It
prints messages a second and the rows the broker table holds at the end (kombu's transport
keeps one taken row per message done).
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from celery import Celery

from worker.celery_app import celery_config
from worker.settings import load_settings

TRANSPORTS = ("kombu", "optrack")
WORKER = [sys.executable, "-m", "celery", "-A", "bench.broker", "worker", "--loglevel=WARNING"]
WORKER += ["--without-gossip", "--without-mingle", "--without-heartbeat"]


def bench_config() -> dict[str, Any]:
    """optrack's Celery settings on the broker named by the environment, without beat; with
    ``BENCH_TRANSPORT=kombu`` on kombu's own SQLAlchemy transport."""
    settings = load_settings()
    config = celery_config(settings)
    config.pop("beat_schedule", None)
    config["task_soft_time_limit"] = config["task_time_limit"] = None
    if os.environ.get("BENCH_TRANSPORT") == "kombu":
        config["broker_url"] = settings.broker_url
        config.pop("broker_transport", None)
        config.pop("broker_transport_options", None)
    return config


app = Celery("bench-broker", set_as_current=False)


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(bench_config())


@app.task(name="bench.count")
def count() -> None:
    """Append one byte to the counter file (O_APPEND: one write, whole, per message)."""
    fd = os.open(os.environ["BENCH_COUNTER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)


def counted(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def wait_count(path: Path, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while counted(path) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {counted(path)} of {n} messages ran")
        time.sleep(0.01)


def run(transport: str, n: int, concurrency: int) -> tuple[float, int]:
    """(messages a second, rows left in the broker's message table)."""
    with TemporaryDirectory(prefix="optrack-bench-broker-") as tmp:
        home = Path(tmp)
        counter = home / "count"
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPTRACK_")}
        env.update(
            OPTRACK_HOME=str(home),
            OPTRACK_BROKER_URL=f"sqla+sqlite:///{home / 'broker.sqlite'}",
            OPTRACK_DATABASE_URL=f"sqlite:///{home / 'optrack.sqlite'}",
            BENCH_TRANSPORT=transport,
            BENCH_COUNTER=str(counter),
        )
        os.environ.update(env)
        sender = Celery("bench-sender", set_as_current=False)
        sender.conf.update(bench_config())
        for _ in range(n):
            sender.send_task("bench.count")
        sender.close()
        with (home / "worker.log").open("w") as log:
            worker = subprocess.Popen(
                [*WORKER, f"--concurrency={concurrency}"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_count(counter, 1, 120)
            start = time.monotonic()
            wait_count(counter, n, 600)
            elapsed = time.monotonic() - start
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
        db = sqlite3.connect(home / "broker.sqlite")
        (left,) = db.execute("SELECT count(*) FROM kombu_message").fetchone()
        db.close()
    return (n - 1) / elapsed, int(left)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=500, help="messages per run")
    parser.add_argument("--concurrency", type=int, default=2, help="worker pool processes")
    parser.add_argument("--transport", choices=TRANSPORTS, action="append")
    args = parser.parse_args(argv)
    print("| transport | messages | concurrency | messages/s | rows left |")
    print("|---|---:|---:|---:|---:|")
    for transport in args.transport or TRANSPORTS:
        rate, left = run(transport, args.n, args.concurrency)
        print(f"| {transport} | {args.n} | {args.concurrency} | {rate:.1f} | {left} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
