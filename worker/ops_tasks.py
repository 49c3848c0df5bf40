"""Celery tasks of the operations features: discovery, notice delivery, retention.

Thin adapters like ``worker.tasks``: they take this process's runtime, call the domain, return
a small JSON summary.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from worker import discovery, notices, retention
from worker.accounts import Accounts
from worker.celery_app import (
    DELIVER_NOTICES_TASK,
    DISCOVER_TASK,
    PRUNE_SOFT_TIME_LIMIT,
    PRUNE_TASK,
    PRUNE_TIME_LIMIT,
    app,
)
from worker.delivery import GuardedTask
from worker.errors import ConfigError, UnknownAccount
from worker.runtime import Runtime

log = logging.getLogger(__name__)
MAX_BATCHES_PER_RUN = 10


def notice_channels(rt: Runtime) -> list[notices.Channel]:
    """The channels configured by OPTRACK_NOTIFY_TASK and OPTRACK_WEBHOOK_URL."""
    settings = rt.settings
    channels: list[notices.Channel] = []
    if settings.notify_task:
        channels.append(notices.TaskChannel(app, settings.notify_task, settings.notify_queue))
    if settings.webhook_url:
        channels.append(notices.WebhookChannel(settings.webhook_url, settings.webhook_secrets))
    return channels


@app.task(bind=True, name=DISCOVER_TASK, ignore_result=True, periodic=True)
def discover(self: GuardedTask) -> dict[str, Any]:
    """List each account's PROCESSING operations, with its own credentials, and track the new
    ones under it; one account paused or failing stops only its own listing."""
    rt = self.runtime
    now = rt.clock.now()
    s = rt.settings
    # Stop listing while one more request (and its wait in place) fits in the soft time limit,
    # which would otherwise stop the task mid-request and discard every page it had read.
    room = s.task_soft_time_limit - (s.request_deadline + s.max_inplace_wait)
    deadline = now + timedelta(seconds=max(room, 0.0))
    with rt.sessions() as session:
        names = Accounts(session).names()
    seen = added = 0
    stopped: dict[str, str] = {}
    for name in names:
        try:
            client = rt.client_for(name)
        except (ConfigError, UnknownAccount) as exc:
            log.error("discovery: account %s skipped: %s", name, exc)
            stopped[name] = str(exc)
            continue
        result = discovery.discover(
            rt.sessions,
            client,
            rt.clock.now(),
            s.discovery_window,
            recorder=rt.recorder,
            clock_allowance=rt.poll_policy.clock_allowance,
            deadline=deadline,
            clock=rt.clock,
            account=name,
        )
        rt.metrics.discovered.inc(len(result.added))
        seen, added = seen + result.seen, added + len(result.added)
        if result.stopped_early is not None:
            stopped[name] = result.stopped_early
    return {"seen": seen, "added": added, "stopped_early": stopped or None}


@app.task(bind=True, name=DELIVER_NOTICES_TASK, ignore_result=True, periodic=True)
def deliver_notices(self: GuardedTask) -> dict[str, int]:
    """Send the completion notices that are due."""
    rt = self.runtime
    channels = notice_channels(rt)
    policy = notices.DeliveryPolicy()
    # No notice is begun unless it can end before the soft time limit, which would stop the
    # run mid-send and hold the rest of its batch for the claim's lease (ten minutes).
    room = rt.settings.task_soft_time_limit - len(channels) * notices.SEND_BOUND
    deadline = rt.clock.now() + timedelta(seconds=max(room, 0.0))
    delivered = failed = 0
    try:
        # A backlog drains a few batches per run; the next beat entry takes the rest.
        for _ in range(MAX_BATCHES_PER_RUN):
            report = notices.deliver_pending(rt.sessions, rt.clock, channels, policy, deadline)
            delivered += len(report.delivered)
            failed += len(report.failed)
            handled = len(report.delivered) + len(report.failed) + report.lost_claims
            if report.out_of_time or handled < policy.batch:
                break
    finally:
        for channel in channels:
            if isinstance(channel, notices.WebhookChannel):
                channel.close()
    rt.metrics.notices.labels("delivered").inc(delivered)
    rt.metrics.notices.labels("failed").inc(failed)
    return {"delivered": delivered, "failed": failed}


@app.task(
    bind=True,
    name=PRUNE_TASK,
    ignore_result=True,
    soft_time_limit=PRUNE_SOFT_TIME_LIMIT,
    time_limit=PRUNE_TIME_LIMIT,
    periodic=True,
)
def prune(self: GuardedTask) -> dict[str, int]:
    """Drop the notices delivered before OPTRACK_NOTICE_RETENTION, and the history of
    operations that ended before OPTRACK_PRUNE_OLDER_THAN if it is set."""
    rt = self.runtime
    now = rt.clock.now()
    delivered = retention.prune_delivered_notices(rt.sessions, now - rt.settings.notice_retention)
    older_than = rt.settings.prune_older_than
    if older_than is None:
        log.info("prune: OPTRACK_PRUNE_OLDER_THAN is not set; the history is kept")
        return {"history_rows": 0, "notices": delivered}
    result = retention.prune(rt.sessions, now - older_than)
    rt.metrics.pruned.inc(result.history_rows)
    return {"history_rows": result.history_rows, "notices": delivered + result.notices}
