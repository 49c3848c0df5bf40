"""Polls one group of operations and records what the API said, in short transactions.

A List window is read page by page and each page is recorded as it arrives: every tracked
operation on it, member of this group or not, is written if the page says something newer
than what is stored. Members the pages did not show fall back to one GET each. A GET group
asks for each member. Each write decides against the rows it has locked, so two messages
that saw one change record it once. Then the group's schedule is written (one row).

A poll cut short (its claim's deadline, a pause of the account, a shutdown) keeps its place in
the group's row: the next poll goes on with the same round, at the List page it did not read
(its token, over the same window) or after the last member it asked by GET, so every member is
asked within a bounded number of polls however slow the API. A round ends when its last
request is done; the group is then due one interval after the round began. What the poll
measured (seconds per request, pages so far) is written either way: the sweep splits a group
one poll cannot finish within half its lease (``planning.too_slow``).

A worker that is stopping ends the poll at once: the request in flight is interrupted, what was
learned is written, and the group is given back due now (``shutdown``), so the next start
polls it instead of waiting for the claim's lease to run out.

Answers are never asked for twice because the database went away: a write that finds it
unreachable is tried again in place, with backoff, while the claim lasts (a task retry would
send every request of the message again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from worker.client import ApiClient, next_page_token
from worker.clock import Clock
from worker.db import DB_UNREACHABLE, PollGroup
from worker.errors import (
    ApiError,
    AuthError,
    BadRequest,
    ConfigError,
    OperationNotFound,
    OptrackError,
    RetryLater,
    ServerError,
    UnknownAccount,
    WrongBaseUrl,
)
from worker.operation import Operation
from worker.planning import LIST, list_pays, second
from worker.recorder import Recorder, Result
from worker.repository import NO_ROUND, PollTarget, Repository
from worker.shutdown import ShutdownRequested, Stop
from worker.tracking import Outcome, PollCounts, PollPolicy, is_due
from worker.ulid import created_from_id

log = logging.getLogger(__name__)
PAGE_SIZE = 1000
# List bounds are exclusive and in whole seconds: pad the window by one on each side.
WINDOW_PAD = timedelta(seconds=1)
# A write the database could not take is tried again after 1, 2, 4, ... s (at most 15 s),
# at most this many times, while the claim lasts.
WRITE_RETRY_FIRST = 1.0
WRITE_RETRY_MAX = 15.0
WRITE_ATTEMPTS = 10
T = TypeVar("T")


class _OutOfTime(Exception):
    """The message's claim is about to expire: stop calling, write what was learned."""


@dataclass
class _Deferral:
    until: datetime
    reason: str


@dataclass
class _Run:
    """What one message learned so far."""

    group_id: int
    deadline: datetime  # no request after this
    expires: datetime  # the claim's end: no write retried past it
    client: ApiClient  # with the credentials of the group's account
    account: str | None = None  # whose operations the answers may write (None: any)
    counts: PollCounts = field(default_factory=PollCounts.empty)
    seen: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)  # members that ended or must be re-placed
    changed: bool = False
    listed: int | None = None
    pages: int | None = None
    skipped: int = 0  # items of the pages that broke the schema (listed all the same)
    list_error: ApiError | None = None
    deferral: _Deferral | None = None
    # An answer (a page, a 200) proved the base URL right: a 404 then may be about its operation.
    reachable: bool = False
    # The round this poll belongs to: when it began, the List page to read next (None: the
    # listing is done or not begun) and the window its token belongs to, whether this poll
    # read the whole listing, and the last member asked by GET ("": none yet, the listing
    # done; None: the GETs not begun).
    round_started: datetime | None = None
    page_token: str | None = None
    bounds: tuple[datetime, datetime] | None = None
    whole_listing: bool = False
    after: str | None = None


