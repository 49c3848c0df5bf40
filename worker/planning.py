"""Which operations are polled together: List windows where they are dense, GETs where not.

Pure: the sweep hands in the operations waiting to be placed and the groups that exist, and
gets back what to write. A List window costs ``ceil(W / 1000)`` requests, W being every
operation created inside it, tracked or not; a GET group costs one request per member. So:

* an operation whose createdAt falls inside a List window joins it;
* a run of operations close together in createdAt (gaps small for the account's density)
  becomes a new List window, or extends the neighbouring one, when the window would cost
  fewer requests than GETs; the rest joins GET groups: a just-seen operation only one that
  falls due within a tick after its own time (one due sooner would ask it again at once);
* a never-seen operation (createdAt unknown) whose ID carries its creation time (``ulid``;
  the account's IDs proven to, against the createdAt of its operations seen) joins the List
  window that covers that time (unless a round of it goes on), as if seen: its poll lists
  the window's own range, and if the guess was wrong the page does not show it and it falls
  back as below;
* other never-seen operations join the newest List window if it reaches within
  ``intake_lookback`` of their tracking (its next poll lists on to them), else are one List
  window when they are many, GETs when few. A window's poll lists the ``intake_lookback``
  before their tracking, then, for those it did not show, the day before
  (``pending_lookback``) if that pays, else asks one GET each; once seen they are placed
  again by their createdAt;
* windows that grew past a page are split between two seconds, windows that cost more than
  their GETs become GET groups, and small neighbours are merged;
* a group one poll cannot finish within half its claim's lease, at the seconds per request
  its last poll measured, is split (``too_slow``), and no placement or merge makes it so.

The account's density (operations per second of createdAt, untracked ones included: what a
window costs) and its untracked density (what a gap inside a window costs: about
``GAP_OPERATIONS`` of them at most) are learned from what the last listings held; until one is
known, or while they held no untracked one, a gap of ``DEFAULT_GAP`` seconds separates windows.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from worker.tracking import PollPolicy

LIST = "list"
FETCH = "fetch"
PAGE_SIZE = 1000
DEFAULT_GAP = timedelta(seconds=60)
# A gap may hold at most this many untracked operations before it separates two windows.
GAP_OPERATIONS = 100
MIN_GAP = timedelta(seconds=1)
MAX_GAP = timedelta(hours=6)


@dataclass(frozen=True, slots=True)
class Waiting:
    """An active operation that no group polls yet."""

    id: str
    created_at: datetime | None  # the API's createdAt, None while never seen
    tracked_at: datetime
    seen_at: datetime | None = None  # when its state was last recorded
    # Never seen, of an account whose IDs are proven to carry their creation time: the ID's.
    id_created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class GroupView:
    """What the planner reads of an existing group."""

    id: int
    kind: str
    start_at: datetime | None
    end_at: datetime | None
    members: int
    listed: int | None = None
    pages: int | None = None
    # A poll holds the group now: upkeep leaves it alone (its message read its members).
    claimed: bool = False
    # Seconds per request its last poll measured (None: never polled).
    request_seconds: float | None = None
    # A poll round cut short goes on where it stopped: no member joins behind its place.
    resuming: bool = False
    # When it is next due (None: not read, as in a plan made by hand).
    due_at: datetime | None = None

    @property
    def span(self) -> float:
        """Seconds of createdAt the window covers (0 for GET groups)."""
        if self.start_at is None or self.end_at is None:
            return 0.0
        return (self.end_at - self.start_at).total_seconds() + 1.0


@dataclass(frozen=True, slots=True)
class NewGroup:
    """A group to create, with its first members."""

    kind: str
    members: tuple[str, ...]
    start_at: datetime | None = None
    end_at: datetime | None = None
    # Just seen operations are not asked again before an interval has passed; None: at once.
    due_at: datetime | None = None


@dataclass
class Placement:
    """What the sweep writes: members joining groups, grown windows, new groups."""

    joins: dict[int, list[str]] = field(default_factory=dict)
    ranges: dict[int, tuple[datetime, datetime]] = field(default_factory=dict)
    new: list[NewGroup] = field(default_factory=list)

    @property
    def placed(self) -> int:
        """How many operations this placement moves."""
        return sum(len(v) for v in self.joins.values()) + sum(len(g.members) for g in self.new)

    def join(self, group_id: int, op_id: str) -> None:
        """Add one member to an existing group."""
        self.joins.setdefault(group_id, []).append(op_id)


def second(value: datetime) -> datetime:
    """A createdAt as the API's filters see it: whole seconds."""
    return value.replace(microsecond=0)


