"""Celery tasks: thin adapters that take the process's runtime, call a service, and return.

Task names are stable (``worker.celery_app``): other services send ``optrack.track`` by name
with a JSON list of IDs. A signature only grows; an older release's shape is translated by
``worker.compat`` before the body runs. Every task is a ``delivery.GuardedTask``: its
deliveries counted, the one past ``OPTRACK_MAX_DELIVERIES`` a dead letter, nothing
acknowledged and forgotten.
"""

from __future__ import annotations

import logging

from celery.exceptions import SoftTimeLimitExceeded
from kombu.exceptions import KombuError

from worker import health, intake, sweep
from worker.celery_app import POLL_TASK, TICK_TASK, TRACK_TASK, app, waiting_messages
from worker.credentials import DEFAULT_ACCOUNT
from worker.delivery import GuardedTask
from worker.errors import AccountError, InvalidMessage
from worker.repository import GroupClaim

log = logging.getLogger(__name__)


@app.task(bind=True, name=TICK_TASK, ignore_result=True, periodic=True)
def tick(self: GuardedTask) -> dict[str, int]:
    """Place waiting operations into poll groups, claim the due groups, dispatch their polls."""
    rt = self.runtime
    if rt.stop.requested:
        # A stopping worker claims nothing: it would hold the claims it could not poll.
        log.info("tick: the worker is stopping; nothing claimed")
        return {"placed": 0, "claimed": 0}
    now = rt.clock.now()
    with rt.sessions.begin() as session:
        health.beat_ticked(session, now)  # `optrack health` checks that beat keeps ticking
    # Each account's own pause: a 429 on one never holds another's polls back.
    paused = rt.paused_accounts(now)

    def send(claim: GroupClaim) -> None:
        try:
            poll.apply_async((claim.group_id, claim.token), eta=sweep.start_at(claim, now))
        except (KombuError, OSError) as exc:  # the broker went away mid-tick
            raise sweep.SendFailed(str(exc)) from exc

    result = sweep.sweep(
        rt.sessions,
        now,
        rt.poll_policy,
        limit=rt.settings.max_due_per_tick,
        paused_until=None,
        paused=frozenset(paused),
        send=send,
        # Asked before claiming: an unstarted claim's message that is not waiting was lost.
        queue_empty=waiting_messages(self.app) == 0,
    )
    if result.sent:
        log.info("tick: %d group(s) due, %d poll message(s) sent", result.claimed, result.sent)
    for account, (until, reason) in sorted(paused.items()):
        log.info("tick: account %s paused until %s (%s)", account, until.isoformat(), reason)
    return {"placed": result.placed, "claimed": result.claimed}


@app.task(
    bind=True,
    name=POLL_TASK,
    ignore_result=True,
    # A database that went away mid-write: the guard tries again soon with the same claim
    # token (still valid for the lease) instead of leaving the group for the lease to run out.
)
def poll(self: GuardedTask, group_id: int, claim_token: str) -> dict[str, int]:
    """Poll one claimed group: List pages over its window, or one GET per member."""
    if not isinstance(group_id, int) or isinstance(group_id, bool):
        # 0.1.0's shape never reaches here (worker.compat translates it): this is garbage.
        raise InvalidMessage(f"optrack.poll takes a poll group's id, not {type(group_id).__name__}")
    rt = self.runtime
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


@app.task(bind=True, name=TRACK_TASK, ignore_result=True)
def track(
    self: GuardedTask, operation_ids: list[str], account: str | None = None
) -> dict[str, list[str]]:
    """Start tracking operation IDs sent by another service, under ``account`` (None, as every
    message of 0.2.0 and before: ``default``); any invalid ID rejects the lot, and so does an
    unknown account or an ID tracked under another."""
    if not isinstance(operation_ids, list):
        raise InvalidMessage(
            f"optrack.track takes a JSON list of operation IDs, not {type(operation_ids).__name__}"
        )
    if account is not None and not isinstance(account, str):
        raise InvalidMessage(f"optrack.track's account is a name, not {type(account).__name__}")
    rt = self.runtime
    try:
        result = intake.track(
            rt.sessions, operation_ids, rt.clock.now(), account or DEFAULT_ACCOUNT
        )
    except AccountError as exc:  # never better for being delivered again
        raise InvalidMessage(str(exc)) from exc
    log.info("track: %d added, %d already tracked", len(result.added), len(result.already_tracked))
    return {"added": list(result.added), "already_tracked": list(result.already_tracked)}
