"""What an answer means for a tracked operation, and when to poll again. Pure domain logic.

Nothing here knows Celery, HTTP or SQL. Every decision takes ``now``. The decisions return
small typed changes (``Observed``, ``Failed``, ``Gone``) or ``Stale`` (an answer that must not
be recorded); the repository turns the changes into rows and keeps the bookkeeping columns
(version, polls, history seq) itself.

What is recorded (issue 11): an answer older than the record, or one that would lower
``created`` or ``failed`` (those counts only grow), is stale whatever its updatedAt says. An
updatedAt ahead of the answer's `Date` (or of ``now``) by more than the clock allowance is not
trusted as the ordering key: the answer is judged by its counts alone and the record keeps the
key it had, so one such answer never makes later true ones look older. An end (COMPLETED,
CANCELED) that lowers no count is never stale for its age: ends are final, so it is true.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from worker.errors import ApiError, BadRequest
from worker.operation import Operation, Status
from worker.retry_after import RetryPolicy

# Local states beside the API's three: PENDING (tracked, never seen) and NOT_FOUND (404).
# This is the one home of the status vocabulary: every other module imports it from here.
PENDING = "PENDING"
PROCESSING = Status.PROCESSING.value
COMPLETED = Status.COMPLETED.value
CANCELED = Status.CANCELED.value
NOT_FOUND = "NOT_FOUND"
ACTIVE_STATES = (PENDING, PROCESSING)
FINISHED_STATES = (COMPLETED, CANCELED)  # ended by the API; NOT_FOUND's end is ours
ENDED_STATES = (*FINISHED_STATES, NOT_FOUND)
ALL_STATES = ACTIVE_STATES + ENDED_STATES


class Known(Protocol):
    """What a decision reads of a tracked operation's stored state."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def total(self) -> int | None: ...
    @property
    def queued(self) -> int | None: ...
    @property
    def created(self) -> int | None: ...
    @property
    def failed(self) -> int | None: ...
    @property
    def remote_created_at(self) -> datetime | None: ...
    @property
    def remote_updated_at(self) -> datetime | None: ...
    @property
    def consecutive_errors(self) -> int: ...
    @property
    def not_before(self) -> datetime | None: ...
    @property
    def version(self) -> int: ...
    @property
    def polls(self) -> int: ...
    @property
    def group_id(self) -> int | None: ...
    @property
    def not_found_since(self) -> datetime | None: ...


class Outcome(enum.StrEnum):
    """What one poll did to one operation."""

    CHANGED = "changed"  # new stats or status: a history row was written
    UNCHANGED = "unchanged"  # confirmed as recorded: nothing written
    STALE = "stale"  # older than the record, or lower counts: logged, nothing written
    NOT_FOUND = "not_found"  # 404: tracking ended
    ERROR = "error"  # 400/500/transport/schema: this operation backs off
    DEFERRED = "deferred"  # the account is paused: its group waits for the pause
    SKIPPED = "skipped"  # not asked this time (backing off, or the claim ran out)


@dataclass(frozen=True, slots=True)
class Observed:
    """An answer newer than the record: the operation's new state."""

    known: Known
    answer: Operation
    # Status or counts moved: the change gets a history row (else only updatedAt moved, or
    # an error streak ended).
    history: bool
    # The ordering key recorded: the answer's updatedAt, or the record's own key when that
    # updatedAt runs ahead of the clocks (``trusted`` False).
    updated_at: datetime
    trusted: bool = True

    @property
    def ended(self) -> bool:
        """True if the answer is a final status."""
        return self.answer.status.value in ENDED_STATES

    @property
    def first_sight(self) -> bool:
        """True if this is the first createdAt known: the operation is placed again."""
        return self.known.remote_created_at is None


@dataclass(frozen=True, slots=True)
class Stale:
    """An answer that must not be recorded: older than the record, or lowering a count."""

    known: Known
    answer: Operation
    reason: str
    # True if it would lower created or failed (a lagging replica); False if only older.
    lowers: bool = False


@dataclass(frozen=True, slots=True)
class Failed:
    """A poll of the operation failed; it is not asked again before ``not_before``."""

    known: Known
    error: str
    not_before: datetime
    # When the operation's 404 streak began (None: it answered 404 last time, or never).
    not_found_since: datetime | None = None


@dataclass(frozen=True, slots=True)
class Gone:
    """The API says the operation does not exist: tracking ends as NOT_FOUND."""

    known: Known
    detail: str


Change = Observed | Failed | Gone
Decision = Change | Stale


