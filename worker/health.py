"""Is optrack working? Beat's heartbeat, the polling lag, rejected credentials and a wrong
base URL, from the DB.

``beat_ticked`` is called by the tick task; ``check`` is what `optrack health` and the metrics
read. Every function takes ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, TypedDict

import msgspec
from sqlalchemy import Engine, func, inspect, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from worker import dead_letters, liveness
from worker.credentials import DEFAULT_ACCOUNT
from worker.db import (
    Account,
    AccountPause,
    Heartbeat,
    Notice,
    PollGroup,
    TrackedOperation,
)
from worker.errors import CONFIG_ERROR_STATUS
from worker.records import Time, iso
from worker.tracking import ACTIVE_STATES, PROCESSING

# The tick's heartbeat. (Releases before 0009 wrote "beat": liveness tells them by that name.)
TICK = "tick"


def database_problem(engine: Engine) -> str | None:
    """Why the database cannot be judged (down, or not migrated), or None."""
    try:
        if not inspect(engine).has_table("heartbeats"):
            return "the database is not migrated to this version; run `optrack db upgrade`"
    except SQLAlchemyError as exc:
        return unreachable(exc)
    return None


def unreachable(exc: SQLAlchemyError) -> str:
    """One line saying the database did not answer, and the driver's first line of why."""
    lines = str(getattr(exc, "orig", None) or type(exc).__name__).strip().splitlines()
    return f"the database does not answer: {lines[0] if lines else type(exc).__name__}"


def beat_ticked(session: Session, now: datetime) -> None:
    """Record that beat's tick ran at ``now`` (in the caller's transaction)."""
    liveness.heartbeat(session, TICK, now)


def last_beat(session: Session) -> datetime | None:
    """When beat's tick last ran, or None if it never did."""
    row = session.get(Heartbeat, TICK)
    return None if row is None else row.beat_at


def poll_lag(session: Session, now: datetime) -> float:
    """Seconds the most overdue poll is late at ``now`` (0 if none): the oldest due time of a
    poll group with members, or how long an operation has waited to be placed in one."""
    due = session.scalar(select(func.min(PollGroup.next_due_at)).where(PollGroup.members > 0))
    waiting = session.scalar(
        select(func.min(TrackedOperation.tracked_at)).where(
            TrackedOperation.group_id.is_(None), TrackedOperation.status.in_(ACTIVE_STATES)
        )
    )
    oldest = min((t for t in (due, waiting) if t is not None), default=None)
    if oldest is None:
        return 0.0
    return max(0.0, (now - oldest).total_seconds())


def poll_lags(session: Session, now: datetime) -> dict[str, float]:
    """``poll_lag`` of each account with a late poll: one account's pause shows as its own."""
    t, g = TrackedOperation, PollGroup
    oldest: dict[str, datetime] = {}
    due = select(g.account, func.min(g.next_due_at)).where(g.members > 0).group_by(g.account)
    waiting = (
        select(t.account, func.min(t.tracked_at))
        .where(t.group_id.is_(None), t.status.in_(ACTIVE_STATES))
        .group_by(t.account)
    )
    for stmt in (due, waiting):
        for account, at in session.execute(stmt):
            if at is not None and (account not in oldest or at < oldest[account]):
                oldest[account] = at
    lags = {name: (now - at).total_seconds() for name, at in oldest.items()}
    return {name: lag for name, lag in sorted(lags.items()) if lag > 0}


def processing_unchanged(session: Session, now: datetime) -> float:
    """Seconds since the PROCESSING operation that changed least recently last changed at the
    API (its updatedAt; 0 if none): over the report's stuck-after, something is stuck."""
    stalest = session.scalar(
        select(func.min(TrackedOperation.remote_updated_at)).where(
            TrackedOperation.status == PROCESSING
        )
    )
    if stalest is None:
        return 0.0
    return max(0.0, (now - stalest).total_seconds())


def operation_counts(session: Session) -> dict[str, int]:
    """How many tracked operations are in each status."""
    stmt = select(TrackedOperation.status, func.count()).group_by(TrackedOperation.status)
    return {status: int(count) for status, count in session.execute(stmt)}


def credentials_rejected(session: Session, account_sid: str) -> AccountPause | None:
    """The account's row while its credentials stand rejected: from a 401/403 until a request
    sent after it is answered 200, whatever pause runs or ran out meanwhile."""
    row = session.get(AccountPause, account_sid)
    if row is not None and row.credentials_rejected_at is not None:
        return row
    return None


def rejected_accounts(session: Session, default_sid: str) -> list[tuple[str, AccountPause]]:
    """Every account whose credentials stand rejected, by name, with its pause row (each
    account's own: one account's revoked key says nothing of another's)."""
    p = AccountPause
    stmt = (
        select(p, Account.name)
        .outerjoin(Account, Account.account_sid == p.account_sid)
        .where(p.credentials_rejected_at.is_not(None))
    )
    found: list[tuple[str, AccountPause]] = []
    for row, name in session.execute(stmt):
        if name is None and row.account_sid == default_sid:
            name = DEFAULT_ACCOUNT
        if name is not None:
            found.append((name, row))
    return sorted(found, key=lambda item: item[0])


