"""The Python API: what other code in the same environment calls instead of the CLI."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from worker import intake, waiting
from worker.credentials import DEFAULT_ACCOUNT
from worker.repository import TrackResult
from worker.runtime import Runtime
from worker.settings import Settings, load_settings
from worker.waiting import Condition, WaitFor, WaitResult

__all__ = ["Condition", "WaitFor", "WaitResult", "track", "wait"]


def track(
    operation_ids: Sequence[str],
    settings: Settings | None = None,
    *,
    account: str = DEFAULT_ACCOUNT,
) -> TrackResult:
    """Start tracking operation IDs under ``account`` (its credentials poll them); any invalid
    ID raises InvalidOperationId, an unknown account UnknownAccount, an ID tracked under
    another account TrackedElsewhere: nothing is written."""
    rt = Runtime(settings or load_settings())
    try:
        return intake.track(rt.sessions, operation_ids, rt.clock.now(), account)
    finally:
        rt.close()


def wait(
    operation_ids: Sequence[str],
    timeout: timedelta | float | None = None,
    *,
    wait_for: WaitFor | str = WaitFor.ENDED,
    max_failed: int | None = None,
    track: bool = False,
    settings: Settings | None = None,
) -> WaitResult:
    """Block until every operation has ended (``wait_for="completed"``: ended, COMPLETED is
    what counts), or ``timeout`` (seconds or a timedelta) passed.

    The result says how (``outcome``, ``exit_code`` as `optrack wait`'s) and holds each
    operation as last read. An invalid ID raises InvalidOperationId; an untracked one
    NotTracked naming them all, unless ``track`` starts tracking them first.
    """
    span = timedelta(seconds=timeout) if isinstance(timeout, int | float) else timeout
    rt = Runtime(settings or load_settings())
    try:
        if track:
            intake.track(rt.sessions, operation_ids, rt.clock.now())
        condition = Condition(WaitFor(wait_for), max_failed)
        return waiting.wait(rt.sessions, operation_ids, condition, span, rt.clock)
    finally:
        rt.close()
