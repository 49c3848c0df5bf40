"""The sweep, run by beat's tick: place waiting operations into poll groups, then claim the
due groups and dispatch one poll message each. A group that falls due before the next tick
is claimed now and its message starts just before its due time (``start_at``).

The claim lives here, whole: minted by ``Repository.claim_due`` (a token and a lease per
group), dispatched after the claim committed, given back at once if the broker refuses a
message, ended by the poll that finishes the group (``Repository.finish``). A claim whose
message a worker started and died in runs out with its lease and the group is due again.

A claim whose message no worker started is either still waiting in the broker or lost (a tick
killed between its commit and its send, a broker restarted without its data). The tick says
which it may be: if the broker's queue holds no message, it is not waiting there, so the group
is claimed again when the lease ends (a late original carries a stale token and does nothing);
while the queue holds messages, only after ``OPTRACK_RESEND_AFTER``, so a backed-up broker is
not sent one more message per group per lease.

``hasten`` makes the groups of given operations due at once (a poll message of 0.1.0, which
named operations, not a group: ``worker.compat``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from itertools import pairwise

from sqlalchemy.orm import Session, sessionmaker

from worker import planning
from worker.planning import FETCH, LIST, GroupView
from worker.repository import GroupClaim, Repository
from worker.tracking import PollPolicy
from worker.ulid import created_from_id

log = logging.getLogger(__name__)
# Operations placed by one tick at most: a burst of new ones is placed over a few ticks.
MAX_PLACED_PER_TICK = 200_000
# Splits, conversions and merges per tick: the sweep's own upkeep stays small.
MAX_UPKEEP_PER_TICK = 20

# A poll claimed ahead of its due time starts this long before it (``start_at``): what the
# broker and the worker add then brings its requests to the interval, not past it.
START_EARLY = timedelta(milliseconds=250)

Send = Callable[[GroupClaim], None]


@dataclass(frozen=True)
class SweepResult:
    """What one tick did."""

    placed: int = 0
    claimed: int = 0
    sent: int = 0
    given_back: int = 0
    paused_until: datetime | None = None


class SendFailed(Exception):
    """Raised by a ``Send`` when the broker did not take the message."""


class DispatchError(Exception):
    """Raised when the broker refused a poll message; the unsent claims were given back."""

    def __init__(self, given_back: int, cause: SendFailed) -> None:
        self.given_back = given_back
        super().__init__(f"broker refused a poll ({cause}); {given_back} claim(s) given back")


def place(sessions: sessionmaker[Session], now: datetime, policy: PollPolicy) -> int:
    """Put every waiting operation into a group of its account and keep each account's groups
    in shape (a group, a List window, never mixes accounts: one account's credentials see
    only its operations); returns how many operations were placed. One placer at a time
    (others skip this tick)."""
    placed = new = 0
    with sessions.begin() as session:
        repo = Repository(session)
        if not repo.try_lock_placement():
            return 0
        waiting_accounts = repo.waiting_accounts()
        left = MAX_PLACED_PER_TICK
        by_account = repo.groups(now)
        for account in sorted({*waiting_accounts, *by_account}):
            groups = by_account.get(account, [])
            waiting = repo.waiting(left, account) if account in waiting_accounts and left else []
            waiting = _id_times(repo, account, waiting, now)
            plan = planning.place(waiting, groups, policy) if waiting else planning.Placement()
            repo.place(plan, now, account)
            _upkeep(repo, groups, policy, now)
            placed, new, left = placed + plan.placed, new + len(plan.new), left - len(waiting)
    if placed:
        log.info("sweep: %d operation(s) placed (%d new group(s))", placed, new)
    return placed


def _id_times(
    repo: Repository, account: str, waiting: list[planning.Waiting], now: datetime
) -> list[planning.Waiting]:
    """The never-seen operations with the creation time their IDs carry, if the account's IDs
    are proven to carry it (asked only of an account with some never seen)."""
    if not any(w.created_at is None for w in waiting) or not repo.ids_carry_time(account, now):
        return waiting
    return [
        w if w.created_at is not None else replace(w, id_created_at=created_from_id(w.id, now))
        for w in waiting
    ]


def _upkeep(
    repo: Repository, groups: Sequence[GroupView], policy: PollPolicy, now: datetime
) -> None:
    """Split windows that outgrew a page, turn windows dearer than GETs into GET groups, split
    groups one poll cannot finish in half a lease, merge small neighbours; a few per tick."""
    budget = MAX_UPKEEP_PER_TICK
    for group in groups:
        if budget <= 0:
            return
        if planning.overspent(group):
            members = [m.id for m in repo.group_members(group.id)]
            size = policy.fetch_group
            parts = [members[i : i + size] for i in range(0, len(members), size)] or [[]]
            repo.regroup(group.id, parts, FETCH, now)
            log.info(
                "sweep: group %d cost %d page(s) for %d operation(s); polled by GET now",
                group.id,
                group.pages,
                group.members,
            )
            budget -= 1
        elif planning.too_big(group, policy):
            parts = planning.split(repo.group_members(group.id), policy.list_group)
            for new_id in [group.id, *repo.regroup(group.id, parts, LIST, now)]:
                repo.refresh_range(new_id)
            budget -= 1
        elif planning.too_slow(group, policy):
            parts = planning.split_slow(group, repo.group_members(group.id), policy)
            new_ids = repo.regroup(group.id, parts, group.kind, now)
            for new_id in [group.id, *new_ids] if group.kind == LIST else []:
                repo.refresh_range(new_id)
            log.info(
                "sweep: group %d takes %.1f s a request; cut in %d to fit half a lease",
                group.id,
                group.request_seconds,
                len(new_ids) + 1,
            )
            budget -= 1
    gap = planning.gap_limit(planning.untracked_density(groups))
    for kind in (LIST, FETCH):
        same = sorted(
            (g for g in groups if g.kind == kind and g.members > 0),
            key=lambda g: (g.start_at or now, g.id),
        )
        merged: set[int] = set()
        for a, b in pairwise(same):
            if budget <= 0:
                return
            if a.id in merged or b.id in merged or not planning.mergeable(a, b, gap, policy):
                continue
            repo.merge(a.id, b.id)
            merged.update((a.id, b.id))  # both views are stale now; the next tick looks again
            budget -= 1


@dataclass(frozen=True)
class Hastened:
    """What ``hasten`` did."""

    groups: int  # the groups the operations are in, all due now
    waiting: int  # operations still in no group (another sweep was placing): the next tick's


def hasten(
    sessions: sessionmaker[Session],
    operation_ids: Sequence[str],
    now: datetime,
    policy: PollPolicy,
) -> Hastened:
    """Make the groups of these operations due now, so the next tick polls them: the waiting
    ones are placed first (as a tick would); ended or unknown operations are left alone."""
    place(sessions, now, policy)
    with sessions.begin() as session:
        groups, waiting = Repository(session).make_due(operation_ids, now)
    return Hastened(groups, waiting)


def sweep(
    sessions: sessionmaker[Session],
    now: datetime,
    policy: PollPolicy,
    *,
    limit: int,
    paused_until: datetime | None,
    send: Send,
    queue_empty: bool = False,
    paused: Collection[str] = (),
) -> SweepResult:
    """One tick: place, then claim the due groups and send their polls, but none of the
    ``paused`` accounts' (``paused_until``: every account waits, as when one was all).
    ``queue_empty``: the broker's queue was seen empty, so an expired claim whose message no
    worker started was lost, not waiting. Raises DispatchError if the broker refused a
    message."""
    placed = place(sessions, now, policy)
    if paused_until is not None and paused_until > now:
        return SweepResult(placed=placed, paused_until=paused_until)
    resend_after = policy.lease if queue_empty else policy.resend_after
    with sessions.begin() as session:
        claims = Repository(session).claim_due(
            now, limit, policy.lease, resend_after, policy.claim_ahead, paused
        )
    sent = dispatch(sessions, claims, send, now)
    return SweepResult(placed=placed, claimed=len(claims), sent=sent)


def start_at(claim: GroupClaim, now: datetime) -> datetime | None:
    """When the poll of ``claim`` should start: None (at once) if its group is due by ``now``,
    else just before its due time. A tick claims what falls due before the next tick; sent
    to start at the tick, such a poll would ask up to a tick early, one request more per
    member every few intervals. The message waits in the worker that took it for less than
    a tick, and never more than a quarter of the claim's lease (a tick longer than that
    starts it sooner), so the poll has its time; lost with that worker, it comes back from
    the broker, or its claim runs out, as any poll message's."""
    start = min(claim.due_at - START_EARLY, now + (claim.expires_at - now) / 4)
    return start if start > now else None


def give_back(
    sessions: sessionmaker[Session], held: Sequence[tuple[int, str]], now: datetime
) -> int:
    """Give back the claims (group id, token) of poll messages a stopping worker holds and
    never started, due now, so the next start polls them at once instead of after the lease;
    one a worker started meanwhile stays with it. Returns how many were given back."""
    if not held:
        return 0
    with sessions.begin() as session:
        given = Repository(session).release_unstarted(held, now)
    if given:
        log.info("sweep: %d claim(s) of unstarted poll message(s) given back", given)
    return given


def dispatch(
    sessions: sessionmaker[Session], claims: Sequence[GroupClaim], send: Send, now: datetime
) -> int:
    """Send one message per claim, after the claim committed (a poll never sees a claim that
    was rolled back); if the broker refuses one, give that one and the rest back at once."""
    for index, claim in enumerate(claims):
        try:
            send(claim)
        except SendFailed as exc:
            unsent = claims[index:]
            with sessions.begin() as session:
                Repository(session).release(unsent, now)
            log.warning("sweep: broker refused a poll; %d claim(s) given back", len(unsent))
            raise DispatchError(len(unsent), exc) from exc
    return len(claims)
