"""Completion notices: an outbox row per ended operation, and the dispatcher that sends it.

``record_end`` inserts the row in the caller's transaction, the one that moves the operation to
COMPLETED, CANCELED or NOT_FOUND: the end and its notice commit together or not at all, and the
unique constraint on ``operation_id`` makes it one notice per operation, ever. A row is queued
only where it can be delivered: by a process with a channel (``end_hook``), or by one without
while a process with one was alive within ``DELIVERY_REMEMBERED`` (``end_hook_if_delivered``;
those processes beat ``liveness.NOTICES``). With no channel anywhere, no outbox grows.

``deliver_pending`` claims due rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; one conditional
UPDATE under SQLite's write lock), sends each through every configured channel not yet done,
and records the result: ``delivered_at``, or ``attempts``, ``last_error`` and a backed-off
``next_attempt_at``. It never sleeps. It reads its clock at each send, so every message's
``sent_at`` (and the webhook's signed timestamp) is when that message left, however long the
batch before it took. A dispatcher killed after a send but before recording it
leaves the claim to expire and the notice is sent again: delivery is at least once per channel,
so every message carries a stable id (the Celery task id ``optrack-notice-<id>``, the webhook's
``webhook-id`` and ``X-Optrack-Notice-Id`` headers and ``notice_id`` field) for receivers to
drop a repeat.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

import requests
from kombu.exceptions import KombuError
from sqlalchemy import and_, update
from sqlalchemy.orm import Session, sessionmaker

from worker import __version__, claims, dialect, liveness, logs
from worker import webhook_signing as signing
from worker.clock import Clock
from worker.db import Notice, TrackedOperation
from worker.records import iso, operation_record
from worker.settings import url_secrets
from worker.tracking import ENDED_STATES
from worker.webhooks import SIGNATURE_HEADER, sign

log = logging.getLogger(__name__)

EVENT = "operation.ended"
# How long after a process with a notice channel was last alive every process still queues
# notices: its restart, a deploy or an outage of a few days loses none; past that, nothing
# delivers them and none is queued.
DELIVERY_REMEMBERED = timedelta(days=7)
NOTICE_ID_HEADER = "X-Optrack-Notice-Id"

ChannelName = Literal["task", "webhook"]
# requests' timeout, for the connection and again for each read of the answer.
WEBHOOK_TIMEOUT = 10.0
# The longest one notice may take on one channel (a connect and a read, each up to the
# timeout): a run begins no notice later than this before its task's time limit.
SEND_BOUND = 2 * WEBHOOK_TIMEOUT


class DeliveryError(Exception):
    """Raised by a channel when a notice could not be handed over; it is retried later."""


def record_end(
    session: Session, row: TrackedOperation, now: datetime, *, owed: bool = True
) -> bool:
    """Queue the notice of ``row``'s end in the caller's transaction; False if one exists.

    ``owed`` False: nothing can deliver it, so it is born delivered. The row is still the
    end's event (``/api/v1/events``), and retention prunes it with the delivered ones."""
    if row.status not in ENDED_STATES:
        raise ValueError(f"{row.id} is {row.status}, not ended: no notice to record")
    stmt = (
        dialect.insert(session)(Notice)
        .values(
            operation_id=row.id,
            payload=json.dumps(operation_record(row), sort_keys=True),
            created_at=now,
            next_attempt_at=now,
            attempts=0,
            delivered_at=None if owed else now,
        )
        .on_conflict_do_nothing(index_elements=["operation_id"])
        .returning(Notice.id)
    )
    return session.scalar(stmt) is not None


def end_hook(session: Session, operation_id: str, now: datetime, *, owed: bool = True) -> None:
    """``record_end`` for the Poller's ``on_end`` hooks, called with each ended operation.

    The row is read inside the same transaction, after the bulk UPDATE, so the notice
    carries the whole final record.
    """
    row = session.get(TrackedOperation, operation_id, populate_existing=True)
    if row is not None:
        record_end(session, row, now, owed=owed)


