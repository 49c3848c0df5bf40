"""The creation time an operation ID carries, read as a ULID's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from worker.ulid import agrees, created_from_id

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
EXAMPLE = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"  # the reference's


def test_the_reference_example_decodes_to_its_millisecond() -> None:
    assert created_from_id(EXAMPLE, NOW) == datetime(2023, 9, 5, 22, 54, 57, 299000, tzinfo=UTC)


def test_upper_case_reads_the_same() -> None:
    upper = "comms_operation_" + EXAMPLE.removeprefix("comms_operation_").upper()
    assert created_from_id(upper, NOW) == created_from_id(EXAMPLE, NOW)


@pytest.mark.parametrize(
    "operation_id",
    [
        "comms_operation_0000000000eee8fzqspvwy6nq8",  # 1970: before any such ID
        "comms_operation_019ahckhd0eee8fzqspvwy6nq8",  # the last minute of 2014
        "comms_operation_7zzzzzzzzzeee8fzqspvwy6nq8",  # year 37,000
        "comms_operation_01h9krwpr",  # too short
        "comms_operation_01h9krwpru" + "eee8fzqspvwy6nq8",  # "u" is no Crockford digit
        "01h9krwprkeee8fzqspvwy6nq8",  # no prefix
        "",
    ],
)
def test_an_implausible_time_is_none(operation_id: str) -> None:
    assert created_from_id(operation_id, NOW) is None


def test_a_time_more_than_a_day_ahead_of_now_is_none() -> None:
    created = created_from_id(EXAMPLE, NOW)
    assert created is not None
    assert created_from_id(EXAMPLE, created - timedelta(hours=23)) == created
    assert created_from_id(EXAMPLE, created - timedelta(hours=25)) is None


def test_an_id_agrees_with_a_createdat_of_its_second_and_not_further() -> None:
    second = datetime(2023, 9, 5, 22, 54, 57, tzinfo=UTC)
    assert agrees(EXAMPLE, second, NOW)
    assert agrees(EXAMPLE, second + timedelta(seconds=2), NOW)
    assert not agrees(EXAMPLE, second + timedelta(seconds=3), NOW)
    assert not agrees(EXAMPLE, second - timedelta(seconds=2), NOW)
    assert not agrees("comms_operation_7zzzzzzzzzeee8fzqspvwy6nq8", second, NOW)