def configuration_error(session: Session, account_sid: str, now: datetime) -> AccountPause | None:
    """The account pause caused by a wrong base URL (a List 404), while it still runs."""
    row = session.get(AccountPause, account_sid)
    if row is not None and row.status_code == CONFIG_ERROR_STATUS and row.paused_until > now:
        return row
    return None


@dataclass(frozen=True)
class AccountGauges:
    """One account's gauges: its active operations, its pause, its credentials."""

    name: str
    active: int
    paused: bool
    credentials_rejected: bool


def account_gauges(session: Session, default_sid: str, now: datetime) -> tuple[AccountGauges, ...]:
    """Every account's gauges at ``now``, by name (the default's pause is ``default_sid``'s)."""
    t = TrackedOperation
    active = dict(
        session.execute(
            select(t.account, func.count()).where(t.status.in_(ACTIVE_STATES)).group_by(t.account)
        ).all()
    )
    found = []
    for row in session.scalars(select(Account).order_by(Account.name)):
        sid = default_sid if row.name == DEFAULT_ACCOUNT else row.account_sid
        pause = None if sid is None else session.get(AccountPause, sid)
        found.append(
            AccountGauges(
                row.name,
                int(active.get(row.name, 0)),
                pause is not None and pause.paused_until > now,
                pause is not None and pause.credentials_rejected_at is not None,
            )
        )
    return tuple(found)


@dataclass(frozen=True)
class Gauges:
    """What a metrics scrape reads of the database, in one session."""

    counts: dict[str, int]
    poll_lag: float
    beat_at: datetime | None
    notices_pending: int
    processing_unchanged: float
    paused: bool
    credentials_rejected: bool  # these two: the default account's
    dead_letters: int
    accounts: tuple[AccountGauges, ...] = ()


def gauges(session: Session, account_sid: str, now: datetime) -> Gauges:
    """Every gauge of ``optrack_*`` read from the database at ``now``."""
    pause = session.get(AccountPause, account_sid)
    pending = session.scalar(
        select(func.count()).select_from(Notice).where(Notice.delivered_at.is_(None))
    )
    return Gauges(
        counts=operation_counts(session),
        poll_lag=poll_lag(session, now),
        beat_at=last_beat(session),
        notices_pending=int(pending or 0),
        processing_unchanged=processing_unchanged(session, now),
        paused=pause is not None and pause.paused_until > now,
        credentials_rejected=credentials_rejected(session, account_sid) is not None,
        dead_letters=dead_letters.waiting(session),
        accounts=account_gauges(session, account_sid, now),
    )


class HealthFacts(TypedDict):
    """`optrack health --json`, and /healthz's answer (200 healthy, 503 not)."""

    ok: bool
    beat_at: Annotated[Time | None, msgspec.Meta(description="beat's last tick; null if none")]
    lag_seconds: Annotated[
        float | None, msgspec.Meta(description="how late the most overdue poll is")
    ]
    problems: Annotated[list[str], msgspec.Meta(description="what is wrong; empty if healthy")]


def unjudged(problem: str) -> HealthFacts:
    """The facts when the database cannot be judged (``database_problem``)."""
    return {"ok": False, "beat_at": None, "lag_seconds": None, "problems": [problem]}


@dataclass(frozen=True)
class HealthReport:
    """The facts `optrack health` judged, and what is wrong (empty when healthy)."""

    beat_at: datetime | None
    lag: float
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems

    def facts(self) -> HealthFacts:
        """`optrack health --json` and the body of the HTTP app's ``/healthz``."""
        return {
            "ok": self.ok,
            "beat_at": iso(self.beat_at),
            "lag_seconds": self.lag,
            "problems": list(self.problems),
        }


def check(
    session: Session,
    now: datetime,
    *,
    account_sid: str,
    max_beat_age: timedelta,
    max_lag: timedelta,
) -> HealthReport:
    """Judge beat's last tick, the polling lag and the credentials at ``now``."""
    problems: list[str] = []
    beat_at = last_beat(session)
    if beat_at is None:
        problems.append("beat has never ticked (is `celery beat` running, and a worker?)")
    elif now - beat_at > max_beat_age:
        age = (now - beat_at).total_seconds()
        problems.append(
            f"beat last ticked {age:.0f}s ago at {beat_at.isoformat()} "
            f"(more than {max_beat_age.total_seconds():.0f}s)"
        )
    lag = poll_lag(session, now)
    for name, late in poll_lags(session, now).items():
        if late > max_lag.total_seconds():
            problems.append(
                f"polling lags {late:.0f}s behind schedule (more than "
                f"{max_lag.total_seconds():.0f}s) (account {name})"
            )
    for name, rejected in rejected_accounts(session, account_sid):
        assert rejected.credentials_rejected_at is not None
        problems.append(
            f"credentials rejected at {rejected.credentials_rejected_at.isoformat()}, no request "
            f"accepted since: {rejected.credentials_error} (account {name})"
        )
    wrong = configuration_error(session, account_sid, now)
    if wrong is not None:
        problems.append(
            f"polling paused at {wrong.updated_at.isoformat()} by a {wrong.reason} "
            "(no operation ended because of it)"
        )
    return HealthReport(beat_at, lag, tuple(problems))