def delivery_configured(session: Session, now: datetime) -> bool:
    """True when a process configured to deliver notices was alive within
    ``DELIVERY_REMEMBERED`` of ``now``."""
    seen = liveness.notices_last_delivered(session)
    return seen is not None and seen > now - DELIVERY_REMEMBERED


def end_hook_if_delivered(session: Session, operation_id: str, now: datetime) -> None:
    """``end_hook`` for a process without a channel: owed only if another process delivers;
    else born delivered (nothing waits in the outbox, retention prunes it)."""
    end_hook(session, operation_id, now, owed=delivery_configured(session, now))


@dataclass(frozen=True)
class Message:
    """One notice as a channel sends it."""

    notice_id: int
    operation_id: str
    record: dict[str, Any]
    sent_at: datetime

    @property
    def timestamp(self) -> int:
        """``sent_at`` in Unix seconds: the ``t`` the webhook signature covers."""
        return int(self.sent_at.timestamp())

    def body(self) -> bytes:
        """The webhook body: compact, key-sorted JSON (the signature covers these bytes)."""
        payload = {
            "event": EVENT,
            "notice_id": self.notice_id,
            "sent_at": iso(self.sent_at),
            "operation": self.record,
        }
        return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


class Channel(Protocol):
    """Somewhere a notice goes; ``send`` raises DeliveryError when it did not get there."""

    @property
    def name(self) -> ChannelName:
        """Which ``*_sent_at`` column records a send: "task" or "webhook"."""
        ...

    def send(self, message: Message) -> None:
        """Hand one notice over."""
        ...


