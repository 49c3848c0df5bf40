"""The reports' SQL: aggregates and window functions; Python only combines what comes back.

Nothing here reads the wall clock: callers pass ``now``. docs/reports.md defines each figure.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import fields, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    case,
    func,
    literal,
    null,
    or_,
    select,
    tuple_,
    type_coerce,
)
from sqlalchemy.orm import Session, sessionmaker

from worker import dialect
from worker.db import (
    HistoryEntry,
    PollGroup,
    TrackedOperation,
    UTCDateTime,
)
from worker.dialect import in_many
from worker.errors import NotTracked
from worker.reports.model import (
    Estimate,
    Flagged,
    Flags,
    HistoryReport,
    HistoryRow,
    OperationState,
    Progress,
    Senders,
    Summary,
    Throughput,
    TimeToFinish,
)
from worker.reports.period import BadPeriod, Period
from worker.tracking import (
    ACTIVE_STATES,
    ALL_STATES,
    ENDED_STATES,
    FINISHED_STATES,
    NOT_FOUND,
    PROCESSING,
)

DEFAULT_STUCK_AFTER = timedelta(minutes=30)
ESTIMATE_WINDOW = 5  # recorded changes the completion estimate looks back over


# --- SQL helpers --------------------------------------------------------------------------


def _ms(value: float | None) -> float | None:
    """Durations to the millisecond: SQLite's julianday arithmetic leaves float dust."""
    return None if value is None else round(float(value), 3)


# Whose operations a query keeps: one account's, those of a set (a scoped HTTP token's), or
# every one (None).
AccountScope = str | frozenset[str] | None


def of_accounts(scope: str | frozenset[str]) -> ColumnElement[bool]:
    """The condition keeping the operations of ``scope``'s account(s)."""
    if isinstance(scope, str):
        return TrackedOperation.account == scope
    return TrackedOperation.account.in_(sorted(scope))


def _scope(
    period: Period, statuses: Sequence[str], account: AccountScope = None
) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if account is not None:
        conditions.append(of_accounts(account))
    if period.since is not None:
        conditions.append(TrackedOperation.tracked_at >= period.since)
    if period.until is not None:
        conditions.append(TrackedOperation.tracked_at < period.until)
    if statuses:
        conditions.append(TrackedOperation.status.in_(statuses))
    return conditions


def _group(column: Any) -> Any:
    """Correlated subquery: a column of the operation's poll group (NULL without one)."""
    return select(column).where(PollGroup.id == TrackedOperation.group_id).scalar_subquery()


def _next_poll() -> Any:
    """When the operation is asked next: its group's due time, or its own backoff if later;
    an operation waiting to be placed is due since it was tracked; an ended one, never."""
    t = TrackedOperation
    group_due = _group(PollGroup.next_due_at)
    expr = case(
        (t.status.in_(ENDED_STATES), null()),
        (
            and_(t.not_before.is_not(None), or_(group_due.is_(None), t.not_before > group_due)),
            t.not_before,
        ),
        else_=func.coalesce(group_due, t.tracked_at),
    )
    return type_coerce(expr, UTCDateTime()).label("next_poll_at")


def _last_confirmed() -> Any:
    """When the API last confirmed the operation's state: its own last recorded answer, or
    its group's last poll if later (a poll confirms what it finds unchanged without a write);
    an operation in error shows its own last answer."""
    t = TrackedOperation
    group_polled = _group(PollGroup.last_polled_at)
    expr = case(
        (
            and_(
                t.consecutive_errors == 0,
                t.status.in_(ACTIVE_STATES),
                group_polled.is_not(None),
                or_(t.last_polled_at.is_(None), group_polled > t.last_polled_at),
            ),
            group_polled,
        ),
        else_=t.last_polled_at,
    )
    return type_coerce(expr, UTCDateTime()).label("last_polled_at")


_COMPUTED = {"next_poll_at": _next_poll, "last_polled_at": _last_confirmed}
# The operation's columns in OperationState's field order: reports read rows, not ORM objects.
STATE_COLUMNS = tuple(
    _COMPUTED[f.name]() if f.name in _COMPUTED else getattr(TrackedOperation, f.name)
    for f in fields(OperationState)
)