def density(groups: Sequence[GroupView]) -> float | None:
    """Operations per second of createdAt in the windows listed lately, or None."""
    listed = [g for g in groups if g.listed is not None and g.span > 0]
    if not listed:
        return None
    return sum(g.listed or 0 for g in listed) / sum(g.span for g in listed)


def untracked_density(groups: Sequence[GroupView]) -> float | None:
    """Untracked operations per second of createdAt in the windows listed lately (what their
    pages held beyond their members), or None.

    A gap between two tracked operations costs a window only the untracked ones created in it:
    a burst whose every operation is tracked has none, however dense the account."""
    listed = [g for g in groups if g.listed is not None and g.span > 0]
    if not listed:
        return None
    extra = sum(max(0, (g.listed or 0) - g.members) for g in listed)
    return extra / sum(g.span for g in listed)


def gap_limit(rate: float | None) -> timedelta:
    """The largest createdAt gap inside one window, ``rate`` being the account's untracked
    operations per second (``untracked_density``): about ``GAP_OPERATIONS`` of them a gap."""
    if rate is None or rate <= 0:
        return DEFAULT_GAP
    return min(MAX_GAP, max(MIN_GAP, timedelta(seconds=GAP_OPERATIONS / rate)))


def list_pays(members: int, span_seconds: float, rate: float | None, policy: PollPolicy) -> bool:
    """True if one listing of a window holding ``members`` costs fewer requests than GETs."""
    if policy.strategy != "auto":
        return policy.strategy == LIST and members > 0
    if members < policy.list_threshold:
        return False
    listed = max(members, (rate or 0.0) * span_seconds)
    return math.ceil(listed / PAGE_SIZE) < members


def place(waiting: Sequence[Waiting], groups: Sequence[GroupView], policy: PollPolicy) -> Placement:
    """Decide the group of every waiting operation (see the module docstring)."""
    plan = Placement()
    rate = density(groups)
    gap = gap_limit(untracked_density(groups))
    windows = sorted(
        (g for g in groups if g.kind == LIST and g.start_at is not None and g.end_at is not None),
        key=lambda g: g.start_at or datetime.min,
    )
    starts = [_start(g) for g in windows]
    sizes = {g.id: g.members for g in groups}
    ranges = {g.id: (g.start_at, g.end_at) for g in windows}

    seen = sorted((w for w in waiting if w.created_at is not None), key=_created)
    leftover: list[Waiting] = []
    for op in seen:
        window = _covering(windows, starts, second(_created(op)))
        if window is not None:
            plan.join(window.id, op.id)
            sizes[window.id] += 1
        else:
            leftover.append(op)
    never_seen: list[Waiting] = []
    for op in (w for w in waiting if w.created_at is None):
        guessed = None if op.id_created_at is None else second(op.id_created_at)
        window = None if guessed is None else _covering(windows, starts, guessed)
        # A round going on reads on from its place: a member joining it would cost a GET.
        if window is not None and not window.resuming:
            plan.join(window.id, op.id)
            sizes[window.id] += 1
        else:
            never_seen.append(op)

    for run in _runs(leftover, gap, starts):
        # Fill the windows on either side first (a run that arrives bit by bit, as pages of
        # a first listing are recorded, grows the last window instead of making small ones).
        before, after = _neighbours(windows, ranges, run, gap)
        if before is not None:
            run = _grow(plan, before, run, ranges, sizes, policy, from_end=False)
        if after is not None and run:
            run = _grow(plan, after, run, ranges, sizes, policy, from_end=True)
        if not run:
            continue
        first, last = second(_created(run[0])), second(_created(run[-1]))
        if list_pays(len(run), (last - first).total_seconds() + 1, rate, policy):
            plan.new.extend(_windows(run, policy))
        else:
            _fetch(plan, run, groups, sizes, policy)

    never_seen = _join_edge(plan, never_seen, groups, sizes, policy)
    if never_seen and list_pays(len(never_seen), _intake_span(never_seen, policy), rate, policy):
        plan.new.append(NewGroup(LIST, tuple(op.id for op in never_seen)))
    elif never_seen:
        _fetch(plan, never_seen, groups, sizes, policy)
    return plan


