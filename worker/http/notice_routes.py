"""Completion notices over HTTP, as `optrack notices` has them: list and show (GET), resend
(POST, behind the token and ``application/json`` like every request that changes state)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse

from worker import outbox, reports
from worker.db import MAX_ROW_ID
from worker.errors import InvalidOperationId, NoDelivery, NoticeNotFound
from worker.http import paging
from worker.http.openapi import answer, body, error
from worker.http.problems import Problem
from worker.http.routes import DEFAULT_PAGE, runtime
from worker.operation import validate_operation_id

router = APIRouter(prefix="/api/v1")
MAX_RESEND_IDS = 1000

NoticeIdParam = Annotated[
    int, Path(ge=1, le=MAX_ROW_ID, description="A notice id (its webhook-id, notice_id)")
]
NoticeId = Annotated[int, msgspec.Meta(ge=1, le=MAX_ROW_ID)]
Since = Annotated[
    str | None,
    Query(description="Ended at or after: 2026-01-31, an ISO datetime, or a span ago (7d)"),
]
Until = Annotated[str | None, Query(description="Ended before (same forms as since)")]
NOT_FOUND = error(404, "No notice with this id (never recorded, or pruned after delivery)")


class ResendRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The notices to send again: their ``ids``, or those whose operation ended in
    [``since``, ``until``) (``until`` default now; same forms as the report's)."""

    ids: Annotated[list[NoticeId], msgspec.Meta(min_length=1, max_length=MAX_RESEND_IDS)] | None = (
        None
    )
    since: str | None = None
    until: str | None = None


async def resend_request(request: Request) -> ResendRequest:
    """The body, JSON of ``ResendRequest``: ids, or a range (since, optionally until)."""
    try:
        given = msgspec.json.decode(await request.body() or b"null", type=ResendRequest)
    except msgspec.DecodeError as exc:  # ValidationError too: it says which field and why
        reason = f'body must be {{"ids": [...]}} or {{"since": ..., "until": ...}}: {exc}'
        raise Problem(422, [{"reason": reason}]) from None
    if (given.ids is None) == (given.since is None) or (given.ids and given.until):
        reason = 'give the notices\' "ids", or a range: "since" (and "until"), not both'
        raise Problem(422, [{"reason": reason}])
    return given


@router.get(
    "/notices",
    summary="List completion notices",
    responses=answer(outbox.NoticesPage, "A page of notices, the newest first, and the next"),
)
def list_notices(
    request: Request,
    statuses: Annotated[
        list[str],
        Query(
            alias="status",
            description=f"Only these statuses (repeat the parameter): {', '.join(outbox.STATUSES)}",
        ),
    ] = [],  # noqa: B006  (FastAPI copies Query defaults)
    since: Since = None,
    until: Until = None,
    operation: Annotated[str | None, Query(description="Only this operation's notice")] = None,
    limit: Annotated[int, Query(ge=1, le=outbox.MAX_PAGE)] = DEFAULT_PAGE,
    cursor: Annotated[str | None, Query(description="`next` of the previous page")] = None,
) -> JSONResponse:
    """`optrack notices list --json`: the notices, the newest first, with where each stands;
    ``since`` and ``until`` bound when their operation ended (the notice's ``created_at``)."""
    rt = runtime(request)
    now = rt.clock.now()
    try:
        wanted = outbox.statuses(statuses)
        op_id = None if operation is None else validate_operation_id(operation)
        before = None if cursor is None else paging.decode_before(cursor, MAX_ROW_ID)
        period = reports.Period.parse(since, until, now)
    except InvalidOperationId as exc:
        raise Problem(422, [{"id": exc.value, "reason": exc.reason}]) from None
    except (ValueError, reports.BadPeriod) as exc:  # BadCursor and unknown statuses too
        raise Problem(422, [{"reason": str(exc)}]) from None
    chosen = outbox.Filter(wanted, period.since, period.until, op_id)
    with rt.sessions() as session:
        found = outbox.page(session, chosen, now, limit, before)
        page: outbox.NoticesPage = {
            "notices": [outbox.record(row, now) for row in found.notices],
            "next": None if found.before is None else paging.encode_before(found.before),
        }
    return JSONResponse(page)


@router.get(
    "/notices/{notice_id}",
    summary="One completion notice",
    responses={
        **answer(outbox.NoticeDetail, "The notice and the final record it carries"),
        **NOT_FOUND,
    },
)
def get_notice(notice_id: NoticeIdParam, request: Request) -> JSONResponse:
    """`optrack notices show ID`."""
    rt = runtime(request)
    with rt.sessions() as session:
        try:
            row = outbox.get(session, notice_id)
        except NoticeNotFound as exc:
            raise Problem(404, [{"reason": str(exc)}]) from None
        return JSONResponse(outbox.detail(row, rt.clock.now()))


@router.post(
    "/notices/resend",
    summary="Resend completion notices",
    responses={
        **answer(outbox.ResendAnswer, "The notices owed again, and those being sent now"),
        **error(404, "An id is no notice; nothing was changed"),
        **error(409, "No process delivers notices (none with a channel lately); nothing changed"),
    },
    openapi_extra=body(ResendRequest, '{"ids": [1, 2]} or {"since": "7d", "until": "1d"}'),
)
def resend_notices(
    given: Annotated[ResendRequest, Depends(resend_request)], request: Request
) -> JSONResponse:
    """`optrack notices resend ID... | --since T [--until T]`: owed again, due now, sent by the
    next dispatcher run; a notice being sent now is left to that send. Safe to repeat."""
    rt = runtime(request)
    now = rt.clock.now()
    wanted = None
    if given.ids is None:
        try:
            period = reports.Period.parse(given.since, given.until, now)
        except reports.BadPeriod as exc:
            raise Problem(422, [{"reason": str(exc)}]) from None
        wanted = outbox.Filter(since=period.since, until=period.until)
    try:
        with rt.sessions.begin() as session:
            done = outbox.resend(
                session,
                now,
                ids=given.ids,
                wanted=wanted,
                channel_here=rt.settings.notices_enabled,
            )
    except NoticeNotFound as exc:
        ids = given.ids or []
        raise Problem(
            404,
            [{"reason": f"no notice with id {i}", "index": ids.index(i)} for i in exc.notice_ids],
        ) from None
    except NoDelivery as exc:
        raise Problem(409, [{"reason": str(exc)}]) from None
    resent: outbox.ResendAnswer = {"resent": list(done.resent), "sending": list(done.sending)}
    return JSONResponse(resent)
