"""The domain on SQLite and PostgreSQL: tracking, placing, claiming, polling, history, errors."""

from __future__ import annotations

import io
import threading
from dataclasses import replace
from datetime import datetime, timedelta
from itertools import pairwise
from types import SimpleNamespace

import pytest
from rich.console import Console
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from tests.db.test_pause import ClockWithNeighbour
from tests.support.services import SID, TOKEN
from worker import intake, sweep
from worker.account import DbGate
from worker.cli.render import status_table
from worker.client import ApiClient
from worker.clock import FakeClock
from worker.db import HistoryEntry, PollGroup, TrackedOperation
from worker.errors import InvalidOperationId
from worker.operation import Operation, Stats, Status
from worker.planning import FETCH, NewGroup
from worker.poller import Poller
from worker.recorder import Recorder
from worker.reports import queries
from worker.repository import GroupClaim, Repository
from worker.sandbox import Fault, SandboxServer
from worker.tracking import Outcome, PollCounts, PollPolicy, Stale, observe

# GETs only: these tests are about one operation at a time (List windows: test_batch.py).
POLICY = PollPolicy(interval=timedelta(seconds=10), lease=timedelta(seconds=60), strategy="fetch")
MISSING = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"


def tick(
    sessions: sessionmaker[Session], clock: FakeClock, paused=None, limit=100, policy=POLICY
) -> list[GroupClaim]:  # type: ignore[no-untyped-def]
    """What beat's tick does: place, claim what is due, 'send' (here: collect) the polls."""
    sent: list[GroupClaim] = []
    sweep.sweep(sessions, clock.now(), policy, limit=limit, paused_until=paused, send=sent.append)
    return sent


def poll_all(poller: Poller, claims: list[GroupClaim]) -> PollCounts:
    total = PollCounts.empty()
    for claim in claims:
        counts = poller.poll(claim.group_id, claim.token)
        for outcome, n in counts.outcomes.items():
            total.add(outcome, n)
        total.requests += counts.requests
        total.rows_written += counts.rows_written
        total.history_rows += counts.history_rows
    return total


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


def group_of(sessions: sessionmaker[Session], op_id: str, clock: FakeClock) -> PollGroup:
    """The operation's poll group, once the sweep placed it."""
    sweep.place(sessions, clock.now(), POLICY)
    with sessions() as session:
        group_id = Repository(session).get(op_id).group_id  # type: ignore[union-attr]
        group = session.get(PollGroup, group_id)
        assert group is not None
        return group


def due_times(sessions: sessionmaker[Session]) -> dict[int, datetime | None]:
    """Each poll group's next due time; None while a poll holds it."""
    with sessions() as session:
        groups = session.scalars(select(PollGroup)).all()
        return {g.id: None if g.claim_token else g.next_due_at for g in groups}


def make_poller(sessions, client, policy: PollPolicy = POLICY) -> Poller:  # type: ignore[no-untyped-def]
    return Poller(sessions, client, policy, client.clock, Recorder(sessions, policy))


@pytest.fixture
def poller(sessions, make_client, db_gate: DbGate) -> Poller:  # type: ignore[no-untyped-def]
    return make_poller(sessions, make_client(gate=db_gate))


def test_track_validates_everything_before_writing(sessions, clock: FakeClock) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidOperationId):
        intake.track(sessions, [MISSING, "not-an-id"], clock.now())
    with sessions() as session:
        assert Repository(session).all() == []
    first = intake.track(sessions, [MISSING, MISSING], clock.now())
    again = intake.track(sessions, [MISSING], clock.now())
    assert first.added == (MISSING,) and first.already_tracked == ()
    assert again.added == () and again.already_tracked == (MISSING,)


