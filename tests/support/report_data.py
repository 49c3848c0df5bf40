"""A known history for the report tests: eight operations whose every figure is worked out.

Times are relative to the report's ``now``, shown as 12:00 of "the day" (the API tests use
``NOW`` = 2026-03-01 12:00 UTC; the CLI tests, which cannot inject time into a subprocess,
use the real time). Operations, by what they show:

    A  COMPLETED  created 10:00, ended 10:05 (300 s), 10 senders: 9 created, 1 failed
    B  COMPLETED  created 09:00, ended 09:10 (600 s), 20 created
    C  CANCELED   created 08:00, ended 08:20 (1200 s), 5 created, 5 still queued
    D  PROCESSING created 11:00, last change observed 11:10: stuck (50 min > 30 min)
    E  PROCESSING created 11:40, changes at 11:45 and 11:50; 2 poll errors in a row
    F  NOT_FOUND  tracked 07:00, never fetched, ended by a 404 at 07:00:10
    G  PENDING    tracked 11:59, never fetched
    H  COMPLETED  tracked 9 days before (outside "since the day"): 1800 s, 2 created, 2 failed
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from html import unescape
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from worker.db import HistoryEntry, TrackedOperation

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DAY = datetime(2026, 3, 1, tzinfo=UTC)  # the day of NOW


def op_id(letter: str) -> str:
    """A valid operation ID ending in the letter's code (IDs use lowercase base32)."""
    return "comms_operation_01h9krwprkeee8fzqspvwy6x" + letter.lower() * 2


def day_of(now: datetime) -> datetime:
    """Midnight of "the day" whose 12:00 is ``now``."""
    return now - timedelta(hours=12)


def operations(now: datetime = NOW) -> list[tuple[Any, ...]]:
    """The known operations, timed so that ``now`` is 12:00 of the day."""
    day = day_of(now)
    h_day = day - timedelta(days=9)

    def at(hour: int, minute: int, second: int = 0, day: datetime = day) -> datetime:
        return day + timedelta(hours=hour, minutes=minute, seconds=second)

    return _table(at, h_day)


def _table(at: Any, h_day: datetime) -> list[tuple[Any, ...]]:
    """(letter, status, created_at, tracked_at, ended_at, errors, last_error, history rows).

    History rows: (observed_at, status, total, queued, created, failed); the API's updatedAt
    of each is its observed_at.
    """
    return [
        (
            "A",
            "COMPLETED",
            at(10, 0),
            at(10, 0, 5),
            at(10, 5),
            0,
            None,
            [
                (at(10, 1), "PROCESSING", 10, 6, 4, 0),
                (at(10, 3), "PROCESSING", 10, 2, 7, 1),
                (at(10, 5), "COMPLETED", 10, 0, 9, 1),
            ],
        ),
        (
            "B",
            "COMPLETED",
            at(9, 0),
            at(9, 0, 5),
            at(9, 10),
            0,
            None,
            [(at(9, 5), "PROCESSING", 20, 10, 10, 0), (at(9, 10), "COMPLETED", 20, 0, 20, 0)],
        ),
        (
            "C",
            "CANCELED",
            at(8, 0),
            at(8, 0, 5),
            at(8, 20),
            0,
            None,
            [(at(8, 10), "PROCESSING", 10, 7, 3, 0), (at(8, 20), "CANCELED", 10, 5, 5, 0)],
        ),
        (
            "D",
            "PROCESSING",
            at(11, 0),
            at(11, 0, 5),
            None,
            0,
            None,
            [(at(11, 5), "PROCESSING", 8, 7, 1, 0), (at(11, 10), "PROCESSING", 8, 5, 2, 1)],
        ),
        (
            "E",
            "PROCESSING",
            at(11, 40),
            at(11, 40, 5),
            None,
            2,
            "ServerError: HTTP 500",
            [(at(11, 45), "PROCESSING", 12, 9, 3, 0), (at(11, 50), "PROCESSING", 12, 6, 6, 0)],
        ),
        ("F", "NOT_FOUND", None, at(7, 0), at(7, 0, 10), 0, "HTTP 404: not found", []),
        ("G", "PENDING", None, at(11, 59), None, 0, None, []),
        (
            "H",
            "COMPLETED",
            at(10, 0, day=h_day),
            at(10, 0, 5, day=h_day),
            at(10, 30, day=h_day),
            0,
            None,
            [(at(10, 30, day=h_day), "COMPLETED", 4, 0, 2, 2)],
        ),
    ]


def load(sessions: sessionmaker[Session], now: datetime = NOW) -> None:
    """Write the known operations and their history."""
    known = operations(now)
    with sessions.begin() as session:
        for letter, status, created, tracked, ended, errors, last_error, rows in known:
            last = rows[-1] if rows else None
            session.add(
                TrackedOperation(
                    id=op_id(letter),
                    status=status,
                    total=last[2] if last else None,
                    queued=last[3] if last else None,
                    created=last[4] if last else None,
                    failed=last[5] if last else None,
                    remote_created_at=created,
                    remote_updated_at=last[0] if last else None,
                    tracked_at=tracked,
                    last_polled_at=ended or (last[0] if last else None),
                    polls=len(rows) + errors,
                    consecutive_errors=errors,
                    last_error=last_error,
                    ended_at=ended,
                )
            )
        session.flush()
        for letter, *_, rows in known:
            for seq, (observed, status, total, queued, created, failed) in enumerate(rows, 2):
                session.add(
                    HistoryEntry(
                        operation_id=op_id(letter),
                        seq=seq,
                        observed_at=observed,
                        remote_updated_at=observed,
                        status=status,
                        total=total,
                        queued=queued,
                        created=created,
                        failed=failed,
                    )
                )


def shown_figures(page: str) -> dict[str, str]:
    """The figures an HTML report shows, by their CSV field name (tagged with data-field)."""
    return {k: unescape(v) for k, v in re.findall(r'data-field="(\w+)">([^<]*)<', page)}
