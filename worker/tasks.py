"""Celery tasks: thin adapters that open the process's runtime, call domain code, and return.

Task names are stable: other services send ``optrack.track`` by name with a JSON list of IDs.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_shutdown
from kombu.exceptions import KombuError
from sqlalchemy.exc import OperationalError as DatabaseOperationalError

from worker import health, intake, sweep
from worker.celery_app import TICK_TASK, app
from worker.repository import GroupClaim
from worker.runtime import Runtime
from worker.settings import load_settings

log = logging.getLogger(__name__)
POLL_TASK = "optrack.poll"
TRACK_TASK = "optrack.track"

_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's runtime, built on first use (after the worker forked)."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(load_settings())
    return _runtime


@worker_process_shutdown.connect
def _close_runtime(**_: Any) -> None:
    global _runtime
    if _runtime is not None:
        _runtime.close()
        _runtime = None


@app.task(name=TICK_TASK, ignore_result=True)
def tick() -> dict[str, int]:
    """Place waiting operations into poll groups, claim the due groups, dispatch their polls."""
    rt = runtime()
    now = rt.clock.now()
    with rt.sessions.begin() as session:
        health.beat_ticked(session, now)  # `optrack health` checks that beat keeps ticking
    paused = rt.gate.paused_until(now)

    def send(claim: GroupClaim) -> None:
        try:
            poll.delay(claim.group_id, claim.token)
        except (KombuError, OSError) as exc:  # the broker went away mid-tick
            raise sweep.SendFailed(str(exc)) from exc

    result = sweep.sweep(
        rt.sessions,
        now,
        rt.poll_policy,
        limit=rt.settings.max_due_per_tick,
        paused_until=paused[0] if paused else None,
        send=send,
    )
    if result.sent:
        log.info("tick: %d group(s) due, %d poll message(s) sent", result.claimed, result.sent)
    elif paused:
        log.info("tick: account paused until %s (%s)", paused[0].isoformat(), paused[1])
    return {"placed": result.placed, "claimed": result.claimed}


@app.task(
    name=POLL_TASK,
    ignore_result=True,
    # A database that went away mid-write: try again soon with the same claim token (still
    # valid for the lease) instead of leaving the group for the lease to run out.
    autoretry_for=(DatabaseOperationalError,),
    retry_backoff=2,
    retry_backoff_max=30,
    retry_jitter=True,
    max_retries=6,
)
def poll(group_id: int, claim_token: str) -> dict[str, int]:
    """Poll one claimed group: List pages over its window, or one GET per member."""
    if not isinstance(group_id, int) or isinstance(group_id, bool):
        # A message from before poll groups: its operations are polled by their groups now.
        log.warning("poll: dropping a message of an older format (%r)", type(group_id).__name__)
        return {}
    rt = runtime()
    try:
        counts = rt.poller.poll(group_id, claim_token)
    except SoftTimeLimitExceeded:
        # Said out loud: its claim may be gone, and the group is due again when it expires.
        log.error(
            "poll of group %d ran past OPTRACK_POLL_TIME_LIMIT (%g s) and was stopped; "
            "the group is polled again once its claim expires",
            group_id,
            rt.settings.task_soft_time_limit,
        )
        return {}
    rt.metrics.observe_polls(counts)
    return counts.as_dict()


@app.task(name=TRACK_TASK, ignore_result=True)
def track(operation_ids: list[str]) -> dict[str, list[str]]:
    """Start tracking operation IDs sent by another service; any invalid ID rejects the lot."""
    if not isinstance(operation_ids, list):
        raise TypeError("optrack.track takes one argument: a JSON list of operation IDs")
    rt = runtime()
    result = intake.track(rt.sessions, operation_ids, rt.clock.now())
    log.info("track: %d added, %d already tracked", len(result.added), len(result.already_tracked))
    return {"added": list(result.added), "already_tracked": list(result.already_tracked)}