class Poller:
    """Polls the groups claimed by a sweep and records the results."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        client: ApiClient,
        policy: PollPolicy,
        clock: Clock,
        recorder: Recorder,
        stop: Stop | None = None,
        clients: Callable[[str], ApiClient] | None = None,
    ) -> None:
        self.sessions = sessions
        self.client = client  # every account's, unless ``clients`` gives each its own
        self.clients = clients
        self.policy = policy
        self.clock = clock
        self.recorder = recorder
        self.stop = stop or Stop()

    def poll(self, group_id: int, token: str) -> PollCounts:
        """Poll the group if it is still claimed with ``token``; return what it did."""
        with self.sessions.begin() as session:
            repo = Repository(session)
            repo.start_claim(group_id, token, self.clock.now())
            group = repo.claimed_group(group_id, token)
            members = repo.members(group_id) if group is not None else []
            if group is not None and group.kind == LIST:
                members = _id_times(repo, group, members, self.clock.now())
        if group is None or group.claim_expires_at is None:
            log.info("group %d: claimed by another sweep meanwhile; nothing to do", group_id)
            return PollCounts.empty()
        started = self.clock.now()
        try:
            client = self.client_for(group.account)
        except (ConfigError, UnknownAccount) as exc:
            return self._unusable(group, token, exc)
        run = _Run(
            group_id,
            group.claim_expires_at - self.policy.deadline_margin,
            group.claim_expires_at,
            client,
            group.account,
            round_started=group.round_started_at or started,
            page_token=group.resume_token,
            after=group.resume_after,
        )
        if group.resume_token is not None:
            run.listed, run.pages = group.listed or 0, group.pages or 0  # the round's so far
            if group.resume_start_at is not None and group.resume_end_at is not None:
                run.bounds = (group.resume_start_at, group.resume_end_at)
        if group.round_started_at is not None:
            log.info("group %d: going on with the round begun at %s", group_id, run.round_started)
        sent_before = client.requests_sent
        try:
            if group.kind == LIST and members and run.after is None:
                self._list(members, run)
            if run.list_error is None:
                self._fetch(self._unlisted(group.kind, members, run), run)
        except _OutOfTime:
            # Due since when it was due: a poll that began too late to ask anything keeps its
            # place among the due groups, ahead of those its neighbours' polls made due later.
            since = min(self.clock.now(), group.next_due_at)
            run.deferral = _Deferral(since, "the claim's lease was running out")
            log.warning("group %d: out of time; the rest is due again", group_id)
        except ShutdownRequested:
            since = min(self.clock.now(), group.next_due_at)
            run.deferral = _Deferral(since, "the worker is stopping")
            log.warning("group %d: the worker is stopping; given back, due now", group_id)
        except RetryLater as exc:
            run.deferral = _Deferral(exc.not_before, exc.reason)
        except (AuthError, WrongBaseUrl) as exc:
            now = self.clock.now()
            paused = client.gate.paused_until(now)
            run.deferral = _Deferral(paused[0] if paused else now + self.policy.interval, str(exc))
            what = "credentials rejected" if isinstance(exc, AuthError) else "configuration error"
            log.error(
                "account %s: %s, its polling paused until %s: %s",
                group.account,
                what,
                run.deferral.until,
                exc,
            )
        run.counts.requests = client.requests_sent - sent_before
        if run.deferral is not None:
            left = [m for m in members if m.id not in run.seen and m.id not in run.removed]
            run.counts.add(Outcome.DEFERRED, len(left))
            log.info(
                "group %d: due again at %s (%s); %d poll(s) deferred",
                group_id,
                run.deferral.until.isoformat(),
                run.deferral.reason,
                len(left),
            )
        self._finish(group, token, started, run)
        return run.counts

    def _unlisted(self, kind: str, members: Sequence[PollTarget], run: _Run) -> list[PollTarget]:
        """The members to ask by GET: those the pages did not show, after the round's place."""
        left = [m for m in members if m.id not in run.seen]
        if kind == LIST and not run.whole_listing:
            # The listing spanned polls: a member with a createdAt lies inside the window and
            # was shown by an earlier page; a never-seen one shown there left the group.
            left = [m for m in left if m.remote_created_at is None]
        if run.after:
            left = [m for m in left if m.id > run.after]
        return left  # in id order, as ``members`` are: the place is the last id asked

    def _unusable(self, group: Any, token: str, exc: OptrackError) -> PollCounts:
        """The group's account cannot be asked (a secret no key opens, the account gone): its
        polls wait an interval, said in the log; nothing else stops."""
        until = self.clock.now() + self.policy.interval
        log.error(
            "account %s cannot poll (%s); group %d due again at %s",
            group.account,
            exc,
            group.id,
            until.isoformat(),
        )
        with self.sessions.begin() as session:
            Repository(session).finish(
                group.id, token, {"next_due_at": until, "last_error": str(exc)[:1000]}
            )
        return PollCounts.empty()

    def client_for(self, account: str) -> ApiClient:
        """The client with ``account``'s credentials."""
        return self.client if self.clients is None else self.clients(account)

    def refresh(self, operation_ids: Sequence[str]) -> PollCounts:
        """Ask for the given active operations now, one GET each with its account's
        credentials, whatever their groups' schedule (a refresh on demand); a pause of an
        account stops its part."""
        with self.sessions() as session:
            repo = Repository(session)
            members = repo.targets(operation_ids)
            accounts = repo.accounts_of([m.id for m in members])
        never = datetime.max.replace(tzinfo=self.clock.now().tzinfo)
        total = PollCounts.empty()
        for account in sorted(set(accounts.values())):
            client = self.client_for(account)
            run = _Run(0, never, never, client, account)
            sent_before = client.requests_sent
            try:
                self._fetch([m for m in members if accounts[m.id] == account], run)
            except (RetryLater, AuthError, WrongBaseUrl, ShutdownRequested) as exc:
                log.warning("refresh stopped: %s", exc or "the process is stopping")
            run.counts.requests = client.requests_sent - sent_before
            total.merge(run.counts)
        return total

    def _check_deadline(self, run: _Run) -> None:
        self.stop.check()
        if self.clock.now() >= run.deadline:
            raise _OutOfTime

    def _list(self, members: Sequence[PollTarget], run: _Run) -> None:
        """Read the members' createdAt window page by page (no status filter: it would hide
        the operations that just ended), recording each page.

        Never-seen members (createdAt unknown) are looked for first over the recent window,
        ``intake_lookback`` before their tracking, or at the time their IDs carry where the
        window's range holds it (``_id_times``): one page learns many createdAt at once.
        Those it did not show are listed over ``pending_lookback`` if that costs fewer pages
        than their GETs at the density the first listing measured, else asked by GET.
        """
        never = [m for m in members if m.remote_created_at is None]
        if run.page_token is not None or not never:  # a round going on, or nothing new
            self._read(members, run, _window(members, self.policy.pending_lookback))
            return
        recent = _window(members, self.policy.intake_lookback)
        self._read(members, run, recent)
        unshown = [m for m in never if m.id not in run.seen]
        if run.list_error is not None or not unshown or run.listed is None:
            return
        span = (recent[1] - recent[0]).total_seconds()
        lookback = self.policy.pending_lookback.total_seconds()
        rate = (run.listed + run.skipped) / span  # the account's operations a second, lately
        if list_pays(len(unshown), lookback, rate, self.policy):
            log.info(
                "group %d: %d new operation(s) not in the last %s; listed over %s",
                run.group_id,
                len(unshown),
                self.policy.intake_lookback,
                self.policy.pending_lookback,
            )
            day = _window(unshown, self.policy.pending_lookback, by_id=False)  # not the guess
            self._read(unshown, run, day, more=True)

    def _read(
        self,
        members: Sequence[PollTarget],
        run: _Run,
        window: tuple[datetime, datetime],
        *,
        more: bool = False,
    ) -> None:
        """Read one window page by page, from the round's page if one is kept; ``more``: a
        second listing of this poll, its pages added to the first's."""
        token, resumed = run.page_token, run.page_token is not None
        if not resumed or run.bounds is None:
            token, resumed, run.bounds = None, False, window
        run.whole_listing = not resumed
        tokens: set[str] = set()
        if more:
            run.after = None  # the round's place is this listing's pages until it ends
        elif run.pages is None or not resumed:
            run.listed = run.pages = 0
        assert run.listed is not None and run.pages is not None
        try:
            while True:
                self._check_deadline(run)
                try:
                    with self.stop.interruptible():
                        page = run.client.list_page(
                            start_date=run.bounds[0],
                            end_date=run.bounds[1],
                            page_size=PAGE_SIZE,
                            page_token=token,
                        )
                except BadRequest as exc:
                    if not resumed:
                        raise
                    # The kept token no longer holds (expired, say): the round lists afresh.
                    log.warning(
                        "group %d: page token refused (%s); listing afresh", run.group_id, exc
                    )
                    token, resumed, run.page_token, run.bounds = None, False, None, window
                    run.whole_listing, run.listed, run.pages = True, 0, 0
                    continue
                resumed = False
                run.pages += 1
                run.listed += len(page.operations)
                run.reachable = True
                self._record({op.id: op for op in page.operations}, run)
                run.skipped += len(page.rejected)
                if page.rejected:
                    log.warning(
                        "List page: %d item(s) broke the schema and were skipped: %s",
                        len(page.rejected),
                        "; ".join(page.rejected[:3]),
                    )
                if page.next_token is None:
                    run.page_token, run.after = None, ""  # the listing is done: GETs next
                    return
                token = run.page_token = next_page_token(page, tokens)
        except (AuthError, RetryLater, WrongBaseUrl):
            raise
        except ApiError as exc:
            if isinstance(exc, OperationNotFound):
                # The List endpoint has no 404: this one says nothing about our operations.
                exc = ServerError(exc.status, exc.errors, exc.url)
            run.list_error = exc
            run.listed = run.pages = None
            # A failed page is a failed poll for every member it should have shown.
            left = {m.id: exc for m in members if m.id not in run.seen}
            log.warning("List page failed (%s); %d operation(s) backed off", exc, len(left))
            self._record(left, run)

    def _fetch(self, members: Sequence[PollTarget], run: _Run) -> None:
        """One GET per member that is not backing off; recorded together at the end.

        404s are recorded only if the API is shown reachable at the right base URL: by an
        answer in this message, else by one List request (which has no 404). A List 404 is
        ``WrongBaseUrl``: the 404s are dropped, nothing ends, the account is paused. A fetch
        that stops before that proof (the deadline, a throttle, rejected credentials, a
        shutdown) drops its 404s too: those members are asked again.
        """
        now = self.clock.now()
        results: dict[str, Result] = {}
        done: list[str] = []  # the members asked or skipped, in order: the round's place
        proven = False
        try:
            for member in members:
                if not is_due(member.not_before, now):
                    run.counts.add(Outcome.SKIPPED)
                    done.append(member.id)
                    continue
                self._check_deadline(run)
                try:
                    with self.stop.interruptible():
                        results[member.id] = run.client.fetch(member.id)
                except (AuthError, RetryLater, WrongBaseUrl):
                    raise
                except ApiError as exc:
                    results[member.id] = exc
                done.append(member.id)
            self._prove_reachable(results, run)
            proven = True
        finally:
            if not (proven or run.reachable or _answered(results)):
                dropped = {k for k, v in results.items() if isinstance(v, OperationNotFound)}
                results = {k: v for k, v in results.items() if k not in dropped}
                # The round goes on at the first of them: they are asked again.
                done = done[: min((done.index(k) for k in dropped), default=len(done))]
            if done:
                run.after = done[-1]
            self._record(results, run)

    def _prove_reachable(self, results: Mapping[str, Result], run: _Run) -> None:
        """Raise WrongBaseUrl if 404s came while the API's List answers 404 too."""
        if _answered(results):
            run.reachable = True
        if run.reachable or not any(isinstance(r, OperationNotFound) for r in results.values()):
            return
        try:
            with self.stop.interruptible():
                run.client.list_page(page_size=1)
        except (AuthError, RetryLater, WrongBaseUrl):
            raise
        except ApiError as exc:  # says nothing of the base URL: the 404s count, within the grace
            log.warning("List probe after 404s failed (%s); the 404s stand", exc)
            return
        run.reachable = True

    def _record(self, results: Mapping[str, Result], run: _Run) -> None:
        """Write what ``results`` say about tracked operations (members or not)."""
        recorded = self._write(
            lambda: self.recorder.record(results, self.clock.now(), run.account),
            run,
            f"{len(results)} answer(s)",
        )
        run.seen.update(recorded.outcomes)
        run.removed.update(recorded.leaving)
        run.changed = run.changed or recorded.changed
        run.counts.rows_written += recorded.rows
        run.counts.history_rows += recorded.history
        for outcome in recorded.outcomes.values():
            run.counts.add(outcome)

    def _write(self, write: Callable[[], T], run: _Run, what: str) -> T:
        """``write()``, tried again in place while the database is unreachable and the claim
        lasts; the answers it holds are never asked for again."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return write()
            except DB_UNREACHABLE as exc:
                wait = min(WRITE_RETRY_MAX, WRITE_RETRY_FIRST * 2 ** (attempt - 1))
                if (
                    attempt == WRITE_ATTEMPTS
                    or self.stop.requested  # no waiting at shutdown: the guard retries it
                    or self.clock.now() + timedelta(seconds=wait) >= run.expires
                ):
                    raise
                log.warning(
                    "group %d: the database did not take %s (%s); trying again in %g s "
                    "without asking the API again",
                    run.group_id,
                    what,
                    type(exc).__name__,
                    wait,
                )
                self.clock.sleep(wait)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _finish(
        self,
        group: Any,
        token: str,
        started: datetime,
        run: _Run,
    ) -> None:
        """Write the group's schedule: due one interval after its round began, or, a poll cut
        short, when the deferral says, with the round's place."""
        last_change = started if run.changed else group.last_change_at
        values: dict[str, Any] = dict(NO_ROUND)  # the round ends, unless cut short
        if run.counts.requests:
            seconds = (self.clock.now() - started).total_seconds() / run.counts.requests
            values["request_seconds"] = seconds
        if run.deferral is not None:
            values.update(next_due_at=run.deferral.until, last_change_at=last_change)
            values.update(
                round_started_at=run.round_started,
                resume_after=run.after,
                resume_token=run.page_token if run.after is None else None,
            )
            if values["resume_token"] is not None and run.bounds is not None:
                values.update(resume_start_at=run.bounds[0], resume_end_at=run.bounds[1])
            if run.pages is not None:
                values.update(listed=run.listed, pages=run.pages)  # the round's so far
        elif run.list_error is not None:
            errors = group.consecutive_errors + 1
            backoff = timedelta(seconds=self.policy.error_wait(run.list_error, errors))
            values.update(
                next_due_at=self.clock.now() + backoff,
                consecutive_errors=errors,
                last_error=f"{type(run.list_error).__name__}: {run.list_error}"[:1000],
            )
        else:
            began = run.round_started or started
            values.update(
                next_due_at=self.policy.next_due(began, last_change),
                last_polled_at=began,
                last_change_at=last_change,
                consecutive_errors=0,
                last_error=None,
            )
            if run.pages is not None:
                values.update(listed=run.listed, pages=run.pages)

        def write() -> None:
            with self.sessions.begin() as session:
                repo = Repository(session)
                remaining = repo.finish(group.id, token, values)
                if remaining is None:
                    log.warning("group %d: claim lost before its schedule was written", group.id)
                elif remaining == 0:
                    repo.drop_group(group.id)

        self._write(write, run, "the group's schedule")


