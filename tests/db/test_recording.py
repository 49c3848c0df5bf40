"""What is recorded (issue 11): stale answers and answers from a fast clock, over the real
sandbox on SQLite and PostgreSQL with the fake clock, and property tests over the rules."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from tests.db.test_tracking import POLICY, make_poller, poll_all, row, tick
from tests.support.services import PG_ADMIN_URL, SID, TOKEN
from worker import health, intake
from worker.account import DbGate
from worker.cli.render import pause_line
from worker.client import ApiClient
from worker.clock import FakeClock
from worker.db import HistoryEntry, PollGroup, make_engine, make_sessionmaker
from worker.operation import Operation, Stats, Status
from worker.poller import Poller
from worker.recorder import Recorder
from worker.repository import Repository
from worker.sandbox import Fault, SandboxServer, SimulatedOperation
from worker.tracking import (
    ENDED_STATES,
    Gone,
    Observed,
    Outcome,
    PollPolicy,
    Stale,
    observe,
)
from worker.tracking import not_found as not_found_decision

OP_ID = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def poller(sessions, make_client, db_gate: DbGate) -> Poller:  # type: ignore[no-untyped-def]
    return make_poller(sessions, make_client(gate=db_gate))


def history(sessions: sessionmaker[Session], op_id: str) -> list[HistoryEntry]:
    with sessions() as session:
        return list(Repository(session).history(op_id))


def assert_true_history(entries: list[HistoryEntry]) -> None:
    """Counts and updatedAt never go back, and no state appears twice."""
    states = [(e.status, e.total, e.queued, e.created, e.failed) for e in entries]
    assert len(set(states)) == len(states), states
    for before, after in pairwise(entries):
        assert after.created >= before.created and after.failed >= before.failed, states
        assert after.remote_updated_at >= before.remote_updated_at


def test_a_same_second_stale_answer_is_not_recorded(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    op = sandbox.add_operation(total=10, duration=10)
    intake.track(sessions, [op.id], clock.now())
    clock.advance(8.5)  # created 8, updatedAt the 8th second
    assert poll_all(poller, tick(sessions, clock)).outcomes[Outcome.CHANGED] == 1
    frozen = clock.now()
    sandbox.simulation.clock = lambda: frozen.timestamp()  # the API's second stands still
    # A lagging replica: the state of 2 s ago (created 6) with the same updatedAt second.
    sandbox.add_fault(Fault("stale", lag=2, match=op.id))
    clock.advance(POLICY.interval.total_seconds())
    counts = poll_all(poller, tick(sessions, clock))
    assert counts.outcomes[Outcome.STALE] == 1 and counts.rows_written == 0
    assert row(sessions, op.id).created == 8
    # The true answer again: nothing new, no second (8, 2) row.
    clock.advance(POLICY.interval.total_seconds())
    assert poll_all(poller, tick(sessions, clock)).outcomes[Outcome.UNCHANGED] == 1
    sandbox.simulation.clock = lambda: clock.now().timestamp()
    clock.advance(POLICY.interval.total_seconds())
    poll_all(poller, tick(sessions, clock))
    entries = history(sessions, op.id)
    assert [e.created for e in entries] == [8, 10]
    assert_true_history(entries)
    assert row(sessions, op.id).status == "COMPLETED"


@pytest.mark.parametrize(
    ("offset", "date_offset"),
    [(30 * 86400, 0.0), (600, 600.0)],
    ids=["30_days_ahead", "10_minutes_fast_node_date_too"],
)
def test_an_updated_at_ahead_of_the_clocks_never_freezes_the_operation(
    sessions,
    sandbox: SandboxServer,
    poller: Poller,
    clock: FakeClock,
    offset: float,
    date_offset: float,
) -> None:  # type: ignore[no-untyped-def]
    op = sandbox.add_operation(total=10, duration=30)
    intake.track(sessions, [op.id], clock.now())
    clock.advance(3.5)
    sandbox.add_fault(
        Fault("future_updated_at", offset=offset, date_offset=date_offset, match=op.id, count=1)
    )
    poll_all(poller, tick(sessions, clock))
    first = row(sessions, op.id)
    assert first.created == 1  # its counts are recorded: they lower nothing
    assert first.remote_updated_at is not None
    assert first.remote_updated_at <= clock.now()  # ... but not its updatedAt
    for _ in range(6):  # every later true answer is recorded, to the end
        clock.advance(POLICY.interval.total_seconds())
        poll_all(poller, tick(sessions, clock))
    final = row(sessions, op.id)
    assert (final.status, final.created) == ("COMPLETED", 10)
    entries = history(sessions, op.id)
    assert len(entries) >= 4
    assert_true_history(entries)
    assert all(e.remote_updated_at <= clock.now() for e in entries)


def test_an_updated_at_within_the_allowance_orders_answers(clock: FakeClock) -> None:
    known = Record.first(clock.now())
    ahead = answer(5, clock.now() + timedelta(seconds=59), served_at=clock.now())
    decided = observe(known, ahead, clock.now(), PollPolicy())
    assert isinstance(decided, Observed) and decided.trusted
    assert decided.updated_at == ahead.updated_at
    tight = PollPolicy(clock_allowance=timedelta(seconds=10))
    decided = observe(known, ahead, clock.now(), tight)
    assert isinstance(decided, Observed) and not decided.trusted
    assert decided.updated_at == known.remote_updated_at


def test_an_end_is_recorded_whatever_its_age(clock: FakeClock) -> None:
    known = replace(Record.first(clock.now()), created=4)
    done = replace(answer(10, clock.now() - timedelta(seconds=30)), status=Status.COMPLETED)
    decided = observe(known, done, clock.now())
    assert isinstance(decided, Observed) and decided.ended
    assert decided.updated_at == known.remote_updated_at  # the key never goes back
    lowered = replace(done, stats=Stats(total=10, queued=0, created=3, failed=7))
    assert isinstance(observe(known, lowered, clock.now()), Stale)


# --- property tests ---------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """A tracked operation's stored state, as the recorder keeps it (``Known``)."""

    id: str
    status: str
    total: int | None
    queued: int | None
    created: int | None
    failed: int | None
    remote_created_at: datetime | None
    remote_updated_at: datetime | None
    consecutive_errors: int = 0
    not_before: datetime | None = None
    version: int = 1
    polls: int = 0
    group_id: int | None = 1
    not_found_since: datetime | None = None

    @classmethod
    def first(cls, at: datetime) -> Record:
        return cls(OP_ID, "PROCESSING", 10, 10, 0, 0, at - timedelta(hours=1), at)

    def applied(self, change: Observed) -> Record:
        s = change.answer.stats
        return replace(
            self,
            status=change.answer.status.value,
            total=s.total,
            queued=s.queued,
            created=s.created,
            failed=s.failed,
            remote_created_at=change.answer.created_at,
            remote_updated_at=change.updated_at,
            version=self.version + 1,
        )