@dataclass(frozen=True)
class PollPolicy:
    """How often to poll, how to back off, and how operations are grouped into messages."""

    interval: timedelta = timedelta(seconds=10)
    # Opt-in adaptive cadence: a group none of whose operations changed for T is polled
    # after idle_factor * T, never later than this. Equal to ``interval``: off (the default).
    max_interval: timedelta = timedelta(seconds=10)
    idle_factor: float = 0.5
    retry: RetryPolicy = RetryPolicy()
    # How long a sweep's claim holds a group; a message stops calling in its last quarter.
    lease: timedelta = timedelta(seconds=120)
    # A claim whose message no worker started is sent again only this long after the claim
    # (at least ``lease``): while no worker consumes, ticks add no message per lease.
    resend_after: timedelta = timedelta(seconds=600)
    # auto: List windows where they cost fewer requests than GETs; fetch: GETs only;
    # list: List windows for every run of operations.
    strategy: str = "auto"
    # Members of a GET group (one message of that many GETs).
    fetch_group: int = 50
    # Members of a List window: one page of 1,000 with room for the untracked ones beside.
    list_group: int = 900
    # The fewest operations a new List window is made for (fewer: GETs cost no more).
    list_threshold: int = 5
    # A never-seen operation was created at most this long before it was tracked (a List
    # window over never-seen operations starts that far back; missing ones fall back to GET).
    pending_lookback: timedelta = timedelta(days=1)
    # Newly tracked operations are first listed over this recent window before their tracking
    # (OPTRACK_INTAKE_LOOKBACK): one page learns many createdAt; the ones it does not show
    # fall back to the ``pending_lookback`` window if that pays, else to one GET each.
    intake_lookback: timedelta = timedelta(seconds=60)
    # How far an updatedAt may run ahead of the answer's Date (or the local clock) and still
    # order answers (OPTRACK_CLOCK_ALLOWANCE).
    clock_allowance: timedelta = timedelta(seconds=60)
    # The longest one request may take: its deadline plus an in-place wait.
    request_time: timedelta = timedelta(seconds=35)
    # A 404 ends tracking only once 404s have lasted this long (OPTRACK_NOT_FOUND_GRACE): a
    # new operation may not be replicated yet. Zero: the first 404 ends it.
    not_found_grace: timedelta = timedelta(seconds=60)
    # A 400 says our request was wrong: asking again soon cannot help. The wait doubles from
    # the first to the ceiling (5 min, 10, 20 ... 6 h: OPTRACK_BAD_REQUEST_BACKOFF and
    # OPTRACK_BAD_REQUEST_MAX_BACKOFF), so a fix on either side is still picked up within
    # hours, without a request every few minutes for ever.
    bad_request_first: timedelta = timedelta(minutes=5)
    bad_request_max: timedelta = timedelta(hours=6)
    # A tick claims what falls due before the next tick (OPTRACK_TICK_INTERVAL), so a tick
    # never adds its own period to the interval; such a poll starts just before its due time
    # (``sweep.start_at``), not a tick early. A group backing off waits its whole backoff.
    claim_ahead: timedelta = timedelta(seconds=2)

    def error_wait(self, error: ApiError, errors: int) -> float:
        """Seconds before asking again after the ``errors``-th failure in a row, ``error``."""
        if isinstance(error, BadRequest):
            steps = max(0, min(errors, 32) - 1)
            first = self.bad_request_first.total_seconds()
            return min(self.bad_request_max.total_seconds(), first * 2.0**steps)
        return max(self.interval.total_seconds(), self.retry.backoff(errors))

    @property
    def adaptive(self) -> bool:
        """True if idle groups may be polled less often than ``interval``."""
        return self.max_interval > self.interval

    def next_due(self, started: datetime, last_change: datetime | None) -> datetime:
        """When a group whose poll started at ``started`` is due again.

        One interval after the start of its poll, so the period holds however long a poll
        takes. Idleness is measured from what *we* saw change, never from the API's
        updatedAt: an operation that queued long before work started is still polled at
        the interval.
        """
        wait = self.interval
        if self.adaptive and last_change is not None:
            idle = (started - last_change) * self.idle_factor
            wait = min(max(wait, idle), self.max_interval)
        return started + wait

    @property
    def deadline_margin(self) -> timedelta:
        """A message stops calling this long before its claim expires: the lease's last
        quarter, or longer if one request may take longer, so it never outlives its claim."""
        return max(self.lease / 4, self.request_time)