def _id_times(
    repo: Repository, group: PollGroup, members: list[PollTarget], now: datetime
) -> list[PollTarget]:
    """A window's never-seen members with the time their IDs carry, where the account's IDs
    are proven to carry it and the window's own range holds that time: its listing then
    covers them without reaching on to their tracking. A wrong guess costs what any member
    the pages did not show costs: the fallback (``_list``, ``_unlisted``)."""
    low, high = group.start_at, group.end_at
    if low is None or high is None or all(m.remote_created_at is not None for m in members):
        return members
    if not repo.ids_carry_time(group.account, now):
        return members
    timed = []
    for member in members:
        at = None if member.remote_created_at else created_from_id(member.id, now)
        if at is not None and low <= second(at) <= high:
            member = replace(member, id_created_at=second(at))
        timed.append(member)
    return timed


def _window(
    members: Sequence[PollTarget], lookback: timedelta, *, by_id: bool = True
) -> tuple[datetime, datetime]:
    """The List bounds covering the members: their createdAt, for one never seen the time its
    ID carries (``by_id``, where ``_id_times`` kept one), else from ``lookback`` before its
    tracking to its tracking; padded by a second each side."""
    known = [m.remote_created_at or (m.id_created_at if by_id else None) for m in members]
    starts = [at or m.tracked_at - lookback for at, m in zip(known, members, strict=True)]
    ends = [at or m.tracked_at for at, m in zip(known, members, strict=True)]
    return (min(starts) - WINDOW_PAD, max(ends) + WINDOW_PAD)


def _answered(results: Mapping[str, Result]) -> bool:
    """True if an operation came back: the base URL is right, a 404 is about its operation."""
    return any(isinstance(r, Operation) for r in results.values())