def answer(
    created: int,
    updated_at: datetime,
    failed: int = 0,
    served_at: datetime | None = None,
    total: int = 10,
) -> Operation:
    status = Status.COMPLETED if created + failed == total else Status.PROCESSING
    stats = Stats(total=total, queued=total - created - failed, created=created, failed=failed)
    return Operation(OP_ID, status, stats, T0 - timedelta(hours=1), updated_at, served_at)


@st.composite
def runs(draw: st.DrawFn) -> tuple[list[Operation], list[datetime], Operation]:
    """A true operation's answers over time, some replaced by lagging or fast replicas."""
    total = draw(st.integers(1, 30))
    truth: list[Operation] = []
    at, created, failed = T0, 0, 0
    while created + failed < total:
        left = total - created - failed
        more_created = draw(st.integers(0, left))
        more_failed = draw(st.integers(0, left - more_created))
        if more_created + more_failed == 0 or len(truth) >= 10:
            more_created = left - more_failed
        created, failed = created + more_created, failed + more_failed
        at += timedelta(seconds=draw(st.integers(0, 90)))
        truth.append(answer(created, at, failed, served_at=at, total=total))
    answers: list[Operation] = []
    times: list[datetime] = []
    for index, true in enumerate(truth):
        for _ in range(draw(st.integers(1, 3))):
            shown = true
            kind = draw(st.sampled_from(["true", "lagging", "fast", "fast_date"]))
            if kind == "lagging" and index > 0:  # an older state, today's updatedAt
                old = truth[draw(st.integers(0, index - 1))]
                shown = replace(old, updated_at=true.updated_at, served_at=true.served_at)
            elif kind in ("fast", "fast_date"):
                ahead = timedelta(seconds=draw(st.integers(61, 40 * 86400)))
                served = true.served_at + ahead if kind == "fast_date" else true.served_at
                shown = replace(true, updated_at=true.updated_at + ahead, served_at=served)
            answers.append(shown)
            late = true.updated_at + timedelta(seconds=draw(st.integers(0, 5)))
            times.append(max([late, *times[-1:]]))
    answers.append(truth[-1])  # the API goes on answering its end
    times.append(times[-1] + timedelta(seconds=10))
    return answers, times, truth[-1]