def _states(session: Session, stmt: Select[Any]) -> tuple[OperationState, ...]:
    return tuple(OperationState(*row) for row in session.execute(stmt))


def _last_change() -> Any:
    """Correlated subquery: observed_at of the operation's latest history row (index-backed)."""
    return (
        select(func.max(HistoryEntry.observed_at))
        .where(HistoryEntry.operation_id == TrackedOperation.id)
        .scalar_subquery()
    )


def one_snapshot(session: Session) -> None:
    """Read every figure from one snapshot, so counts and lists agree while polls write.

    PostgreSQL: REPEATABLE READ. SQLite's transaction is one snapshot already.
    """
    dialect.one_snapshot(session)


# --- summary ------------------------------------------------------------------------------


def summarize(
    session: Session,
    period: Period,
    stuck_after: timedelta,
    now: datetime,
    statuses: Sequence[str] = (),
    list_limit: int | None = None,
    account: AccountScope = None,
) -> Summary:
    """The figures of `optrack report` for operations tracked in ``period``.

    ``list_limit`` caps each list of flagged operations (stuck, NOT_FOUND, in error); their
    counts are always complete. It runs several queries: on PostgreSQL, give it a session in
    a REPEATABLE READ transaction for figures from one snapshot (the CLI does).
    """
    unknown = sorted(set(statuses) - set(ALL_STATES))
    if unknown:
        raise BadPeriod(f"unknown status {', '.join(unknown)}; use one of {', '.join(ALL_STATES)}")
    scope = _scope(period, statuses, account)
    by_status = dict.fromkeys(ALL_STATES, 0)
    total = created = failed = queued = 0
    starts: list[datetime] = []
    ends: list[datetime] = []
    grouped = (
        select(
            TrackedOperation.status,
            func.count(),
            func.coalesce(func.sum(TrackedOperation.total), 0),
            func.coalesce(func.sum(TrackedOperation.created), 0),
            func.coalesce(func.sum(TrackedOperation.failed), 0),
            func.coalesce(func.sum(TrackedOperation.queued), 0),
            func.min(TrackedOperation.remote_created_at),
            func.max(TrackedOperation.remote_updated_at),
        )
        .where(*scope)
        .group_by(TrackedOperation.status)
    )
    for status, count, s_total, s_created, s_failed, s_queued, start, end in session.execute(
        grouped
    ):
        by_status[status] = int(count)
        total += int(s_total or 0)
        created += int(s_created or 0)
        failed += int(s_failed or 0)
        queued += int(s_queued or 0)
        starts += [start] if start is not None else []
        ends += [end] if end is not None else []
    processed = created + failed
    start, end = (min(starts), max(ends)) if starts and ends else (None, None)
    minutes = (end - start).total_seconds() / 60 if start and end else 0.0
    return Summary(
        now=now,
        period=period,
        statuses=tuple(statuses),
        stuck_after=stuck_after,
        operations=sum(by_status.values()),
        by_status=by_status,
        senders=Senders(
            total=total,
            created=created,
            failed=failed,
            queued=queued,
            failure_rate=round(failed / processed, 6) if processed else None,
        ),
        time_to_finish=_time_to_finish(session, scope),
        throughput=Throughput(
            created=created,
            start=start,
            end=end,
            per_minute=round(created / minutes, 3) if minutes > 0 else None,
        ),
        stuck=_stuck(session, scope, now - stuck_after, now, list_limit),
        not_found=_flagged(
            session,
            [*scope, TrackedOperation.status == NOT_FOUND],
            "ended_at",
            now,
            list_limit,
        ),
        in_error=_flagged(
            session,
            [*scope, TrackedOperation.consecutive_errors > 0],
            "consecutive_errors",
            now,
            list_limit,
        ),
    )