def test_poll_records_changes_once_and_ends(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    op = sandbox.add_operation(total=4, duration=100)
    intake.track(sessions, [op.id], clock.now())
    counts = poll_all(poller, tick(sessions, clock))
    assert counts.outcomes[Outcome.CHANGED] == 1 and counts.requests == 1
    assert history_count(sessions, op.id) == 1
    # Seen once, it is placed by its createdAt and asked again one interval later.
    assert tick(sessions, clock) == []
    assert group_of(sessions, op.id, clock).next_due_at == clock.now() + POLICY.interval

    # Same state again (the sandbox's clock stood still): nothing is written at all.
    sandbox_now = clock.now()
    clock.advance(10)
    sandbox.simulation.clock = lambda: sandbox_now.timestamp()
    claims = tick(sessions, clock)
    counts = poll_all(poller, claims)
    assert counts.outcomes[Outcome.UNCHANGED] == 1 and counts.rows_written == 0
    assert history_count(sessions, op.id) == 1
    # ... yet status knows the state was confirmed then.
    assert group_of(sessions, op.id, clock).last_polled_at == clock.now()

    # The redelivered message of that sweep finds its claim gone and does nothing.
    again = poll_all(poller, claims)
    assert again.requests == 0 and sum(again.outcomes.values()) == 0

    # The operation finishes: one more row, tracking ends, nothing is due any more.
    sandbox.simulation.clock = lambda: clock.now().timestamp()
    clock.advance(100)
    counts = poll_all(poller, tick(sessions, clock))
    assert counts.outcomes[Outcome.CHANGED] == 1
    final = row(sessions, op.id)
    assert final.status == "COMPLETED" and final.ended_at is not None
    assert (final.created, final.queued) == (4, 0) and final.group_id is None
    assert history_count(sessions, op.id) == 2
    clock.advance(3600)
    assert tick(sessions, clock) == []


def test_a_tick_never_adds_its_own_period_to_the_interval(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    """Ticks every 2 s; a claimed poll starts 0.3 s after its tick (the broker, a worker).
    Each poll makes its group due one interval after it started, 0.3 s past a tick: claiming
    only what is due then waits for the tick after, 12 s between two requests at interval 10.
    Claiming what falls due before the next tick keeps every gap within the interval, and
    the sandbox's request log shows it."""

    def gaps(policy: PollPolicy) -> list[float]:
        op = sandbox.add_operation(total=100, duration=3600)
        intake.track(sessions, [op.id], clock.now())
        for _ in range(40):  # 80 s of ticks
            claims = tick(sessions, clock, policy=policy)
            clock.advance(0.3)
            poll_all(poller, claims)
            clock.advance(1.7)
        asked = [r["t"] for r in sandbox.requests_log() if op.id in str(r["path"])]
        return [b - a for a, b in pairwise(asked)]

    late = gaps(replace(POLICY, claim_ahead=timedelta(0)))
    assert late and all(gap == pytest.approx(12.0) for gap in late)  # a tick's period added
    kept = gaps(replace(POLICY, claim_ahead=timedelta(seconds=2)))
    assert len(kept) >= 7 and max(kept) == pytest.approx(10.0)


def test_a_just_seen_operation_is_not_asked_again_by_a_group_falling_due_sooner(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    """Two GET groups claimed by one tick; the first is polled, the second's message waits
    (a busy worker). Its first sight places each operation again; a tick placing them then
    must not fill the waiting group, whose poll would ask them again at once. Each is next
    asked one interval (less a tick) after it was seen, by its own group."""
    policy = replace(POLICY, fetch_group=3, claim_ahead=timedelta(seconds=2))
    ops = [sandbox.add_operation(total=100, duration=3600) for _ in range(5)]
    intake.track(sessions, [o.id for o in ops], clock.now())
    first, second = tick(sessions, clock, policy=policy)
    poller.poll(first.group_id, first.token)
    clock.advance(0.3)
    sweep.place(sessions, clock.now(), policy)  # a tick of the other beat
    clock.advance(0.3)
    poller.poll(second.group_id, second.token)  # its worker got to it late
    for _ in range(12):  # ticks every 2 s, for 24 s
        clock.advance(2)
        poll_all(poller, tick(sessions, clock, policy=policy))
    for op in ops:
        asked = [r["t"] for r in sandbox.requests_log() if op.id in str(r["path"])]
        gaps = [b - a for a, b in pairwise(asked)]
        assert len(gaps) >= 2 and min(gaps) >= 8.0, (op.id, gaps)


def test_a_group_backing_off_after_an_error_is_never_claimed_early(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    """A group whose List failed waits its whole backoff (``consecutive_errors``); one
    polled without error is claimed up to a tick before it is due."""
    op = sandbox.add_operation(total=2, duration=3600)
    intake.track(sessions, [op.id], clock.now())
    poll_all(poller, tick(sessions, clock))
    group_id = group_of(sessions, op.id, clock).id
    due = clock.now() + timedelta(seconds=1)
    with sessions.begin() as session:
        session.execute(
            update(PollGroup)
            .where(PollGroup.id == group_id)
            .values(next_due_at=due, consecutive_errors=2)
        )
    assert tick(sessions, clock) == []
    clock.current = due
    assert [c.group_id for c in tick(sessions, clock)] == [group_id]

    with sessions.begin() as session:  # polled fine, due in a second: claimed now
        session.execute(
            update(PollGroup)
            .where(PollGroup.id == group_id)
            .values(
                next_due_at=clock.now() + timedelta(seconds=1),
                consecutive_errors=0,
                claim_token=None,
                claim_expires_at=None,
            )
        )
    assert [c.group_id for c in tick(sessions, clock)] == [group_id]


def test_an_operation_idle_for_an_hour_at_its_first_poll_is_polled_after_one_interval(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    # Queued an hour ago, no sender processed yet: its updatedAt is an hour old.
    hour_ago = clock.now().timestamp() - 3600
    op = sandbox.add_operation(total=3600, duration=7200, created_at=hour_ago)
    sandbox.simulation.clock = lambda: hour_ago + 1.0
    intake.track(sessions, [op.id], clock.now())
    poll_all(poller, tick(sessions, clock))
    assert row(sessions, op.id).remote_updated_at.timestamp() == pytest.approx(hour_ago, abs=1)
    sandbox.simulation.clock = lambda: clock.now().timestamp()  # it starts moving now
    polled = []
    for _ in range(6):
        clock.advance(5)
        if poll_all(poller, tick(sessions, clock)).requests:
            polled.append(clock.now())
    # The default cadence is the interval, whatever the API's updatedAt says.
    first = polled[0] - (clock.now() - timedelta(seconds=30))
    assert first == timedelta(seconds=10) and len(polled) == 3


def test_adaptive_cadence_is_an_opt_in_and_measured_from_our_own_sightings(
    sessions, sandbox: SandboxServer, make_client, db_gate: DbGate, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    adaptive = PollPolicy(
        interval=timedelta(seconds=10),
        max_interval=timedelta(seconds=60),
        lease=timedelta(seconds=60),
        strategy="fetch",
    )
    poller = make_poller(sessions, make_client(gate=db_gate), adaptive)
    op = sandbox.add_operation(total=10, duration=3600)
    frozen = clock.now().timestamp()
    sandbox.simulation.clock = lambda: frozen  # it never moves
    intake.track(sessions, [op.id], clock.now())
    times = []
    for _ in range(40):
        if poll_all(poller, tick(sessions, clock, policy=adaptive)).requests:
            times.append(clock.now())
        clock.advance(5)
    gaps = [(b - a).total_seconds() for a, b in pairwise(times)]
    assert gaps[0] == 10  # seen a change (the first sight) one interval ago
    assert gaps == sorted(gaps) and max(gaps) <= 60 and gaps[-1] > 10


def test_history_constraint_rejects_a_duplicate_row(sessions, clock: FakeClock) -> None:  # type: ignore[no-untyped-def]
    intake.track(sessions, [MISSING], clock.now())
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


def test_concurrent_recorders_of_one_answer_write_one_row(
    sessions, sandbox: SandboxServer, make_client, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    op = sandbox.add_operation(total=4, duration=3600)
    intake.track(sessions, [op.id], clock.now())
    answer = make_client().fetch(op.id)
    recorders = [Recorder(sessions, POLICY) for _ in range(4)]
    barrier = threading.Barrier(len(recorders))
    outcomes: list[Outcome] = []

    def run(recorder: Recorder) -> None:
        barrier.wait()
        outcomes.extend(recorder.record({op.id: answer}, clock.now()).outcomes.values())

    threads = [threading.Thread(target=run, args=(r,)) for r in recorders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert history_count(sessions, op.id) == 1
    assert outcomes.count(Outcome.CHANGED) == 1


def test_two_sweeps_never_claim_the_same_group(sessions, clock: FakeClock) -> None:  # type: ignore[no-untyped-def]
    tracked = [f"comms_operation_0{i:025d}" for i in range(40 * POLICY.fetch_group)]
    intake.track(sessions, tracked, clock.now())
    sweep.place(sessions, clock.now(), POLICY)
    claims: list[list[GroupClaim]] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait()
        claims.append(tick(sessions, clock, limit=15))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [c.group_id for batch in claims for c in batch]
    assert len(claimed) == len(set(claimed)) == 40  # 15 + 15 + 10 + 0


def test_a_broker_refusal_gives_the_unsent_claims_back_at_once(sessions, clock: FakeClock) -> None:  # type: ignore[no-untyped-def]
    tracked = [f"comms_operation_0{i:025d}" for i in range(3 * POLICY.fetch_group)]
    intake.track(sessions, tracked, clock.now())
    sent: list[GroupClaim] = []

    def refuse_the_second(claim: GroupClaim) -> None:
        if sent:
            raise sweep.SendFailed("connection refused")
        sent.append(claim)

    with pytest.raises(sweep.DispatchError) as raised:
        sweep.sweep(
            sessions, clock.now(), POLICY, limit=10, paused_until=None, send=refuse_the_second
        )
    assert raised.value.given_back == 2
    # The two unsent groups are due again now; the sent one stays claimed by its message.
    again = tick(sessions, clock)
    assert len(again) == 2 and sent[0].group_id not in {c.group_id for c in again}


def test_404_ends_tracking_as_not_found(sessions, poller: Poller, clock: FakeClock) -> None:  # type: ignore[no-untyped-def]
    intake.track(sessions, [MISSING], clock.now())
    # 404s for less than the grace (60 s) end nothing: asked again within an interval.
    for _ in range(6):
        counts = poll_all(poller, tick(sessions, clock))
        assert counts.outcomes[Outcome.ERROR] == 1
        assert row(sessions, MISSING).not_found_since is not None
        clock.advance(POLICY.interval.total_seconds())
    counts = poll_all(poller, tick(sessions, clock))
    assert counts.outcomes[Outcome.NOT_FOUND] == 1
    assert row(sessions, MISSING).status == "NOT_FOUND"
    assert history_count(sessions) == 0
    with sessions() as session:  # its group had nobody left and is gone
        assert session.scalar(select(func.count()).select_from(PollGroup)) == 0


def test_500_backs_off_that_operation_only(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    a = sandbox.add_operation(total=2, duration=3600)
    b = sandbox.add_operation(total=2, duration=3600)
    intake.track(sessions, [a.id, b.id], clock.now())
    sandbox.add_fault(Fault(kind="status", status=500, match=a.id, count=3))
    for errors in (1, 2, 3):
        poll_all(poller, tick(sessions, clock))
        state = row(sessions, a.id)
        assert state.consecutive_errors == errors
        assert "ServerError" in (state.last_error or "")
        assert state.not_before is not None
        clock.current = max(state.not_before, group_of(sessions, b.id, clock).next_due_at)
    # 500s were never retried in place: one request per scheduled poll.
    a_requests = [r for r in sandbox.requests_log() if a.id in str(r["path"])]
    assert [r["status"] for r in a_requests] == [500, 500, 500]
    poll_all(poller, tick(sessions, clock))
    assert row(sessions, a.id).consecutive_errors == 0
    assert row(sessions, b.id).consecutive_errors == 0
    # b was polled at its interval all along, whatever a's backoff.
    b_requests = [r for r in sandbox.requests_log() if b.id in str(r["path"])]
    assert len(b_requests) >= 4


def test_throttle_defers_the_group_and_stops_the_next_sweep(
    sessions, sandbox: SandboxServer, poller: Poller, db_gate: DbGate, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = [sandbox.add_operation(total=2, duration=3600) for _ in range(3)]
    intake.track(sessions, [o.id for o in ops], clock.now())
    sandbox.add_fault(Fault(kind="status", status=429, retry_after="60"))
    counts = poll_all(poller, tick(sessions, clock))
    assert counts.outcomes[Outcome.DEFERRED] == 3
    not_before = clock.now() + timedelta(seconds=60)
    with sessions() as session:
        assert session.scalars(select(PollGroup.next_due_at)).all() == [not_before]
    assert len(sandbox.requests_log()) == 1
    paused = db_gate.paused_until(clock.now())
    assert paused is not None and paused[0] == not_before
    # A sweep during the pause claims nothing.
    clock.advance(30)
    assert tick(sessions, clock, paused[0]) == []
    clock.advance(30)
    assert poll_all(poller, tick(sessions, clock)).outcomes[Outcome.CHANGED] == 3


def test_bad_credentials_pause_without_failing_operations(
    sessions, sandbox: SandboxServer, make_client, db_gate: DbGate, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    op = sandbox.add_operation(total=2, duration=3600)
    intake.track(sessions, [op.id], clock.now())
    poller = make_poller(sessions, make_client(gate=db_gate, token="wrong"))
    counts = poll_all(poller, tick(sessions, clock))
    assert counts.outcomes[Outcome.DEFERRED] == 1
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
    intake.track(sessions, [op.id], clock.now())
    sandbox.add_fault(Fault(kind="malformed", variant=variant))
    counts = poll_all(poller, tick(sessions, clock))
    assert counts.outcomes[Outcome.ERROR] == 1
    state = row(sessions, op.id)
    assert state.status == "PENDING" and state.total is None
    assert "SchemaError" in (state.last_error or "")
    assert history_count(sessions) == 0


def test_an_answer_older_than_the_record_does_not_move_stats_back(clock: FakeClock) -> None:
    recorded = SimpleNamespace(
        id=MISSING,
        status="PROCESSING",
        total=10,
        queued=2,
        created=8,
        failed=0,
        polls=3,
        consecutive_errors=0,
        not_before=None,
        version=4,
        group_id=1,
        remote_created_at=clock.now() - timedelta(hours=1),
        remote_updated_at=clock.now(),
    )
    stale = Operation(
        MISSING,
        Status.PROCESSING,
        Stats(total=10, queued=6, created=4, failed=0),
        clock.now() - timedelta(hours=1),
        clock.now() - timedelta(seconds=30),
    )
    decided = observe(recorded, stale, clock.now())
    assert isinstance(decided, Stale) and decided.lowers


def test_upkeep_never_regroups_a_group_a_poll_holds(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = [sandbox.add_operation(total=2, duration=3600) for _ in range(2)]
    answers = [poller.client.fetch(o.id) for o in ops]
    sandbox.clear_requests()
    with sessions.begin() as session:  # seen, in two GET groups small enough to merge
        repo = Repository(session)
        repo.add_seen(answers, clock.now(), POLICY.clock_allowance)
        for op in ops:
            repo.create_group(NewGroup(FETCH, (op.id,)), clock.now())
    with sessions.begin() as session:
        held = Repository(session).claim_due(clock.now(), 10, POLICY.lease)
    # A merge keeps the lower id: the group still held is the one the other is merged into.
    into, other = sorted(held, key=lambda claim: claim.group_id)
    started = clock.now()
    poll_all(poller, [other])  # one poll is done; the other still holds its group
    assert due_times(sessions) == {other.group_id: started + POLICY.interval, into.group_id: None}
    clock.advance(1)  # the two fall due within a tick of each other: they may merge
    sweep.place(sessions, clock.now(), POLICY)
    with sessions() as session:  # no merge moved members from under the running poll
        assert session.get(PollGroup, into.group_id) is not None
    poll_all(poller, [into])
    asked = [r["path"].rsplit("/", 1)[1] for r in sandbox.requests_log()]
    assert sorted(asked) == sorted(o.id for o in ops)  # each asked once
    assert due_times(sessions) == {
        other.group_id: started + POLICY.interval,
        into.group_id: clock.now() + POLICY.interval,
    }
    sweep.place(sessions, clock.now(), POLICY)  # both free now: merged
    # ... and due when the earlier was: a merge delays none of its members.
    assert due_times(sessions) == {into.group_id: started + POLICY.interval}


def test_members_joined_while_a_poll_holds_the_group_are_counted_and_it_never_outgrows_a_batch(
    sessions: sessionmaker[Session], sandbox: SandboxServer, clock: FakeClock
) -> None:
    """A placement during a poll joins its group (a GET group with room is filled whether a
    poll holds it or not); the poll's end must not write back the members it read first."""
    policy = replace(POLICY, fetch_group=3)
    ops = [sandbox.add_operation(total=2, duration=3600) for _ in range(6)]
    intake.track(sessions, [o.id for o in ops[:2]], clock.now())
    with ApiClient(sandbox.base_url, SID, TOKEN, clock=clock) as client:  # seen once
        poll_all(make_poller(sessions, client, policy), tick(sessions, clock, policy=policy))
    clock.advance(policy.interval.total_seconds())
    [claim] = tick(sessions, clock, policy=policy)
    assert group_sizes(sessions) == {claim.group_id: (2, 2)}

    def another_tick_places_more() -> None:  # runs while the poll waits out a short 429
        intake.track(sessions, [ops[2].id], neighbour.now())
        sweep.place(sessions, neighbour.now(), policy)

    neighbour = ClockWithNeighbour(clock.now(), another_tick_places_more)
    sandbox.simulation.clock = lambda: neighbour.now().timestamp()
    sandbox.add_fault(Fault(kind="status", status=429, retry_after="1", match=ops[0].id))
    with ApiClient(sandbox.base_url, SID, TOKEN, clock=neighbour) as client:
        make_poller(sessions, client, policy).poll(claim.group_id, claim.token)
    assert neighbour.during_sleep is None  # the placement ran mid-poll
    assert group_sizes(sessions) == {claim.group_id: (3, 3)}  # (counted, members)

    intake.track(sessions, [o.id for o in ops[3:]], neighbour.now())
    sweep.place(sessions, neighbour.now(), policy)
    sizes = group_sizes(sessions)
    assert all(counted == members <= 3 for counted, members in sizes.values()), sizes
    assert sum(members for _, members in sizes.values()) == 6


def group_sizes(sessions: sessionmaker[Session]) -> dict[int, tuple[int, int]]:
    """Each group's members column and its active members counted."""
    t = TrackedOperation
    with sessions() as session:
        counted = dict(
            session.execute(
                select(t.group_id, func.count()).where(t.group_id.is_not(None)).group_by(t.group_id)
            ).all()
        )
        return {g.id: (g.members, counted.get(g.id, 0)) for g in session.scalars(select(PollGroup))}


def test_a_merge_keeps_the_earlier_due_time_and_the_later_change(
    sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    now = clock.now()
    with sessions.begin() as session:
        repo = Repository(session)
        into, other = (repo.create_group(NewGroup(FETCH, ()), now) for _ in range(2))
        for group_id, due, change in ((into, 19, -3600), (other, 10, -5)):
            session.execute(
                update(PollGroup)
                .where(PollGroup.id == group_id)
                .values(
                    next_due_at=now + timedelta(seconds=due),
                    last_change_at=now + timedelta(seconds=change),
                )
            )
        repo.merge(into, other)
    with sessions() as session:
        [merged] = session.scalars(select(PollGroup)).all()
    assert merged.id == into and merged.next_due_at == now + timedelta(seconds=10)
    assert merged.last_change_at == now - timedelta(seconds=5)


def test_400_backs_off_growing_to_a_ceiling_of_hours_and_shows_in_status(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    """Our request was wrong: 5 min, 10, 20 ... doubling to 6 h, never every five minutes."""
    a = sandbox.add_operation(total=2, duration=10**6)
    b = sandbox.add_operation(total=2, duration=10**6)
    intake.track(sessions, [a.id, b.id], clock.now())
    sandbox.add_fault(Fault(kind="status", status=400, match=a.id, count=9))
    waits = []
    for errors in range(1, 10):
        poll_all(poller, tick(sessions, clock))
        state = row(sessions, a.id)
        assert state.consecutive_errors == errors and state.not_before is not None
        assert (state.last_error or "").startswith("BadRequest: HTTP 400")
        waits.append((state.not_before - clock.now()).total_seconds())
        clock.current = state.not_before
    assert waits == [300, 600, 1200, 2400, 4800, 9600, 19200, 21600, 21600]
    a_requests = [r for r in sandbox.requests_log() if a.id in str(r["path"])]
    assert [r["status"] for r in a_requests] == [400] * 9  # one request per backoff, no more

    with sessions() as session:
        shown = {r.id: r for r in queries.every_operation(session)}
    assert shown[a.id].next_poll_at == row(sessions, a.id).not_before  # status tells when
    out = Console(width=400, file=io.StringIO())
    out.print(status_table([shown[a.id]]))
    text = out.file.getvalue()  # type: ignore[attr-defined]
    assert "BadRequest: HTTP 400" in text and "(9 in a row)" in text

    poll_all(poller, tick(sessions, clock))  # the request is right again: back to normal
    assert row(sessions, a.id).consecutive_errors == 0
    assert row(sessions, b.id).consecutive_errors == 0


# --- a poll cut by its deadline goes on where it stopped ----------------------------------

# A 10 s lease: a message stops asking 5 s after its claim (request_time 5 s).
SLOW = replace(POLICY, lease=timedelta(seconds=10), request_time=timedelta(seconds=5))


def slow_answers(sandbox: SandboxServer, count: int = 500) -> None:
    """Every answer takes 2.5 to 3 s of the fake clock (the sandbox sleeps on it)."""
    for i in range(count):
        sandbox.add_fault(Fault(kind="slow", delay=2.5 + (i % 3) * 0.25))


def asked(sandbox: SandboxServer) -> list[str]:
    """The operations the GETs asked for, in order."""
    return [str(r["path"]).rsplit("/", 1)[1] for r in sandbox.requests_log()]


def seen_in_one_group(
    sessions: sessionmaker[Session], sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> list[str]:
    """Six operations, seen once (quick answers), then in one GET group by their createdAt."""
    ids = sorted(sandbox.add_operation(total=4, duration=3600).id for _ in range(6))
    intake.track(sessions, ids, clock.now())
    poll_all(poller, tick(sessions, clock, policy=SLOW))
    sweep.place(sessions, clock.now(), SLOW)
    assert len({row(sessions, op_id).group_id for op_id in ids}) == 1
    clock.advance(SLOW.interval.total_seconds())
    sandbox.clear_requests()
    return ids


def test_a_poll_cut_by_its_deadline_goes_on_after_the_last_member_it_asked(
    sessions, sandbox: SandboxServer, make_client, db_gate: DbGate, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    poller = make_poller(sessions, make_client(gate=db_gate), SLOW)
    ids = seen_in_one_group(sessions, sandbox, poller, clock)
    slow_answers(sandbox)
    began = clock.now()
    for _ in range(3):  # claimed as a sweep does (its upkeep would split the group: below)
        with sessions.begin() as session:
            [claim] = Repository(session).claim_due(clock.now(), 10, SLOW.lease)
        counts = poller.poll(claim.group_id, claim.token)
        assert counts.requests == 2
    # Each member asked once, in order: each poll went on after the last member asked.
    assert asked(sandbox) == ids
    with sessions() as session:
        group = session.get(PollGroup, claim.group_id)
        assert group is not None
        # The round is over: due one interval after it began, nothing left to go on with.
        assert group.next_due_at == began + SLOW.interval
        assert group.last_polled_at == began
        assert (group.round_started_at, group.resume_after) == (None, None)
        assert group.request_seconds is not None and 2.5 <= group.request_seconds <= 3.0


def test_slow_answers_ask_every_member_within_a_few_polls_and_groups_fit_half_a_lease(
    sessions, sandbox: SandboxServer, make_client, db_gate: DbGate, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    poller = make_poller(sessions, make_client(gate=db_gate), SLOW)
    ids = seen_in_one_group(sessions, sandbox, poller, clock)
    slow_answers(sandbox)
    began = clock.now()
    while clock.now() < began + timedelta(seconds=75):
        poll_all(poller, tick(sessions, clock, policy=SLOW))
        clock.advance(2)  # beat's tick
    times: dict[str, list[float]] = {op_id: [] for op_id in ids}
    for r in sandbox.requests_log():
        times[str(r["path"]).rsplit("/", 1)[1]].append(float(r["t"]) - began.timestamp())
    # Before, the first members were asked over and over and the last ones never. One
    # worker, 2.5-3 s an answer: a round of six takes ~17 s of answers and a few ticks; every
    # member is asked within the first 30 s, then every 30 s at most.
    for op_id in ids:
        asks = times[op_id]
        assert asks and asks[0] <= 30, (op_id, asks)
        assert len(asks) >= 3 and max(b - a for a, b in pairwise(asks)) <= 30, (op_id, asks)
    # The sweep cut the group by what its polls measured: each poll fits half a lease.
    with sessions() as session:
        groups = session.scalars(select(PollGroup)).all()
    half = SLOW.lease.total_seconds() / 2
    assert all(g.members * (g.request_seconds or 0) <= half for g in groups)
    assert sum(g.members for g in groups) == 6