@given(runs())
def test_whatever_replicas_say_the_history_is_true_and_reaches_the_end(
    run: tuple[list[Operation], list[datetime], Operation],
) -> None:
    answers, times, final = run
    record = Record(OP_ID, "PENDING", None, None, None, None, None, None)
    recorded: list[Record] = []
    for shown, now in zip(answers, times, strict=True):
        if record.status in ENDED_STATES:
            break  # an end stops polling
        decided = observe(record, shown, now)
        if isinstance(decided, Stale):
            assert decided.answer is shown
        elif decided is not None:
            record = record.applied(decided)
            if decided.history:
                recorded.append(record)
    # The true end is reached, with the true counts.
    assert (record.status, record.created, record.failed) == (
        final.status.value,
        final.stats.created,
        final.stats.failed,
    )
    states = [(r.status, r.queued, r.created, r.failed) for r in recorded]
    assert len(set(states)) == len(states)  # no state twice
    for before, after in pairwise(recorded):
        assert after.created >= before.created and after.failed >= before.failed  # type: ignore[operator]
        assert after.remote_updated_at >= before.remote_updated_at  # type: ignore[operator]
    # No recorded updatedAt runs ahead of what the clocks allow.
    allowance = PollPolicy().clock_allowance
    assert all(r.remote_updated_at <= times[-1] + allowance for r in recorded)  # type: ignore[operator]


@given(
    st.integers(0, 20),
    st.integers(0, 20),
    st.integers(0, 20),
    st.integers(0, 20),
    st.integers(-5, 5),
)
def test_an_answer_that_lowers_created_or_failed_is_stale_whatever_its_date(
    created: int, failed: int, new_created: int, new_failed: int, shift: int
) -> None:
    known = replace(Record.first(T0), total=40, queued=40 - created - failed)
    known = replace(known, created=created, failed=failed)
    stats = Stats(
        total=40, queued=40 - new_created - new_failed, created=new_created, failed=new_failed
    )
    shown = Operation(
        OP_ID, Status.PROCESSING, stats, T0 - timedelta(hours=1), T0 + timedelta(seconds=shift)
    )
    decided = observe(known, shown, T0 + timedelta(seconds=10))
    if new_created < created or new_failed < failed:
        assert isinstance(decided, Stale) and decided.lowers
    elif shift < 0:
        assert isinstance(decided, Stale) and not decided.lowers
    else:
        assert not isinstance(decided, Stale)


# --- NOT_FOUND only when it is true -----------------------------------------------------


