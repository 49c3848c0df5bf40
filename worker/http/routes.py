"""The JSON API (``/api/v1``) and ``/healthz``: thin calls into tracking, reports, listing, health.

Records come from the formatters the CLI uses (``reports.formats``), so a field means the same
in `optrack status --json`, `history --json`, `report --json` and here. No SQL lives here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field, ValidationError

from worker import health, intake, listing, reports
from worker.accounts import Accounts
from worker.credentials import DEFAULT_ACCOUNT, validate_account_name
from worker.db import DatabaseError
from worker.durations import parse_duration
from worker.errors import AccountError, InvalidOperationId, NotTracked
from worker.health import HealthFacts
from worker.http import paging
from worker.http.auth import access_of, all_accounts, forbidden
from worker.http.openapi import FORBIDDEN, answer, error
from worker.http.problems import ErrorEntry, Problem
from worker.http.shapes import (
    AccountsPage,
    AccountSummary,
    OperationsPage,
    ProgressPage,
    TrackAnswer,
)
from worker.operation import validate_operation_id
from worker.records import operation_record, utc_text
from worker.reports.formats import (
    HISTORY_CSV_FIELDS,
    SUMMARY_CSV_FIELDS,
    account_record,
    estimate_record,
    history_record,
    history_row_record,
    summary_record,
    summary_row,
    to_csv,
)
from worker.reports.queries import AccountScope
from worker.reports.shapes import AccountRecord, HistoryRecord, SummaryRecord
from worker.runtime import Runtime
from worker.tracking import ALL_STATES

MAX_IDS = 10_000  # per POST; more is a 413 that says to split the list
DEFAULT_PAGE = 100
DEFAULT_REPORT_LIST = 100
MAX_PROGRESS = 200

api = APIRouter(prefix="/api/v1")
public = APIRouter()


class CsvResponse(PlainTextResponse):
    """CSV text (documented as text/csv; sent with ``charset=utf-8``)."""

    media_type = "text/csv"


NOT_TRACKED = error(404, "The operation ID is valid but not tracked")


def _json(payload: Mapping[str, object]) -> JSONResponse:
    """Our records are JSON-ready already: skip FastAPI's jsonable_encoder (a third of the
    time of a page of 1,000 operations)."""
    return JSONResponse(payload)


def runtime(request: Request) -> Runtime:
    """The process's Runtime, put on the app by ``create_app``."""
    rt = request.app.state.runtime
    assert isinstance(rt, Runtime)
    return rt


def _operation_id(value: str) -> str:
    try:
        return validate_operation_id(value)
    except InvalidOperationId as exc:
        raise Problem(422, [{"id": exc.value, "reason": exc.reason}]) from None


def _statuses(values: list[str]) -> tuple[str, ...]:
    wanted = tuple(dict.fromkeys(v.strip().upper() for v in values if v.strip()))
    unknown = [s for s in wanted if s not in ALL_STATES]
    if unknown:
        raise Problem(
            422,
            [{"reason": f"unknown status {', '.join(unknown)}; use {', '.join(ALL_STATES)}"}],
        )
    return wanted


def _span(name: str, text: str) -> timedelta:
    try:
        return reports.parse_span(text)
    except reports.BadPeriod as exc:
        raise Problem(422, [{"reason": f"{name}: {exc}"}]) from None


OperationId = Annotated[str, Path(description="A SenderPool operation ID (comms_operation_…)")]
Statuses = Annotated[
    list[str],
    Query(
        alias="status",
        description=f"Only these statuses (repeat the parameter): {', '.join(ALL_STATES)}",
    ),
]


AccountName = Annotated[
    str | None,
    Query(description="Only this account's operations (`optrack accounts`); absent: every one"),
]


def _account(request: Request, name: str | None) -> AccountScope:
    """Whose operations to show: ``name`` if it names an account the token sees (422 if it
    names none, 403 if the token's accounts do not include it); without ``name``, the
    token's accounts (None: every account)."""
    access = access_of(request)
    if name is None:
        return access.accounts
    try:
        with runtime(request).sessions() as session:
            found = Accounts(session).get(validate_account_name(name)).name
    except AccountError as exc:
        raise Problem(422, [{"reason": str(exc)}]) from None
    if not access.sees(found):
        raise forbidden(f"token {access.token} does not see account {found}")
    return found


