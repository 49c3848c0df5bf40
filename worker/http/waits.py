"""Waiting over HTTP: ``GET /api/v1/operations/{id}?wait=30s&after=SEQ`` (a long poll, as
Google's WaitOperation) and ``GET /api/v1/events`` (a Server-Sent Events stream).

Both are async: between their short reads (``waiting``, ``events``, in worker threads) they
sleep on the event loop, so a waiting client holds no thread and no database connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from worker import events, listing, waiting
from worker.durations import parse_duration
from worker.http.auth import access_of
from worker.http.openapi import FORBIDDEN, answer
from worker.http.problems import Problem
from worker.http.routes import (
    MAX_IDS,
    NOT_TRACKED,
    AccountName,
    OperationId,
    _account,
    _json,
    _operation_id,
    runtime,
    visible,
)
from worker.http.shapes import OperationStep
from worker.records import operation_record

router = APIRouter(prefix="/api/v1")
MAX_SEQ = 2**31 - 1  # seq is an INTEGER column
EVENT_STREAM = "text/event-stream"
RETRY_MS = 2000  # what a browser's EventSource waits before it reconnects


def _wait_span(text: str) -> float:
    try:
        span = parse_duration(text)
    except ValueError as exc:
        raise Problem(422, [{"reason": f"wait: {exc}"}]) from None
    if span > waiting.MAX_HTTP_WAIT:
        limit = int(waiting.MAX_HTTP_WAIT.total_seconds())
        raise Problem(422, [{"reason": f"wait: at most {limit}s; ask again to wait longer"}])
    return span.total_seconds()


@router.get(
    "/operations/{operation_id}",
    summary="One tracked operation; optionally wait",
    responses={**answer(OperationStep, "The operation's record and latest step"), **NOT_TRACKED},
)
async def get_operation(
    operation_id: OperationId,
    request: Request,
    wait: Annotated[
        str | None,
        Query(description="Wait up to this long (at most 60s) for a step after `after` or the end"),
    ] = None,
    after: Annotated[
        int | None,
        Query(ge=0, le=MAX_SEQ, description="The `seq` already known: wait for a later step"),
    ] = None,
) -> JSONResponse:
    """The operation's record and ``seq``, its latest history step (null before the first).

    With ``wait``, answered as soon as the operation has a step after ``after`` or has ended,
    else when the wait runs out: 200 with the current record either way. 404 if it is not
    tracked, 422 if ``{id}`` is not an operation ID or ``wait`` is over 60s.
    """
    op_id = _operation_id(operation_id)
    span = 0.0 if wait is None else _wait_span(wait)
    rt = runtime(request)
    if access_of(request).accounts is not None:
        # Before any wait: another account's operation is not there for this token.

        def account() -> str | None:
            with rt.sessions() as session:
                return listing.account_of(session, op_id)

        owner = await asyncio.to_thread(account)
        if owner is not None:
            visible(request, op_id, owner)
    snap = await waiting.await_step(
        rt.sessions,
        op_id,
        after,
        timedelta(seconds=span),
        rt.clock,
        gone=request.is_disconnected,
    )
    visible(request, op_id, snap.operation.account)
    step: OperationStep = {**operation_record(snap.operation), "seq": snap.seq}
    return _json(step)


def _ids(values: list[str]) -> frozenset[str] | None:
    wanted = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if not wanted:
        return None
    if len(wanted) > MAX_IDS:
        raise Problem(413, [{"reason": f"{len(wanted):,} IDs; at most {MAX_IDS:,}"}])
    return frozenset(_operation_id(v) for v in wanted)


def _frame(event: events.Event | None) -> bytes:
    if event is None:
        return b": heartbeat\n\n"
    data = json.dumps(event.data, separators=(",", ":"))
    return f"id: {event.cursor.text()}\nevent: {event.kind}\ndata: {data}\n\n".encode()


@router.get(
    "/events",
    summary="Every recorded change and end, as Server-Sent Events",
    response_class=StreamingResponse,
    responses={200: {"content": {EVENT_STREAM: {}}}, **FORBIDDEN},
)
async def get_events(
    request: Request,
    ids: Annotated[
        list[str], Query(description="Only these operations (comma-separated or repeated)")
    ] = [],  # noqa: B006  (FastAPI copies Query defaults)
    account: AccountName = None,
    last_event_id: Annotated[
        str | None, Header(description="Resume after this event id (sent by EventSource)")
    ] = None,
) -> StreamingResponse:
    """``event: change`` (a history row: id, seq, status, counts, observed_at) and ``event:
    end`` (the final record, NOT_FOUND included), each with ``id: H-N``; a ``: heartbeat``
    comment after 15 s of quiet. Without ``Last-Event-ID`` the stream starts now. A token
    scoped to accounts gets their operations' events only."""
    wanted = _ids(ids)
    scope = await asyncio.to_thread(_account, request, account)
    try:
        resume = None if last_event_id is None else events.Cursor.parse(last_event_id)
    except events.BadEventId as exc:
        raise Problem(422, [{"reason": f"Last-Event-ID: {exc}"}]) from None
    rt = runtime(request)

    def start() -> events.Cursor:
        with rt.sessions() as session:
            return events.head(session)

    cursor = resume if resume is not None else await asyncio.to_thread(start)
    feed = events.Feed(cursor, wanted, scope)

    async def frames() -> AsyncIterator[bytes]:
        yield f"retry: {RETRY_MS}\n: stream from {cursor.text()}\n\n".encode()
        async for event in events.follow(rt.sessions, feed, rt.clock):
            yield _frame(event)

    return StreamingResponse(
        frames(),
        media_type=EVENT_STREAM,
        headers={"X-Accel-Buffering": "no"},  # a proxy (nginx) must not hold events back
    )