def _time_to_finish(session: Session, scope: list[ColumnElement[bool]]) -> TimeToFinish:
    """p50/p95 by linear interpolation between ranks (PostgreSQL's percentile_cont)."""
    seconds = dialect.seconds_between(TrackedOperation.remote_created_at, TrackedOperation.ended_at)
    finished = [
        *scope,
        TrackedOperation.status.in_(FINISHED_STATES),
        TrackedOperation.remote_created_at.is_not(None),
        TrackedOperation.ended_at.is_not(None),
    ]
    count, (p50, p95), longest = dialect.percentiles(session, seconds, finished, (0.5, 0.95))
    return TimeToFinish(count, _ms(p50), _ms(p95), _ms(longest))


def _stuck(
    session: Session,
    scope: list[ColumnElement[bool]],
    cutoff: datetime,
    now: datetime,
    limit: int | None,
) -> Flags:
    """PROCESSING operations whose latest recorded change was observed before ``cutoff``."""
    last_change = func.coalesce(_last_change(), TrackedOperation.tracked_at).label("last_change")
    # MATERIALIZED: look the last change up once per operation, not again for the output.
    inner = (
        select(*STATE_COLUMNS, last_change)
        .where(*scope, TrackedOperation.status == PROCESSING)
        .cte("processing")
        .prefix_with("MATERIALIZED")
    )
    return _flags(
        session,
        inner,
        inner.c.last_change < literal(cutoff, UTCDateTime()),
        (inner.c.last_change, inner.c.id),
        now,
        limit,
    )


def _flagged(
    session: Session,
    where: list[ColumnElement[bool]],
    largest_first: str,
    now: datetime,
    limit: int | None,
) -> Flags:
    """Operations matching ``where``, the largest ``largest_first`` column first."""
    source = select(*STATE_COLUMNS, _last_change().label("last_change")).where(*where).subquery()
    order = (source.c[largest_first].desc(), source.c.id)
    return _flags(session, source, None, order, now, limit)


def _flags(
    session: Session,
    source: Any,
    where: ColumnElement[bool] | None,
    order: tuple[Any, ...],
    now: datetime,
    limit: int | None,
) -> Flags:
    """Count and list in one pass: the count is a window over every match, before the LIMIT."""
    conditions = [] if where is None else [where]
    if limit == 0:
        count = session.scalar(select(func.count()).select_from(source).where(*conditions))
        return Flags(int(count or 0), ())
    stmt = (
        select(source, func.count().over().label("matches"))
        .where(*conditions)
        .order_by(*order)
        .limit(limit)
    )
    rows = session.execute(stmt).all()
    flagged = []
    for *state, last_change, _matches in rows:
        unchanged = None if last_change is None else (now - last_change).total_seconds()
        flagged.append(Flagged(OperationState(*state), last_change, unchanged))
    # No row: nothing matched (the limit is at least 1 here).
    return Flags(int(rows[0][-1]) if rows else 0, tuple(flagged))


# --- one operation ------------------------------------------------------------------------


def get_operation(session: Session, operation_id: str) -> OperationState:
    """One tracked operation; NotTracked if optrack does not follow it."""
    found = _states(session, select(*STATE_COLUMNS).where(TrackedOperation.id == operation_id))
    if not found:
        raise NotTracked(operation_id)
    return found[0]


def operations(
    session: Session,
    period: Period,
    statuses: Sequence[str] = (),
    limit: int | None = None,
    account: AccountScope = None,
) -> tuple[OperationState, ...]:
    """Operations tracked in ``period`` (of ``account``), the most recently tracked first."""
    stmt = (
        select(*STATE_COLUMNS)
        .where(*_scope(period, statuses, account))
        .order_by(TrackedOperation.tracked_at.desc(), TrackedOperation.id)
        .limit(limit)
    )
    return _states(session, stmt)


def every_operation(session: Session) -> tuple[OperationState, ...]:
    """Every tracked operation, the most recently tracked last (`optrack status`)."""
    stmt = select(*STATE_COLUMNS).order_by(TrackedOperation.tracked_at, TrackedOperation.id)
    return _states(session, stmt)


