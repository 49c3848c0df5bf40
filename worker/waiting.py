"""Waiting for operations to end: `optrack wait`, ``worker.api.wait`` and the HTTP long poll.

A wait reads the database only, one short transaction per look, a bounded interval apart: an
operation already ended answers at once, and nothing holds a connection between looks. What a
look means is decided by pure functions (``Condition.unmet``, ``verdict``, ``settled``); the
loops take a clock, so tests decide "when" without sleeping.

    wait(sessions, ids, condition, timeout, clock) -> WaitResult           CLI and Python API
    await_step(sessions, id, after, wait, clock) -> Snapshot               HTTP long poll
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from worker.clock import Clock
from worker.db import DB_UNREACHABLE, HistoryEntry, TrackedOperation
from worker.dialect import in_many
from worker.errors import NotTracked
from worker.operation import validate_operation_id
from worker.reports import OperationState, get_operation
from worker.reports.queries import STATE_COLUMNS
from worker.tracking import COMPLETED

log = logging.getLogger(__name__)

# Between two looks at the database: short enough that an end recorded is seen at once (a
# poll interval is seconds), long enough that a thousand waiters cost little.
LOOK_INTERVAL = 0.5
# A database that stops answering during a wait is looked at again for this long (a restart),
# then the wait gives up (`optrack wait` exits 3). The first look is not retried.
OUTAGE_GRACE = timedelta(seconds=30)
# The longest an HTTP request may wait (Google's WaitOperation and most proxies' idle limits).
MAX_HTTP_WAIT = timedelta(seconds=60)


class WaitFor(enum.StrEnum):
    """What a wait waits for: any end, or COMPLETED."""

    ENDED = "ended"
    COMPLETED = "completed"


class Outcome(enum.StrEnum):
    """How a wait ended."""

    OK = "ok"  # every operation ended as asked
    UNMET = "unmet"  # every operation ended, one or more otherwise
    TIMEOUT = "timeout"  # the timeout came first


# `timeout(1)`'s 124 for a timeout; 2 (usage) and 3 (database) are the CLI's own.
EXIT_CODES = {Outcome.OK: 0, Outcome.UNMET: 1, Outcome.TIMEOUT: 124}
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


@dataclass(frozen=True)
class Condition:
    """What "ended as asked" means: an end (or COMPLETED), at most ``max_failed`` senders."""

    wait_for: WaitFor = WaitFor.ENDED
    max_failed: int | None = None

    def unmet(self, op: OperationState) -> str | None:
        """Why an ended operation did not end as asked, or None if it did (or has not ended)."""
        if not op.ended:
            return None
        if self.wait_for is WaitFor.COMPLETED and op.status != COMPLETED:
            return f"{op.status}, not COMPLETED"
        if self.max_failed is not None and (op.failed or 0) > self.max_failed:
            return f"{op.failed} senders failed, more than {self.max_failed}"
        return None


@dataclass(frozen=True)
class WaitResult:
    """The operations as last read, in the order asked, and how the wait ended."""

    outcome: Outcome
    operations: tuple[OperationState, ...]
    unmet: dict[str, str]  # operation ID -> why it did not end as asked
    waited: timedelta

    @property
    def exit_code(self) -> int:
        """0 ended as asked, 1 one ended otherwise, 124 the timeout came first."""
        return EXIT_CODES[self.outcome]

    @property
    def pending(self) -> tuple[str, ...]:
        """The operations still active (after a timeout)."""
        return tuple(op.id for op in self.operations if not op.ended)


def verdict(ops: Sequence[OperationState], condition: Condition) -> Outcome | None:
    """The outcome once every operation has ended, else None (keep waiting)."""
    if not all(op.ended for op in ops):
        return None
    return Outcome.UNMET if any(condition.unmet(op) for op in ops) else Outcome.OK


def read_states(session: Session, operation_ids: Sequence[str]) -> tuple[OperationState, ...]:
    """The operations in the order given; NotTracked naming every ID optrack does not follow."""
    found: dict[str, OperationState] = {}
    for wanted in in_many(session, TrackedOperation.id, operation_ids):
        for row in session.execute(select(*STATE_COLUMNS).where(wanted)):
            state = OperationState(*row)
            found[state.id] = state
    missing = [op_id for op_id in operation_ids if op_id not in found]
    if missing:
        raise NotTracked(*missing)
    return tuple(found[op_id] for op_id in operation_ids)


def wait(
    sessions: sessionmaker[Session],
    operation_ids: Sequence[str],
    condition: Condition,
    timeout: timedelta | None,
    clock: Clock,
    *,
    interval: float = LOOK_INTERVAL,
    on_end: Callable[[OperationState], None] | None = None,
) -> WaitResult:
    """Block until every operation has ended (or ``timeout`` passed), looking every ``interval``.

    Every ID is validated first (InvalidOperationId); an untracked one raises NotTracked on
    the first look, which is not retried if the database does not answer (the driver's error
    propagates). ``on_end`` is called once with each operation as its end is seen.
    """
    ids = list(dict.fromkeys(validate_operation_id(op_id) for op_id in operation_ids))
    if not ids:
        raise ValueError("no operation ID to wait for")
    started = clock.now()
    deadline = None if timeout is None else started + timeout
    seen_ended: set[str] = set()
    outage_since: datetime | None = None
    with sessions() as session:
        ops = read_states(session, ids)
    while True:
        for op in ops:
            if op.ended and op.id not in seen_ended:
                seen_ended.add(op.id)
                if on_end is not None:
                    on_end(op)
        now = clock.now()
        outcome = verdict(ops, condition)
        if outcome is None and deadline is not None and now >= deadline:
            outcome = Outcome.TIMEOUT
        if outcome is not None:
            unmet = {op.id: why for op in ops if (why := condition.unmet(op)) is not None}
            return WaitResult(outcome, ops, unmet, now - started)
        pause = interval if deadline is None else min(interval, (deadline - now).total_seconds())
        clock.sleep(max(pause, 0.0))
        try:
            with sessions() as session:
                ops = read_states(session, ids)
            outage_since = None
        except DB_UNREACHABLE as exc:
            now = clock.now()
            outage_since = outage_since or now
            if now - outage_since >= OUTAGE_GRACE:
                raise
            log.warning("wait: the database did not answer (%s); looking again", type(exc).__name__)


@dataclass(frozen=True)
class Snapshot:
    """One operation and ``seq``, the step of its latest history row (None before the first)."""

    operation: OperationState
    seq: int | None


def snapshot(session: Session, operation_id: str) -> Snapshot:
    """The operation and its latest history step; NotTracked if it is not tracked."""
    op = get_operation(session, operation_id)
    seq = session.scalar(
        select(func.max(HistoryEntry.seq)).where(HistoryEntry.operation_id == operation_id)
    )
    return Snapshot(op, seq)


def settled(snap: Snapshot, after: int | None) -> bool:
    """True once the operation has ended, or (``after`` given) has a history step after it."""
    if snap.operation.ended:
        return True
    return after is not None and snap.seq is not None and snap.seq > after


async def await_step(
    sessions: sessionmaker[Session],
    operation_id: str,
    after: int | None,
    wait_for: timedelta,
    clock: Clock,
    *,
    interval: float = LOOK_INTERVAL,
    gone: Callable[[], Awaitable[bool]] | None = None,
) -> Snapshot:
    """The operation as soon as it has ended or has a step after ``after``, else after
    ``wait_for``; async, so a waiting request holds no thread and no connection.

    Each look runs in a worker thread and its own short transaction; ``gone`` (the client
    disconnected) ends the wait early.
    """

    def look() -> Snapshot:
        with sessions() as session:
            return snapshot(session, operation_id)

    deadline = clock.now() + wait_for
    while True:
        snap = await asyncio.to_thread(look)
        left = (deadline - clock.now()).total_seconds()
        if settled(snap, after) or left <= 0:
            return snap
        await asyncio.sleep(min(interval, left))
        if gone is not None and await gone():
            return snap
