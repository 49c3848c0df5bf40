"""Replaying dead letters: each sent again as a new message (a new task id, so a new delivery
count), then marked replayed. `optrack dead-letters replay` and ``POST
/api/v1/dead-letters/replay`` both call ``replay``; each passes the ``send`` of its process.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from worker import dead_letters
from worker.clock import Clock
from worker.errors import BrokerError, NotWaiting

# Publishes task ``name`` with ``args`` under ``task_id``; raises BrokerError if not taken.
Send = Callable[[str, list[Any], str], None]


@dataclass(frozen=True)
class Replayed:
    """A dead letter sent again: its id, its task and the new message's task id."""

    letter_id: int
    task: str
    task_id: str


def replay(
    sessions: sessionmaker[Session], letter_ids: Sequence[int] | None, send: Send, clock: Clock
) -> Iterator[Replayed]:
    """Send the letters ``letter_ids`` (all waiting if None) again, in the order they came,
    yielding each once it is sent and marked.

    Every id is checked before anything is sent: NotWaiting names those not waiting. A
    BrokerError stops at that letter (the ones yielded before it are replayed).
    """
    with sessions() as session:
        letters = dead_letters.to_replay(session, letter_ids)
    missing = sorted(set(letter_ids or ()) - {x.id for x in letters})
    if missing:
        raise NotWaiting(missing)
    for letter in letters:
        task_id = str(uuid.uuid4())
        try:
            send(letter.task, letter.args, task_id)
        except BrokerError as exc:
            raise BrokerError(f"dead letter {letter.id} not replayed: {exc}") from exc
        # Marked after the send: a crash in between leaves it listed, and a second replay is
        # harmless (tracking an ID twice changes nothing; a stale poll token does nothing).
        with sessions.begin() as session:
            dead_letters.mark_replayed(session, letter.id, task_id, clock.now())
        yield Replayed(letter.id, letter.task, task_id)