def test_a_new_operation_answering_404_for_its_first_seconds_is_tracked_to_its_end(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    op = sandbox.add_operation(total=4, duration=30, not_found_for=15)  # not replicated yet
    intake.track(sessions, [op.id], clock.now())
    first_404 = clock.now()
    for _ in range(2):  # t=0 and t=10: 404s, well within the grace
        assert poll_all(poller, tick(sessions, clock)).outcomes[Outcome.ERROR] == 1
        state = row(sessions, op.id)
        assert state.status == "PENDING" and state.not_found_since == first_404
        clock.advance(POLICY.interval.total_seconds())
    assert poll_all(poller, tick(sessions, clock)).outcomes[Outcome.CHANGED] == 1
    assert row(sessions, op.id).not_found_since is None  # an answer ends the streak
    for _ in range(3):
        clock.advance(POLICY.interval.total_seconds())
        poll_all(poller, tick(sessions, clock))
    assert row(sessions, op.id).status == "COMPLETED"
    statuses = [r["status"] for r in sandbox.requests_log() if op.id in str(r["path"])]
    assert statuses[:2] == [404, 404] and set(statuses[2:]) == {200}


def test_a_404_streak_ends_tracking_only_once_it_lasts_the_grace(clock: FakeClock) -> None:
    policy = PollPolicy(not_found_grace=timedelta(seconds=60))
    known = replace(Record.first(clock.now()), not_found_since=None)
    first = not_found_decision(known, "HTTP 404", clock.now(), policy)
    assert not isinstance(first, Gone) and first.not_found_since == clock.now()
    assert first.not_before <= clock.now() + policy.interval
    later = replace(known, not_found_since=clock.now())
    assert not isinstance(
        not_found_decision(later, "HTTP 404", clock.now() + timedelta(seconds=59), policy), Gone
    )
    assert isinstance(
        not_found_decision(later, "HTTP 404", clock.now() + timedelta(seconds=60), policy), Gone
    )
    # A grace of zero: the first 404 ends it (the behaviour before the grace).
    zero = PollPolicy(not_found_grace=timedelta(0))
    assert isinstance(not_found_decision(known, "HTTP 404", clock.now(), zero), Gone)


@pytest.mark.parametrize("strategy", ["fetch", "list"])
def test_a_base_url_without_v1_ends_nothing_and_pauses_polling(
    sessions, sandbox: SandboxServer, db_gate: DbGate, clock: FakeClock, strategy: str
) -> None:  # type: ignore[no-untyped-def]
    ops = [sandbox.add_operation(total=4, duration=3600) for _ in range(6)]
    intake.track(sessions, [o.id for o in ops], clock.now())
    # Every route of the root without /v1 answers the API's 20404, fetches included.
    policy = replace(POLICY, strategy=strategy, not_found_grace=timedelta(0), list_threshold=1)
    with ApiClient(sandbox.root_url, SID, TOKEN, gate=db_gate, clock=clock) as client:
        poller = Poller(sessions, client, policy, clock, Recorder(sessions, policy))
        counts = poll_all(poller, tick(sessions, clock, policy=policy))
    # Even with no grace at all, no operation ended or counted an error.
    assert counts.outcomes[Outcome.NOT_FOUND] == 0 and counts.outcomes[Outcome.ERROR] == 0
    assert counts.outcomes[Outcome.DEFERRED] == len(ops)
    for op in ops:
        state = row(sessions, op.id)
        assert (state.status, state.not_found_since, state.consecutive_errors) == (
            "PENDING",
            None,
            0,
        )
    # Shown by `optrack status` and `optrack health`, with the reason.
    pause = db_gate.current()
    assert pause is not None and pause.status_code == 404
    line = pause_line(pause, clock.now())
    assert line is not None and "OPTRACK_API_BASE_URL" in line and "configuration error" in line
    with sessions() as session:
        report = health.check(
            session,
            clock.now(),
            account_sid=SID,
            max_beat_age=timedelta(days=1),
            max_lag=timedelta(days=1),
        )
    assert not report.ok
    assert any("OPTRACK_API_BASE_URL" in p and "no operation ended" in p for p in report.problems)
    # The sweep claims nothing while the configuration error pauses the account.
    paused = db_gate.paused_until(clock.now())
    assert paused is not None and tick(sessions, clock, paused[0], policy=policy) == []
    # The List endpoint was asked once (the probe of a GET group, or the window's page).
    lists = [r for r in sandbox.requests_log() if str(r["path"]) == "/SenderPools/Operations"]
    assert len(lists) == 1


@pytest.mark.parametrize(
    "cut",
    [
        Fault(kind="slow", delay=6),  # past the message's deadline: _OutOfTime
        Fault(kind="status", status=429, retry_after="600"),  # RetryLater
        Fault(kind="status", status=401),  # AuthError
    ],
    ids=["deadline", "429", "401"],
)
def test_404s_of_a_poll_cut_short_before_the_base_url_was_proven_end_nothing(
    sessions, sandbox: SandboxServer, db_gate: DbGate, clock: FakeClock, cut: Fault
) -> None:  # type: ignore[no-untyped-def]
    ops = sorted((sandbox.add_operation(total=4, duration=3600) for _ in range(3)), key=_id)
    intake.track(sessions, [o.id for o in ops], clock.now())
    # The root without /v1 answers 20404 everywhere; no grace: an unproven 404 would end it.
    policy = replace(
        POLICY,
        lease=timedelta(seconds=10),
        request_time=timedelta(seconds=5),
        not_found_grace=timedelta(0),
    )
    if cut.kind == "slow":
        cut.match = ops[0].id  # the first 404 comes back after the message's deadline
    else:
        cut.match = ops[1].id  # the second GET is refused: the poll stops after one 404
    sandbox.add_fault(cut)
    with ApiClient(sandbox.root_url, SID, TOKEN, gate=db_gate, clock=clock) as client:
        poller = Poller(sessions, client, policy, clock, Recorder(sessions, policy))
        counts = poll_all(poller, tick(sessions, clock, policy=policy))
    assert counts.outcomes[Outcome.NOT_FOUND] == 0 and counts.outcomes[Outcome.ERROR] == 0
    assert counts.outcomes[Outcome.DEFERRED] == len(ops)
    for op in ops:
        state = row(sessions, op.id)
        assert (state.status, state.not_found_since, state.consecutive_errors) == (
            "PENDING",
            None,
            0,
        )
    # No List request proved the base URL: the poll stopped before it could ask one.
    paths = [str(r["path"]) for r in sandbox.requests_log()]
    assert paths[0] == f"/SenderPools/Operations/{ops[0].id}"
    assert "/SenderPools/Operations" not in paths


def _id(op: SimulatedOperation) -> str:
    return op.id


def test_a_404_with_the_api_reachable_counts_towards_the_grace(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    gone = "comms_operation_01h9krwprkeee8fzqspvwy6nq9"
    intake.track(sessions, [gone], clock.now())
    counts = poll_all(poller, tick(sessions, clock))
    assert counts.outcomes[Outcome.ERROR] == 1 and counts.outcomes[Outcome.DEFERRED] == 0
    assert row(sessions, gone).not_found_since == clock.now()
    # One List request proved the base URL right (no answer in the message did).
    paths = [str(r["path"]) for r in sandbox.requests_log()]
    assert paths == [f"/v1/SenderPools/Operations/{gone}", "/v1/SenderPools/Operations"]


# --- a database that goes away does not cost API calls -----------------------------------


class LocksOutTheDatabase:
    """A request budget (the client's real hook before each request) that, at the first
    request, stops the test's PostgreSQL database from taking connections."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")

    def allow(self, allowed: bool) -> None:
        with self.engine.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{self.name}" WITH ALLOW_CONNECTIONS {allowed}'))
            if not allowed:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
                    ),
                    {"n": self.name},
                )

    def reserve(self, now: datetime, max_wait: float) -> float:
        self.allow(False)
        return 0.0


class ReopensOnSleep(FakeClock):
    """The fake clock; its second wait (the client's 0 s budget waits aside) lets the database
    take connections again."""

    def __init__(self, start: datetime, lock: LocksOutTheDatabase) -> None:
        super().__init__(start)
        self.lock = lock

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        if len(self.waits) == 2:
            self.lock.allow(True)

    @property
    def waits(self) -> list[float]:
        return [s for s in self.slept if s > 0]


def test_a_write_the_database_cannot_take_is_retried_without_asking_the_api_again(
    pg_url: str, sandbox: SandboxServer, clock: FakeClock
) -> None:
    lock = LocksOutTheDatabase(pg_url.rsplit("/", 1)[1])
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    try:
        op = sandbox.add_operation(total=4, duration=3600)
        intake.track(sessions, [op.id], clock.now())
        retrying = ReopensOnSleep(clock.now(), lock)
        client = ApiClient(sandbox.base_url, SID, TOKEN, clock=retrying, budget=lock)
        with client:
            poller = Poller(sessions, client, POLICY, retrying, Recorder(sessions, POLICY))
            counts = poll_all(poller, tick(sessions, retrying))  # no exception: no task retry
        assert counts.requests == 1 and counts.outcomes[Outcome.CHANGED] == 1
        assert retrying.waits == [1.0, 2.0]  # the write, tried twice more in place
        assert row(sessions, op.id).status == "PROCESSING"
        assert len([r for r in sandbox.requests_log() if op.id in str(r["path"])]) == 1
        with sessions() as session:  # the group's end was written too: its one member, seen
            assert session.scalars(select(PollGroup)).all() == []  # at last, is placed anew
    finally:
        lock.allow(True)
        engine.dispose()
        lock.engine.dispose()
