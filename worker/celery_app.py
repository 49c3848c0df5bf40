"""The Celery app. ``celery -A worker.celery_app worker|beat`` runs it in production.

Settings are read once per process, when Celery first configures the app (not at import); each
process builds one Runtime from them, on first use, and closes it at its end. Every task name
lives here.

Shutdown: a pool process ignores SIGTERM until its first task and then only notes it (its
Runtime's ``stop``), so SIGTERM to the whole process group (systemd's KillMode=control-group)
no longer kills the pool under the main process's warm shutdown, which then waited for the
lost jobs. The main process passes its own SIGTERM on to the pool processes, so a poll in
flight ends at once either way and gives its group back.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import (
    beat_init,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
    worker_shutting_down,
)
from celery.worker import state as worker_state
from kombu.exceptions import KombuError

from worker import broker, liveness, logs, sweep
from worker.clock import SystemClock
from worker.db import DB_UNREACHABLE
from worker.errors import BrokerError
from worker.metrics import MetricsServer, start_worker_server
from worker.runtime import Runtime
from worker.settings import Settings, load_settings

TICK_TASK = "optrack.tick"
POLL_TASK = "optrack.poll"
TRACK_TASK = "optrack.track"
DISCOVER_TASK = "optrack.discover"
DELIVER_NOTICES_TASK = "optrack.deliver_notices"
PRUNE_TASK = "optrack.prune"
PRUNE_INTERVAL = 86400.0
# Retention deletes in batches, each its own transaction: stopped, it goes on the next day.
PRUNE_SOFT_TIME_LIMIT = 1800.0
PRUNE_TIME_LIMIT = 1860.0
# Redis gives an unacknowledged message to another worker after its visibility timeout, even
# while the first still runs it: the timeout outlasts the longest any task may run (its hard
# time limit) by this much, which also covers a retry's countdown (at most a minute) held by
# a worker; never below Celery's usual ten minutes.
VISIBILITY_MARGIN = 300.0
MIN_VISIBILITY_TIMEOUT = 600.0
log = logging.getLogger(__name__)


def waiting_messages(app: Celery) -> int | None:
    """How many messages wait in the default queue, taken by no worker (ticks, polls, tracks
    alike); None if the broker did not say."""
    queue = app.amqp.queues[app.conf.task_default_queue]
    with app.pool.acquire(block=True) as conn:  # pooled: no new connection per tick
        try:
            # Declared as the workers declare it (a passive declare of an empty Redis queue,
            # which is no key, fails); the answer counts the messages not delivered.
            declared = queue.bind(conn.default_channel).queue_declare()
        except (KombuError, *conn.connection_errors, *conn.channel_errors, OSError) as exc:
            log.warning("broker: queue depth unknown (%s)", exc)
            return None
    return int(declared.message_count)


def unstarted_polls() -> list[tuple[int, str]]:
    """The poll messages this worker process received and no pool process started yet:
    (group id, claim token) each, in the main process of a worker."""
    started = {request.id for request in worker_state.active_requests}
    held = []
    for request in list(worker_state.reserved_requests):
        if request.name != POLL_TASK or request.id in started:
            continue
        args = [*request.args, *(request.kwargs or {}).values()]
        if len(args) >= 2 and type(args[0]) is int and isinstance(args[1], str):
            held.append((args[0], args[1]))  # an older release's shape has no claim to give
    return held


def visibility_timeout(settings: Settings) -> float:
    """Seconds Redis waits for a message's acknowledgement before it delivers it again."""
    longest = max(settings.task_time_limit, PRUNE_TIME_LIMIT)
    return max(MIN_VISIBILITY_TIMEOUT, longest + VISIBILITY_MARGIN)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for optrack: JSON only, late acks, prefetch 1, the beat tick."""
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        # A worker killed mid-poll hands the message back instead of dropping it.
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # No message holds a worker slot for ever: every task is stopped within the claim's
        # lease (OPTRACK_POLL_TIME_LIMIT), killed a little later if it ignores that.
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        "broker_connection_retry_on_startup": True,
        "timezone": "UTC",
        "enable_utc": True,
        "worker_hijack_root_logger": True,
        "beat_schedule": {
            "optrack-tick": {
                "task": TICK_TASK,
                "schedule": settings.tick_interval,
                # A tick older than two intervals is useless: the next one does its work.
                "options": {"expires": max(2 * settings.tick_interval, 5.0)},
            }
        },
    }
    schedule = config["beat_schedule"]
    if settings.discovery_interval is not None:
        schedule["optrack-discover"] = {
            "task": DISCOVER_TASK,
            "schedule": settings.discovery_interval,
            "options": {"expires": settings.discovery_interval},
        }
    if settings.notices_enabled:
        schedule["optrack-deliver-notices"] = {
            "task": DELIVER_NOTICES_TASK,
            "schedule": settings.tick_interval,
            "options": {"expires": max(2 * settings.tick_interval, 5.0)},
        }
    # Delivered notices are pruned after OPTRACK_NOTICE_RETENTION wherever they are delivered.
    if settings.prune_older_than is not None or settings.notices_enabled:
        schedule["optrack-prune"] = {
            "task": PRUNE_TASK,
            "schedule": PRUNE_INTERVAL,
            "options": {"expires": PRUNE_INTERVAL / 2},
        }
    if settings.broker_url.startswith("sqla+sqlite:///"):
        home = Path(settings.broker_url.removeprefix("sqla+sqlite:///")).parent
        config["beat_schedule_filename"] = str(home / "celerybeat-schedule")
    embedded = broker.kombu_connection(settings.broker_url)
    if embedded is not None:
        # Our transport under kombu's SQLAlchemy one: a message handed to a killed process
        # comes back, a done one is deleted (worker.broker). An older release's leftovers:
        # taken within the longest a message is held, given back once.
        config["broker_url"], config["broker_transport"] = embedded
        config["broker_transport_options"] = {"legacy_window": visibility_timeout(settings)}
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # A message unacked this long belongs to a dead worker: no live one runs that long.
        config["broker_transport_options"] = {"visibility_timeout": visibility_timeout(settings)}
    return config


class OptrackCelery(Celery):  # type: ignore[misc]  # celery ships no type hints
    """The app: settings read once per process, one Runtime per process, the metrics server."""

    _runtime: Runtime | None = None
    _metrics_server: MetricsServer | None = None
    _heartbeat: liveness.ProcessHeartbeat | None = None
    _pool_process = False
    _worker: Any = None  # the WorkController of this main process
    _unstarted: tuple[tuple[int, str], ...] = ()  # noted when the warm shutdown began

    @cached_property
    def settings(self) -> Settings:
        """This process's settings, read from the environment the first time they are asked."""
        return load_settings()

    def use_settings(self, settings: Settings) -> None:
        """Take ``settings`` as this process's (a command that read them already, before the
        app is configured), so they are not read twice."""
        self.__dict__["settings"] = settings

    @property
    def runtime(self) -> Runtime:
        """This process's runtime, built on first use (in a pool process: after the fork)."""
        if self._runtime is None:
            self._runtime = Runtime(self.settings)
        return self._runtime

    def forget_runtime(self) -> None:
        """Drop a runtime inherited through a fork: its connections belong to the parent."""
        self._runtime = None

    def enter_pool_process(self) -> None:
        """In a new pool process: a fresh runtime, and SIGTERM ignored (billiard keeps an
        ignored signal; any handler set now it replaces with one that exits at once)."""
        self.forget_runtime()
        self._pool_process = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def note_sigterm(self) -> None:
        """In a pool process, once a task starts: SIGTERM asks this process's runtime to stop
        (a poll in flight ends and gives its group back); the pool's close ends the process."""
        if self._pool_process and signal.getsignal(signal.SIGTERM) is not self._on_sigterm:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, _signum: int, _frame: Any) -> None:
        self.runtime.stop.request()

    def stop_pool(self) -> None:
        """In the main process, at its warm shutdown: SIGTERM to every pool process, so that
        a SIGTERM to the main process alone (KillMode=mixed, `kill PID`) ends a poll too."""
        pool = getattr(self._worker, "pool", None)
        try:
            pids = list(pool.info.get("processes", [])) if pool is not None else []
        except (AttributeError, TypeError):  # not started yet, or a pool without processes
            pids = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # it has just ended
                os.kill(pid, signal.SIGTERM)

    def note_unstarted(self) -> None:
        """In the main process, when its warm shutdown begins (a signal handler: no I/O here):
        note the poll messages received and not started, before Celery forgets them as it
        closes its connection."""
        self._unstarted = tuple(unstarted_polls())

    def give_back_unstarted(self) -> int:
        """In the main process, once its pool stopped: give back the claims of the poll messages
        it noted (``note_unstarted``) or still holds, never started, so the next start polls
        those groups at once, not after the lease; their messages go back to the broker with
        stale tokens. A claim a poll started meanwhile stays (``claim_started_at``)."""
        held = list(dict.fromkeys([*self._unstarted, *unstarted_polls()]))
        self._unstarted = ()
        if not held:
            return 0
        try:
            return sweep.give_back(self.runtime.sessions, held, self.runtime.clock.now())
        except DB_UNREACHABLE as exc:  # the lease still ends them
            log.warning("could not give back %d unstarted poll claim(s): %s", len(held), exc)
            return 0

    def close_runtime(self) -> None:
        """Close this process's runtime (its database pools and HTTP session)."""
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None

    def start_metrics(self) -> None:
        """Serve /metrics from the worker's main process for all its children."""
        self._metrics_server = start_worker_server(self.settings)

    def start_heartbeat(self, role: str) -> None:
        """Refuse to run beside another release (OtherReleaseRunning), then beat for this
        process (``worker`` or ``beat``) until ``stop_heartbeat``."""
        heartbeat = liveness.ProcessHeartbeat(
            self.settings.database_url,
            role,
            SystemClock(),
            delivers_notices=self.settings.notices_enabled,
        )
        heartbeat.refuse_beside_other_releases()
        heartbeat.start()
        self._heartbeat = heartbeat

    def stop_heartbeat(self) -> None:
        """Stop beating and forget this process's heartbeat."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    def stop_metrics(self) -> None:
        """Stop serving /metrics."""
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None


def publisher(settings: Settings) -> Callable[[str, list[Any], str], None]:
    """A ``send`` of task messages by name on ``settings``' broker, for a process that runs no
    task (`optrack serve`'s dead-letter replay): optrack's configuration, not this process's app.
    """
    sender = Celery("optrack-publisher", set_as_current=False)
    sender.conf.update(celery_config(settings))

    def send(task: str, args: list[Any], task_id: str) -> None:
        try:
            sender.send_task(task, args=args, task_id=task_id)
        except (KombuError, OSError) as exc:
            raise BrokerError(f"broker error {exc}") from exc

    return send


app = OptrackCelery(
    "optrack",
    include=["worker.tasks", "worker.ops_tasks"],
    task_cls="worker.delivery:GuardedTask",
)
logs.connect_celery_signals(lambda: app.settings)


@app.on_configure.connect
def _configure(sender: OptrackCelery, **_: Any) -> None:
    sender.conf.update(celery_config(sender.settings))


@worker_init.connect
def _start_main_process(sender: Any = None, **_: Any) -> None:
    # In the main process, before the pool forks.
    _refuse_beside_other_releases("worker")
    app._worker = sender
    app.start_metrics()


@worker_shutting_down.connect
def _stop_pool(**_: Any) -> None:
    app.note_unstarted()
    app.stop_pool()


@worker_shutdown.connect
def _stop_main_process(**_: Any) -> None:
    # Once the pool is gone: no pool process holds the database, and this is no signal handler.
    app.give_back_unstarted()
    app.stop_metrics()
    app.stop_heartbeat()
    app.close_runtime()


@beat_init.connect
def _start_beat(**_: Any) -> None:
    _refuse_beside_other_releases("beat")
    atexit.register(app.stop_heartbeat)


def _refuse_beside_other_releases(role: str) -> None:
    try:
        app.start_heartbeat(role)
    except liveness.OtherReleaseRunning as exc:
        # Said once, plainly, and the process ends: no traceback, no half-started worker.
        logging.getLogger("optrack").critical("%s", exc)
        sys.stderr.write(f"optrack: {exc}\n")
        sys.stderr.flush()
        os._exit(1)


@worker_process_init.connect
def _fresh_runtime(**_: Any) -> None:
    app.enter_pool_process()


@task_prerun.connect
def _note_sigterm(**_: Any) -> None:
    app.note_sigterm()


@worker_process_shutdown.connect
def _close_runtime(**_: Any) -> None:
    app.close_runtime()