def _covering(
    windows: Sequence[GroupView], starts: Sequence[datetime], created: datetime
) -> GroupView | None:
    """The List window whose [start_at, end_at] holds ``created`` (a second), if any."""
    index = bisect.bisect_right(starts, created) - 1
    if index < 0:
        return None
    window = windows[index]
    if window.end_at is None or created > window.end_at:
        return None
    return window


def _join_edge(
    plan: Placement,
    never_seen: Sequence[Waiting],
    groups: Sequence[GroupView],
    sizes: dict[int, int],
    policy: PollPolicy,
) -> list[Waiting]:
    """Never-seen operations join the account's newest List window if its createdAt range
    reaches within ``intake_lookback`` of their tracking and it has room: its next poll (at
    most an interval away) lists on to their tracking, so operations handed over one by one
    cost no request of their own; it has room up to ``most_members``. A claimed window takes
    them too: a poll that has not started yet reads them with its members, one under way
    leaves them to the next, within the interval (a listing of their own would cost a
    request). A window going on with a cut round does not: its kept page token would miss
    them. Returns those left to place ([] if they joined)."""
    if not never_seen:
        return []
    first = min(op.tracked_at for op in never_seen)
    edge = [
        g
        for g in groups
        if g.kind == LIST
        and g.end_at is not None
        and g.end_at >= second(first) - policy.intake_lookback
        and not g.resuming
        and sizes[g.id] + len(never_seen) <= most_members(policy)
    ]
    if not edge or policy.strategy == FETCH:
        return list(never_seen)
    window = max(edge, key=lambda g: g.end_at or datetime.min)
    for op in never_seen:
        plan.join(window.id, op.id)
    sizes[window.id] += len(never_seen)
    return []


def _intake_span(never_seen: Sequence[Waiting], policy: PollPolicy) -> float:
    """Seconds of createdAt the first listing of never-seen operations covers: from
    ``intake_lookback`` before the first was tracked to the last's tracking (the poller lists
    the ``pending_lookback`` window only for those it did not show, and only if that pays)."""
    tracked = [w.tracked_at for w in never_seen]
    return (max(tracked) - min(tracked) + policy.intake_lookback).total_seconds() + 2.0


def _start(group: GroupView) -> datetime:
    assert group.start_at is not None
    return group.start_at


def _created(op: Waiting) -> datetime:
    assert op.created_at is not None
    return op.created_at


def _runs(
    ops: Sequence[Waiting], gap: timedelta, starts: Sequence[datetime]
) -> list[list[Waiting]]:
    """Consecutive operations (by createdAt) no more than ``gap`` apart and with no window
    between them, so a new window never overlaps an existing one."""
    runs: list[list[Waiting]] = []
    previous_slot = -1
    for op in ops:
        created = second(_created(op))
        slot = bisect.bisect_right(starts, created)
        if runs and slot == previous_slot and created - second(_created(runs[-1][-1])) <= gap:
            runs[-1].append(op)
        else:
            runs.append([op])
        previous_slot = slot
    return runs


def _neighbours(
    windows: Sequence[GroupView],
    ranges: dict[int, tuple[datetime | None, datetime | None]],
    run: Sequence[Waiting],
    gap: timedelta,
) -> tuple[GroupView | None, GroupView | None]:
    """The windows just before and just after a run, if they are within ``gap`` of it."""
    first, last = second(_created(run[0])), second(_created(run[-1]))
    before = after = None
    for window in windows:
        low, high = ranges[window.id]
        if low is None or high is None:
            continue
        if timedelta(0) <= first - high <= gap:
            before = window
        elif timedelta(0) <= low - last <= gap and after is None:
            after = window
    return before, after


