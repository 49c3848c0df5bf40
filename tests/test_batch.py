"""Batch polling through List pages, on SQLite and PostgreSQL, against the sandbox."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from worker import tracking
from worker.clock import FakeClock
from worker.db import HistoryEntry, TrackedOperation
from worker.poller import Poller
from worker.repository import Claim, DbGate
from worker.sandbox import Fault, SandboxServer
from worker.tracking import Outcome, PollPolicy, Strategy

POLICY = PollPolicy(
    interval=timedelta(seconds=10),
    max_interval=timedelta(seconds=10),
    lease=timedelta(seconds=60),
    list_threshold=5,
)
MISSING = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"


@pytest.fixture
def poller(sessions, make_client, db_gate: DbGate) -> Poller:  # type: ignore[no-untyped-def]
    return Poller(sessions, make_client(gate=db_gate), POLICY)


def sweep_and_poll(sessions, poller: Poller, clock: FakeClock, configured: str = "auto"):  # type: ignore[no-untyped-def]
    sweep = tracking.sweep(sessions, clock.now(), 10_000, POLICY, None, configured)
    reports = []
    for chunk in sweep.chunks:
        reports += poller.poll(chunk.operation_ids, sweep.token, chunk.strategy)
    return sweep, reports


def api_calls(sandbox: SandboxServer) -> list[str]:
    return [
        "list" if r["path"].endswith("/Operations") else "fetch" for r in sandbox.requests_log()
    ]


def rows(sessions: sessionmaker[Session]) -> dict[str, TrackedOperation]:
    with sessions() as session:
        return {r.id: r for r in session.scalars(select(TrackedOperation))}


def history_count(sessions: sessionmaker[Session], op_id: str) -> int:
    with sessions() as session:
        stmt = select(func.count()).where(HistoryEntry.operation_id == op_id)
        return int(session.scalar(stmt) or 0)


def test_one_page_refreshes_many_operations(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = sandbox.simulation.add_operations(30, total=10, duration=100)
    tracking.track(sessions, [o.id for o in ops], clock.now())
    sweep, reports = sweep_and_poll(sessions, poller, clock)
    assert [c.strategy for c in sweep.chunks] == [Strategy.LIST]
    assert {r.outcome for r in reports} == {Outcome.CHANGED}
    assert api_calls(sandbox) == ["list"]
    assert all(r.status == "PROCESSING" and r.total == 10 for r in rows(sessions).values())
    assert poller.last_stats.rows_updated == 30 and poller.last_stats.history_rows == 30


def test_pages_are_followed(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = sandbox.simulation.add_operations(1001, total=5, duration=100)
    tracking.track(sessions, [o.id for o in ops], clock.now())
    sweep, reports = sweep_and_poll(sessions, poller, clock)
    # All created in one second: one message, whose window takes two pages of 1,000.
    assert [(c.strategy, len(c.operation_ids)) for c in sweep.chunks] == [(Strategy.LIST, 1001)]
    assert sum(r.outcome is Outcome.CHANGED for r in reports) == 1001
    assert api_calls(sandbox) == ["list", "list"]


def test_list_chunks_are_cut_between_seconds_and_small_tails_are_fetched() -> None:
    t0 = FakeClock().now()
    created = [t0, t0, t0, t0 + timedelta(seconds=1), t0 + timedelta(seconds=1.5)]
    created += [t0 + timedelta(seconds=2)] * 6 + [t0 + timedelta(seconds=3)]
    ids = tuple(f"op{i}" for i in range(len(created)))
    policy = PollPolicy(list_chunk=2, list_threshold=2)
    parts = tracking._cut(Claim("t", ids, tuple(created)), 2, by_second=True)
    assert [len(p) for p in parts] == [3, 2, 6, 1]  # never inside one second
    assert policy.choose("auto", 1) is Strategy.FETCH


def test_an_operation_that_ended_between_sweeps_is_recorded_once(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    quick = sandbox.add_operation(total=4, duration=5)
    slow = [sandbox.add_operation(total=4, duration=1000) for _ in range(5)]
    tracking.track(sessions, [quick.id] + [o.id for o in slow], clock.now())
    sweep_and_poll(sessions, poller, clock)
    clock.advance(10)  # `quick` completes before the next sweep
    sweep_and_poll(sessions, poller, clock)
    final = rows(sessions)[quick.id]
    assert final.status == "COMPLETED" and (final.created, final.queued) == (4, 0)
    assert history_count(sessions, quick.id) == 2  # first sight, then the end
    clock.advance(10)
    sweep, _ = sweep_and_poll(sessions, poller, clock)
    assert quick.id not in sweep.operation_ids
    assert history_count(sessions, quick.id) == 2
    assert api_calls(sandbox) == ["list"] * 3  # no GET for the operation that ended


def test_429_on_a_list_page_pauses_the_account(
    sessions, sandbox: SandboxServer, poller: Poller, db_gate: DbGate, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = sandbox.simulation.add_operations(10, total=4, duration=100)
    tracking.track(sessions, [o.id for o in ops], clock.now())
    sandbox.add_fault(Fault(kind="status", status=429, retry_after="60"))
    _, reports = sweep_and_poll(sessions, poller, clock)
    not_before = clock.now() + timedelta(seconds=60)
    assert {r.outcome for r in reports} == {Outcome.DEFERRED}
    assert {r.next_poll_at for r in rows(sessions).values()} == {not_before}
    paused = db_gate.paused_until(clock.now())
    assert paused is not None and paused[0] == not_before
    assert api_calls(sandbox) == ["list"]
    clock.advance(30)
    assert tracking.sweep(sessions, clock.now(), 100, POLICY, paused[0], "list").chunks == ()


def test_a_failed_page_backs_off_its_operations(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = sandbox.simulation.add_operations(6, total=4, duration=100)
    tracking.track(sessions, [o.id for o in ops], clock.now())
    sandbox.add_fault(Fault(kind="status", status=500))
    _, reports = sweep_and_poll(sessions, poller, clock)
    assert {r.outcome for r in reports} == {Outcome.ERROR}
    assert {r.consecutive_errors for r in rows(sessions).values()} == {1}
    assert api_calls(sandbox) == ["list"]  # the 500 was not retried in place


def test_operations_the_pages_miss_fall_back_to_one_get(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    recent = sandbox.simulation.add_operations(5, total=4, duration=100)
    old_time = clock.now() - timedelta(days=3)
    old = sandbox.add_operation(total=4, duration=100, created_at=old_time.timestamp())
    ids = [o.id for o in recent] + [old.id, MISSING]
    tracking.track(sessions, ids, clock.now())
    _, reports = sweep_and_poll(sessions, poller, clock)
    outcomes = {r.operation_id: r.outcome for r in reports}
    assert outcomes[MISSING] is Outcome.NOT_FOUND
    assert outcomes[old.id] is Outcome.CHANGED  # older than the lookback: fetched by GET
    assert sorted(api_calls(sandbox)) == ["fetch", "fetch", "list"]
    # Once its createdAt is known, the old one is inside the next sweep's window.
    clock.advance(10)
    sandbox.clear_requests()
    sweep_and_poll(sessions, poller, clock)
    assert api_calls(sandbox) == ["list"]


def test_adaptive_cadence_polls_idle_operations_less_often() -> None:
    policy = PollPolicy(interval=timedelta(seconds=10), max_interval=timedelta(seconds=120))
    now = FakeClock().now()
    assert policy.next_poll(now, now) == now + timedelta(seconds=10)
    assert policy.next_poll(now, now - timedelta(seconds=100)) == now + timedelta(seconds=50)
    assert policy.next_poll(now, now - timedelta(hours=5)) == now + timedelta(seconds=120)
    assert policy.next_poll(now, now + timedelta(seconds=30)) == now + timedelta(seconds=10)


def test_auto_strategy_switches_at_the_threshold() -> None:
    assert POLICY.choose("auto", 4) is Strategy.FETCH
    assert POLICY.choose("auto", 5) is Strategy.LIST
    assert POLICY.choose("fetch", 10_000) is Strategy.FETCH


def test_bad_items_on_a_page_are_skipped_and_their_operations_fetched(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = sandbox.simulation.add_operations(6, total=4, duration=100)
    tracking.track(sessions, [o.id for o in ops], clock.now())
    # Every item of the page breaks the schema (a status the API might add one day).
    sandbox.add_fault(Fault(kind="malformed", variant="unknown_status"))
    _, reports = sweep_and_poll(sessions, poller, clock)
    assert {r.outcome for r in reports} == {Outcome.CHANGED}  # each fetched by GET instead
    assert sorted(api_calls(sandbox)) == ["fetch"] * 6 + ["list"]


def test_a_404_on_a_list_page_ends_nothing(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = sandbox.simulation.add_operations(6, total=4, duration=100)
    tracking.track(sessions, [o.id for o in ops], clock.now())
    sandbox.add_fault(Fault(kind="status", status=404))
    _, reports = sweep_and_poll(sessions, poller, clock)
    assert {r.outcome for r in reports} == {Outcome.ERROR}
    assert {r.status for r in rows(sessions).values()} == {"PENDING"}


def test_a_message_stops_calling_before_its_claim_expires(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    ops = [sandbox.add_operation(total=4, duration=100) for _ in range(3)]
    tracking.track(sessions, [o.id for o in ops], clock.now())
    sweep = tracking.sweep(sessions, clock.now(), 100, POLICY, None, "fetch")
    clock.advance(50)  # the lease is 60 s: past its last quarter, nothing more is asked
    reports = poller.poll(sweep.operation_ids, sweep.token, Strategy.FETCH)
    assert {r.outcome for r in reports} == {Outcome.DEFERRED}
    assert api_calls(sandbox) == []
    # Due again at once, for the next tick, with nothing counted against them.
    again = tracking.sweep(sessions, clock.now(), 100, POLICY, None, "fetch")
    assert sorted(again.operation_ids) == sorted(o.id for o in ops)
    assert {r.consecutive_errors for r in rows(sessions).values()} == {0}


def test_the_claim_lease_is_a_setting() -> None:
    from worker.errors import ConfigError
    from worker.runtime import Runtime
    from worker.settings import load_settings

    settings = load_settings({"OPTRACK_CLAIM_LEASE": "15"})
    assert Runtime(settings).poll_policy.lease == timedelta(seconds=15)
    assert Runtime(load_settings({})).poll_policy.lease == timedelta(seconds=120)
    with pytest.raises(ConfigError, match="OPTRACK_CLAIM_LEASE"):
        load_settings({"OPTRACK_CLAIM_LEASE": "1"})
