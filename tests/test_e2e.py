"""End to end: sandbox, two workers and beat as real processes on Redis (or RabbitMQ) and
PostgreSQL."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.processes import (
    Sandbox,
    base_env,
    beat_args,
    celery_process,
    sandbox_process,
    wait_for,
    worker_args,
)
from worker.db import (
    AccountPause,
    HistoryEntry,
    TrackedOperation,
    make_engine,
    make_sessionmaker,
)

pytestmark = pytest.mark.slow
IN_FLIGHT = 0.1  # a request sent before the pause was recorded cannot be called back


@dataclass
class Stack:
    sandbox: Sandbox
    env: dict[str, str]
    db_url: str
    logs: Path

    def track(self, ids: list[str]) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "worker", "track", *ids],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr

    def rows(self) -> list[TrackedOperation]:
        engine = make_engine(self.db_url)
        with make_sessionmaker(engine)() as session:
            rows = list(session.scalars(select(TrackedOperation).order_by(TrackedOperation.id)))
        engine.dispose()
        return rows

    def history(self, op_id: str) -> list[HistoryEntry]:
        engine = make_engine(self.db_url)
        with make_sessionmaker(engine)() as session:
            stmt = select(HistoryEntry).where(HistoryEntry.operation_id == op_id)
            entries = list(session.scalars(stmt.order_by(HistoryEntry.seq)))
        engine.dispose()
        return entries

    def pause(self) -> AccountPause:
        engine = make_engine(self.db_url)
        with make_sessionmaker(engine)() as session:
            pause = session.scalars(select(AccountPause)).one()
        engine.dispose()
        return pause

    def all_ended(self) -> bool:
        rows = self.rows()
        return bool(rows) and all(row.ended for row in rows)


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str) -> Iterator[Stack]:
    """Sandbox + beat + two worker processes, polling every second.

    The param: the strategy, ``+2beats`` for a second beat, ``@rabbitmq`` for RabbitMQ as the
    broker instead of Redis.
    """
    param = getattr(request, "param", "auto")
    broker = "rabbitmq_url" if "@rabbitmq" in param else "redis_url"
    env = base_env(
        tmp_path,
        OPTRACK_POLL_STRATEGY=param.split("+")[0].split("@")[0],
        OPTRACK_DATABASE_URL=pg_url,
        OPTRACK_BROKER_URL=str(request.getfixturevalue(broker)),
        OPTRACK_POLL_INTERVAL="1",
        OPTRACK_TICK_INTERVAL="0.5",
        OPTRACK_BATCH_SIZE="5",
    )
    with ExitStack() as stack, sandbox_process(env, tmp_path / "sandbox.log") as api:
        env["OPTRACK_API_BASE_URL"] = api.base_url
        stack.enter_context(celery_process(worker_args("w1"), env, tmp_path / "w1.log"))
        stack.enter_context(celery_process(worker_args("w2"), env, tmp_path / "w2.log"))
        beats = 2 if getattr(request, "param", "").endswith("+2beats") else 1
        for n in range(1, beats + 1):  # a second beat is a mistake optrack must survive
            schedule = tmp_path / f"schedule{n}"
            stack.enter_context(celery_process(beat_args(schedule), env, tmp_path / f"beat{n}.log"))
        yield Stack(api, env, pg_url, tmp_path)


def assert_history_is_true(stack: Stack, op_id: str) -> None:
    """Final state equals the API's; history has one row per change and ends in it."""
    row = next(r for r in stack.rows() if r.id == op_id)
    final = stack.sandbox.http.get(
        f"{stack.sandbox.base_url}/SenderPools/Operations/{op_id}", timeout=5
    ).json()
    assert row.status == final["status"]
    assert (row.total, row.queued, row.created, row.failed) == tuple(
        final["stats"][k] for k in ("total", "queued", "created", "failed")
    )
    entries = stack.history(op_id)
    states = [(e.status, e.total, e.queued, e.created, e.failed) for e in entries]
    assert len(states) == len(set(states)), "a change was recorded twice"
    assert all(a.seq < b.seq for a, b in itertools.pairwise(entries))
    assert all(
        a.created <= b.created and a.failed <= b.failed for a, b in itertools.pairwise(entries)
    )
    assert states[-1] == (row.status, row.total, row.queued, row.created, row.failed)
    assert all(s[0] == "PROCESSING" for s in states[:-1])


