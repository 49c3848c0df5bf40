"""events.passable and Cursor: a feed never moves past a row that may still commit below it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from worker.events import HOLD, SETTLED, BadEventId, Cursor, passable

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def rows(*ids: int, age: timedelta = timedelta(0)) -> list[tuple[int, datetime]]:
    return [(i, NOW - age) for i in ids]


def test_contiguous_rows_pass_at_once() -> None:
    gaps: dict[int, datetime] = {}
    assert passable(4, rows(5, 6, 7), gaps, NOW) == 3
    assert gaps == {}


def test_a_young_gap_holds_the_rows_after_it_until_hold_passed() -> None:
    gaps: dict[int, datetime] = {}
    # 6 taken by a transaction not committed yet: 5 goes, 7 and 8 wait.
    assert passable(4, rows(5, 7, 8), gaps, NOW) == 1
    assert gaps == {6: NOW}
    assert passable(5, rows(7, 8), gaps, NOW + HOLD / 2) == 0
    # 6 committed meanwhile: everything goes, the gap is forgotten.
    assert passable(5, rows(6, 7, 8), gaps, NOW + HOLD / 2) == 3
    assert gaps == {}


def test_a_gap_that_never_fills_is_passed_after_hold() -> None:
    gaps: dict[int, datetime] = {}
    assert passable(4, rows(7, 8), gaps, NOW) == 0
    assert passable(4, rows(7, 8), gaps, NOW + HOLD) == 2  # 5 and 6 rolled back
    assert gaps == {}


def test_every_gap_ages_from_its_first_sight_together() -> None:
    gaps: dict[int, datetime] = {}
    assert passable(0, rows(2, 4, 6), gaps, NOW) == 0
    assert set(gaps) == {1, 3, 5}
    assert passable(0, rows(2, 4, 6), gaps, NOW + HOLD) == 3  # one wait, not three


def test_a_gap_before_settled_rows_is_passed_at_once() -> None:
    gaps: dict[int, datetime] = {}
    # Rows pruned by retention long ago, or a rollback an hour ago: no wait.
    assert passable(0, rows(100, 101, age=SETTLED), gaps, NOW) == 2
    assert gaps == {}


def test_cursor_text_round_trips_and_orders() -> None:
    assert Cursor.parse(Cursor(1234, 56).text()) == Cursor(1234, 56)
    assert Cursor(3, 1) < Cursor(3, 2) < Cursor(4, 0)


@pytest.mark.parametrize("text", ["", "12", "1-2-3", "-1-2", "a-b", "1.5-2", f"{2**63}-0", "1 -2"])
def test_a_bad_event_id_is_refused(text: str) -> None:
    with pytest.raises(BadEventId):
        Cursor.parse(text)
