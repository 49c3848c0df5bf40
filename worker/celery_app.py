"""The Celery app. ``celery -A worker.celery_app worker|beat`` runs it in production.

Settings are read when Celery first configures the app, not at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_shutdown

from worker import logs
from worker.metrics import MetricsServer, start_worker_server
from worker.settings import Settings, load_settings

TICK_TASK = "optrack.tick"
DISCOVER_TASK = "optrack.discover"
DELIVER_NOTICES_TASK = "optrack.deliver_notices"
PRUNE_TASK = "optrack.prune"
PRUNE_INTERVAL = 86400.0


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
    if settings.prune_older_than is not None:
        schedule["optrack-prune"] = {
            "task": PRUNE_TASK,
            "schedule": PRUNE_INTERVAL,
            "options": {"expires": PRUNE_INTERVAL / 2},
        }
    if settings.broker_url.startswith("sqla+sqlite:///"):
        home = Path(settings.broker_url.removeprefix("sqla+sqlite:///")).parent
        config["beat_schedule_filename"] = str(home / "celerybeat-schedule")
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # Polls finish in seconds; a message unacked this long belongs to a dead worker.
        config["broker_transport_options"] = {"visibility_timeout": 600}
    return config


app = Celery("optrack", include=["worker.tasks", "worker.ops_tasks"])
logs.connect_celery_signals()
_metrics_server: MetricsServer | None = None


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(load_settings()))


@worker_init.connect
def _start_metrics(**_: Any) -> None:
    # The worker's main process serves /metrics for all its children (before they fork).
    global _metrics_server
    _metrics_server = start_worker_server(load_settings())


@worker_shutdown.connect
def _stop_metrics(**_: Any) -> None:
    global _metrics_server
    if _metrics_server is not None:
        _metrics_server.close()
        _metrics_server = None
