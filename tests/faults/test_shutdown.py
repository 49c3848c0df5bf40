"""Graceful shutdown: SIGTERM to a worker holding a poll finishes it; nothing is half-written.

Real processes: one worker, beat, a private Redis, a fresh PostgreSQL database. A "slow" fault
holds a poll open when SIGTERM arrives (the SIGKILL case: tests/faults/test_faults_processes.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fault_stack import check_history, fault_stack
from tests.support.processes import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_sigterm_finishes_the_poll_in_flight_then_another_worker_goes_on(
    tmp_path: Path, pg_url: str
) -> None:
    # One operation per poll message: the worker holds only the victim's when SIGTERM comes.
    with fault_stack(tmp_path, db_url=pg_url, workers=("w1",), OPTRACK_BATCH_SIZE="1") as stack:
        ids = [stack.create(total=12, duration=15, fail_ratio=0.25) for _ in range(4)]
        victim = stack.create(total=10, duration=15)
        stack.sandbox.fault(kind="slow", delay=4, match=victim)
        stack.track([*ids, victim])
        wait_for(lambda: stack.pending_faults() == [], 60, "the held poll to reach the API")
        assert stack.requests_for(victim) == []  # still in flight

        assert stack.stop("w1") == 0  # SIGTERM: warm shutdown
        log = stack.log("w1")
        after_sigterm = log[log.index("worker: Warm shutdown") :]
        # The poll in flight was finished and written before the worker exited ...
        assert f"polled {victim}" in after_sigterm
        assert "optrack.poll" in after_sigterm and "succeeded" in after_sigterm
        assert len(stack.requests_for(victim)) == 1
        assert stack.rows()[victim].polls >= 1
        assert len(stack.history().get(victim, [])) == 1  # the answer w1 got, written whole

        # ... and whatever it had not started is polled by the next worker, to the end.
        stack.start_worker("w2")
        stack.wait_until_all_ended(90)
        check_history(stack, "sigterm_mid_poll", faults=1)
        assert "polled comms_operation_" in stack.log("w2")
