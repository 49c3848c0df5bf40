"""worker.waiting on a real database (SQLite and PostgreSQL) with a fake clock: what a wait
decides and when, without sleeping. The processes and exit codes: tests/e2e/test_wait.py."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from worker import api, intake, waiting
from worker.clock import FakeClock
from worker.db import HistoryEntry, TrackedOperation
from worker.errors import InvalidOperationId, NotTracked
from worker.settings import load_settings
from worker.waiting import Condition, Outcome, WaitFor

A = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
B = "comms_operation_01h9krwprkeee8fzqspvwy6nq9"
C = "comms_operation_01h9krwprkeee8fzqspvwy6nqa"


class ScriptedClock(FakeClock):
    """A fake clock that runs ``actions[n]`` (a change by "another process") at its n-th sleep."""

    def __init__(self, actions: dict[int, Callable[[], None]]) -> None:
        super().__init__()
        self.actions = actions

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        action = self.actions.get(len(self.slept))
        if action is not None:
            action()


def end(
    sessions: sessionmaker[Session], op_id: str, status: str, failed: int = 0
) -> Callable[[], None]:
    def run() -> None:
        with sessions.begin() as session:
            session.execute(
                update(TrackedOperation)
                .where(TrackedOperation.id == op_id)
                .values(status=status, total=10, created=10 - failed, failed=failed, queued=0)
            )

    return run


@pytest.fixture
def tracked(sessions: sessionmaker[Session], clock: FakeClock) -> sessionmaker[Session]:
    intake.track(sessions, [A, B, C], clock.now())
    return sessions


def test_an_operation_already_ended_answers_at_once(tracked: sessionmaker[Session]) -> None:
    end(tracked, A, "COMPLETED")()
    clock = ScriptedClock({})
    result = waiting.wait(tracked, [A], Condition(), timedelta(minutes=5), clock)
    assert (result.outcome, result.exit_code, clock.slept) == (Outcome.OK, 0, [])
    assert [op.status for op in result.operations] == ["COMPLETED"]


def test_a_wait_looks_every_interval_until_all_have_ended(tracked: sessionmaker[Session]) -> None:
    clock = ScriptedClock({3: end(tracked, B, "COMPLETED"), 7: end(tracked, A, "COMPLETED")})
    seen: list[str] = []
    result = waiting.wait(
        tracked,
        [A, B],
        Condition(),
        None,
        clock,
        interval=0.5,
        on_end=lambda op: seen.append(op.id),
    )
    assert result.outcome is Outcome.OK
    assert clock.slept == [0.5] * 7  # a bounded interval, never a busy loop
    assert seen == [B, A]  # each end reported once, as it is seen
    assert result.waited == timedelta(seconds=3.5)
    assert [op.id for op in result.operations] == [A, B]  # in the order asked


def test_the_timeout_comes_first(tracked: sessionmaker[Session]) -> None:
    clock = ScriptedClock({1: end(tracked, A, "CANCELED")})
    result = waiting.wait(tracked, [A, B], Condition(), timedelta(seconds=1.2), clock)
    assert (result.outcome, result.exit_code) == (Outcome.TIMEOUT, 124)
    assert clock.slept == [0.5, 0.5, pytest.approx(0.2)]  # the last sleep ends at the deadline
    assert result.pending == (B,)
    assert result.unmet == {}  # CANCELED is an end, as asked
    assert [op.status for op in result.operations] == ["CANCELED", "PENDING"]
    zero = waiting.wait(tracked, [B], Condition(), timedelta(0), ScriptedClock({}))
    assert zero.outcome is Outcome.TIMEOUT  # --timeout 0: one look


@pytest.mark.parametrize(
    ("condition", "ends", "outcome", "unmet"),
    [
        (Condition(), {A: "COMPLETED", B: "CANCELED"}, Outcome.OK, {}),
        (
            Condition(WaitFor.COMPLETED),
            {A: "COMPLETED", B: "CANCELED"},
            Outcome.UNMET,
            {B: "CANCELED, not COMPLETED"},
        ),
        (
            Condition(WaitFor.COMPLETED),
            {A: "NOT_FOUND", B: "COMPLETED"},
            Outcome.UNMET,
            {A: "NOT_FOUND, not COMPLETED"},
        ),
        (
            Condition(max_failed=2),
            {A: ("COMPLETED", 3), B: ("COMPLETED", 2)},
            Outcome.UNMET,
            {A: "3 senders failed, more than 2"},
        ),
    ],
)
def test_ended_as_asked_or_otherwise(
    tracked: sessionmaker[Session],
    condition: Condition,
    ends: dict[str, str | tuple[str, int]],
    outcome: Outcome,
    unmet: dict[str, str],
) -> None:
    for op_id, how in ends.items():
        status, failed = how if isinstance(how, tuple) else (how, 0)
        end(tracked, op_id, status, failed)()
    result = waiting.wait(tracked, [A, B], condition, None, ScriptedClock({}))
    assert (result.outcome, result.unmet) == (outcome, unmet)
    assert result.exit_code == (0 if outcome is Outcome.OK else 1)


def test_untracked_and_invalid_ids_are_named(tracked: sessionmaker[Session]) -> None:
    x = "comms_operation_01h9krwprkeee8fzqspvwy6nqb"
    y = "comms_operation_01h9krwprkeee8fzqspvwy6nqc"
    with pytest.raises(NotTracked) as caught:
        waiting.wait(tracked, [A, x, y], Condition(), None, ScriptedClock({}))
    assert caught.value.operation_ids == (x, y)
    assert x in str(caught.value) and y in str(caught.value)
    with pytest.raises(InvalidOperationId):
        waiting.wait(tracked, [A, "nope"], Condition(), None, ScriptedClock({}))


def test_the_long_poll_step_and_end(tracked: sessionmaker[Session], clock: FakeClock) -> None:
    with tracked() as session:
        snap = waiting.snapshot(session, A)
    assert snap.seq is None and not waiting.settled(snap, None) and not waiting.settled(snap, 0)
    with tracked.begin() as session:
        session.add(
            HistoryEntry(
                operation_id=A,
                seq=2,
                observed_at=clock.now(),
                remote_updated_at=clock.now(),
                status="PROCESSING",
                total=10,
                queued=9,
                created=1,
                failed=0,
            )
        )
    with tracked() as session:
        snap = waiting.snapshot(session, A)
    assert snap.seq == 2
    assert waiting.settled(snap, 1) and not waiting.settled(snap, 2)
    assert not waiting.settled(snap, None)  # without `after`: only an end answers
    end(tracked, A, "CANCELED")()
    with tracked() as session:
        assert waiting.settled(waiting.snapshot(session, A), 2)


def test_the_python_api_waits_and_tracks_first(db_url: str, tmp_path: Path) -> None:
    settings = load_settings({"OPTRACK_DATABASE_URL": db_url, "OPTRACK_HOME": str(tmp_path)})
    with pytest.raises(NotTracked):
        api.wait([A], 0, settings=settings)
    result = api.wait([A], timedelta(0), track=True, settings=settings)
    assert isinstance(result, api.WaitResult)
    assert (result.outcome, result.exit_code, result.pending) == (Outcome.TIMEOUT, 124, (A,))