def _grow(
    plan: Placement,
    window: GroupView,
    run: list[Waiting],
    ranges: dict[int, tuple[datetime | None, datetime | None]],
    sizes: dict[int, int],
    policy: PollPolicy,
    *,
    from_end: bool,
) -> list[Waiting]:
    """Move the run's operations nearest to ``window`` into it while it has room (never
    splitting one second); return the rest of the run, in order."""
    ordered = list(reversed(run)) if from_end else list(run)
    taken: list[Waiting] = []
    for op in ordered:
        room = sizes[window.id] + len(taken) < policy.list_group
        same_second = bool(taken) and second(_created(op)) == second(_created(taken[-1]))
        if not (room or same_second):
            break
        taken.append(op)
    if not taken:
        return run
    low, high = ranges[window.id]
    assert low is not None and high is not None
    seconds = [second(_created(op)) for op in taken]
    ranges[window.id] = (min(low, *seconds), max(high, *seconds))
    plan.ranges[window.id] = (min(low, *seconds), max(high, *seconds))
    for op in taken:
        plan.join(window.id, op.id)
    sizes[window.id] += len(taken)
    rest = ordered[len(taken) :]
    return list(reversed(rest)) if from_end else rest


def _windows(run: Sequence[Waiting], policy: PollPolicy) -> list[NewGroup]:
    """Cut a run into windows of about ``list_group`` members, never inside one second."""
    groups: list[NewGroup] = []
    current: list[Waiting] = []
    for op in run:
        full = len(current) >= policy.list_group
        if full and second(_created(op)) != second(_created(current[-1])):
            groups.append(_window(current, policy))
            current = []
        current.append(op)
    if current:
        groups.append(_window(current, policy))
    return groups


def _window(ops: Sequence[Waiting], policy: PollPolicy) -> NewGroup:
    return NewGroup(
        LIST,
        tuple(op.id for op in ops),
        second(_created(ops[0])),
        second(_created(ops[-1])),
        _due(ops, policy),
    )


def _due(ops: Sequence[Waiting], policy: PollPolicy) -> datetime | None:
    """One interval after the earliest last sight of the members (None if one was never
    seen: due at once)."""
    seen = [op.seen_at for op in ops]
    if not seen or any(t is None for t in seen):
        return None
    return min(t for t in seen if t is not None) + policy.interval


def _fetch(
    plan: Placement,
    ops: Sequence[Waiting],
    groups: Sequence[GroupView],
    sizes: dict[int, int],
    policy: PollPolicy,
) -> None:
    """Fill GET groups that have room and are asked when the operations should be, then new
    ones. A GET group asks each member once a poll, so a just-seen operation joins only a group
    that falls due within a tick after its own due time (a group due sooner would ask it again
    at once: one request more); a never-seen one joins any."""
    unseen = [op for op in ops if op.seen_at is None]
    seen = sorted((op for op in ops if op.seen_at is not None), key=_seen)
    dues = [_seen(op) + policy.interval for op in seen]
    for group in groups:
        if not (unseen or seen):
            return
        room = _fetch_limit(group, policy) - sizes[group.id]
        if group.kind != FETCH or room <= 0 or group.resuming:
            continue
        taken, unseen = unseen[:room], unseen[room:]
        if len(taken) < room and group.due_at is not None and not group.claimed:
            # Due between a tick before the group and the group: the group asks them on time.
            low = bisect.bisect_left(dues, group.due_at - policy.claim_ahead)
            high = min(bisect.bisect_right(dues, group.due_at), low + room - len(taken))
            taken += seen[low:high]
            del seen[low:high], dues[low:high]
        for op in taken:
            plan.join(group.id, op.id)
        sizes[group.id] += len(taken)
    for left in (unseen, seen):  # apart: a group of both would be due at once
        for start in range(0, len(left), policy.fetch_group):
            part = left[start : start + policy.fetch_group]
            new = NewGroup(FETCH, tuple(op.id for op in part), due_at=_due(part, policy))
            plan.new.append(new)


def _seen(op: Waiting) -> datetime:
    assert op.seen_at is not None
    return op.seen_at


@dataclass(frozen=True, slots=True)
class Member:
    """A member of a group, as a split reads it."""

    id: str
    created_at: datetime | None


def split(members: Sequence[Member], size: int) -> list[list[str]]:
    """Cut a window's members into windows of about ``size``, never inside one second.

    The first part stays in the group; each other part becomes a new window.
    """
    known = sorted((m for m in members if m.created_at is not None), key=_member_created)
    parts: list[list[Member]] = []
    for member in known:
        created = second(_member_created(member))
        if parts and (len(parts[-1]) < size or second(_member_created(parts[-1][-1])) == created):
            parts[-1].append(member)
        else:
            parts.append([member])
    never_seen = [m.id for m in members if m.created_at is None]
    result = [[m.id for m in part] for part in parts] or [[]]
    result[0].extend(never_seen)
    return result


