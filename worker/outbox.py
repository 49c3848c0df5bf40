"""The notices outbox as people see it: list, show and resend (`optrack notices`,
``/api/v1/notices``). The dispatcher's side is ``worker.notices``.

A notice's status is read from its columns (there is no status column, so no migration):

    sending    claimed by a dispatcher whose lease still runs, not delivered yet
    failed     not delivered, its last attempt failed (``last_error``): retried at next_attempt_at
    owed       not delivered, no failed attempt: due at next_attempt_at
    delivered  delivered_at set, and it went out on a channel
    unsent     delivered_at set, sent nowhere: it ended where no channel delivered notices
               (born delivered: the event stream's end only)

**Resend** makes notices owed again, due now, and the next dispatcher run sends them. A
delivered (or unsent) notice is owed again on every channel; one not delivered yet is made due
now, its channels that went out staying done. A notice a dispatcher is sending now (its claim's
lease running) is left to that send: resend never takes over a claim, so it never makes two
dispatchers send one notice at once, and the dispatcher records its result as usual. Each
statement is one conditional UPDATE, so resending twice, or while a worker delivers, leaves
one owed notice, never two rows or a lost result. Receivers drop a repeat by ``webhook-id``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, TypedDict, cast

import msgspec
from sqlalchemy import ColumnElement, and_, false, or_, select, update
from sqlalchemy.orm import Session

from worker.db import Notice
from worker.errors import NoDelivery, NoticeNotFound
from worker.notices import delivery_configured
from worker.records import OperationRecord, Time, iso, utc_text

Status = Literal["owed", "sending", "failed", "delivered", "unsent"]
STATUSES: tuple[Status, ...] = ("owed", "sending", "failed", "delivered", "unsent")
MAX_PAGE = 1000


class NoticeRecord(TypedDict):
    """One completion notice: what it is about, where it stands, where it went."""

    id: Annotated[int, msgspec.Meta(description="The notice id: webhook-id, notice_id")]
    operation_id: str
    status: Annotated[str, msgspec.Meta(description=", ".join(STATUSES))]
    created_at: Annotated[Time, msgspec.Meta(description="When its operation's end was recorded")]
    attempts: int
    next_attempt_at: Annotated[
        Time | None, msgspec.Meta(description="When it is sent next; null once delivered")
    ]
    last_error: str | None
    task_sent_at: Time | None
    webhook_sent_at: Time | None
    delivered_at: Time | None


class NoticeDetail(NoticeRecord):
    """A notice and the final record of its operation, as it is sent."""

    operation: OperationRecord


class NoticesPage(TypedDict):
    """A page of notices, the newest first."""

    notices: list[NoticeRecord]
    next: Annotated[
        str | None,
        msgspec.Meta(description="The cursor of the next page (opaque); null on the last"),
    ]


class ResendAnswer(TypedDict):
    """What a resend did: the notices owed again, and those left to a send under way."""

    resent: Annotated[list[int], msgspec.Meta(description="Owed again, due now")]
    sending: Annotated[
        list[int], msgspec.Meta(description="Being sent by a dispatcher now: left to that send")
    ]


@dataclass(frozen=True)
class Filter:
    """Which notices a list or a range resend takes; every part optional."""

    statuses: tuple[Status, ...] = ()
    since: datetime | None = None  # created_at >= since
    until: datetime | None = None  # created_at < until
    operation_id: str | None = None


@dataclass(frozen=True)
class Page:
    """Notices newest first, and the id to continue below (None: the last page)."""

    notices: list[Notice]
    before: int | None


@dataclass(frozen=True)
class Resent:
    """The ids owed again, due now, and those left to a dispatcher sending them now."""

    resent: tuple[int, ...]
    sending: tuple[int, ...]


def statuses(values: Sequence[str]) -> tuple[Status, ...]:
    """``values`` as statuses, each once, in any case; ValueError naming an unknown one."""
    wanted = tuple(dict.fromkeys(v.strip().lower() for v in values if v.strip()))
    unknown = [v for v in wanted if v not in STATUSES]
    if unknown:
        raise ValueError(f"unknown notice status {', '.join(unknown)}; use {', '.join(STATUSES)}")
    return cast(tuple[Status, ...], wanted)


def status_of(row: Notice, now: datetime) -> Status:
    """Where ``row`` stands at ``now`` (see the module's docstring)."""
    if row.delivered_at is not None:
        return "delivered" if row.task_sent_at or row.webhook_sent_at else "unsent"
    if row.claim_token is not None and row.next_attempt_at > now:
        return "sending"
    return "failed" if row.last_error is not None else "owed"


def _claimed(now: datetime) -> ColumnElement[bool]:
    return and_(Notice.claim_token.is_not(None), Notice.next_attempt_at > now)


def _status_clause(status: Status, now: datetime) -> ColumnElement[bool]:
    sent = or_(Notice.task_sent_at.is_not(None), Notice.webhook_sent_at.is_not(None))
    if status == "delivered":
        return and_(Notice.delivered_at.is_not(None), sent)
    if status == "unsent":
        return and_(Notice.delivered_at.is_not(None), ~sent)
    if status == "sending":
        return and_(Notice.delivered_at.is_(None), _claimed(now))
    failing = Notice.last_error.is_not(None) if status == "failed" else Notice.last_error.is_(None)
    return and_(Notice.delivered_at.is_(None), ~_claimed(now), failing)


def _where(wanted: Filter, now: datetime) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = []
    if wanted.statuses:
        clauses.append(or_(false(), *(_status_clause(s, now) for s in wanted.statuses)))
    if wanted.since is not None:
        clauses.append(Notice.created_at >= wanted.since)
    if wanted.until is not None:
        clauses.append(Notice.created_at < wanted.until)
    if wanted.operation_id is not None:
        clauses.append(Notice.operation_id == wanted.operation_id)
    return clauses


def page(
    session: Session, wanted: Filter, now: datetime, limit: int, before: int | None = None
) -> Page:
    """Up to ``limit`` notices of ``wanted`` with an id below ``before``, the newest first (a
    keyset page: as cheap deep in the list as at its start)."""
    stmt = select(Notice).where(*_where(wanted, now)).order_by(Notice.id.desc()).limit(limit + 1)
    if before is not None:
        stmt = stmt.where(Notice.id < before)
    rows = list(session.scalars(stmt))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, rows[-1].id if more and rows else None)