def operation_history(session: Session, operation_id: str, now: datetime) -> HistoryReport:
    """Every recorded change of one operation with deltas and rates, and its estimate."""
    op = get_operation(session, operation_id)
    h = HistoryEntry

    def previous(column: Any) -> Any:
        return func.lag(column).over(order_by=h.seq)

    # Before the first row the operation stood at its creation: nothing done, all queued.
    prev_created = func.coalesce(previous(h.created), 0)
    prev_failed = func.coalesce(previous(h.failed), 0)
    prev_queued = func.coalesce(previous(h.queued), h.total)
    prev_time = func.coalesce(
        previous(h.remote_updated_at),
        literal(op.remote_created_at, UTCDateTime()),
    )
    stmt = (
        select(
            h.seq,
            h.observed_at,
            h.remote_updated_at,
            h.status,
            h.total,
            h.queued,
            h.created,
            h.failed,
            (h.created - prev_created).label("created_delta"),
            (h.failed - prev_failed).label("failed_delta"),
            (h.queued - prev_queued).label("queued_delta"),
            dialect.seconds_between(prev_time, h.remote_updated_at).label("elapsed"),
        )
        .where(h.operation_id == operation_id)
        .order_by(h.seq)
    )
    rows = []
    for r in session.execute(stmt):
        elapsed = _ms(r.elapsed)
        moved = r.created_delta + r.failed_delta
        rows.append(
            HistoryRow(
                seq=r.seq,
                observed_at=r.observed_at,
                remote_updated_at=r.remote_updated_at,
                status=r.status,
                total=r.total,
                queued=r.queued,
                created=r.created,
                failed=r.failed,
                created_delta=r.created_delta,
                failed_delta=r.failed_delta,
                queued_delta=r.queued_delta,
                elapsed_seconds=elapsed,
                rate_per_minute=round(moved * 60 / elapsed, 3) if elapsed else None,
            )
        )
    estimate = estimates(session, [op])[op.id]
    return HistoryReport(now=now, operation=op, rows=tuple(rows), estimate=estimate)


def estimates(session: Session, ops: Sequence[OperationState]) -> dict[str, Estimate]:
    """Completion estimates, from each operation's last ``ESTIMATE_WINDOW`` changes.

    rate = (done at the latest row - done at the row ESTIMATE_WINDOW changes before it) over
    the API time between them; with fewer rows the basis is the creation (nothing done, at
    createdAt). ETA = latest row's time + remaining / rate.
    """
    ids = [op.id for op in ops if op.status == PROCESSING]
    recent: dict[str, list[Any]] = {}
    rank = (
        func.row_number()
        .over(partition_by=HistoryEntry.operation_id, order_by=HistoryEntry.seq.desc())
        .label("rank")
    )
    for wanted in in_many(session, HistoryEntry.operation_id, ids):
        inner = (
            select(
                HistoryEntry.operation_id,
                HistoryEntry.remote_updated_at,
                HistoryEntry.total,
                (HistoryEntry.created + HistoryEntry.failed).label("done"),
                rank,
            )
            .where(wanted)
            .subquery()
        )
        stmt = (
            select(inner)
            .where(inner.c.rank <= ESTIMATE_WINDOW + 1)
            .order_by(inner.c.operation_id, inner.c.rank)
        )
        for row in session.execute(stmt):
            recent.setdefault(row.operation_id, []).append(row)
    return {op.id: _estimate(op, recent.get(op.id, [])) for op in ops}


def _estimate(op: OperationState, recent: list[Any]) -> Estimate:
    none = Estimate(None, None, None, None, None, "")
    if op.status != PROCESSING:
        return replace(none, note="ended" if op.status in ENDED_STATES else "not fetched yet")
    if not recent:
        return replace(none, note="no recorded change yet")
    latest = recent[0]
    remaining = max(latest.total - latest.done, 0)
    if len(recent) > ESTIMATE_WINDOW or op.remote_created_at is None:
        basis_time, basis_done = recent[-1].remote_updated_at, recent[-1].done
        note = f"rate over the last {len(recent) - 1} change(s)"
    else:
        basis_time, basis_done = op.remote_created_at, 0
        note = f"rate since creation ({len(recent)} change(s))"
    seconds = (latest.remote_updated_at - basis_time).total_seconds()
    moved = latest.done - basis_done
    if seconds <= 0 or moved <= 0:
        return Estimate(remaining, None, basis_time, latest.remote_updated_at, None, "no progress")
    per_second = moved / seconds
    return Estimate(
        remaining=remaining,
        rate_per_minute=round(per_second * 60, 3),
        basis_start=basis_time,
        basis_end=latest.remote_updated_at,
        eta=latest.remote_updated_at + timedelta(seconds=round(remaining / per_second)),
        note=note,
    )


