"""The notices' retry schedule (worker.notices.DeliveryPolicy): doubling from 10 s to an hour,
each wait jittered ±20% by injected randomness, so tests know every wait."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from worker.notices import DeliveryPolicy

# The schedule docs/operations.md documents: the n-th failure waits this long, ±20%.
SCHEDULE = [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]


class Drawn(random.Random):
    def __init__(self, draw: float) -> None:
        super().__init__(0)
        self.draw = draw

    def random(self) -> float:
        return self.draw


@pytest.mark.parametrize(("attempts", "seconds"), list(enumerate(SCHEDULE, 1)))
def test_the_documented_schedule_and_its_jitter_bounds(attempts: int, seconds: float) -> None:
    policy = DeliveryPolicy()
    assert DeliveryPolicy(jitter=0).backoff(attempts) == timedelta(seconds=seconds)
    assert policy.backoff(attempts, Drawn(0.0)) == timedelta(seconds=seconds * 0.8)
    assert policy.backoff(attempts, Drawn(0.5)) == timedelta(seconds=seconds)
    assert policy.backoff(attempts, Drawn(1.0)) == timedelta(seconds=seconds * 1.2)


def test_jitter_spreads_notices_that_failed_together() -> None:
    policy, rng = DeliveryPolicy(), random.Random(19)
    waits = [policy.backoff(3, rng).total_seconds() for _ in range(500)]
    assert all(32 <= w <= 48 for w in waits)
    assert len(set(waits)) > 400  # not one instant for all of them
    assert min(waits) < 33 and max(waits) > 47  # the whole ±20% is used
    again = random.Random(19)
    assert waits == [policy.backoff(3, again).total_seconds() for _ in range(500)]


def test_huge_attempt_counts_stay_capped_and_bad_jitter_is_refused() -> None:
    assert DeliveryPolicy(jitter=0).backoff(10_000) == timedelta(hours=1)
    assert DeliveryPolicy().backoff(10_000, Drawn(1.0)) == timedelta(hours=1.2)
    for bad in (-0.1, 1.0, 2.0):
        with pytest.raises(ValueError, match="jitter"):
            DeliveryPolicy(jitter=bad)
