"""Discovery: list the account's PROCESSING operations and start tracking the new ones.

Knows nothing of Celery or the CLI. A pause of the account (409/429/503 past what may be waited
in place) or another API failure stops the listing, but what was found before it is kept: the
result says "stopped early", and when the pause ends (``not_before``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from worker.client import ApiClient
from worker.clock import Clock
from worker.credentials import DEFAULT_ACCOUNT
from worker.errors import ApiError, RetryLater
from worker.operation import Operation, Status
from worker.recorder import Recorder
from worker.repository import Repository
from worker.tracking import PollPolicy, trusted_updated_at

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiscoveryResult:
    """What one discovery run found and started tracking."""

    seen: int  # PROCESSING operations listed (before a stop, if any)
    added: tuple[str, ...]  # IDs tracked by this run
    already_tracked: int
    stopped_early: str | None = None  # why the listing stopped before its last page
    not_before: datetime | None = None  # set when a pause of the account stopped it

    @property
    def complete(self) -> bool:
        """True if every page was read."""
        return self.stopped_early is None

    def summary(self) -> str:
        """One line for humans and logs."""
        line = (
            f"{self.seen} PROCESSING operation(s) listed: {len(self.added)} newly tracked, "
            f"{self.already_tracked} already tracked"
        )
        if self.not_before is not None:
            return f"{line}; stopped early, not before {self.not_before.isoformat()}"
        if self.stopped_early is not None:
            return f"{line}; stopped early: {self.stopped_early}"
        return line


def discover(
    sessions: sessionmaker[Session],
    client: ApiClient,
    now: datetime,
    window: timedelta,
    *,
    page_size: int = 1000,
    recorder: Recorder | None = None,
    clock_allowance: timedelta = PollPolicy.clock_allowance,
    deadline: datetime | None = None,
    clock: Clock | None = None,
    account: str = DEFAULT_ACCOUNT,
) -> DiscoveryResult:
    """Track every PROCESSING operation created in the last ``window``; idempotent.

    A new operation starts with the state and createdAt the listing showed (its first
    history row), so the sweep places it at once, but never an updatedAt ahead of the clocks
    by more than ``clock_allowance`` (OPTRACK_CLOCK_ALLOWANCE, as for a poll); with a
    ``recorder``, what the listing shows of operations already tracked is recorded too
    (every page is news). With a ``deadline`` (and the ``clock`` to read), the listing stops
    once it is reached and what was found is kept: the task's time limit, which would stop it
    in the middle of a request, comes at least one request later. ``client`` holds the
    credentials of ``account``, which the new operations belong to; what it lists of another
    account's operations (tracked under the wrong one) is not written.
    """
    found: dict[str, Operation] = {}
    stopped: str | None = None
    not_before: datetime | None = None
    try:
        for op in client.iter_operations(
            status=Status.PROCESSING, start_date=now - window, page_size=page_size
        ):
            found[op.id] = op
            if deadline is not None and clock is not None and clock.now() >= deadline:
                stopped = "out of time; the next run lists again"
                break
    except RetryLater as exc:
        stopped, not_before = exc.reason, exc.not_before
    except ApiError as exc:
        stopped = str(exc)
    with sessions.begin() as session:
        tracked = Repository(session).add_seen(list(found.values()), now, clock_allowance, account)
    if recorder is not None and tracked.already_tracked:
        recorder.record({op_id: found[op_id] for op_id in tracked.already_tracked}, now, account)
    result = DiscoveryResult(
        seen=len(found),
        added=tracked.added,
        already_tracked=len(tracked.already_tracked),
        stopped_early=stopped,
        not_before=not_before,
    )
    for op_id in result.added:
        log.info(
            "discovered %s (account %s); tracking it", op_id, account, extra={"operation_id": op_id}
        )
        if not trusted_updated_at(found[op_id], now, clock_allowance):
            log.warning(
                "%s: updatedAt %s runs ahead of the answer's Date and the local clock by more "
                "than OPTRACK_CLOCK_ALLOWANCE; not recorded",
                op_id,
                found[op_id].updated_at.isoformat(),
                extra={"operation_id": op_id},
            )
    (log.info if result.complete else log.warning)(
        "discovery of account %s: %s", account, result.summary()
    )
    return result
