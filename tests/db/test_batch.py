"""List windows on SQLite and PostgreSQL, against the sandbox: one page refreshes many
operations, every page is news, windows fit the data, writes grow with change."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from urllib.parse import parse_qs

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from worker import discovery, intake, sweep
from worker.account import DbGate
from worker.clock import FakeClock
from worker.db import HistoryEntry, PollGroup, TrackedOperation
from worker.poller import Poller
from worker.recorder import Recorder
from worker.repository import GroupClaim, Repository
from worker.sandbox import Fault, SandboxServer
from worker.sandbox.simulation import SimulatedOperation
from worker.tracking import Outcome, PollCounts, PollPolicy

POLICY = PollPolicy(
    interval=timedelta(seconds=10),
    max_interval=timedelta(seconds=10),
    lease=timedelta(seconds=60),
    list_threshold=5,
    # The first 404 ends tracking: these tests are about pages (the grace: test_recording.py).
    not_found_grace=timedelta(0),
)
MISSING = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"


@pytest.fixture
def poller(sessions, make_client, db_gate: DbGate) -> Poller:  # type: ignore[no-untyped-def]
    client = make_client(gate=db_gate)
    return Poller(sessions, client, POLICY, client.clock, Recorder(sessions, POLICY))


def sweep_and_poll(
    sessions: sessionmaker[Session], poller: Poller, clock: FakeClock, policy: PollPolicy = POLICY
) -> PollCounts:
    """One tick and every poll it dispatched."""
    claims: list[GroupClaim] = []
    sweep.sweep(sessions, clock.now(), policy, limit=10_000, paused_until=None, send=claims.append)
    total = PollCounts.empty()
    for claim in claims:
        counts = poller.poll(claim.group_id, claim.token)
        for outcome, n in counts.outcomes.items():
            total.add(outcome, n)
        total.requests += counts.requests
        total.rows_written += counts.rows_written
        total.history_rows += counts.history_rows
    return total


def api_calls(sandbox: SandboxServer) -> list[str]:
    return [
        "list" if r["path"].endswith("/Operations") else "fetch" for r in sandbox.requests_log()
    ]


def rows(sessions: sessionmaker[Session]) -> dict[str, TrackedOperation]:
    with sessions() as session:
        return {r.id: r for r in session.scalars(select(TrackedOperation))}


def groups(sessions: sessionmaker[Session]) -> list[PollGroup]:
    with sessions() as session:
        return list(session.scalars(select(PollGroup).order_by(PollGroup.id)))


def history_count(sessions: sessionmaker[Session], op_id: str) -> int:
    with sessions() as session:
        stmt = select(func.count()).where(HistoryEntry.operation_id == op_id)
        return int(session.scalar(stmt) or 0)


def created_second(op: SimulatedOperation) -> datetime:
    return datetime.fromtimestamp(op.created_second, UTC)


def settle(sessions: sessionmaker[Session], poller: Poller, clock: FakeClock) -> None:
    """First sight of newly tracked operations, then their placement by createdAt."""
    sweep_and_poll(sessions, poller, clock)
    sweep.place(sessions, clock.now(), POLICY)
    clock.advance(POLICY.interval.total_seconds())


def test_never_seen_operations_are_listed_together_then_windowed_by_created_at(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = sandbox.simulation.add_operations(30, total=10, duration=100)
    intake.track(sessions, [o.id for o in ops], clock.now())
    counts = sweep_and_poll(sessions, poller, clock)
    assert api_calls(sandbox) == ["list"]  # one page over the lookback, not 30 GETs
    assert counts.outcomes[Outcome.CHANGED] == 30 and counts.history_rows == 30
    assert all(r.status == "PROCESSING" and r.total == 10 for r in rows(sessions).values())
    sweep.place(sessions, clock.now(), POLICY)
    [window] = groups(sessions)
    assert window.kind == "list" and window.members == 30
    assert window.start_at == window.end_at == created_second(ops[0])


def test_pages_are_followed(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = sandbox.simulation.add_operations(1001, total=5, duration=40)
    intake.track(sessions, [o.id for o in ops], clock.now())
    settle(sessions, poller, clock)
    sandbox.clear_requests()
    counts = sweep_and_poll(sessions, poller, clock)
    # All created in one second: one window, whose listing takes two pages of 1,000.
    assert api_calls(sandbox) == ["list", "list"]
    assert counts.outcomes[Outcome.CHANGED] == 1001


def test_a_sweep_writes_the_changes_and_one_row_per_group_not_every_operation(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    still = sandbox.simulation.add_operations(200, total=10, duration=100_000)
    moving = sandbox.simulation.add_operations(7, total=10, duration=30)
    intake.track(sessions, [o.id for o in still + moving], clock.now())
    settle(sessions, poller, clock)
    counts = sweep_and_poll(sessions, poller, clock)
    # 200 stood still (confirmed, nothing written), 7 moved: 7 rows and 7 history rows.
    assert counts.outcomes[Outcome.UNCHANGED] == 200
    assert counts.rows_written == counts.history_rows == 7
    assert counts.requests == 1


def test_every_page_is_news_for_operations_the_window_did_not_claim(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    window = sandbox.simulation.add_operations(10, total=10, duration=50)
    intake.track(sessions, [o.id for o in window], clock.now())
    settle(sessions, poller, clock)
    # A newcomer created in the same second, tracked after the window was placed: it waits to
    # be placed, no group has claimed it, yet the window's page shows it.
    newcomer = sandbox.add_operation(total=4, duration=50, created_at=window[0].created_at)
    with sessions.begin() as session:
        Repository(session).add([newcomer.id], clock.now())
    claims: list[GroupClaim] = []
    with sessions.begin() as session:
        claims = Repository(session).claim_due(clock.now(), 10, POLICY.lease)
    [claim] = claims
    counts = poller.poll(claim.group_id, claim.token)
    assert counts.outcomes[Outcome.CHANGED] == 11
    state = rows(sessions)[newcomer.id]
    assert state.status == "PROCESSING" and state.total == 4
    assert history_count(sessions, newcomer.id) == 1
    # The same page read again (another message, or a redelivery) records nothing twice.
    page = poller.client.list_page(
        start_date=created_second(window[0]) - timedelta(seconds=1),
        end_date=created_second(window[0]) + timedelta(seconds=1),
        page_size=1000,
    )
    recorded = poller.recorder.record({op.id: op for op in page.operations}, clock.now())
    assert recorded.rows == 0 and history_count(sessions, newcomer.id) == 1
    assert api_calls(sandbox) == ["list", "list", "list"]  # no GET for the newcomer


def test_an_operation_that_ended_between_sweeps_is_recorded_once_without_a_get(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    quick = sandbox.add_operation(total=1, duration=15)
    slow = [sandbox.add_operation(total=4, duration=1000) for _ in range(5)]
    intake.track(sessions, [quick.id] + [o.id for o in slow], clock.now())
    settle(sessions, poller, clock)
    sweep_and_poll(sessions, poller, clock)
    clock.advance(10)  # `quick` completes within this interval
    sweep_and_poll(sessions, poller, clock)
    final = rows(sessions)[quick.id]
    assert final.status == "COMPLETED" and (final.created, final.queued) == (1, 0)
    assert history_count(sessions, quick.id) == 2  # first sight, then the end
    clock.advance(10)
    sweep_and_poll(sessions, poller, clock)
    assert history_count(sessions, quick.id) == 2
    assert api_calls(sandbox) == ["list"] * 4  # no GET for the operation that ended


def test_sparse_operations_among_many_untracked_cost_gets_not_pages(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    day = 86_400
    now = clock.now().timestamp()
    # 20,000 untracked operations over the last day, and 5 tracked ones spread among them.
    for hour in range(24):
        sandbox.simulation.add_operations(
            833, total=10, duration=10 * day, created_at=now - day + hour * 3600 + 60
        )
    tracked = [
        sandbox.add_operation(total=10, duration=10 * day, created_at=now - day + i * 17_000)
        for i in range(5)
    ]
    # Discovery-like start: their createdAt is known (seen once by GET).
    intake.track(sessions, [o.id for o in tracked], clock.now())
    settle(sessions, poller, clock)
    sandbox.clear_requests()
    for _ in range(3):
        sweep_and_poll(sessions, poller, clock)
        clock.advance(10)
    calls = api_calls(sandbox)
    assert calls.count("list") == 0 and calls.count("fetch") == 15  # 5 GETs a sweep


def test_a_window_that_costs_more_than_its_gets_becomes_a_get_group(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    now = clock.now().timestamp()
    # Five tracked operations within 50 s, and 8,000 untracked ones created among them.
    tracked = [
        sandbox.add_operation(total=10, duration=100_000, created_at=now - 600 + 10 * i)
        for i in range(5)
    ]
    sandbox.simulation.add_operations(8000, total=1, duration=100_000, created_at=now - 575)
    intake.track(sessions, [o.id for o in tracked], clock.now())
    settle(sessions, poller, clock)  # first seen together, then one window
    sandbox.clear_requests()
    sweep_and_poll(sessions, poller, clock)  # the window costs 9 pages for 5 operations
    assert api_calls(sandbox) == ["list"] * 9
    sweep.place(sessions, clock.now(), POLICY)
    assert [g.kind for g in groups(sessions)] == ["fetch"]
    clock.advance(10)
    sandbox.clear_requests()
    sweep_and_poll(sessions, poller, clock)
    assert api_calls(sandbox) == ["fetch"] * 5, sandbox.requests_log()


def test_discovered_operations_keep_their_created_at_and_state(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    day_ago = clock.now().timestamp() - 86_400
    day_old = [
        sandbox.add_operation(total=10, duration=3 * 86_400, created_at=day_ago + i)
        for i in range(6)
    ]
    found = discovery.discover(sessions, poller.client, clock.now(), timedelta(days=7))
    assert set(found.added) == {o.id for o in day_old}
    for op in day_old:
        state = rows(sessions)[op.id]
        assert state.status == "PROCESSING" and state.remote_created_at == created_second(op)
        assert history_count(sessions, op.id) == 1  # discovery's sight is its first step
    sandbox.clear_requests()
    clock.advance(10)
    sweep_and_poll(sessions, poller, clock)
    # Placed by createdAt at once: one page for the six, no GET on their first poll.
    assert api_calls(sandbox) == ["list"]


def test_429_on_a_list_page_pauses_the_account(
    sessions, sandbox: SandboxServer, poller: Poller, db_gate: DbGate, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = sandbox.simulation.add_operations(10, total=4, duration=100)
    intake.track(sessions, [o.id for o in ops], clock.now())
    sandbox.add_fault(Fault(kind="status", status=429, retry_after="60"))
    counts = sweep_and_poll(sessions, poller, clock)
    not_before = clock.now() + timedelta(seconds=60)
    assert counts.outcomes[Outcome.DEFERRED] == 10
    assert [g.next_due_at for g in groups(sessions)] == [not_before]
    paused = db_gate.paused_until(clock.now())
    assert paused is not None and paused[0] == not_before
    assert api_calls(sandbox) == ["list"]
    clock.advance(30)
    assert (
        sweep.sweep(
            sessions, clock.now(), POLICY, limit=100, paused_until=paused[0], send=lambda c: None
        ).claimed
        == 0
    )


def test_a_failed_page_backs_off_its_operations_and_its_window(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = sandbox.simulation.add_operations(6, total=4, duration=100)
    intake.track(sessions, [o.id for o in ops], clock.now())
    sandbox.add_fault(Fault(kind="status", status=500))
    counts = sweep_and_poll(sessions, poller, clock)
    assert counts.outcomes[Outcome.ERROR] == 6
    assert {r.consecutive_errors for r in rows(sessions).values()} == {1}
    assert api_calls(sandbox) == ["list"]  # the 500 was not retried in place
    [window] = groups(sessions)
    assert window.consecutive_errors == 1 and window.next_due_at > clock.now()


def test_operations_the_pages_miss_fall_back_to_one_get(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    recent = sandbox.simulation.add_operations(5, total=4, duration=100)
    old_time = clock.now() - timedelta(days=3)
    old = sandbox.add_operation(total=4, duration=100, created_at=old_time.timestamp())
    ids = [o.id for o in recent] + [old.id, MISSING]
    intake.track(sessions, ids, clock.now())
    counts = sweep_and_poll(sessions, poller, clock)
    assert counts.outcomes[Outcome.NOT_FOUND] == 1
    assert rows(sessions)[old.id].status == "COMPLETED"  # older than the lookback: a GET
    assert sorted(api_calls(sandbox)) == ["fetch", "fetch", "list"]


def test_bad_items_on_a_page_are_skipped_and_their_operations_fetched(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = sandbox.simulation.add_operations(6, total=4, duration=100)
    intake.track(sessions, [o.id for o in ops], clock.now())
    # Every item of the page breaks the schema (a status the API might add one day).
    sandbox.add_fault(Fault(kind="malformed", variant="unknown_status"))
    counts = sweep_and_poll(sessions, poller, clock)
    assert counts.outcomes[Outcome.CHANGED] == 6  # each fetched by GET instead
    assert sorted(api_calls(sandbox)) == ["fetch"] * 6 + ["list"]


def test_a_404_on_a_list_page_ends_nothing(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = sandbox.simulation.add_operations(6, total=4, duration=100)
    intake.track(sessions, [o.id for o in ops], clock.now())
    sandbox.add_fault(Fault(kind="status", status=404))
    counts = sweep_and_poll(sessions, poller, clock)
    # A configuration error (the List endpoint has no 404): the account pauses, nothing fails.
    assert counts.outcomes[Outcome.DEFERRED] == 6 and counts.outcomes[Outcome.ERROR] == 0
    assert {(r.status, r.consecutive_errors) for r in rows(sessions).values()} == {("PENDING", 0)}
    pause = poller.client.gate.current()  # type: ignore[attr-defined]
    assert pause is not None and pause.status_code == 404


def test_a_message_stops_calling_before_its_claim_expires(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = [sandbox.add_operation(total=4, duration=100) for _ in range(3)]
    intake.track(sessions, [o.id for o in ops], clock.now())
    claims: list[GroupClaim] = []
    sweep.sweep(sessions, clock.now(), POLICY, limit=100, paused_until=None, send=claims.append)
    clock.advance(50)  # the lease is 60 s: past its last quarter, nothing more is asked
    [claim] = claims
    counts = poller.poll(claim.group_id, claim.token)
    assert counts.outcomes[Outcome.DEFERRED] == 3
    assert api_calls(sandbox) == []
    # Due again at once, for the next tick, with nothing counted against them.
    again: list[GroupClaim] = []
    sweep.sweep(sessions, clock.now(), POLICY, limit=100, paused_until=None, send=again.append)
    assert [c.group_id for c in again] == [claim.group_id]
    assert {r.consecutive_errors for r in rows(sessions).values()} == {0}


def test_windows_are_cut_at_a_page_and_never_inside_one_second(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    start = clock.now().timestamp() - 3000
    ops = [
        sandbox.add_operation(total=10, duration=100_000, created_at=start + i * 0.5)
        for i in range(2500)
    ]
    intake.track(sessions, [o.id for o in ops], clock.now())
    settle(sessions, poller, clock)
    windows = groups(sessions)
    assert [g.kind for g in windows] == ["list"] * 3
    assert sum(g.members for g in windows) == 2500
    assert all(g.members <= POLICY.list_group + 1 for g in windows)
    for a, b in pairwise(windows):
        assert a.end_at is not None and b.start_at is not None and a.end_at < b.start_at
    sandbox.clear_requests()
    sweep_and_poll(sessions, poller, clock)
    assert api_calls(sandbox) == ["list"] * 3  # ceil(2,500 / 1,000) pages


def test_the_claim_lease_is_a_setting() -> None:
    from worker.errors import ConfigError
    from worker.runtime import Runtime
    from worker.settings import load_settings

    settings = load_settings({"OPTRACK_CLAIM_LEASE": "15", "OPTRACK_REQUEST_DEADLINE": "2.5"})
    assert Runtime(settings).poll_policy.lease == timedelta(seconds=15)
    assert Runtime(load_settings({})).poll_policy.lease == timedelta(seconds=120)
    with pytest.raises(ConfigError, match="OPTRACK_CLAIM_LEASE"):
        load_settings({"OPTRACK_CLAIM_LEASE": "1"})


def test_list_windows_ask_for_no_status_filter(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = sandbox.simulation.add_operations(8, total=4, duration=100)
    intake.track(sessions, [o.id for o in ops], clock.now())
    settle(sessions, poller, clock)
    sweep_and_poll(sessions, poller, clock)
    for entry in sandbox.requests_log():
        query = parse_qs(entry["query"])
        assert "status" not in query and query["pageSize"] == ["1000"]


def test_a_listing_cut_by_its_deadline_goes_on_at_the_page_it_did_not_read(
    sessions, sandbox: SandboxServer, make_client, db_gate: DbGate, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    # A never-seen window over a day: 4,000 untracked operations from 12 h ago, then six
    # tracked now but created after them, on its last page (so the recent window, listed
    # first, shows none of them). Every answer takes 2.5-3 s; a message stops 5 s after its
    # claim.
    policy = replace(POLICY, lease=timedelta(seconds=10), request_time=timedelta(seconds=5))
    sandbox.simulation.add_operations(
        4000, total=10, duration=100_000, created_at=clock.now().timestamp() - 43_200
    )
    new = sandbox.simulation.add_operations(
        6, total=10, duration=100_000, created_at=clock.now().timestamp() - 43_000
    )
    intake.track(sessions, [o.id for o in new], clock.now())
    for i in range(100):
        sandbox.add_fault(Fault(kind="slow", delay=2.5 + (i % 3) * 0.25))
    client = make_client(gate=db_gate)
    poller = Poller(sessions, client, policy, clock, Recorder(sessions, policy))
    ticks = 0
    while any(r.remote_created_at is None for r in rows(sessions).values()) and ticks < 10:
        sweep_and_poll(sessions, poller, clock, policy)
        clock.advance(2)  # beat's tick
        ticks += 1
    # Before, every poll read pages 1 and 2 again and the new operations were never seen.
    assert all(r.remote_created_at is not None for r in rows(sessions).values())
    tokens = [parse_qs(str(r["query"])).get("pageToken", [""])[0] for r in sandbox.requests_log()]
    # The recent window (empty), then the day's five pages, each read once.
    assert tokens[0] == "" and len(tokens[1:]) == 5 and len(set(tokens[1:])) == 5


def test_a_burst_placed_after_its_first_window_was_listed_is_not_cut_at_every_gap(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    # Six batches of 100 operations, each batch in one second, 4 s apart, every one tracked
    # (bench.sweep's burst). The first listing of the first three measures 300 operations
    # over 9 s (33 a second, 100 of them in 3 s), but no untracked one: the 4 s gaps between
    # the batches cost a window nothing, so the last three, seen later, join that window
    # instead of becoming a window each (one List request a sweep, not four).
    start = clock.now().timestamp()
    batches = [
        sandbox.simulation.add_operations(
            100, total=10, duration=100_000, created_at=start - 40 + 4 * i
        )
        for i in range(6)
    ]
    intake.track(sessions, [o.id for b in batches[:3] for o in b], clock.now())
    settle(sessions, poller, clock)
    sweep_and_poll(sessions, poller, clock)  # the window of 300 is listed: density known
    [window] = groups(sessions)
    assert window.listed == 300 and window.members == 300
    clock.advance(30)
    intake.track(sessions, [o.id for b in batches[3:] for o in b], clock.now())
    settle(sessions, poller, clock)  # seen by their own first listing, then placed
    assert [(g.kind, g.members) for g in groups(sessions)] == [("list", 600)]
    sandbox.clear_requests()
    clock.advance(10)
    sweep_and_poll(sessions, poller, clock)
    assert api_calls(sandbox) == ["list"]
