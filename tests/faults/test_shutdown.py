"""Shutdown within seconds: SIGTERM to `optrack run`'s process group, as systemd's default
KillMode=control-group sends it, stops every process of the group within 10 s, and the poll
it interrupted gives its group back, due at once: the next start polls it.

Real processes on both backends: the embedded default (SQLite, Celery's SQLAlchemy transport on
SQLite) and PostgreSQL + a private Redis. A "slow" fault holds a poll open for a minute when
SIGTERM arrives (the SIGKILL case: tests/faults/test_faults_processes.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.support.private_services import private_redis
from tests.support.processes import CELERY, Sandbox, base_env, sandbox_process, wait_for
from worker.db import PollGroup, TrackedOperation, make_engine, make_sessionmaker

pytestmark = [pytest.mark.slow, pytest.mark.faults]
STOP_WITHIN = 10.0  # seconds from SIGTERM until no process of the group is left


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


@contextmanager
def _run(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`optrack run --serve` in a session of its own (its pid is its process group's id)."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", "--serve", "--no-auth"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if _group(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _stop_group(process: subprocess.Popen[bytes]) -> float:
    """SIGTERM to the whole group, as systemd does; the seconds until none of it is left."""
    assert len(_group(process.pid)) >= 4  # main, two pool processes, beat, serve
    started = time.monotonic()
    os.killpg(process.pid, signal.SIGTERM)
    wait_for(
        lambda: process.poll() is not None and not _group(process.pid),
        STOP_WITHIN,
        "every process of the group to exit",
        interval=0.05,
    )
    return time.monotonic() - started


def _victim_group(db_url: str, op_id: str) -> PollGroup:
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as session:
            op = session.scalars(select(TrackedOperation).where(TrackedOperation.id == op_id)).one()
            group = session.get(PollGroup, op.group_id)
            assert group is not None
            return group
    finally:
        engine.dispose()


def _asked_since(api: Sandbox, op_id: str, since: float) -> list[float]:
    return [r["t"] for r in api.requests() if r["path"].endswith("/" + op_id) and r["t"] > since]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql+redis"])
def test_sigterm_to_the_group_stops_run_within_seconds_and_gives_the_claim_back(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    with ExitStack() as exits:
        if backend == "sqlite":
            db_url = f"sqlite:///{tmp_path / 'home' / 'optrack.sqlite'}"
            services: dict[str, str] = {}
        else:
            db_url = request.getfixturevalue("pg_url")
            redis = exits.enter_context(private_redis(tmp_path / "redis"))
            services = {"OPTRACK_DATABASE_URL": db_url, "OPTRACK_BROKER_URL": redis.url()}
        env = base_env(
            tmp_path,
            OPTRACK_POLL_INTERVAL="1",
            OPTRACK_TICK_INTERVAL="0.5",
            OPTRACK_BATCH_SIZE="1",
            OPTRACK_POLL_STRATEGY="fetch",
            # A held claim would keep its group from every poll for two minutes.
            OPTRACK_CLAIM_LEASE="120",
            OPTRACK_HTTP_PORT="0",
            **services,
        )
        api = exits.enter_context(sandbox_process(env, tmp_path / "sandbox.log"))
        env["OPTRACK_API_BASE_URL"] = api.base_url
        ids = [api.create(total=20, duration=60) for _ in range(3)]
        victim = ids[0]
        api.fault(kind="slow", delay=60, match=victim)  # its first poll waits a minute
        subprocess.run(
            [sys.executable, "-m", "worker", "track", *ids], env=env, check=True, timeout=60
        )

        with _run(env, tmp_path / "run1.log") as first:
            wait_for(lambda: api.pending_faults() == [], 60, "the victim's poll to be held")
            took = _stop_group(first)
            stopped_at = datetime.now(UTC)
        print(f"\n{backend}: the group of `optrack run --serve` exited {took:.2f} s after SIGTERM")
        assert took < STOP_WITHIN
        assert first.returncode == 0
        log = (tmp_path / "run1.log").read_text(errors="replace")
        assert "the worker is stopping; given back, due now" in log

        # The interrupted poll gave its group back: no claim, due by the time the stop ended.
        group = _victim_group(db_url, victim)
        assert group.claim_token is None
        due = group.next_due_at
        assert due.replace(tzinfo=due.tzinfo or UTC) <= stopped_at

        # The next start asks for the victim at once, not once the 120 s lease ran out.
        restarted = time.time()
        with _run(env, tmp_path / "run2.log") as second:
            wait_for(
                lambda: _asked_since(api, victim, restarted) != [],
                30,
                "the next start to poll the victim",
            )
            first_poll = min(_asked_since(api, victim, restarted))
            assert first_poll - restarted < 30
            took = _stop_group(second)
        assert took < STOP_WITHIN


def _text(log: Path) -> str:
    return log.read_text(errors="replace")


COMMANDS = {
    "worker": [*CELERY, "worker", "-c", "2", "--loglevel=INFO"],
    "beat": [*CELERY, "beat", "--loglevel=INFO"],
    "serve": [sys.executable, "-m", "worker", "serve", "--no-auth"],
    "run": [sys.executable, "-m", "worker", "run"],
}
READY = {"worker": "ready.", "beat": "beat: Starting", "serve": "dashboard", "run": "ready."}


@pytest.mark.parametrize("target", ["group", "main"])
@pytest.mark.parametrize("backend", ["sqlite", "postgresql+redis"])
def test_sigterm_stops_each_process_kind_within_seconds(
    tmp_path: Path, backend: str, target: str, request: pytest.FixtureRequest
) -> None:
    with ExitStack() as exits:
        if backend == "sqlite":
            services: dict[str, str] = {}
        else:
            redis = exits.enter_context(private_redis(tmp_path / "redis"))
            services = {
                "OPTRACK_DATABASE_URL": request.getfixturevalue("pg_url"),
                "OPTRACK_BROKER_URL": redis.url(),
            }
        env = base_env(tmp_path, OPTRACK_TICK_INTERVAL="0.5", OPTRACK_HTTP_PORT="0", **services)
        subprocess.run([sys.executable, "-m", "worker", "db", "upgrade"], env=env, check=True)
        for kind, command in COMMANDS.items():
            log = tmp_path / f"{kind}.log"
            with log.open("ab") as out:
                process = subprocess.Popen(
                    command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            try:
                wait_for(lambda log=log, kind=kind: READY[kind] in _text(log), 60, kind)
                started = time.monotonic()
                if target == "group":
                    os.killpg(process.pid, signal.SIGTERM)
                else:
                    process.send_signal(signal.SIGTERM)
                wait_for(
                    lambda process=process: process.poll() is not None and not _group(process.pid),
                    STOP_WITHIN,
                    f"every process of `{kind}` to exit",
                    interval=0.05,
                )
                took = time.monotonic() - started
                print(f"\n{backend}: `{kind}` stopped {took:.2f} s after SIGTERM to the {target}")
                assert "Traceback" not in _text(log)
            finally:
                if _group(process.pid):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
