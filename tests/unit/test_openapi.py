"""The OpenAPI document: valid OpenAPI 3, every answer typed, every error of the one shape.

Clients in other languages are generated from it (issue 19): an empty schema is an ``unknown``
type there, an undocumented status an exception. tests/db/test_schemathesis.py checks the
live answers against it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from openapi_spec_validator import validate

from worker.http import create_app
from worker.http.openapi import SAFE_METHODS
from worker.records import OPERATION_FIELDS, OperationRecord
from worker.reports.formats import HISTORY_CSV_FIELDS
from worker.reports.shapes import HistoryRowRecord
from worker.runtime import Runtime
from worker.settings import load_settings

ERRORS_REF = "#/components/schemas/Errors"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    rt = Runtime(load_settings({"OPTRACK_HOME": "/nonexistent"}))  # no database is opened
    return create_app(rt, token="t" * 32).openapi()


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def test_the_document_is_valid_openapi_3(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.")
    validate(doc)  # raises on any violation of the OpenAPI 3.x schema, a dangling $ref too


def test_no_2xx_json_answer_has_an_empty_schema(doc: dict[str, Any]) -> None:
    seen = 0
    for method, path, operation in operations(doc):
        for status, response in operation["responses"].items():
            for media, content in response.get("content", {}).items():
                if not status.startswith("2") or media != "application/json":
                    continue
                schema = resolve(doc, content.get("schema", {}))
                assert schema.get("properties"), f"{method.upper()} {path} {status}: {schema}"
                seen += 1
    assert seen >= 8


def test_every_schema_is_an_object_with_its_properties(doc: dict[str, Any]) -> None:
    for name, schema in doc["components"]["schemas"].items():
        if name == "TrackRequest":
            continue
        assert schema["type"] == "object" and schema["properties"], name
    assert set(doc["components"]["schemas"]).isdisjoint({"HTTPValidationError", "ValidationError"})


def test_every_error_is_the_one_shape_and_every_status_answered_is_listed(
    doc: dict[str, Any],
) -> None:
    for method, path, operation in operations(doc):
        responses = operation["responses"]
        where = f"{method.upper()} {path}"
        expected = {"400", "503"}
        if path.startswith("/api/"):
            expected.add("401")
        if method not in SAFE_METHODS:
            expected |= {"413", "415", "422"}
        if operation.get("parameters"):
            expected.add("422")
        if "{operation_id}" in path:
            expected.add("404")
        assert expected <= set(responses), (where, sorted(responses))
        for status, response in responses.items():
            if status.startswith("2") or (path == "/healthz" and status == "503"):
                continue
            assert response["content"] == {"application/json": {"schema": {"$ref": ERRORS_REF}}}
    errors = doc["components"]["schemas"]["ErrorEntry"]
    assert set(errors["properties"]) == {"reason", "id", "index"}
    assert errors["required"] == ["reason"]


def test_csv_answers_are_text_csv(doc: dict[str, Any]) -> None:
    csv = [
        (method, path, operation["responses"]["200"]["content"])
        for method, path, operation in operations(doc)
        if path.endswith(".csv")
    ]
    assert len(csv) == 2
    for _, _, content in csv:
        assert set(content) == {"text/csv"}


def test_the_schemas_are_derived_from_the_records() -> None:
    """One definition: the record's builder fills the TypedDict the schema is made from."""
    schema = msgspec.json.schema(OperationRecord)["$defs"]["OperationRecord"]
    assert set(schema["properties"]) == set(OPERATION_FIELDS)
    assert schema["properties"]["tracked_at"] == {"type": "string", "format": "date-time"}
    assert tuple(HistoryRowRecord.__annotations__) == HISTORY_CSV_FIELDS
