"""Celery tasks: thin adapters that open the process's runtime, call domain code, and return.

Task names are stable: other services send ``optrack.track`` by name with a JSON list of IDs.

Every task runs under ``GuardedTask``: its deliveries are counted in the database before the
work starts, the delivery past ``OPTRACK_MAX_DELIVERIES`` becomes a dead letter instead of
running (``worker.dead_letters``), invalid input is rejected once, and a database that does not
answer is retried with backoff (``optrack.track``, ``optrack.poll``) or left to the next run
(the periodic tasks). Nothing is acknowledged and forgotten.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.signals import worker_process_shutdown
from kombu.exceptions import KombuError

from worker import dead_letters, health, intake, sweep
from worker.celery_app import TICK_TASK, app
from worker.errors import InvalidMessage, InvalidOperationId
from worker.repository import DB_UNREACHABLE, GroupClaim
from worker.retry_after import RetryPolicy
from worker.runtime import Runtime
from worker.settings import load_settings

log = logging.getLogger(__name__)
POLL_TASK = "optrack.poll"
TRACK_TASK = "optrack.track"
# Retries while the database does not answer: 1 s, 2 s, 4 s ... at most a minute, jittered.
DATABASE_RETRY = RetryPolicy(backoff_base=1.0, backoff_max=60.0)

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


class GuardedTask(Task):  # type: ignore[misc]  # celery ships no type hints
    """A task whose messages are counted, dead-lettered past the maximum, never lost."""

    # The periodic tasks (tick, discovery, notices, prune): their next run does the work, so a
    # database error or a failure ends this message (logged) instead of retrying or burying
    # it. The others carry work nobody sends again (IDs, a claim): retried, or buried.
    periodic = False
    max_retries = None  # retries are bounded by the deliveries counted, not by Celery

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.is_eager or not request.id:
            return self.run(*args, **kwargs)
        rt = runtime()
        task_id = str(request.id)
        try:
            with rt.sessions.begin() as session:
                count = dead_letters.count_delivery(session, task_id, self.name, rt.clock.now())
        except DB_UNREACHABLE as exc:
            return self._database_down(exc)  # not counted: nothing can be, nor buried
        if count > rt.settings.max_deliveries:
            reason = f"started {count - 1} times without ending (OPTRACK_MAX_DELIVERIES)"
            return self._bury(rt, task_id, args, reason, count - 1)
        try:
            result = self.run(*args, **kwargs)
        except (InvalidMessage, InvalidOperationId) as exc:
            log.error("%s[%s] rejected, not retried: %s", self.name, task_id, exc)
            self._forget(rt, task_id)
            return None
        except DB_UNREACHABLE as exc:
            return self._database_down(exc)
        except Exception as exc:
            # Not a retry: a bug or an unforeseen answer. Keep the message to replay after a fix,
            # then let Celery log the failure as usual.
            if self.periodic:
                self._forget(rt, task_id)
            else:
                self._bury(rt, task_id, args, f"{type(exc).__name__}: {exc}", count)
            raise
        self._forget(rt, task_id)
        return result

    def _database_down(self, exc: Exception) -> Any:
        name = type(exc).__name__
        if self.periodic:
            log.warning(
                "%s: the database did not answer (%s); the next run does its work", self.name, name
            )
            return None
        countdown = DATABASE_RETRY.backoff(int(self.request.retries or 0) + 1)
        log.warning(
            "%s[%s]: the database did not answer (%s); retried in %.1f s",
            self.name,
            self.request.id,
            name,
            countdown,
        )
        try:
            raise self.retry(exc=exc, countdown=countdown)
        except Reject as rejected:
            # The broker refused the retry: hand this message back instead of dropping it.
            raise Reject(f"retry not published: {rejected.reason}", requeue=True) from exc

    def _bury(self, rt: Runtime, task_id: str, args: tuple[Any, ...], reason: str, n: int) -> Any:
        try:
            with rt.sessions.begin() as session:
                dead_letters.bury(
                    session,
                    task_id=task_id,
                    task=self.name,
                    args=list(args),
                    reason=reason,
                    deliveries=n,
                    now=rt.clock.now(),
                )
        except DB_UNREACHABLE as exc:
            return self._database_down(exc)
        log.error("%s[%s] is a dead letter now: %s", self.name, task_id, reason)
        return None

    def _forget(self, rt: Runtime, task_id: str) -> None:
        try:
            with rt.sessions.begin() as session:
                dead_letters.forget_delivery(session, task_id)
        except DB_UNREACHABLE:
            pass  # a stale counter row only; the message itself is done


@app.task(name=TICK_TASK, ignore_result=True, base=GuardedTask, periodic=True)
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
    # A database that went away mid-write: the guard tries again soon with the same claim
    # token (still valid for the lease) instead of leaving the group for the lease to run out.
    base=GuardedTask,
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


@app.task(name=TRACK_TASK, ignore_result=True, base=GuardedTask)
def track(operation_ids: list[str]) -> dict[str, list[str]]:
    """Start tracking operation IDs sent by another service; any invalid ID rejects the lot."""
    if not isinstance(operation_ids, list):
        raise InvalidMessage(
            "optrack.track takes one argument: a JSON list of operation IDs, "
            f"not {type(operation_ids).__name__}"
        )
    rt = runtime()
    result = intake.track(rt.sessions, operation_ids, rt.clock.now())
    log.info("track: %d added, %d already tracked", len(result.added), len(result.already_tracked))
    return {"added": list(result.added), "already_tracked": list(result.already_tracked)}
