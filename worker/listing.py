"""Read queries of the HTTP API: keyset pages of tracked operations, the dashboard's watch list.

Beside ``repository`` (which owns the writes and the poll queries): every function
takes the caller's session and returns the reports' frozen ``OperationState`` values, so the
adapters serialize them with the one formatter (``records.operation_record``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from worker.db import Account, TrackedOperation
from worker.reports.model import OperationState
from worker.reports.queries import STATE_COLUMNS, AccountScope, of_accounts
from worker.tracking import ACTIVE_STATES

MAX_PAGE = 1000


@dataclass(frozen=True)
class Page:
    """One keyset page of tracked operations; ``after`` is the last ID when there is more."""

    operations: tuple[OperationState, ...]
    after: str | None


def _states(session: Session, stmt: Any) -> tuple[OperationState, ...]:
    return tuple(OperationState(*row) for row in session.execute(stmt))


def page(
    session: Session,
    statuses: Sequence[str],
    limit: int,
    after: str | None = None,
    account: AccountScope = None,
) -> Page:
    """Up to ``limit`` operations (of ``account``) with an ID greater than ``after``, in ID
    order.

    Keyset by the primary key: a page costs the same at the millionth row as at the first,
    and operations tracked while a client pages through never shift or repeat a page.
    """
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
    stmt = select(*STATE_COLUMNS).order_by(TrackedOperation.id).limit(limit + 1)
    if statuses:
        stmt = stmt.where(TrackedOperation.status.in_(list(statuses)))
    if after is not None:
        stmt = stmt.where(TrackedOperation.id > after)
    if account is not None:
        stmt = stmt.where(of_accounts(account))
    found = _states(session, stmt)
    more = len(found) > limit
    shown = found[:limit]
    return Page(shown, shown[-1].id if more and shown else None)


def watched_ids(
    session: Session,
    now: datetime,
    recent: timedelta,
    limit: int,
    account: AccountScope = None,
) -> tuple[str, ...]:
    """The dashboard's progress list: operations (of ``account``) still active or ended
    within ``recent`` of ``now`` (so a finish stays in sight), the most recently tracked
    first."""
    stmt = (
        select(TrackedOperation.id)
        .where(
            or_(
                TrackedOperation.status.in_(ACTIVE_STATES),
                TrackedOperation.ended_at >= now - recent,
            )
        )
        .order_by(TrackedOperation.tracked_at.desc(), TrackedOperation.id)
        .limit(limit)
    )
    if account is not None:
        stmt = stmt.where(of_accounts(account))
    return tuple(session.scalars(stmt))


def account_of(session: Session, operation_id: str) -> str | None:
    """The account ``operation_id`` is tracked under; None if it is not tracked."""
    return session.scalar(
        select(TrackedOperation.account).where(TrackedOperation.id == operation_id)
    )


@dataclass(frozen=True)
class AccountFigures:
    """One account's operations at a glance: active ones, and senders created and failed."""

    name: str
    active: int
    created: int
    failed: int

    @property
    def failure_rate(self) -> float | None:
        """Failed senders of all those that ended either way; None before any."""
        done = self.created + self.failed
        return None if done == 0 else self.failed / done


def account_figures(session: Session, account: AccountScope = None) -> list[AccountFigures]:
    """Every account (of ``account``) by name, with its figures."""
    t = TrackedOperation
    names = select(Account.name).order_by(Account.name)
    active_by = select(t.account, func.count()).where(t.status.in_(ACTIVE_STATES))
    sums = select(
        t.account, func.coalesce(func.sum(t.created), 0), func.coalesce(func.sum(t.failed), 0)
    )
    if account is not None:
        names = names.where(
            Account.name.in_([account] if isinstance(account, str) else sorted(account))
        )
        active_by = active_by.where(of_accounts(account))
        sums = sums.where(of_accounts(account))
    active = dict(session.execute(active_by.group_by(t.account)).all())
    senders = {
        name: (int(c or 0), int(f or 0)) for name, c, f in session.execute(sums.group_by(t.account))
    }
    return [
        AccountFigures(name, int(active.get(name, 0)), *senders.get(name, (0, 0)))
        for name in session.scalars(names)
    ]
