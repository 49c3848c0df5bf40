"""The account pause: what every caller of the API must honor, and an in-process keeper of it.

409/429/503 are about the account, not one operation, so one pause stops every caller. The
shared keeper is the database (``account.DbGate``); ``LocalGate`` keeps it in one process.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Protocol


class AccountGate(Protocol):
    """Where the account's pause is kept, shared by every process that calls the API."""

    def paused_until(self, now: datetime) -> tuple[datetime, str] | None:
        """Return (until, reason) if the account must not call the API at ``now``."""
        ...

    def pause(self, until: datetime, reason: str, status: int) -> None:
        """Record that nobody may call the API before ``until`` (keeps a later pause)."""
        ...

    def count_throttle(self, now: datetime, status: int) -> int:
        """Count one more 409/429/503 in a row for the account; return how many so far."""
        ...

    def answered_ok(self, sent_at: datetime) -> None:
        """A request sent at ``sent_at`` got a 200: the account's throttles in a row start
        again from 0, and a rejection of the credentials recorded before it is over."""
        ...


class LocalGate:
    """An in-process gate, for one-off use of the client outside the tracker (and as the
    fallback of a shared gate whose store is unreachable)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until: datetime | None = None
        self._reason = ""
        self._throttles = 0

    def paused_until(self, now: datetime) -> tuple[datetime, str] | None:
        """Return the pause if it is still running."""
        with self._lock:
            if self._until is not None and self._until > now:
                return self._until, self._reason
            return None

    def pause(self, until: datetime, reason: str, status: int) -> None:
        """Record a pause, keeping the later of two."""
        with self._lock:
            if self._until is None or until > self._until:
                self._until, self._reason = until, reason

    def count_throttle(self, now: datetime, status: int) -> int:
        """Count one more throttle in a row."""
        with self._lock:
            self._throttles += 1
            return self._throttles

    def answered_ok(self, sent_at: datetime) -> None:
        """Start counting throttles again."""
        with self._lock:
            self._throttles = 0
