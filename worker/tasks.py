"""Celery tasks: thin adapters that open the process's runtime, call domain code, and return.

Task names are stable: other services send ``optrack.track`` by name with a JSON list of IDs.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_process_shutdown
from kombu.exceptions import OperationalError
from sqlalchemy.exc import OperationalError as DatabaseOperationalError

from worker import health, tracking
from worker.celery_app import app
from worker.repository import Repository
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


@app.task(name="optrack.tick", ignore_result=True)
def tick() -> dict[str, int]:
    """Claim the operations due now and dispatch their polls in chunks."""
    rt = runtime()
    now = rt.clock.now()
    with rt.sessions.begin() as session:
        health.beat_ticked(session, now)  # `optrack health` checks that beat keeps ticking
    paused = rt.gate.paused_until(now)
    sweep = tracking.sweep(
        rt.sessions,
        now,
        limit=rt.settings.max_due_per_tick,
        policy=rt.poll_policy,
        paused_until=paused[0] if paused else None,
        configured=rt.settings.poll_strategy,
    )
    # Sent after the claim committed: a poll never sees a claim that was rolled back.
    for index, chunk in enumerate(sweep.chunks):
        try:
            poll.delay(list(chunk.operation_ids), sweep.token, chunk.strategy.value)
        except OperationalError:  # kombu's: the broker went away mid-tick
            unsent = [i for c in sweep.chunks[index:] for i in c.operation_ids]
            with rt.sessions.begin() as session:
                Repository(session).release(unsent, sweep.token, now)
            log.warning("tick: broker unreachable; %d claim(s) given back", len(unsent))
            raise
    claimed = len(sweep.operation_ids)
    if claimed:
        strategies = sorted({chunk.strategy.value for chunk in sweep.chunks})
        log.info(
            "tick: %d operation(s) due, %d poll message(s) sent (%s)",
            claimed,
            len(sweep.chunks),
            "+".join(strategies),
        )
    elif paused:
        log.info("tick: account paused until %s (%s)", paused[0].isoformat(), paused[1])
    return {"claimed": claimed}


@app.task(
    name=POLL_TASK,
    ignore_result=True,
    # A database that went away mid-write: try again soon with the same claim token (still
    # valid for the lease) instead of leaving the operations for the lease to run out.
    autoretry_for=(DatabaseOperationalError,),
    retry_backoff=2,
    retry_backoff_max=30,
    retry_jitter=True,
    max_retries=6,
)
def poll(
    operation_ids: list[str], claim_token: str | None = None, strategy: str = "fetch"
) -> dict[str, int]:
    """Poll the given claimed operations once each, by GET or by List pages."""
    rt = runtime()
    reports = rt.poller.poll(operation_ids, claim_token, tracking.Strategy(strategy))
    rt.metrics.observe_polls(reports)
    return tracking.summarize(reports)


@app.task(name=TRACK_TASK, ignore_result=True)
def track(operation_ids: list[str]) -> dict[str, list[str]]:
    """Start tracking operation IDs sent by another service; any invalid ID rejects the lot."""
    if not isinstance(operation_ids, list):
        raise TypeError("optrack.track takes one argument: a JSON list of operation IDs")
    rt = runtime()
    result = tracking.track(rt.sessions, operation_ids, rt.clock.now())
    log.info("track: %d added, %d already tracked", len(result.added), len(result.already_tracked))
    return {"added": list(result.added), "already_tracked": list(result.already_tracked)}
