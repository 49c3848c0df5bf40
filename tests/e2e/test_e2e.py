"""End to end: sandbox, two workers and beat as real processes on Redis (or RabbitMQ) and
PostgreSQL."""

from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote

import pytest
from sqlalchemy import select

from tests.support.processes import (
    Sandbox,
    base_env,
    beat_args,
    celery_process,
    sandbox_process,
    stop,
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
from worker.sweep import START_EARLY

pytestmark = pytest.mark.slow
IN_FLIGHT = 0.1  # a request sent before the pause was recorded cannot be called back
BUDGET = 4  # requests a second, for the budget test
# The shortest time between two sweeps' polls of one group: the interval (1 s) less a tick
# (0.5 s), less a little for the time a request takes to reach the sandbox.
SAME_SWEEP = 0.45


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

    The param: the strategy, then options: ``+2beats`` (a second beat), ``+budget`` (a
    request budget of BUDGET a second), ``+coarse`` (interval 3 s and ticks every 2 s: the
    interval no multiple of the tick), ``@rabbitmq`` (RabbitMQ as the broker, not Redis).
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
    if "+coarse" in param:
        env.update(OPTRACK_POLL_INTERVAL="3", OPTRACK_TICK_INTERVAL="2")
    if "+budget" in param:
        env["OPTRACK_MAX_REQUESTS_PER_SECOND"] = str(BUDGET)
    with ExitStack() as stack, sandbox_process(env, tmp_path / "sandbox.log") as api:
        env["OPTRACK_API_BASE_URL"] = api.base_url
        stack.enter_context(celery_process(worker_args("w1"), env, tmp_path / "w1.log"))
        stack.enter_context(celery_process(worker_args("w2"), env, tmp_path / "w2.log"))
        beats = 2 if "+2beats" in param else 1
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
            # Not retried in place: the next request for it (the same operation, or the same
            # List window) waits for its next poll (>= 1 s).
            same = [r for r in later if (r["path"], r["query"]) == (entry["path"], entry["query"])]
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
        # Polls of one operation are at least the interval less one tick apart (a tick claims
        # what falls due before the next): two beats and two workers never polled it twice in
        # one sweep, which would be milliseconds apart.
        assert not gaps or min(gaps) >= SAME_SWEEP, f"{op_id} polled twice in {min(gaps):.2f}s"
    beat_logs = [(stack.logs / f"beat{n}.log").read_text() for n in (1, 2)]
    assert all("Sending due task optrack-tick" in text for text in beat_logs)


@pytest.mark.parametrize("stack", ["fetch+coarse"], indirect=True)
def test_a_poll_claimed_ahead_starts_at_its_due_time_not_at_the_tick(stack: Stack) -> None:
    # Interval 3 s, ticks every 2 s: a group polled at a tick is due 3 s later, and the tick
    # 2 s later claims it (it falls due before the next tick). Sent at once, its poll would
    # ask a second early, every 2 s; it starts just before its due time instead.
    api = stack.sandbox
    ids = [api.create(total=40, duration=20) for _ in range(4)]
    stack.track(ids)
    wait_for(stack.all_ended, 120, "every operation to end")
    log = api.requests()
    gaps = []
    for op_id in ids:
        times = [r["t"] for r in log if r["path"].endswith(op_id)]
        gaps += [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) >= 16, f"only {len(gaps)} gaps"
    early = 3.0 - START_EARLY.total_seconds() - 0.1  # less a request's own jitter
    assert min(gaps) >= early, f"asked {min(gaps):.2f} s after the last look (interval 3 s)"
    assert statistics.median(gaps) <= 3.0, f"median gap {statistics.median(gaps):.2f} s"


@pytest.mark.parametrize("stack", ["list+2beats"], indirect=True)
def test_two_workers_and_two_beats_never_double_a_change_in_list_windows(stack: Stack) -> None:
    api = stack.sandbox
    ids = [api.create(total=40, duration=8) for _ in range(12)]
    stack.track(ids)
    wait_for(stack.all_ended, 120, "every operation to end")
    log = api.requests()
    for op_id in ids:
        assert_history_is_true(stack, op_id)  # no change recorded twice, none lost
    windows: dict[str, list[float]] = {}
    for entry in log:
        windows.setdefault(entry["query"], []).append(entry["t"])
    for query, times in windows.items():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert not gaps or min(gaps) >= SAME_SWEEP, f"window {query} listed twice in a sweep"


@pytest.mark.parametrize("stack", ["fetch+budget"], indirect=True)
def test_the_request_budget_is_kept_by_both_workers_together(stack: Stack) -> None:
    api = stack.sandbox
    # 30 operations polled every second would be 30 requests a second without a budget.
    ids = [api.create(total=100, duration=120) for _ in range(30)]
    stack.track(ids)
    wait_for(lambda: len(api.requests()) >= 40, 60, "ten seconds of polling")
    times = sorted(r["t"] for r in api.requests())
    # One slot every 1/BUDGET s, shared through the database: in any second (less a little
    # for the time between a slot and its request reaching the sandbox), at most BUDGET.
    busiest = max(sum(1 for t in times if start <= t < start + 0.94) for start in times)
    assert busiest <= BUDGET, f"{busiest} requests within one second"
    for name in ("w1", "w2"):  # both workers spent from the one budget
        assert "succeeded" in (stack.logs / f"{name}.log").read_text()


@pytest.mark.parametrize("stack", ["list"], indirect=True)
def test_one_slow_answer_delays_only_its_own_window(stack: Stack) -> None:
    api = stack.sandbox
    now = time.time()
    old = [api.create(total=100, duration=7200, created_at=now - 3600) for _ in range(6)]
    new = [api.create(total=100, duration=7200) for _ in range(6)]
    stack.track(old + new)

    def windows() -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        for entry in api.requests():
            start = parse_qs(entry["query"]).get("startDate", [""])[0]
            found.setdefault(start, []).append(entry["t"])
        return found

    # The first listing sees all twelve; then each half is a window of its own.
    wait_for(lambda: sum(len(t) >= 3 for t in windows().values()) >= 2, 60, "two windows")
    old_start = min(s for s, t in windows().items() if len(t) >= 3)
    api.fault(kind="slow", delay=12, match=f"startDate={quote(old_start)}")
    wait_for(lambda: api.pending_faults() == [], 30, "the slow answer to begin")
    slow_at = max(windows()[old_start])
    wait_for(lambda: time.time() > slow_at + 8, 20, "eight seconds of the slow answer")
    new_start = max(s for s, t in windows().items() if len(t) >= 3)
    during = [t for t in windows()[new_start] if slow_at < t < slow_at + 8]
    # The other window kept its one-second cadence while the slow answer held a worker.
    assert len(during) >= 5, f"the other window was listed {len(during)} times in 8 s"


def test_track_wait_on_the_embedded_default_returns_within_an_interval_of_the_ends(
    tmp_path: Path,
) -> None:
    # As `make demo` runs it: SQLite, Celery's SQLAlchemy transport, `optrack run`.
    env = base_env(tmp_path, OPTRACK_POLL_INTERVAL="1", OPTRACK_TICK_INTERVAL="1")
    with ExitStack() as stack, sandbox_process(env, tmp_path / "sandbox.log") as api:
        env["OPTRACK_API_BASE_URL"] = api.base_url
        log = (tmp_path / "run.log").open("wb")
        stack.callback(log.close)
        run = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"], env=env, stdout=log, stderr=log
        )
        stack.callback(stop, run)
        started = time.time()
        durations = (6, 9, 12)
        ids = [api.create(total=6, duration=d) for d in durations]
        waited = subprocess.run(
            [sys.executable, "-m", "worker", "track", *ids, "--wait"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        returned = time.time()
    assert waited.returncode == 0, waited.stderr
    assert "all 3 operation(s) ended" in waited.stdout
    # The last true end is at most `started + 12 s`; the wait ends within one interval
    # (1 s) plus one tick (1 s) of it, plus the embedded broker's ~1 s polling.
    assert returned - (started + max(durations)) <= 3.5
