"""When a claimed poll starts (``sweep.start_at``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from worker.repository import GroupClaim
from worker.sweep import START_EARLY, start_at

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=120)


def claim(due_in: float) -> GroupClaim:
    return GroupClaim(1, "token", NOW + LEASE, NOW + timedelta(seconds=due_in))


def test_a_group_due_already_is_polled_at_once() -> None:
    assert start_at(claim(0), NOW) is None
    assert start_at(claim(-30), NOW) is None


def test_a_group_claimed_ahead_is_polled_just_before_its_due_time() -> None:
    assert start_at(claim(1.5), NOW) == NOW + timedelta(seconds=1.5) - START_EARLY


def test_a_group_due_within_the_early_margin_is_polled_at_once() -> None:
    assert start_at(claim(START_EARLY.total_seconds() / 2), NOW) is None


def test_the_wait_never_takes_more_than_a_quarter_of_the_lease() -> None:
    # A tick of an hour claims groups due within the hour: the poll still has its lease.
    assert start_at(claim(3000), NOW) == NOW + LEASE / 4
