"""Fault tests, processes: a worker killed mid-poll, two beats at once.

Real processes on Redis and PostgreSQL. A "slow" sandbox fault holds one poll open, so the
test knows a poll is in flight when it strikes: the fault leaves the sandbox's queue when the
request arrives, and the request log gets its entry only when the answer goes out.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.support.fault_stack import FaultStack, check_history, fault_stack
from tests.support.processes import wait_for
from worker.db import DeadLetter, make_engine, make_sessionmaker

pytestmark = [pytest.mark.slow, pytest.mark.faults]
HOLD = 60.0  # a "slow" answer longer than the test needs: the poll is still open when we strike


@pytest.fixture
def one_worker(tmp_path: Path, pg_url: str) -> Iterator[FaultStack]:
    """Sandbox, beat and a single worker ``w1``: the one holding the slow poll is known.

    A 20 s claim lease (OPTRACK_CLAIM_LEASE), so a killed worker's operations come back soon.
    """
    # A request and an in-place wait must fit in half of it (OPTRACK_REQUEST_DEADLINE and
    # OPTRACK_MAX_INPLACE_WAIT, checked at start).
    with fault_stack(
        tmp_path,
        db_url=pg_url,
        workers=("w1",),
        OPTRACK_CLAIM_LEASE="20",
        OPTRACK_REQUEST_DEADLINE="8",
        OPTRACK_MAX_INPLACE_WAIT="2",
    ) as stack:
        yield stack


def hold_a_poll(stack: FaultStack) -> tuple[list[str], str]:
    """Track five operations and hold the first poll of one of them open; return (ids, it)."""
    ids = [stack.create(total=12, duration=6, fail_ratio=0.25) for _ in range(4)]
    victim = stack.create(total=10, duration=4)
    stack.sandbox.fault(kind="slow", delay=HOLD, match=victim)
    stack.track([*ids, victim])
    wait_for(lambda: stack.pending_faults() == [], 60, "the held poll to reach the API")
    assert stack.requests_for(victim) == [], "the held request has already been answered"
    return [*ids, victim], victim


def test_sigkill_of_the_pool_process_mid_poll_hands_the_poll_back(
    one_worker: FaultStack,
) -> None:
    stack = one_worker
    _, victim = hold_a_poll(stack)
    (pool,) = stack.children("w1")
    os.kill(pool, signal.SIGKILL)
    killed_at = time.time()

    stack.wait_until_all_ended(90)
    check_history(stack, "sigkill_pool_process_mid_poll", faults=1)
    log = stack.log("w1")
    assert "WorkerLostError" in log
    # task_reject_on_worker_lost: the killed poll's message came back and ran again.
    received = re.findall(r"Task optrack\.poll\[([0-9a-f-]+)\] received", log)
    assert [t for t, n in itertools.groupby(sorted(received)) if len(list(n)) > 1]
    # Asked again after the kill (the held request is still hanging in the sandbox).
    assert any(r["t"] > killed_at for r in stack.requests_for(victim))


@pytest.mark.timeout(600)
def test_sigkill_of_a_worker_mid_poll_then_a_new_worker_takes_over(
    one_worker: FaultStack,
) -> None:
    stack = one_worker
    _, victim = hold_a_poll(stack)
    stack.kill("w1")  # parent first: nothing is handed back, the message stays unacked
    killed_at = time.time()
    stack.start_worker("w2")

    # The dead worker's claim keeps its operations until the claim's lease runs out.
    stack.wait_until_all_ended(400)
    check_history(stack, "sigkill_worker_mid_poll_then_restart", faults=1)
    assert "polled comms_operation_" in stack.log("w2")
    assert any(r["t"] > killed_at for r in stack.requests_for(victim))


def test_two_beats_at_once_poll_nothing_twice(tmp_path: Path, pg_url: str) -> None:
    with fault_stack(tmp_path, db_url=pg_url, beats=("beat1", "beat2")) as stack:
        ids = [stack.create(total=15, duration=8, fail_ratio=0.2) for _ in range(6)]
        ids.append(stack.create(total=10, duration=6, outcome="CANCELED"))
        stack.track(ids)
        stack.wait_until_all_ended(90)
        check_history(stack, "two_beats_at_once", faults=1)
        for name in ("beat1", "beat2"):
            assert "Sending due task optrack-tick" in stack.log(name)
        # Claims make the two beats' ticks share the work: each operation is asked once per
        # poll interval (1 s; up to one 0.5 s tick early, as a tick claims what falls due
        # before the next), never twice at once by two sweeps (milliseconds apart).
        for op_id in ids:
            times = [r["t"] for r in stack.requests_for(op_id)]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            if not all(gap >= 0.45 for gap in gaps):
                polls = [
                    line
                    for name in ("w1", "w2")
                    for line in stack.log(name).splitlines()
                    if f"polled {op_id}" in line
                ]
                pytest.fail(f"{op_id} polled twice at once: {gaps}\n" + "\n".join(polls))


POISON_DELIVERIES = 2  # OPTRACK_MAX_DELIVERIES of the poison test: two kills, then a letter


def dead_letter_rows(stack: FaultStack) -> list[DeadLetter]:
    engine = make_engine(stack.db_url)
    try:
        with make_sessionmaker(engine)() as session:
            return list(session.scalars(select(DeadLetter)))
    finally:
        engine.dispose()


@pytest.mark.timeout(300)
def test_a_message_that_kills_its_worker_is_a_dead_letter_after_the_maximum(
    tmp_path: Path, pg_url: str
) -> None:
    """A poll whose every start kills its pool process (late acks + reject_on_worker_lost hand
    it back each time) is started OPTRACK_MAX_DELIVERIES times, then buried, not run again."""
    with fault_stack(
        tmp_path,
        db_url=pg_url,
        workers=("w1",),
        OPTRACK_CLAIM_LEASE="20",
        OPTRACK_REQUEST_DEADLINE="8",  # a request and an in-place wait fit in half the lease
        OPTRACK_MAX_INPLACE_WAIT="2",
        OPTRACK_RESEND_AFTER="20",
        OPTRACK_MAX_DELIVERIES=str(POISON_DELIVERIES),
    ) as stack:
        victim = stack.create(total=6, duration=4)
        stack.sandbox.fault(kind="slow", delay=HOLD, match=victim, count=POISON_DELIVERIES)
        stack.track([victim])
        for left in range(POISON_DELIVERIES - 1, -1, -1):

            def held(left: int = left) -> bool:
                pending = stack.pending_faults()
                return sum(int(f["count"]) for f in pending) == left

            wait_for(held, 60, f"delivery {POISON_DELIVERIES - left} to reach the API")
            (pool,) = stack.children("w1")
            os.kill(pool, signal.SIGKILL)
            wait_for(lambda pool=pool: pool not in stack.children("w1"), 20, "the pool to die")

        wait_for(lambda: len(dead_letter_rows(stack)) == 1, 60, "the poison poll to be buried")
        (letter,) = dead_letter_rows(stack)
        assert letter.task == "optrack.poll"
        assert letter.deliveries == POISON_DELIVERIES
        assert "OPTRACK_MAX_DELIVERIES" in letter.reason
        received = re.findall(rf"Task optrack\.poll\[{letter.task_id}\] received", stack.log("w1"))
        assert len(received) == POISON_DELIVERIES + 1  # the last delivery was buried, not run
        # Its group comes back with the claim's lease, under a new message: the operation ends.
        stack.wait_until_all_ended(120)
        check_history(stack, "poison_poll_dead_lettered", faults=POISON_DELIVERIES)
        assert "is a dead letter now" in stack.log("w1")
        assert len(stack.requests_for(victim)) >= 1