def observe(
    known: Known, answer: Operation, now: datetime, policy: PollPolicy = PollPolicy()
) -> Observed | Stale | None:
    """The change an answer makes to the record, ``Stale`` if it must not be recorded, or None
    if it says nothing new (see the module docstring for the rules)."""
    stats = answer.stats
    lower = [
        f"{name} {was} -> {now_}"
        for name, was, now_ in (
            ("created", known.created, stats.created),
            ("failed", known.failed, stats.failed),
        )
        if was is not None and now_ < was
    ]
    if lower:
        return Stale(known, answer, f"would lower {', '.join(lower)}", lowers=True)
    trusted = trusted_updated_at(answer, now, policy.clock_allowance)
    recorded = ordering_key(known, now, policy.clock_allowance)
    older = trusted and recorded is not None and answer.updated_at < recorded
    # An end is final whoever says it: never dropped for its age, so the true end is reached.
    if older and answer.status.value not in ENDED_STATES:
        return Stale(
            known,
            answer,
            f"updatedAt {answer.updated_at.isoformat()} older than the recorded "
            f"{recorded.isoformat() if recorded else None}",
        )
    if known.remote_updated_at is None:
        key = first_sight_key(answer, now, policy.clock_allowance)
    elif trusted and not older:
        key = answer.updated_at
    else:
        key = known.remote_updated_at
    history = (known.status, known.total, known.queued, known.created, known.failed) != (
        answer.status.value,
        stats.total,
        stats.queued,
        stats.created,
        stats.failed,
    )
    moved = (
        history
        or key != known.remote_updated_at
        or known.remote_created_at is None
        or known.consecutive_errors > 0
        or known.not_before is not None
        or known.not_found_since is not None
    )
    return Observed(known, answer, history, key, trusted) if moved else None


def reference_time(answer: Operation, now: datetime) -> datetime:
    """The earliest of the answer's `Date` and ``now``: what an updatedAt is judged against."""
    return now if answer.served_at is None else min(answer.served_at, now)


def trusted_updated_at(answer: Operation, now: datetime, allowance: timedelta) -> bool:
    """False when the answer's updatedAt runs ahead of its `Date` or ``now`` by more than
    ``allowance``: a node with a fast clock, which must not order the answers."""
    return answer.updated_at <= reference_time(answer, now) + allowance


def first_sight_key(answer: Operation, now: datetime, allowance: timedelta) -> datetime:
    """The ordering key recorded when an operation is first seen (by a poll or a listing):
    its updatedAt, or, when that runs ahead of the clocks, no later than it was served."""
    if trusted_updated_at(answer, now, allowance):
        return answer.updated_at
    return min(answer.created_at, reference_time(answer, now))


def ordering_key(known: Known, now: datetime, allowance: timedelta) -> datetime | None:
    """The recorded updatedAt if it may order answers; None if absent or itself ahead of
    ``now`` (written before the allowance existed): then the counts alone judge."""
    key = known.remote_updated_at
    return key if key is not None and key <= now + allowance else None


def failure(known: Known, error: ApiError, now: datetime, policy: PollPolicy) -> Failed:
    """A failed poll: count it and back this operation off (its group goes on)."""
    errors = known.consecutive_errors + 1
    wait = policy.error_wait(error, errors)
    detail = f"{type(error).__name__}: {error}"[:1000]
    # Another error amid 404s neither ends nor restarts the streak.
    return Failed(known, detail, now + timedelta(seconds=wait), known.not_found_since)


def not_found(known: Known, detail: str, now: datetime, policy: PollPolicy) -> Gone | Failed:
    """A 404 from a fetch: tracking ends as NOT_FOUND once 404s have lasted the grace;
    before that it is a failed poll that remembers when the streak began."""
    since = known.not_found_since or now
    if now - since >= policy.not_found_grace:
        return Gone(known, detail[:1000])
    ends = since + policy.not_found_grace
    note = f"{detail} (404 since {since.isoformat()}; ends tracking if it lasts until "
    note += f"{ends.isoformat()})"
    # Asked again within an interval, and no later than the grace's end.
    again = min(now + policy.interval, max(ends, now + timedelta(seconds=1)))
    return Failed(known, note[:1000], again, since)


def is_due(not_before: datetime | None, now: datetime) -> bool:
    """True unless the operation is backing off past ``now``."""
    return not_before is None or not_before <= now


@dataclass
class PollCounts:
    """How many operations one message saw, per outcome, and what it cost."""

    outcomes: dict[Outcome, int]
    requests: int = 0
    rows_written: int = 0
    history_rows: int = 0

    @classmethod
    def empty(cls) -> PollCounts:
        """All outcomes at zero."""
        return cls({outcome: 0 for outcome in Outcome})

    def add(self, outcome: Outcome, count: int = 1) -> None:
        """Count ``count`` operations with ``outcome``."""
        self.outcomes[outcome] += count

    def merge(self, other: PollCounts) -> None:
        """Add ``other``'s counts to these."""
        for outcome, count in other.outcomes.items():
            self.outcomes[outcome] += count
        self.requests += other.requests
        self.rows_written += other.rows_written
        self.history_rows += other.history_rows

    def as_dict(self) -> dict[str, int]:
        """JSON-ready counts for task results and logs."""
        counts = {outcome.value: n for outcome, n in self.outcomes.items()}
        counts.update(
            requests=self.requests, rows_written=self.rows_written, history=self.history_rows
        )
        return counts