def visible(request: Request, operation_id: str, account: str) -> None:
    """NotTracked (a 404) for an operation of an account the token does not see: to such a
    token, another account's operation is not there at all."""
    if not access_of(request).sees(account):
        raise NotTracked(operation_id)


class TrackRequest(BaseModel):
    """IDs to track under one account; every one is validated before anything is written."""

    ids: list[Any] = Field(
        description=f"Operation IDs, at most {MAX_IDS:,} per request",
        examples=[["comms_operation_01h9krwprkeee8fzqspvwy6nq8"]],
        # Checked one by one in ``intake`` (each error names its index), so typed for clients
        # here rather than by pydantic.
        json_schema_extra={"items": {"type": "string"}, "maxItems": MAX_IDS},
    )
    account: Any = Field(
        default=None,
        description="The account whose credentials poll them (`optrack accounts`); "
        "absent or null: `default`, the environment's",
        examples=["default"],
        json_schema_extra={"type": ["string", "null"]},
    )


async def track_request(request: Request) -> TrackRequest:
    """The body as JSON whatever its Content-Type (``curl -d`` sends a form type)."""
    raw = await request.body()
    try:
        return TrackRequest.model_validate(json.loads(raw or b"null"))
    except RecursionError:  # "[[[[…" nested deeper than the parser recurses
        raise Problem(422, [{"reason": 'body is nested too deep; send {"ids": [...]}'}]) from None
    except ValueError as exc:  # not JSON, or not {"ids": [...]}
        reason = (
            'body must be JSON like {"ids": ["comms_operation_…"]}'
            if not isinstance(exc, ValidationError)
            else 'body must be an object with a list "ids": '
            + "; ".join(e["msg"] for e in exc.errors())
        )
        raise Problem(422, [{"reason": reason}]) from None


@api.post(
    "/operations",
    summary="Track operation IDs",
    responses=answer(TrackAnswer, "The IDs tracked now and those tracked already"),
    # 403 (a read-only token, or an account the token does not see) is added for every POST.
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": TrackRequest.model_json_schema()}},
        }
    },
)
def track(body: Annotated[TrackRequest, Depends(track_request)], request: Request) -> JSONResponse:
    """Validate every ID, then track the new ones: ``{"added": [...], "already_tracked": [...]}``.

    One invalid ID and nothing is written: 422 with ``{"errors": [{"id", "index", "reason"}]}``.
    """
    if not body.ids:
        raise Problem(422, [{"reason": "ids is empty: give at least one operation ID"}])
    if len(body.ids) > MAX_IDS:
        raise Problem(
            413,
            [{"reason": f"{len(body.ids):,} IDs; send at most {MAX_IDS:,} per request"}],
        )
    errors: list[ErrorEntry] = []
    for index, value in enumerate(body.ids):
        try:
            validate_operation_id(value)
        except InvalidOperationId as exc:
            shown = value[:100] if isinstance(value, str) else None
            errors.append({"id": shown, "index": index, "reason": exc.reason})
    if errors:
        raise Problem(422, errors)
    account = DEFAULT_ACCOUNT if body.account is None else body.account
    if not isinstance(account, str):
        raise Problem(422, [{"reason": "account must be a string: an account's name"}])
    access = access_of(request)
    if not access.sees(account):
        raise forbidden(f"token {access.token} may not track under account {account[:64]!r}")
    rt = runtime(request)
    try:
        result = intake.track(rt.sessions, body.ids, rt.clock.now(), account)
    except AccountError as exc:  # unknown, badly named, or an ID tracked under another
        raise Problem(422, [{"reason": str(exc)}]) from None
    added: TrackAnswer = {
        "added": list(result.added),
        "already_tracked": list(result.already_tracked),
    }
    return _json(added)


