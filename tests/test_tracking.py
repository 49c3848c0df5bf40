"""The domain on SQLite and PostgreSQL: tracking, claiming, polling, history, errors."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from worker import tracking
from worker.clock import FakeClock
from worker.db import HistoryEntry, TrackedOperation
from worker.errors import InvalidOperationId
from worker.poller import Poller
from worker.repository import DbGate, Repository
from worker.sandbox import Fault, SandboxServer
from worker.tracking import Outcome, PollPolicy, Sweep

POLICY = PollPolicy(interval=timedelta(seconds=10), lease=timedelta(seconds=60))
MISSING = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"


def due(sessions: sessionmaker[Session], clock: FakeClock, paused=None, limit=100) -> Sweep:  # type: ignore[no-untyped-def]
    """Claim what is due now, as beat's tick does, one GET per operation."""
    return tracking.sweep(sessions, clock.now(), limit, POLICY, paused, configured="fetch")


def ids(sweep: Sweep) -> tuple[str, ...]:
    return sweep.operation_ids


def history_count(sessions: sessionmaker[Session], op_id: str | None = None) -> int:
    with sessions() as session:
        stmt = select(func.count()).select_from(HistoryEntry)
        if op_id:
            stmt = stmt.where(HistoryEntry.operation_id == op_id)
        return int(session.scalar(stmt) or 0)


def row(sessions: sessionmaker[Session], op_id: str) -> TrackedOperation:
    with sessions() as session:
        found = Repository(session).get(op_id)
        assert found is not None
        return found


@pytest.fixture
def poller(sessions, make_client, db_gate: DbGate) -> Poller:  # type: ignore[no-untyped-def]
    return Poller(sessions, make_client(gate=db_gate), POLICY)


def test_track_validates_everything_before_writing(sessions, clock: FakeClock) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidOperationId):
        tracking.track(sessions, [MISSING, "not-an-id"], clock.now())
    with sessions() as session:
        assert Repository(session).all() == []
    first = tracking.track(sessions, [MISSING, MISSING], clock.now())
    again = tracking.track(sessions, [MISSING], clock.now())
    assert first.added == (MISSING,) and first.already_tracked == ()
    assert again.added == () and again.already_tracked == (MISSING,)


