"""Fault tests, the API: throttling storms, 500 bursts, timeouts, drops, broken 200 answers.

Real processes (two workers and beat on a private Redis, a fresh PostgreSQL database) against
the sandbox API, whose request log is the witness: when each fault was answered and when the
tracker called again.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fault_stack import FaultStack, check_history, fault_stack
from tests.support.processes import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.faults]
# A request whose worker checked the pause just before another worker recorded it is already
# on its way; on two busy cores that takes up to a few hundred milliseconds.
IN_FLIGHT = 0.5
READ_TIMEOUT = 1.0


@pytest.fixture
def stack(tmp_path: Path, pg_url: str) -> Iterator[FaultStack]:
    """Two workers and beat; a low read timeout so that a slow answer times out."""
    with fault_stack(tmp_path, db_url=pg_url, OPTRACK_READ_TIMEOUT=str(READ_TIMEOUT)) as stack:
        yield stack


def later_requests(log: list[dict[str, Any]], i: int, same_path: bool) -> list[dict[str, Any]]:
    return [r for r in log[i + 1 :] if not same_path or r["path"] == log[i]["path"]]


def test_a_storm_of_throttling_errors_timeouts_and_drops(stack: FaultStack) -> None:
    ids = [stack.create(total=16, duration=10, fail_ratio=0.25) for _ in range(6)]
    ids += [stack.create(total=10, duration=8, outcome="CANCELED") for _ in range(2)]
    slow_one, dropped_one = ids[0], ids[1]
    stack.track(ids)
    wait_for(lambda: len(stack.api_log()) >= len(ids), 60, "every operation's first poll")
    faults: list[dict[str, Any]] = [
        # Account-wide: each pauses every worker for Retry-After.
        {"kind": "status", "status": 429, "retry_after": "2", "count": 3},
        {"kind": "status", "status": 503, "retry_after": "2", "retry_after_form": "date"},
        {"kind": "status", "status": 409, "retry_after": "1"},
        {"kind": "status", "status": 503, "retry_after": "1", "count": 2},
        # A burst of 500s, then one answer slower than the read timeout, then two drops.
        {"kind": "status", "status": 500, "count": 5},
        {"kind": "slow", "delay": 3 * READ_TIMEOUT, "match": slow_one},
        {"kind": "drop", "count": 2, "match": dropped_one},
    ]
    for fault in faults:
        stack.sandbox.fault(**fault)
    wait_for(lambda: stack.pending_faults() == [], 90, "every fault to be served")
    stack.wait_until_all_ended(120)
    log = stack.api_log()
    check_history(stack, "api_storm", faults=sum(f.get("count", 1) for f in faults))

    statuses = [r["status"] for r in log]
    assert statuses.count(429) == 3 and statuses.count(503) == 3 and statuses.count(409) == 1
    assert statuses.count(500) == 5 and statuses.count(0) == 2  # 0: dropped, no answer
    for i, entry in enumerate(log):
        status, t = entry["status"], entry["t"]
        if status in (409, 429, 503):
            # Retry-After honored by both workers: "2" s; "1" s; an HTTP-date is whole
            # seconds, so "2" promises at least 1 s.
            pause = 2.0 if status == 429 else 1.0
            early = [r for r in later_requests(log, i, False) if IN_FLIGHT < r["t"] - t < pause]
            assert early == [], f"{len(early)} request(s) during the pause after {status}"
        elif status in (500, 0):
            # Never retried in place: the operation's next request waits for its next poll.
            same = later_requests(log, i, True)
            assert same and same[0]["t"] - t >= 0.9, f"{entry} was retried in place"
    # The slow answer was given up after the read timeout and polled again later.
    slow = [r for r in log if r["path"].endswith(slow_one)]
    assert any(b["t"] - a["t"] >= READ_TIMEOUT for a, b in itertools.pairwise(slow))
    logs = stack.logs()
    assert f"timed out calling {stack.sandbox.base_url}/SenderPools/Operations/{slow_one}" in logs
    assert f"no answer from {stack.sandbox.base_url}/SenderPools/Operations/{dropped_one}" in logs
    assert "HTTP 500 from" in logs


# What the tracker logs for each broken 200 (worker/operation.py, worker/client.py).
MALFORMED = {
    "not_json": ("the answer's body is not valid JSON",),
    "wrong_content_type": ("expected a JSON answer, got Content-Type 'text/html",),
    "missing_field": ("status: unknown value None",),
    "negative_count": ("stats.queued: must be", "got -1"),
    "unknown_status": ("status: unknown value 'PAUSED'",),
    "bad_date": ("updatedAt: 'not-a-date' is not an ISO 8601 date-time",),
    "wrong_id": ("the answer is about comms_operation_7zzzz",),
}


def test_200_answers_that_break_the_schema_are_never_stored(stack: FaultStack) -> None:
    broken = {variant: stack.create(total=12, duration=6, fail_ratio=0.25) for variant in MALFORMED}
    # Each operation's first answer is broken in its own way.
    for variant, op_id in broken.items():
        stack.sandbox.fault(kind="malformed", variant=variant, match=op_id)
    stack.track(list(broken.values()))
    stack.wait_until_all_ended(90)
    log = stack.api_log()
    history = stack.history()
    check_history(stack, "malformed_200s", faults=len(MALFORMED))

    logs = stack.logs()
    for variant, op_id in broken.items():
        first, *retries = [r for r in log if r["path"].endswith(op_id)]
        assert first["status"] == 200 and retries, f"{variant}: never polled again"
        # Logged as a failed poll of that operation, with the reason.
        line = next((ln for ln in logs.splitlines() if f"{op_id}: poll failed" in ln), "")
        assert all(reason in line for reason in MALFORMED[variant]), f"{variant}: {line!r}"
        # Nothing of the broken answer was stored: every history row was observed after the
        # tracker asked again (the broken answer came before that).
        assert all(e.observed_at.timestamp() >= retries[0]["t"] for e in history[op_id])
    assert not re.search(r"Traceback", logs), "a broken answer crashed a task"


def test_lagging_replicas_fast_clocks_and_late_404s_never_corrupt_the_history(
    stack: FaultStack,
) -> None:
    lagging = stack.create(total=20, duration=10)
    fast = stack.create(total=20, duration=8)
    fast_node = stack.create(total=20, duration=8)
    late = stack.create(total=10, duration=6)
    # Not replicated yet: its first two GETs answer 404 (20404), counted in requests, not in
    # seconds (a window of 3 s of wall time had passed before a loaded machine's first poll).
    stack.sandbox.fault(kind="status", status=404, match=late, count=2)
    stack.track([lagging, fast, fast_node, late])
    faults: list[dict[str, Any]] = [
        # Older stats with today's updatedAt, answered three times.
        {"kind": "stale", "lag": 4, "match": lagging, "count": 3},
        # An updatedAt 30 days ahead; a node 10 minutes fast whose Date header is fast too.
        {"kind": "future_updated_at", "offset": 30 * 86400, "match": fast},
        {"kind": "future_updated_at", "offset": 600, "date_offset": 600, "match": fast_node},
    ]
    wait_for(lambda: len(stack.api_log()) >= 4, 60, "every operation's first poll")
    for fault in faults:
        stack.sandbox.fault(**fault)
    wait_for(lambda: stack.pending_faults() == [], 60, "every fault to be served")
    stack.wait_until_all_ended(90)
    log = stack.api_log()
    # check_history: right final state, no duplicate, counts and updatedAt never go back.
    check_history(stack, "replicas_and_late_404s", faults=5 + 2)
    history = stack.history()
    now = time.time()
    assert all(
        e.remote_updated_at.timestamp() < now + 60
        for op_id in (fast, fast_node)
        for e in history[op_id]
    ), "a future updatedAt was recorded"
    # The late operation answered 404 at first, was not ended, and was tracked to its end.
    late_statuses = [r["status"] for r in log if r["path"].endswith(late)]
    assert late_statuses[:2] == [404, 404] and late_statuses[-1] == 200
    logs = stack.logs()
    assert f"{lagging}: stale answer not recorded (would lower created" in logs
    assert f"{late}: the API says it does not exist (since" in logs
    assert "OPTRACK_CLOCK_ALLOWANCE" in logs
    assert not re.search(r"Traceback", logs)