@api.get(
    "/operations",
    summary="List tracked operations",
    responses={
        **answer(OperationsPage, "A page of operations and the next page's cursor"),
        **FORBIDDEN,
    },
)
def list_operations(
    request: Request,
    statuses: Statuses = [],  # noqa: B006  (FastAPI copies Query defaults)
    limit: Annotated[int, Query(ge=1, le=listing.MAX_PAGE)] = DEFAULT_PAGE,
    cursor: Annotated[str | None, Query(description="`next` of the previous page")] = None,
    account: AccountName = None,
) -> JSONResponse:
    """A page of operations in ID order (fields of `optrack status --json`) and the cursor of
    the next page (``next``: null on the last)."""
    wanted = _statuses(statuses)
    try:
        after = None if cursor is None else paging.decode(cursor)
    except paging.BadCursor as exc:
        raise Problem(422, [{"reason": str(exc)}]) from None
    scope = _account(request, account)
    with runtime(request).sessions() as session:
        found = listing.page(session, wanted, limit, after, scope)
    page: OperationsPage = {
        "operations": [operation_record(op) for op in found.operations],
        "next": None if found.after is None else paging.encode(found.after),
    }
    return _json(page)


# GET /operations/{operation_id} (and its wait) is in waits.py, beside the event stream.


def _history(operation_id: str, request: Request) -> reports.HistoryReport:
    op_id = _operation_id(operation_id)
    rt = runtime(request)
    with rt.sessions() as session:
        found = reports.operation_history(session, op_id, rt.clock.now())
    visible(request, op_id, found.operation.account)
    return found


@api.get(
    "/operations/{operation_id}/history",
    summary="The history of one operation",
    responses={**answer(HistoryRecord, "The operation, its changes, its estimate"), **NOT_TRACKED},
)
def get_history(operation_id: OperationId, request: Request) -> JSONResponse:
    """`optrack history ID --json`: the operation, each recorded change, the estimate."""
    return _json(history_record(_history(operation_id, request)))


@api.get(
    "/operations/{operation_id}/history.csv",
    summary="The history of one operation as CSV",
    response_class=CsvResponse,
    responses={200: {"description": "A header and one row per change"}, **NOT_TRACKED},
)
def get_history_csv(operation_id: OperationId, request: Request) -> CsvResponse:
    """`optrack history ID --csv`."""
    rows = [history_row_record(r) for r in _history(operation_id, request).rows]
    return CsvResponse(to_csv(rows, HISTORY_CSV_FIELDS))


def _summary(
    request: Request,
    since: str | None,
    until: str | None,
    statuses: list[str],
    stuck_after: str,
    limit: int | None,
    account: str | None = None,
) -> reports.Summary:
    rt = runtime(request)
    now = rt.clock.now()
    wanted = _statuses(statuses)
    stuck = _span("stuck_after", stuck_after)
    try:
        period = reports.Period.parse(since, until, now)
    except reports.BadPeriod as exc:
        raise Problem(422, [{"reason": str(exc)}]) from None
    scope = _account(request, account)
    with rt.sessions() as session:
        reports.one_snapshot(session)
        return reports.summarize(session, period, stuck, now, wanted, limit, scope)


Since = Annotated[
    str | None, Query(description="Tracked at or after: 2026-01-31, an ISO datetime, or 7d ago")
]
Until = Annotated[str | None, Query(description="Tracked before (same forms as since)")]
StuckAfter = Annotated[str, Query(description="PROCESSING unchanged this long is stuck")]


@api.get(
    "/report",
    summary="The report of a period",
    responses={**answer(SummaryRecord, "The figures of the period (docs/reports.md)"), **FORBIDDEN},
)
def get_report(
    request: Request,
    since: Since = None,
    until: Until = None,
    statuses: Statuses = [],  # noqa: B006
    stuck_after: StuckAfter = "30m",
    limit: Annotated[
        int, Query(ge=0, le=listing.MAX_PAGE, description="Operations per flagged list")
    ] = DEFAULT_REPORT_LIST,
    account: AccountName = None,
) -> JSONResponse:
    """`optrack report --json` (docs/reports.md); the flagged lists hold at most ``limit``
    operations each, their counts are complete."""
    summary = _summary(request, since, until, statuses, stuck_after, limit, account)
    return _json(summary_record(summary))