class TaskSender(Protocol):
    """The part of a Celery app a TaskChannel uses (``Celery.send_task``)."""

    def send_task(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Publish a task message by name."""
        ...


@dataclass(frozen=True)
class TaskChannel:
    """Sends the Celery task ``task_name`` with the final record as its one argument."""

    app: TaskSender
    task_name: str
    queue: str
    name: ChannelName = field(default="task", init=False)

    def send(self, message: Message) -> None:
        """Publish once, no publisher retries (they would sleep): a failure is retried later."""
        try:
            self.app.send_task(
                self.task_name,
                args=[message.record],
                task_id=f"optrack-notice-{message.notice_id}",
                queue=self.queue,
                retry=False,
            )
        except (KombuError, OSError) as exc:
            raise DeliveryError(f"could not publish {self.task_name}: {exc}") from None


def webhook_session() -> requests.Session:
    """A session for webhook POSTs that takes nothing from the environment.

    ``trust_env = False``: no proxy from ``HTTP(S)_PROXY``, no credentials from ``~/.netrc``,
    no CA bundle from ``REQUESTS_CA_BUNDLE`` (TLS is verified against certifi's bundle).
    """
    session = requests.Session()
    session.trust_env = False
    return session


@dataclass
class WebhookChannel:
    """POSTs the notice as JSON, signed as Standard Webhooks sign (``webhook_signing``) and with
    the deprecated ``X-Optrack-Signature`` (``webhooks``); any 2xx is a delivery.

    ``secret`` is one secret or several (a rotation: each signs every notice). The URL is
    checked once, at start (``worker.settings``: https, or http to loopback, or
    ``OPTRACK_WEBHOOK_ALLOW_INSECURE_HTTP=1``).
    """

    url: str = field(repr=False)  # its path and query may hold a token
    secret: str | Sequence[str] = field(repr=False)
    timeout: float = WEBHOOK_TIMEOUT
    session: requests.Session = field(default_factory=webhook_session, repr=False)
    name: ChannelName = field(default="webhook", init=False)
    _secrets: tuple[str, ...] = field(init=False, repr=False)
    _keys: tuple[bytes, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._secrets = (self.secret,) if isinstance(self.secret, str) else tuple(self.secret)
        self._keys = tuple(signing.key_of(s) for s in self._secrets)  # BadSecret: none shown
        if not self._keys:
            raise signing.BadSecret("a webhook channel needs at least one secret")
        # Also for a session passed in: nothing from the environment routes or authenticates us.
        self.session.trust_env = False
        # The URL's path and query often hold a token, and urllib3 logs the request line at
        # DEBUG: redacted in its records themselves, so no handler of anyone's ever sees it.
        logs.redact_logger("urllib3.connectionpool", url_secrets(self.url))

    def send(self, message: Message) -> None:
        """One POST, no redirects followed; raise DeliveryError unless the answer is 2xx."""
        body = message.body()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"optrack/{__version__} (+notices)",
            **signing.headers(self._keys, str(message.notice_id), message.timestamp, body),
            # Deprecated (optrack 0.1's scheme), sent for this release beside the standard ones.
            SIGNATURE_HEADER: sign(self._secrets, body, message.timestamp),
            NOTICE_ID_HEADER: str(message.notice_id),
        }
        try:
            response = self.session.post(
                self.url, data=body, headers=headers, timeout=self.timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            raise DeliveryError(f"no answer from the webhook: {type(exc).__name__}") from None
        if not 200 <= response.status_code < 300:
            raise DeliveryError(f"the webhook answered HTTP {response.status_code}")

    def close(self) -> None:
        """Close pooled connections."""
        self.session.close()


@dataclass(frozen=True)
class DeliveryPolicy:
    """How many notices one run claims, how long a claim holds, how failures back off.

    After the n-th failed attempt the notice waits ``backoff_base * 2**(n-1)`` seconds, at most
    ``backoff_max``, times a factor drawn uniformly from ``1 ± jitter``: 10 s, 20 s, 40 s …
    an hour, each ±20%, so the notices a receiver's outage failed together do not all come
    back in the same second. Retried until delivered; nothing sleeps.
    """

    # A claim must outlast its whole batch: 20 notices x 2 channels x a 10 s timeout < lease.
    batch: int = 20
    lease: timedelta = timedelta(minutes=10)
    backoff_base: float = 10.0
    backoff_max: float = 3600.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def backoff(self, attempts: int, rng: random.Random | None = None) -> timedelta:
        """Wait after the ``attempts``-th failed attempt (1-based): doubling, capped, jittered
        (``rng``: the randomness, injected by tests; the module's by default)."""
        exponent = max(0, min(attempts, 32) - 1)
        ceiling = min(self.backoff_max, self.backoff_base * 2.0**exponent)
        factor = (
            (rng or random).uniform(1.0 - self.jitter, 1.0 + self.jitter) if self.jitter else 1.0
        )
        # Whole milliseconds: the same instant on SQLite and PostgreSQL.
        return timedelta(milliseconds=round(ceiling * factor * 1000))


@dataclass(frozen=True)
class DeliveryReport:
    """What one dispatcher run did."""

    delivered: tuple[str, ...] = ()  # operation IDs whose notice is now fully delivered
    failed: tuple[tuple[str, str], ...] = ()  # (operation ID, error), retried later
    lost_claims: int = 0  # results not recorded because another run took the claim over
    out_of_time: int = 0  # claimed, not sent before the deadline: given back, due now


@dataclass
class _Claimed:
    id: int
    operation_id: str
    payload: str
    attempts: int
    sent: dict[ChannelName, datetime | None]


_SENT_COLUMN: dict[ChannelName, str] = {"task": "task_sent_at", "webhook": "webhook_sent_at"}


def _claim(session: Session, now: datetime, policy: DeliveryPolicy) -> tuple[str, list[_Claimed]]:
    token = claims.new_token()
    rows = claims.claim(
        session,
        Notice,
        claimable=and_(Notice.delivered_at.is_(None), Notice.next_attempt_at <= now),
        order_by=[Notice.next_attempt_at, Notice.id],
        limit=policy.batch,
        values={"next_attempt_at": now + policy.lease, "claim_token": token},
        returning=[
            Notice.id,
            Notice.operation_id,
            Notice.payload,
            Notice.attempts,
            Notice.task_sent_at,
            Notice.webhook_sent_at,
        ],
    )
    claimed = [
        _Claimed(row[0], row[1], row[2], row[3], {"task": row[4], "webhook": row[5]})
        for row in rows
    ]
    return token, claimed


def _send_all(
    notice: _Claimed, channels: Sequence[Channel], clock: Clock
) -> tuple[dict[ChannelName, datetime], list[str]]:
    record = json.loads(notice.payload)
    sent: dict[ChannelName, datetime] = {}
    errors: list[str] = []
    for channel in channels:
        if notice.sent[channel.name] is not None:
            continue  # went out on an earlier attempt
        # Read at each send: a receiver checks sent_at against its own clock.
        message = Message(notice.id, notice.operation_id, record, clock.now())
        try:
            channel.send(message)
        except DeliveryError as exc:
            errors.append(f"{channel.name}: {exc}")
        else:
            sent[channel.name] = message.sent_at
    return sent, errors


def _record(
    session: Session,
    notice: _Claimed,
    token: str,
    sent: dict[ChannelName, datetime],
    errors: list[str],
    now: datetime,
    retry_at: datetime,
) -> bool:
    values: dict[str, Any] = {_SENT_COLUMN[name]: when for name, when in sent.items()}
    values.update(claim_token=None, attempts=notice.attempts + 1)
    if errors:
        values.update(last_error="; ".join(errors)[:1000], next_attempt_at=retry_at)
    else:
        values.update(delivered_at=now, last_error=None)
    stmt = (
        update(Notice)
        .where(Notice.id == notice.id, Notice.claim_token == token)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def _give_back(session: Session, notices: Sequence[_Claimed], token: str, now: datetime) -> None:
    ids = [notice.id for notice in notices]
    session.execute(
        update(Notice)
        .where(Notice.id.in_(ids), Notice.claim_token == token)
        .values(claim_token=None, next_attempt_at=now)
        .execution_options(synchronize_session=False)
    )


def deliver_pending(
    sessions: sessionmaker[Session],
    clock: Clock,
    channels: Sequence[Channel],
    policy: DeliveryPolicy = DeliveryPolicy(),
    deadline: datetime | None = None,
    rng: random.Random | None = None,
) -> DeliveryReport:
    """Send the notices due at ``clock.now()`` through ``channels``; never waits between them.

    The clock is read again for each send (``sent_at``) and for each result (``delivered_at``,
    the backoff of a failure, jittered by ``rng``). No notice is begun at or after
    ``deadline``: the rest of the batch is given back, due now, instead of being held for the
    claim's lease by a run its task's time limit stopped mid-send.
    """
    if not channels:
        return DeliveryReport()
    with sessions.begin() as session:
        token, claimed = _claim(session, clock.now(), policy)
    delivered: list[str] = []
    failed: list[tuple[str, str]] = []
    lost = 0
    for index, notice in enumerate(claimed):
        if deadline is not None and clock.now() >= deadline:
            rest = claimed[index:]
            with sessions.begin() as session:
                _give_back(session, rest, token, clock.now())
            log.info("notices: out of time; %d given back for the next run", len(rest))
            return DeliveryReport(tuple(delivered), tuple(failed), lost, len(rest))
        sent, errors = _send_all(notice, channels, clock)
        now = clock.now()
        retry_at = now + policy.backoff(notice.attempts + 1, rng) if errors else now
        with sessions.begin() as session:
            recorded = _record(session, notice, token, sent, errors, now, retry_at)
        extra = {"operation_id": notice.operation_id}
        if not recorded:
            lost += 1
            log.warning("notice %d: claim lost before its result was recorded", notice.id)
        elif errors:
            failed.append((notice.operation_id, "; ".join(errors)))
            log.warning(
                "notice %d for %s not delivered (attempt %d): %s; retried at %s",
                notice.id,
                notice.operation_id,
                notice.attempts + 1,
                "; ".join(errors),
                retry_at.isoformat(),
                extra=extra,
            )
        else:
            delivered.append(notice.operation_id)
            log.info("notice %d for %s delivered", notice.id, notice.operation_id, extra=extra)
    return DeliveryReport(tuple(delivered), tuple(failed), lost)
