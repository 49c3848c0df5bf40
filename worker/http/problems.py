"""Every error answer of the API has one shape: ``{"errors": [{"reason": ..., "id"?: ...}]}``."""

from __future__ import annotations

import logging
from typing import Annotated, Any, NotRequired, TypedDict

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from worker.db import DatabaseError
from worker.errors import InvalidOperationId, NotTracked
from worker.reports import BadPeriod

log = logging.getLogger(__name__)


class ErrorEntry(TypedDict):
    """One thing wrong with the request."""

    reason: str
    id: NotRequired[Annotated[str | None, msgspec.Meta(description="The operation ID it is about")]]
    index: NotRequired[
        Annotated[int, msgspec.Meta(description="Its position in the request's list")]
    ]


class Errors(TypedDict):
    """Every error answer of the API (any status but 2xx)."""

    errors: list[ErrorEntry]


class Problem(Exception):
    """Raised by a route to answer ``status`` with these error entries."""

    def __init__(self, status: int, errors: list[ErrorEntry]) -> None:
        self.status = status
        self.errors = errors
        super().__init__(f"HTTP {status}: {errors}")


def answer(status: int, errors: list[ErrorEntry], **headers: str) -> JSONResponse:
    """The error answer."""
    body: Errors = {"errors": errors}
    return JSONResponse(body, status_code=status, headers=headers or None)


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if part != "body") or "body"


def install(app: FastAPI) -> None:
    """Map our errors, FastAPI's and the database's to the one shape."""

    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return answer(exc.status, exc.errors)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return answer(exc.status_code, [{"reason": str(exc.detail)}], **(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors: list[ErrorEntry] = [
            {"reason": f"{_where(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}"}
            for e in exc.errors()
        ]
        return answer(422, errors)

    @app.exception_handler(NotTracked)
    async def _not_tracked(_: Request, exc: NotTracked) -> JSONResponse:
        return answer(404, [{"id": exc.operation_id, "reason": "not tracked"}])

    @app.exception_handler(InvalidOperationId)
    async def _bad_id(_: Request, exc: InvalidOperationId) -> JSONResponse:
        shown = exc.value[:100] if isinstance(exc.value, str) else None
        return answer(422, [{"id": shown, "reason": exc.reason}])

    @app.exception_handler(BadPeriod)
    async def _bad_period(_: Request, exc: BadPeriod) -> JSONResponse:
        return answer(422, [{"reason": str(exc)}])

    @app.exception_handler(DatabaseError)
    async def _database(_: Request, exc: DatabaseError) -> JSONResponse:
        # The driver's message may name hosts and users: the log gets the type, callers less.
        log.warning("http: the database did not answer: %s", type(exc).__name__)
        return answer(503, [{"reason": "the database did not answer; try again"}])
