"""Operation IDs and the response parser: the edge where raw JSON becomes typed objects."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from worker.errors import InvalidOperationId, SchemaError
from worker.operation import Status, parse_operation, parse_page, validate_operation_id

GOOD_ID = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"


def op_json(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": GOOD_ID,
        "status": "PROCESSING",
        "stats": {"total": 10, "queued": 5, "created": 4, "failed": 1},
        "createdAt": "2024-04-05T06:20:00Z",
        "updatedAt": "2024-04-05T06:21:00+00:00",
    }
    data.update(overrides)
    return data


@pytest.mark.parametrize(
    "value",
    [GOOD_ID, "comms_operation_7" + "z" * 25, "comms_operation_0" + "a" * 34],
)
def test_valid_ids_pass(value: str) -> None:
    assert validate_operation_id(value) == value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("not-an-id", "must start with"),
        ("comms_operation_81h9krwprkeee8fzqspvwy6nq8", "digit 0-7"),
        ("comms_operation_01H9KRWPRKEEE8FZQSPVWY6NQ8", "lower-case"),
        ("comms_operation_01h9krwprkeee8fzqspvwy6nqi", "without i, l, o, u"),
        ("comms_operation_01h9krwprkeee8fzqspvwy6", "25-34"),
        (GOOD_ID + "\n", "Crockford"),
        (GOOD_ID + "/../../x", "Crockford"),
        (GOOD_ID + "a" * 20, "longer than"),
        ("comms_operation_01h9krwprkeee8fzqspvwy6nq8?x=1", "Crockford"),
        ("comms_operation_01h9krwprkeee8fzqspvwy6nq\uff18", "Crockford"),  # full-width 8
    ],
)
def test_invalid_ids_say_why(value: str, reason: str) -> None:
    with pytest.raises(InvalidOperationId) as info:
        validate_operation_id(value)
    assert reason in str(info.value)


def test_parse_operation_gives_typed_utc_values() -> None:
    op = parse_operation(op_json(extra="ignored"))
    assert op.status is Status.PROCESSING
    assert (op.stats.total, op.stats.queued, op.stats.created, op.stats.failed) == (10, 5, 4, 1)
    assert op.created_at == datetime(2024, 4, 5, 6, 20, tzinfo=UTC)
    assert op.updated_at == datetime(2024, 4, 5, 6, 21, tzinfo=UTC)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "expected an object"),
        (op_json(status="DONE"), "status: unknown value"),
        (op_json(stats={"total": 1, "queued": 0, "created": 1}), "stats.failed"),
        (op_json(stats={"total": 1, "queued": -1, "created": 1, "failed": 0}), ">= 0"),
        (op_json(stats={"total": 1, "queued": 0, "created": True, "failed": 0}), "integer"),
        (op_json(stats={"total": "1", "queued": 0, "created": 1, "failed": 0}), "integer"),
        (op_json(createdAt="yesterday"), "createdAt"),
        (op_json(updatedAt="2024-04-05T06:20:00"), "no time zone"),
        ({k: v for k, v in op_json().items() if k != "updatedAt"}, "updatedAt"),
        (op_json(id="comms_operation_x"), "id:"),
    ],
)
def test_schema_breaches_are_errors(body: Any, message: str) -> None:
    with pytest.raises(SchemaError) as info:
        parse_operation(body)
    assert message in str(info.value)


def test_answer_about_another_id_is_rejected() -> None:
    other = "comms_operation_01h9krwprkeee8fzqspvwy6nq9"
    with pytest.raises(SchemaError, match="asked for"):
        parse_operation(op_json(), expected_id=other)


def test_page_extracts_next_token() -> None:
    page = parse_page(
        {
            "operations": [op_json()],
            "pagination": {
                "next": "/v1/SenderPools/Operations?pageSize=1&pageToken=abc%3D",
                "self": "/v1/SenderPools/Operations?pageSize=1",
            },
        }
    )
    assert page.next_token == "abc="
    assert len(page.operations) == 1
    with pytest.raises(SchemaError, match="pagination"):
        parse_page({"operations": []})
