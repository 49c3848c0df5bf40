"""The OpenAPI document: every answer typed from the TypedDict its builder fills, every error.

A route names the JSON it answers with ``answer(SomeRecord)`` (a TypedDict: the one definition
of that record, see ``worker.records``), its body with ``body(SomeRequest)``, and the errors
only it gives (a 404) with ``error``. ``document`` adds the schemas of those types, derived by
``msgspec.json.schema_components``, and the errors any operation can answer, each of the one
shape ``Errors``, in place of FastAPI's ``HTTPValidationError`` (which the API never answers):

    400  every operation     a Host header naming no address served (``guards``)
    401  behind the token    no token or a wrong one (``auth``)
    403  not GET             a read-only token, or an account the token does not see
    413  with a body         a body over 1 MiB (``app.BodyLimit``), or too many IDs
    415  not GET             a request changing state that is not JSON (``guards``)
    422  with parameters     a bad parameter or body
    503  every operation     the database did not answer (``problems``)

Types register when the routes are defined (at import), like the routes themselves.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from worker.http.problems import Errors

JSON = "application/json"
REF = "#/components/schemas/{name}"
SAFE_METHODS = frozenset({"get", "head", "options"})
ERRORS = {
    400: "The Host header names no address this server answers for",
    401: "No token, or a wrong one (with WWW-Authenticate)",
    403: "A read-only token changing state, or an account the token does not see",
    413: "A body over 1 MiB, or more IDs than one request takes",
    415: "A request that changes state must be Content-Type: application/json",
    422: "A bad parameter or body; each entry says what was wrong",
    503: "The database did not answer; try again",
}
CHALLENGE = {
    "WWW-Authenticate": {"description": 'Bearer realm="optrack"', "schema": {"type": "string"}}
}
# FastAPI's own models for a 422 it documents but our handlers never send.
FASTAPI_ERRORS = ("HTTPValidationError", "ValidationError")

_shapes: dict[str, type] = {"Errors": Errors}


def _ref(shape: type) -> dict[str, str]:
    known = _shapes.setdefault(shape.__name__, shape)
    if known is not shape:
        raise ValueError(f"two types named {shape.__name__} in the OpenAPI document")
    return {"$ref": REF.format(name=shape.__name__)}


def json_response(shape: type, description: str) -> dict[str, Any]:
    """An OpenAPI response object: JSON of ``shape``."""
    return {"description": description, "content": {JSON: {"schema": _ref(shape)}}}


def answer(shape: type, description: str, status: int = 200) -> dict[int | str, Any]:
    """``responses=`` of a route whose ``status`` answer is JSON of ``shape``."""
    return {status: json_response(shape, description)}


def error(status: int, description: str) -> dict[int | str, Any]:
    """``responses=`` of an error only this route gives (the common ones are added for all)."""
    return {status: json_response(Errors, description)}


# A GET a token scoped to accounts may be refused: another account named, or a route of every
# account (dead letters, notices, the pause).
FORBIDDEN: dict[int | str, Any] = {
    403: {
        "description": "The token does not see the account named, or sees only some accounts "
        "and this is a route of every account",
        "content": {JSON: {"schema": {"$ref": REF.format(name="Errors")}}},
    }
}


def body(shape: type, description: str) -> dict[str, Any]:
    """``openapi_extra=`` of a route that reads a JSON body of ``shape`` itself."""
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {JSON: {"schema": _ref(shape)}},
        }
    }


def _errors_of(method: str, operation: dict[str, Any]) -> list[int]:
    statuses = [400, 503]
    if operation.get("security"):
        statuses.append(401)
    if "requestBody" in operation:
        statuses.append(413)
    if method not in SAFE_METHODS:
        statuses.append(415)
        if operation.get("security"):
            statuses.append(403)
    if operation.get("parameters") or "requestBody" in operation:
        statuses.append(422)
    return statuses


def document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, typed."""
    doc = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    for path_item in doc["paths"].values():
        for method, operation in path_item.items():
            responses = operation["responses"]
            for status in _errors_of(method, operation):
                given = responses.get(str(status))
                if given is None or "HTTPValidationError" in str(given):
                    responses[str(status)] = json_response(Errors, ERRORS[status])
            if "401" in responses:
                responses["401"]["headers"] = CHALLENGE
            operation["responses"] = dict(sorted(responses.items()))
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in FASTAPI_ERRORS:
        schemas.pop(name, None)
    _, components = msgspec.json.schema_components(list(_shapes.values()), ref_template=REF)
    schemas.update(components)
    doc["components"]["schemas"] = dict(sorted(schemas.items()))
    return doc


class OpenApiApp(FastAPI):
    """FastAPI whose ``openapi()`` is ``document``: what ``/api/v1/openapi.json`` serves."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = document(self)
        return self.openapi_schema