def progress_states(session: Session, operation_ids: Sequence[str]) -> list[OperationState]:
    """The current state of the given operations, in the given order; NotTracked if one is
    not tracked."""
    found: dict[str, OperationState] = {}
    for wanted in in_many(session, TrackedOperation.id, list(dict.fromkeys(operation_ids))):
        found.update((op.id, op) for op in _states(session, select(*STATE_COLUMNS).where(wanted)))
    missing = [op_id for op_id in operation_ids if op_id not in found]
    if missing:
        raise NotTracked(missing[0])
    return [found[op_id] for op_id in operation_ids]


def progress(session: Session, operation_ids: Sequence[str]) -> tuple[Progress, ...]:
    """Current state and estimate of the given operations (in the given order)."""
    ordered = progress_states(session, operation_ids)
    guesses = estimates(session, ordered)
    return tuple(Progress(op, guesses[op.id]) for op in ordered)


def status_counts(session: Session, operation_ids: Sequence[str]) -> dict[str, int]:
    """How many of the given operations are in each status; NotTracked if one is not tracked.

    For the operations ``watch`` does not draw a bar for: any number of them, in one array
    (PostgreSQL) or a few chunks (SQLite).
    """
    wanted_ids = list(dict.fromkeys(operation_ids))
    counts: dict[str, int] = {}
    for wanted in in_many(session, TrackedOperation.id, wanted_ids):
        stmt = (
            select(TrackedOperation.status, func.count())
            .where(wanted)
            .group_by(TrackedOperation.status)
        )
        for status, n in session.execute(stmt):
            counts[status] = counts.get(status, 0) + int(n)
    if sum(counts.values()) < len(wanted_ids):
        known: set[str] = set()
        for wanted in in_many(session, TrackedOperation.id, wanted_ids):
            known.update(session.scalars(select(TrackedOperation.id).where(wanted)))
        raise NotTracked(next(i for i in wanted_ids if i not in known))
    return counts


def operation_pages(
    sessions: sessionmaker[Session], size: int = 1000, account: str | None = None
) -> Iterator[tuple[OperationState, ...]]:
    """Every tracked operation, the most recently tracked last, ``size`` at a time.

    Keyset pages on (tracked_at, id), each read in a session of its own: a page costs the same
    at the end as at the start, only one is in memory, and no transaction (on SQLite: the
    write lock) stays open while the caller prints.
    """
    after: tuple[datetime, str] | None = None
    while True:
        stmt = select(*STATE_COLUMNS).order_by(TrackedOperation.tracked_at, TrackedOperation.id)
        if account is not None:
            stmt = stmt.where(TrackedOperation.account == account)
        if after is not None:
            stmt = stmt.where(
                tuple_(TrackedOperation.tracked_at, TrackedOperation.id)
                > tuple_(literal(after[0], UTCDateTime()), literal(after[1]))
            )
        with sessions() as session:
            found = _states(session, stmt.limit(size))
        if found:
            yield found
        if len(found) < size:
            return
        after = (found[-1].tracked_at, found[-1].id)


def count_operations(session: Session, account: str | None = None) -> int:
    """How many operations are tracked (of ``account``)."""
    stmt = select(func.count()).select_from(TrackedOperation)
    if account is not None:
        stmt = stmt.where(TrackedOperation.account == account)
    return int(session.scalar(stmt) or 0)


def active_ids(session: Session, account: AccountScope = None) -> tuple[str, ...]:
    """IDs of the operations (of ``account``) still PENDING or PROCESSING, the oldest tracked
    first."""
    stmt = (
        select(TrackedOperation.id)
        .where(TrackedOperation.status.in_(ACTIVE_STATES))
        .order_by(TrackedOperation.tracked_at, TrackedOperation.id)
    )
    if account is not None:
        stmt = stmt.where(of_accounts(account))
    return tuple(session.scalars(stmt))