@api.get(
    "/report.csv",
    summary="The report as one CSV row",
    response_class=CsvResponse,
    responses={200: {"description": "A header and one row"}, **FORBIDDEN},
)
def get_report_csv(
    request: Request,
    since: Since = None,
    until: Until = None,
    statuses: Statuses = [],  # noqa: B006
    stuck_after: StuckAfter = "30m",
    account: AccountName = None,
) -> CsvResponse:
    """`optrack report --csv`: a header and one row, to append daily."""
    summary = _summary(request, since, until, statuses, stuck_after, 0, account)
    return CsvResponse(to_csv([summary_row(summary)], SUMMARY_CSV_FIELDS))


@api.get(
    "/account",
    summary="The account pause or credentials error",
    responses={**answer(AccountRecord, "The last pause, and whether it holds now"), **FORBIDDEN},
    dependencies=[Depends(all_accounts)],
)
def get_account(request: Request) -> JSONResponse:
    """The ``account`` object of `optrack status --json`."""
    rt = runtime(request)
    return _json(account_record(rt.gate.current(), rt.clock.now()))


@api.get(
    "/accounts",
    summary="Every account the token sees, with its figures",
    responses=answer(AccountsPage, "Each account: active operations, pause, failure rate"),
)
def get_accounts(request: Request) -> JSONResponse:
    """The dashboard's per-account summary; a token scoped to accounts sees only those."""
    rt = runtime(request)
    now = rt.clock.now()
    scope = access_of(request).accounts
    with rt.sessions() as session:
        figures = listing.account_figures(session, scope)
        paused = Accounts(session).paused(now, rt.settings.account_sid)
    rows: list[AccountSummary] = [
        {
            "name": f.name,
            "active": f.active,
            "paused": f.name in paused,
            "paused_until": utc_text(paused[f.name][0]) if f.name in paused else None,
            "failure_rate": f.failure_rate,
        }
        for f in figures
    ]
    page: AccountsPage = {"accounts": rows}
    return _json(page)


@api.get(
    "/progress",
    summary="Progress of the active and just-ended operations",
    responses={**answer(ProgressPage, "Each operation with its completion estimate"), **FORBIDDEN},
)
def get_progress(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=MAX_PROGRESS)] = 50,
    recent: Annotated[str, Query(description="Also operations ended this long ago")] = "10m",
    account: AccountName = None,
) -> JSONResponse:
    """What `optrack watch` shows: each operation and its completion estimate, the most
    recently tracked first."""
    rt = runtime(request)
    now = rt.clock.now()
    window = _span("recent", recent)
    scope = _account(request, account)
    with rt.sessions() as session:
        ids = listing.watched_ids(session, now, window, limit, scope)
        items = reports.progress(session, ids)
    page: ProgressPage = {
        "now": utc_text(now),
        "progress": [
            {"operation": operation_record(p.operation), "estimate": estimate_record(p.estimate)}
            for p in items
        ],
    }
    return _json(page)


@public.get(
    "/healthz",
    summary="Health (no token)",
    response_model=None,
    responses={
        **answer(HealthFacts, "Healthy: `optrack health` would exit 0"),
        **answer(HealthFacts, "Unhealthy: the reasons are in problems", 503),
    },
)
def healthz(
    request: Request,
    max_lag: Annotated[str, Query(description="Unhealthy if a due poll is later")] = "5m",
    max_beat_age: Annotated[str, Query(description="Unhealthy if beat is quieter")] = "1m",
) -> JSONResponse:
    """200 when `optrack health` would exit 0, else 503 with its reasons in ``problems``."""
    try:
        lag, beat_age = parse_duration(max_lag), parse_duration(max_beat_age)
    except ValueError as exc:
        raise Problem(422, [{"reason": str(exc)}]) from None
    rt = runtime(request)
    problem = health.database_problem(rt.engine)
    if problem is not None:
        return JSONResponse(health.unjudged(problem), status_code=503)
    try:
        with rt.sessions() as session:
            report = health.check(
                session,
                rt.clock.now(),
                account_sid=rt.settings.account_sid,
                max_beat_age=beat_age,
                max_lag=lag,
            )
    except DatabaseError as exc:  # gone since database_problem asked: 503 all the same
        return JSONResponse(health.unjudged(health.unreachable(exc)), status_code=503)
    if not report.ok:
        return JSONResponse(report.facts(), status_code=503)
    return _json(report.facts())
