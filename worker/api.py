"""The Python API: what other code in the same environment calls instead of the CLI."""

from __future__ import annotations

from collections.abc import Sequence

from worker import intake
from worker.repository import TrackResult
from worker.runtime import Runtime
from worker.settings import Settings, load_settings


def track(operation_ids: Sequence[str], settings: Settings | None = None) -> TrackResult:
    """Start tracking operation IDs; any invalid ID raises InvalidOperationId, writing nothing."""
    rt = Runtime(settings or load_settings())
    try:
        return intake.track(rt.sessions, operation_ids, rt.clock.now())
    finally:
        rt.close()