def test_poll_records_changes_once_and_ends(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    op = sandbox.add_operation(total=4, duration=100)
    tracking.track(sessions, [op.id], clock.now())
    claim = due(sessions, clock)
    assert ids(claim) == (op.id,)
    [report] = poller.poll(ids(claim), claim.token)
    assert report.outcome is Outcome.CHANGED
    assert report.next_poll_at == clock.now() + POLICY.interval
    assert history_count(sessions, op.id) == 1

    # Same state again (the sandbox's clock stood still): the schedule moves, no history row.
    sandbox_now = clock.now()
    clock.advance(10)
    sandbox.simulation.clock = lambda: sandbox_now.timestamp()
    claim = due(sessions, clock)
    [report] = poller.poll(ids(claim), claim.token)
    assert report.outcome is Outcome.UNCHANGED
    assert history_count(sessions, op.id) == 1

    # The redelivered message of that sweep finds its claim gone and does nothing.
    [again] = poller.poll(ids(claim), claim.token)
    assert again.outcome is Outcome.SKIPPED

    # The operation finishes: one more row, tracking ends, nothing is due any more.
    sandbox.simulation.clock = lambda: clock.now().timestamp()
    clock.advance(100)
    claim = due(sessions, clock)
    [report] = poller.poll(ids(claim), claim.token)
    assert report.outcome is Outcome.CHANGED
    final = row(sessions, op.id)
    assert final.status == "COMPLETED" and final.ended_at is not None
    assert (final.created, final.queued) == (4, 0)
    assert history_count(sessions, op.id) == 2
    clock.advance(3600)
    assert due(sessions, clock).chunks == ()


def test_history_constraint_rejects_a_duplicate_row(sessions, clock: FakeClock) -> None:  # type: ignore[no-untyped-def]
    tracking.track(sessions, [MISSING], clock.now())
    entry = {
        "operation_id": MISSING,
        "seq": 2,
        "observed_at": clock.now(),
        "remote_updated_at": clock.now(),
        "status": "PROCESSING",
        "total": 1,
        "queued": 1,
        "created": 0,
        "failed": 0,
    }
    with sessions.begin() as session:
        session.add(HistoryEntry(**entry))
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(HistoryEntry(**entry))
    assert history_count(sessions) == 1


def test_concurrent_polls_of_one_operation_write_one_row(
    sessions, sandbox: SandboxServer, make_client, db_gate: DbGate, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    op = sandbox.add_operation(total=4, duration=3600)
    tracking.track(sessions, [op.id], clock.now())
    pollers = [Poller(sessions, make_client(gate=db_gate), POLICY) for _ in range(4)]
    barrier = threading.Barrier(len(pollers))
    outcomes: list[Outcome] = []

    def run(p: Poller) -> None:
        barrier.wait()
        outcomes.extend(r.outcome for r in p.poll([op.id], None))

    threads = [threading.Thread(target=run, args=(p,)) for p in pollers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert history_count(sessions, op.id) == 1
    assert outcomes.count(Outcome.CHANGED) == 1


def test_two_sweeps_never_claim_the_same_operation(sessions, clock: FakeClock) -> None:  # type: ignore[no-untyped-def]
    tracked = [f"comms_operation_0{i:025d}" for i in range(40)]
    tracking.track(sessions, tracked, clock.now())
    claims: list[tuple[str, ...]] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait()
        claims.append(ids(due(sessions, clock, limit=15)))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [i for c in claims for i in c]
    assert len(claimed) == len(set(claimed)) == 40  # 15 + 15 + 10 + 0


def test_404_ends_tracking_as_not_found(sessions, poller: Poller, clock: FakeClock) -> None:  # type: ignore[no-untyped-def]
    tracking.track(sessions, [MISSING], clock.now())
    [report] = poller.poll([MISSING], None)
    assert report.outcome is Outcome.NOT_FOUND
    assert row(sessions, MISSING).status == "NOT_FOUND"
    assert history_count(sessions) == 0


def test_500_backs_off_that_operation_only(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    a = sandbox.add_operation(total=2, duration=3600)
    b = sandbox.add_operation(total=2, duration=3600)
    tracking.track(sessions, [a.id, b.id], clock.now())
    sandbox.add_fault(Fault(kind="status", status=500, match=a.id, count=3))
    for errors in (1, 2, 3):
        claim = due(sessions, clock)
        reports = {r.operation_id: r for r in poller.poll(ids(claim), claim.token)}
        if a.id in reports:
            assert reports[a.id].outcome is Outcome.ERROR
        state = row(sessions, a.id)
        assert state.consecutive_errors == errors
        assert "ServerError" in (state.last_error or "")
        clock.current = state.next_poll_at
    # 500s were never retried in place: one request per scheduled poll.
    a_requests = [r for r in sandbox.requests_log() if a.id in str(r["path"])]
    assert [r["status"] for r in a_requests] == [500, 500, 500]
    claim = due(sessions, clock)
    poller.poll(ids(claim), claim.token)
    assert row(sessions, a.id).consecutive_errors == 0
    assert row(sessions, b.id).consecutive_errors == 0


def test_throttle_defers_the_whole_sweep_and_stops_the_next(
    sessions, sandbox: SandboxServer, poller: Poller, db_gate: DbGate, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = [sandbox.add_operation(total=2, duration=3600) for _ in range(3)]
    tracking.track(sessions, [o.id for o in ops], clock.now())
    sandbox.add_fault(Fault(kind="status", status=429, retry_after="60"))
    claim = due(sessions, clock)
    reports = poller.poll(ids(claim), claim.token)
    assert {r.outcome for r in reports} == {Outcome.DEFERRED}
    not_before = clock.now() + timedelta(seconds=60)
    for o in ops:
        assert row(sessions, o.id).next_poll_at == not_before
    assert len(sandbox.requests_log()) == 1
    paused = db_gate.paused_until(clock.now())
    assert paused is not None and paused[0] == not_before
    # A sweep during the pause claims nothing.
    clock.advance(30)
    assert due(sessions, clock, paused[0]).chunks == ()
    clock.advance(30)
    claim = due(sessions, clock)
    assert len(ids(claim)) == 3


def test_bad_credentials_pause_without_failing_operations(
    sessions, sandbox: SandboxServer, make_client, db_gate: DbGate, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    op = sandbox.add_operation(total=2, duration=3600)
    tracking.track(sessions, [op.id], clock.now())
    poller = Poller(sessions, make_client(gate=db_gate, token="wrong"), POLICY)
    [report] = poller.poll([op.id], None)
    assert report.outcome is Outcome.DEFERRED
    state = row(sessions, op.id)
    assert state.status == "PENDING" and state.consecutive_errors == 0
    pause = db_gate.current()
    assert pause is not None and pause.status_code == 401
    assert "credentials rejected" in pause.reason


@pytest.mark.parametrize("variant", ["not_json", "negative_count", "wrong_id", "bad_date"])
def test_malformed_answers_are_not_stored(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock, variant: str
) -> None:  # type: ignore[no-untyped-def]
    op = sandbox.add_operation(total=2, duration=3600)
    tracking.track(sessions, [op.id], clock.now())
    sandbox.add_fault(Fault(kind="malformed", variant=variant))
    [report] = poller.poll([op.id], None)
    assert report.outcome is Outcome.ERROR
    state = row(sessions, op.id)
    assert state.status == "PENDING" and state.total is None
    assert "SchemaError" in (state.last_error or "")
    assert history_count(sessions) == 0


def test_an_answer_older_than_the_record_does_not_move_stats_back(clock: FakeClock) -> None:
    from types import SimpleNamespace

    from worker.operation import Operation, Stats, Status

    recorded = SimpleNamespace(
        id=MISSING,
        status="PROCESSING",
        total=10,
        queued=2,
        created=8,
        failed=0,
        polls=3,
        consecutive_errors=0,
        version=4,
        remote_updated_at=clock.now(),
    )
    stale = Operation(
        MISSING,
        Status.PROCESSING,
        Stats(total=10, queued=6, created=4, failed=0),
        clock.now() - timedelta(hours=1),
        clock.now() - timedelta(seconds=30),
    )
    values, history = tracking.observation(recorded, stale, clock.now(), POLICY)
    assert history is None
    assert "created" not in values and values["polls"] == 4
