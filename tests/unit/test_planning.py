"""The planner's rules that keep a GET group's members on their own cadence (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from worker.planning import (
    FETCH,
    LIST,
    GroupView,
    Waiting,
    mergeable,
    most_members,
    place,
)
from worker.tracking import PollPolicy

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
TICK = timedelta(seconds=2)
POLICY = PollPolicy(interval=timedelta(seconds=10), strategy="fetch", claim_ahead=TICK)


def get_group(group_id: int, due_in: float, members: int = 1, **kw: bool) -> GroupView:
    due = NOW + timedelta(seconds=due_in)
    return GroupView(group_id, FETCH, None, None, members, due_at=due, **kw)


def seen(op_id: str, ago: float = 0.0) -> Waiting:
    at = NOW - timedelta(seconds=ago)
    return Waiting(op_id, at - timedelta(hours=1), at - timedelta(minutes=1), seen_at=at)


def test_a_just_seen_operation_joins_only_a_group_due_within_a_tick_after_its_own_time() -> None:
    groups = [
        get_group(1, due_in=0.5),  # would ask it again at once
        get_group(2, due_in=4.0, claimed=True),  # a poll holds it: asked now
        get_group(3, due_in=11.5),  # due 1.5 s after it: the same tick asks it on time
        get_group(4, due_in=13.0),  # would hold it 3 s past its interval
    ]
    plan = place([seen("a")], groups, POLICY)
    assert plan.joins == {3: ["a"]} and not plan.new

    plan = place([seen("b")], [groups[0], groups[1], groups[3]], POLICY)
    assert not plan.joins
    [new] = plan.new
    assert new.members == ("b",) and new.due_at == NOW + POLICY.interval


def test_a_never_seen_operation_joins_any_get_group_and_never_one_with_seen_ones() -> None:
    never = Waiting("n", None, NOW)
    plan = place([never], [get_group(1, due_in=0.5, claimed=True)], POLICY)
    assert plan.joins == {1: ["n"]}

    plan = place([never, seen("s", ago=1.0)], [], POLICY)
    assert sorted((g.members, g.due_at) for g in plan.new) == [
        (("n",), None),  # at once
        (("s",), NOW + timedelta(seconds=9)),  # an interval after its sight
    ]


def test_get_groups_merge_only_when_they_fall_due_within_a_tick() -> None:
    a = get_group(1, due_in=5.0)
    assert mergeable(a, get_group(2, due_in=6.5), timedelta(0), POLICY)
    assert not mergeable(a, get_group(2, due_in=8.0), timedelta(0), POLICY)
    assert not mergeable(a, get_group(2, due_in=2.0), timedelta(0), POLICY)


def test_a_gap_in_created_at_is_weighed_by_the_untracked_operations_listings_held() -> None:
    policy = PollPolicy(interval=timedelta(seconds=10), claim_ahead=TICK)
    start = NOW - timedelta(minutes=10)
    # Three batches of 100 operations, each in one second, 4 s apart, after a window listed.
    later = [
        Waiting(f"{batch}-{i}", start + timedelta(seconds=12 + 4 * batch), NOW, seen_at=NOW)
        for batch in range(3)
        for i in range(100)
    ]
    # Its listing held its 300 members over 9 s and nothing else: the gaps cost nothing, the
    # batches grow it (however dense: 33 operations a second, 130 in 4 s).
    window = GroupView(1, LIST, start, start + timedelta(seconds=8), 300, listed=300, pages=1)
    plan = place(later, [window], policy)
    assert plan.joins == {1: [w.id for w in later]} and not plan.new
    # 300 untracked operations beside them (33 a second): a 4 s gap holds more than 100 of
    # them, each batch is a window of its own.
    window = GroupView(1, LIST, start, start + timedelta(seconds=8), 300, listed=600, pages=1)
    plan = place(later, [window], policy)
    assert not plan.joins and [len(g.members) for g in plan.new] == [100, 100, 100]


def test_a_never_seen_operation_joins_the_newest_window_even_while_a_poll_holds_it() -> None:
    # Claimed ahead of its due time, the newest window is held for up to a tick before its
    # poll starts; a listing of their own would cost new operations a request each tick.
    policy = PollPolicy(interval=timedelta(seconds=5), claim_ahead=TICK)
    start, end = NOW - timedelta(minutes=5), NOW - timedelta(seconds=3)
    window = GroupView(1, LIST, start, end, 400, listed=2400, pages=3, claimed=True)
    never = [Waiting(f"n{i}", None, NOW) for i in range(16)]
    plan = place(never, [window], policy)
    assert plan.joins == {1: [op.id for op in never]} and not plan.new

    going_on = GroupView(1, LIST, start, end, 400, listed=2400, pages=3, resuming=True)
    plan = place(never, [going_on], policy)
    assert not plan.joins and [g.kind for g in plan.new] == [LIST]


def test_a_never_seen_operation_joins_the_window_its_id_time_falls_in() -> None:
    policy = PollPolicy(interval=timedelta(seconds=10), claim_ahead=TICK)
    start, end = NOW - timedelta(minutes=70), NOW - timedelta(minutes=50)
    window = GroupView(1, LIST, start, end, 20, listed=20, pages=1)
    inside = Waiting("in", None, NOW, id_created_at=NOW - timedelta(minutes=60, seconds=-0.5))
    at_end = Waiting("end", None, NOW, id_created_at=end + timedelta(milliseconds=999))
    outside = Waiting("out", None, NOW, id_created_at=end + timedelta(seconds=1))
    unproven = Waiting("none", None, NOW)  # no ID time: placed as never-seen ones always were
    plan = place([inside, at_end, outside, unproven], [window], policy)
    assert plan.joins == {1: ["in", "end"]} and not plan.ranges
    assert [g.members for g in plan.new] == [("out", "none")]
    # A window whose round goes on from a page token is left alone.
    resuming = GroupView(1, LIST, start, end, 20, listed=20, pages=1, resuming=True)
    plan = place([inside], [resuming], policy)
    assert not plan.joins and [g.members for g in plan.new] == [("in",)]


def test_new_operations_join_the_newest_window_up_to_the_size_it_is_split_at() -> None:
    # A window merged back up to list_group (900) must still take each tick's new operations,
    # or every tick's would cost a listing of their own; it is split past a fifth more.
    policy = PollPolicy(interval=timedelta(seconds=5), claim_ahead=TICK)
    start, end = NOW - timedelta(minutes=7), NOW - timedelta(seconds=3)
    never = [Waiting(f"n{i}", None, NOW) for i in range(16)]
    full = GroupView(1, LIST, start, end, policy.list_group, listed=3400, pages=4)
    assert place(never, [full], policy).joins == {1: [op.id for op in never]}

    at_split = GroupView(1, LIST, start, end, most_members(policy) - 15, listed=3400, pages=4)
    plan = place(never, [at_split], policy)
    assert not plan.joins and [g.kind for g in plan.new] == [LIST]