def _member_created(member: Member) -> datetime:
    assert member.created_at is not None
    return member.created_at


def overspent(group: GroupView) -> bool:
    """True if the last listing of a window cost more requests than GETs of its members."""
    if group.kind != LIST or group.claimed or group.pages is None:
        return False
    return group.pages > group.members > 0


def too_big(group: GroupView, policy: PollPolicy) -> bool:
    """True if a window holds more members than one page should and spans more than one
    second (a window is never cut inside a second)."""
    if group.kind != LIST or group.claimed or group.start_at is None or group.end_at is None:
        return False
    return group.start_at < group.end_at and group.members > most_members(policy)


def most_members(policy: PollPolicy) -> int:
    """The most members a window holds before it is split (``too_big``): a fifth above
    ``list_group``. New operations join the newest window up to it, not up to ``list_group``:
    a window merged back to ``list_group`` would otherwise turn every tick's new operations
    away, each tick's then costing a listing of their own."""
    return policy.list_group * 6 // 5


def mergeable(a: GroupView, b: GroupView, gap: timedelta, policy: PollPolicy) -> bool:
    """True if two neighbouring groups of one kind are small enough to poll as one, within
    half a lease at the slower one's measured seconds per request."""
    if a.kind != b.kind or a.id == b.id or a.claimed or b.claimed or a.resuming or b.resuming:
        return False
    seconds = max(a.request_seconds or 0.0, b.request_seconds or 0.0)
    if a.kind == FETCH:
        # The merged group is due when the earlier was: the other's members would be asked
        # early, one request more each, unless the two fall due within one tick.
        if a.due_at is None or b.due_at is None:
            return False
        if abs(a.due_at - b.due_at) > policy.claim_ahead:
            return False
        members = a.members + b.members
        return members <= policy.fetch_group and members * seconds <= _half_lease(policy)
    if a.end_at is None or b.start_at is None or b.start_at - a.end_at > gap:
        return False
    pages = (a.pages or 1) + (b.pages or 1)
    return a.members + b.members <= policy.list_group and pages * seconds <= _half_lease(policy)


def _half_lease(policy: PollPolicy) -> float:
    return policy.lease.total_seconds() / 2


def poll_requests(group: GroupView, policy: PollPolicy) -> int | None:
    """How many requests one poll of the group may make and end within half its lease, at
    the seconds per request its last poll measured (None: nothing measured yet)."""
    if not group.request_seconds or group.request_seconds <= 0:
        return None
    return max(1, math.floor(_half_lease(policy) / group.request_seconds))


def _fetch_limit(group: GroupView, policy: PollPolicy) -> int:
    """The most members a GET group may hold: a batch, and no more than one poll asks in
    half its lease."""
    fit = poll_requests(group, policy)
    return policy.fetch_group if fit is None else min(policy.fetch_group, fit)


def too_slow(group: GroupView, policy: PollPolicy) -> bool:
    """True if one poll of the group takes more than half its lease at the seconds per
    request its last poll measured: GETs of every member, pages of a window (one second, or
    a createdAt never seen, is never cut; a poll cut short goes on with the round instead)."""
    fit = poll_requests(group, policy)
    if fit is None or group.claimed or group.members <= 1:
        return False
    if group.kind == FETCH:
        return group.members > fit
    if group.start_at is None or group.end_at is None or group.start_at >= group.end_at:
        return False
    return (group.pages or 0) > fit


def split_slow(group: GroupView, members: Sequence[Member], policy: PollPolicy) -> list[list[str]]:
    """Cut a ``too_slow`` group into parts one poll each finishes within half a lease: GET
    groups by id (a poll's order), windows by createdAt in proportion to the pages they cost."""
    fit = poll_requests(group, policy) or 1
    if group.kind == FETCH:
        ids = sorted(m.id for m in members)
        return [ids[i : i + fit] for i in range(0, len(ids), fit)] or [[]]
    size = max(1, group.members * fit // max(1, group.pages or 1))
    return split(members, size)