def get(session: Session, notice_id: int) -> Notice:
    """The notice ``notice_id``; NoticeNotFound if there is none (never, or pruned)."""
    row = session.get(Notice, notice_id)
    if row is None:
        raise NoticeNotFound([notice_id])
    return row


def record(row: Notice, now: datetime) -> NoticeRecord:
    """The JSON of one notice (`optrack notices list --json`, ``GET /api/v1/notices``)."""
    delivered = row.delivered_at is not None
    return {
        "id": row.id,
        "operation_id": row.operation_id,
        "status": status_of(row, now),
        "created_at": utc_text(row.created_at),
        "attempts": row.attempts,
        "next_attempt_at": None if delivered else utc_text(row.next_attempt_at),
        "last_error": row.last_error,
        "task_sent_at": iso(row.task_sent_at),
        "webhook_sent_at": iso(row.webhook_sent_at),
        "delivered_at": iso(row.delivered_at),
    }


def detail(row: Notice, now: datetime) -> NoticeDetail:
    """``record`` and the operation's final record the notice carries."""
    payload: dict[str, Any] = json.loads(row.payload)
    return {**record(row, now), "operation": cast(OperationRecord, payload)}


def resend(
    session: Session,
    now: datetime,
    *,
    ids: Sequence[int] | None = None,
    wanted: Filter | None = None,
    channel_here: bool = False,
) -> Resent:
    """Make the notices ``ids`` (or those of ``wanted``) owed again, due ``now``.

    NoticeNotFound names the ids that are no notice (nothing is changed then). NoDelivery when
    nothing would send them: this process has no channel (``channel_here``) and no process with
    one was alive within ``notices.DELIVERY_REMEMBERED``.
    """
    if (ids is None) == (wanted is None):
        raise ValueError("give the notices' ids or a filter, not both")
    if ids is not None:
        chosen: list[ColumnElement[bool]] = [Notice.id.in_(sorted(set(ids)))]
        found = set(session.scalars(select(Notice.id).where(*chosen)))
        missing = sorted(set(ids) - found)
        if missing:
            raise NoticeNotFound(missing)
    else:
        assert wanted is not None
        chosen = _where(wanted, now)
    if not (channel_here or delivery_configured(session, now)):
        raise NoDelivery(
            "no process delivers notices: none with OPTRACK_NOTIFY_TASK or OPTRACK_WEBHOOK_URL "
            "(a worker or beat) was alive in the last 7 days, so nothing would send them; "
            "nothing was changed"
        )
    again = session.execute(
        update(Notice)
        .where(*chosen, Notice.delivered_at.is_not(None))
        .values(delivered_at=None, task_sent_at=None, webhook_sent_at=None, next_attempt_at=now)
        .returning(Notice.id)
        .execution_options(synchronize_session=False)
    )
    resent = set(again.scalars())
    due = session.execute(
        update(Notice)
        .where(*chosen, Notice.delivered_at.is_(None), ~_claimed(now))
        .values(next_attempt_at=now)
        .returning(Notice.id)
        .execution_options(synchronize_session=False)
    )
    resent |= set(due.scalars())
    busy = session.scalars(
        select(Notice.id).where(*chosen, Notice.delivered_at.is_(None), _claimed(now))
    )
    return Resent(tuple(sorted(resent)), tuple(sorted(set(busy) - resent)))
