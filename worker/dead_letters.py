"""Dead letters: task messages optrack gave up on, kept in the database to be listed and replayed.

Every task message counts its deliveries in ``task_deliveries``, one row per Celery task id,
written in a transaction of its own *before* the work starts: a delivery that kills its worker
process (late acks and ``task_reject_on_worker_lost`` hand the message back) is counted too.
The delivery past ``max_deliveries`` is not run: the message goes to ``dead_letters`` with the
reason and is acknowledged, so no message loops for ever. A message that ends (done, or rejected
as invalid) drops its counter row. ``optrack dead-letters replay`` sends a letter's task again
under a new task id (a new count) and marks the letter replayed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, TypedDict

import msgspec
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from worker import dialect
from worker.db import DeadLetter, TaskDelivery
from worker.dialect import in_many
from worker.records import Time, iso, utc_text

# A reason is for people; the message's arguments are kept whole beside it.
MAX_REASON = 2000


@dataclass(frozen=True)
class Letter:
    """One dead letter as the CLI and the API show it."""

    id: int
    task: str
    task_id: str
    args: list[Any]
    reason: str
    deliveries: int
    created_at: datetime
    replayed_at: datetime | None
    replay_task_id: str | None

    @classmethod
    def of(cls, row: DeadLetter) -> Letter:
        """The letter of a ``dead_letters`` row."""
        args = json.loads(row.args)
        return cls(
            row.id,
            row.task,
            row.task_id,
            args if isinstance(args, list) else [args],
            row.reason,
            row.deliveries,
            row.created_at,
            row.replayed_at,
            row.replay_task_id,
        )


def count_delivery(session: Session, task_id: str, task: str, now: datetime) -> int:
    """Count one more start of message ``task_id``; return how many starts it has had."""
    insert = dialect.insert(session)
    stmt = insert(TaskDelivery).values(
        task_id=task_id, task=task, deliveries=1, first_at=now, last_at=now
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["task_id"],
        set_={"deliveries": TaskDelivery.deliveries + 1, "last_at": now},
    ).returning(TaskDelivery.deliveries)
    return int(session.scalar(stmt) or 0)


def forget_delivery(session: Session, task_id: str) -> None:
    """The message ended: drop its counter."""
    session.execute(delete(TaskDelivery).where(TaskDelivery.task_id == task_id))


def bury(
    session: Session,
    *,
    task_id: str,
    task: str,
    args: Sequence[Any],
    reason: str,
    deliveries: int,
    now: datetime,
) -> bool:
    """Keep the message as a dead letter and drop its counter; False if it was buried already."""
    insert = dialect.insert(session)
    stmt = (
        insert(DeadLetter)
        .values(
            task=task,
            task_id=task_id,
            args=json.dumps(list(args)),
            reason=reason[:MAX_REASON],
            deliveries=deliveries,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["task_id"])
        .returning(DeadLetter.id)
    )
    buried = session.scalar(stmt) is not None
    forget_delivery(session, task_id)
    return buried


def waiting(session: Session) -> int:
    """How many dead letters have not been replayed."""
    stmt = select(func.count()).select_from(DeadLetter).where(DeadLetter.replayed_at.is_(None))
    return int(session.scalar(stmt) or 0)


def letters(session: Session, *, replayed: bool = False) -> list[Letter]:
    """The dead letters in the order they came, the replayed ones too if ``replayed``."""
    stmt = select(DeadLetter).order_by(DeadLetter.id)
    if not replayed:
        stmt = stmt.where(DeadLetter.replayed_at.is_(None))
    return [Letter.of(row) for row in session.scalars(stmt)]


def to_replay(session: Session, ids: Sequence[int] | None) -> list[Letter]:
    """The letters not replayed yet among ``ids`` (all of them if None)."""
    stmt = select(DeadLetter).where(DeadLetter.replayed_at.is_(None)).order_by(DeadLetter.id)
    if ids is None:
        return [Letter.of(row) for row in session.scalars(stmt)]
    found = [
        row
        for w in in_many(session, DeadLetter.id, sorted(set(ids)))
        for row in session.scalars(stmt.where(w))
    ]
    return [Letter.of(row) for row in sorted(found, key=lambda r: r.id)]


def mark_replayed(session: Session, letter_id: int, replay_task_id: str, now: datetime) -> None:
    """Record that letter ``letter_id`` was sent again as message ``replay_task_id``."""
    session.execute(
        update(DeadLetter)
        .where(DeadLetter.id == letter_id)
        .values(replayed_at=now, replay_task_id=replay_task_id)
    )


class LetterRecord(TypedDict):
    """A task message optrack gave up on, as `optrack dead-letters --json` and the API show it."""

    id: int
    task: Annotated[str, msgspec.Meta(description="The task's name (optrack.poll, …)")]
    task_id: str
    args: Annotated[list[Any], msgspec.Meta(description="The message's arguments, kept whole")]
    reason: str
    deliveries: int
    created_at: Time
    replayed_at: Annotated[Time | None, msgspec.Meta(description="null until replayed")]
    replay_task_id: Annotated[str | None, msgspec.Meta(description="The replay's task id")]


class LettersRecord(TypedDict):
    """The dead letters in the order they came."""

    dead_letters: list[LetterRecord]


def as_json(letter: Letter) -> LetterRecord:
    """JSON-ready fields of one letter (times ISO 8601 UTC, ``Z``)."""
    return {
        "id": letter.id,
        "task": letter.task,
        "task_id": letter.task_id,
        "args": letter.args,
        "reason": letter.reason,
        "deliveries": letter.deliveries,
        "created_at": utc_text(letter.created_at),
        "replayed_at": iso(letter.replayed_at),
        "replay_task_id": letter.replay_task_id,
    }
