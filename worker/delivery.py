"""The base class of every optrack task: this process's runtime, and deliveries that are
counted, dead-lettered past the maximum, never lost.

Its deliveries are counted in the database before the work starts; the delivery past
``OPTRACK_MAX_DELIVERIES`` becomes a dead letter instead of running (``worker.dead_letters``);
invalid input is rejected once; a database that does not answer is retried with backoff
(``optrack.track``, ``optrack.poll``) or left to the next run (the periodic tasks). Nothing is
acknowledged and forgotten. A message an older release sent in a shape the task no longer
takes runs as ``worker.compat`` translates it. The app makes it every task's class
(``task_cls``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import Reject

from worker import compat, dead_letters
from worker.db import DB_UNREACHABLE
from worker.errors import InvalidMessage, InvalidOperationId
from worker.retry_after import RetryPolicy
from worker.runtime import Runtime

log = logging.getLogger(__name__)
# Retries while the database does not answer: 1 s, 2 s, 4 s ... at most a minute, jittered.
DATABASE_RETRY = RetryPolicy(backoff_base=1.0, backoff_max=60.0)


class GuardedTask(Task):  # type: ignore[misc]  # celery ships no type hints
    """A task whose messages are counted, dead-lettered past the maximum, never lost."""

    # The periodic tasks (tick, discovery, notices, prune): their next run does the work, so a
    # database error or a failure ends this message (logged) instead of retrying or burying
    # it. The others carry work nobody sends again (IDs, a claim): retried, or buried.
    periodic = False
    max_retries = None  # retries are bounded by the deliveries counted, not by Celery

    @property
    def runtime(self) -> Runtime:
        """This process's runtime (one per process, built from settings read once)."""
        runtime: Runtime = self.app.runtime
        return runtime

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        older = compat.translate(self.name, args, kwargs)
        request = self.request
        if request.called_directly or request.is_eager or not request.id:
            return self.run(*args, **kwargs) if older is None else older(self.runtime)
        rt = self.runtime
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
            result = self.run(*args, **kwargs) if older is None else older(rt)
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