@pytest.mark.parametrize("stack", ["fetch", "list", "list@rabbitmq"], indirect=True)
def test_tracks_to_the_end_through_429s_and_500s(stack: Stack) -> None:
    api = stack.sandbox
    ids = [
        api.create(total=12, duration=6, fail_ratio=0.25),
        api.create(total=20, duration=8),
        api.create(total=10, duration=7, outcome="CANCELED"),
        api.create(total=8, duration=5),
        api.create(total=9, duration=9, fail_ratio=0.5),
        api.create(total=3, duration=4, outcome="CANCELED", cancel_at=0.34),
    ]
    victim = ids[1]
    api.fault(kind="status", status=429, retry_after="2")
    # A 500 on the victim's GET (fetch) or on a List page (list): either way, not retried.
    api.fault(kind="status", status=500, match=victim, count=2)
    api.fault(kind="status", status=500, match="/Operations", count=1)
    api.fault(kind="status", status=503, retry_after="2", retry_after_form="date")
    stack.track(ids)
    wait_for(stack.all_ended, 120, "every operation to end")
    log = api.requests()
    api.clear_faults()  # a fault left unconsumed must not hit the checks below

    for op_id in ids:
        assert_history_is_true(stack, op_id)
    statuses = {row.id: row.status for row in stack.rows()}
    expected = ["COMPLETED", "COMPLETED", "CANCELED", "COMPLETED", "COMPLETED", "CANCELED"]
    assert [statuses[i] for i in ids] == expected

    by_status = [r["status"] for r in log]
    assert 500 in by_status and 429 in by_status and 503 in by_status
    for i, entry in enumerate(log):
        later = log[i + 1 :]
        if entry["status"] == 500:
            # Not retried in place: the next request for it waits for its next poll (>= 1 s).
            same = [r for r in later if r["path"] == entry["path"]]
            assert same and same[0]["t"] - entry["t"] >= 1.0
        if entry["status"] in (429, 503):
            # "2" seconds; the HTTP-date form has whole seconds, so at least 1 s is promised.
            pause = 2.0 if entry["status"] == 429 else 1.0
            early = [r for r in later if IN_FLIGHT < r["t"] - entry["t"] < pause - 0.05]
            assert early == [], f"requests during the pause after {entry['status']}"


@pytest.mark.parametrize("stack", ["fetch"], indirect=True)
def test_429_retry_after_3_silences_both_workers(stack: Stack) -> None:
    api = stack.sandbox
    ids = [api.create(total=30, duration=25) for _ in range(10)]
    stack.track(ids)
    wait_for(lambda: len(api.requests()) >= 20, 60, "polling to be under way")
    api.fault(kind="status", status=429, retry_after="3")
    wait_for(lambda: any(r["status"] == 429 for r in api.requests()), 30, "the 429")
    t429 = next(r["t"] for r in api.requests() if r["status"] == 429)
    wait_for(lambda: api.requests()[-1]["t"] > t429 + 3.5, 30, "polling to resume")
    pause = stack.pause()
    assert pause.status_code == 429
    assert pause.paused_until.timestamp() >= t429 + 3.0
    # The moment the pause was recorded; requests sent before it were already in flight.
    recorded = pause.updated_at.timestamp() + IN_FLIGHT
    assert recorded - t429 < 1.0, "the pause was recorded late"
    after = [r for r in api.requests() if r["t"] > t429]
    silenced = [r for r in after if recorded < r["t"] < t429 + 3.0]
    assert silenced == [], f"{len(silenced)} request(s) during the 3 s pause"
    resumed = [r for r in after if r["t"] - t429 >= 3.0]
    assert resumed, "polling never resumed"
    # Both workers polled before and after: the pause really was shared.
    for name in ("w1", "w2"):
        assert "polled comms_operation_" in (stack.logs / f"{name}.log").read_text()


@pytest.mark.parametrize("stack", ["fetch+2beats"], indirect=True)
def test_two_workers_and_two_beats_never_poll_one_operation_twice_in_a_sweep(
    stack: Stack,
) -> None:
    api = stack.sandbox
    ids = [api.create(total=40, duration=8) for _ in range(8)]
    stack.track(ids)
    wait_for(stack.all_ended, 120, "every operation to end")
    log = api.requests()
    api.clear_faults()
    for op_id in ids:
        assert_history_is_true(stack, op_id)
        times = [r["t"] for r in log if r["path"].endswith(op_id)]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # Polls of one operation are at least one poll interval (1 s) apart: two beats and
        # two workers never polled it twice in one sweep.
        assert min(gaps) >= 0.95, f"{op_id} polled twice within {min(gaps):.2f}s"
    beat_logs = [(stack.logs / f"beat{n}.log").read_text() for n in (1, 2)]
    assert all("Sending due task optrack-tick" in text for text in beat_logs)
