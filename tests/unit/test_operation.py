"""Operation IDs and the response parser: the edge where raw JSON becomes typed objects."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from worker.client import LocalGate, _http_error, next_page_token
from worker.errors import (
    ApiErrorDetail,
    InvalidOperationId,
    OperationNotFound,
    SchemaError,
    ServerError,
    WrongBaseUrl,
)
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
        (op_json(stats={"total": 1, "queued": -1, "created": 1, "failed": 0}), "must be 0.."),
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


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (op_json(stats={"total": 2**31, "queued": 0, "created": 0, "failed": 0}), "0..2147483647"),
        (op_json(createdAt="0001-01-01T00:00:00Z"), "outside 2000..2999"),
        (op_json(updatedAt="9999-12-31T23:59:59Z"), "outside 2000..2999"),
    ],
)
def test_values_the_database_or_date_arithmetic_cannot_hold_are_rejected(
    body: Any, message: str
) -> None:
    with pytest.raises(SchemaError, match=message):
        parse_operation(body)


def test_a_bad_item_does_not_fail_its_page() -> None:
    page = parse_page(
        {
            "operations": [op_json(), op_json(status="PAUSED"), "junk"],
            "pagination": {"next": None, "self": "/v1/SenderPools/Operations"},
        }
    )
    assert [op.id for op in page.operations] == [GOOD_ID]
    assert len(page.rejected) == 2 and "operations[1]: status" in page.rejected[0]


def test_pagination_that_never_ends_is_a_schema_error() -> None:
    page = parse_page({"operations": [], "pagination": {"next": "?pageToken=a", "self": "x"}})
    seen: set[str] = set()
    assert next_page_token(page, seen) == "a"
    with pytest.raises(SchemaError, match="repeats"):
        next_page_token(page, seen)


def test_only_the_apis_not_found_code_ends_an_operation() -> None:
    gate = LocalGate()
    now = datetime(2026, 1, 1, tzinfo=UTC)
    twilio = (ApiErrorDetail(code=20404, message="The resource was not found."),)
    assert isinstance(_http_error(404, twilio, "u", "fetch", now, gate), OperationNotFound)
    assert isinstance(_http_error(404, (), "u", "fetch", now, gate), WrongBaseUrl)
    # The List endpoint has no 404: even the API's 20404 there means a wrong base URL.
    assert isinstance(_http_error(404, twilio, "u", "list", now, gate), WrongBaseUrl)
    assert isinstance(_http_error(500, twilio, "u", "fetch", now, gate), ServerError)
