"""Completion notices on SQLite and PostgreSQL: one outbox row per end, sent through a real
Celery broker (Redis) and a real local webhook that verifies the signature, across killed
workers; the receiver of docs/operations.md run as a server against replays."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.support.services import SID, TOKEN
from worker import liveness
from worker.celery_app import DELIVER_NOTICES_TASK, celery_config
from worker.clock import FakeClock, SystemClock
from worker.db import Notice, TrackedOperation
from worker.notices import (
    DELIVERY_REMEMBERED,
    DeliveryPolicy,
    Message,
    TaskChannel,
    WebhookChannel,
    deliver_pending,
    end_hook,
    record_end,
)
from worker.poller import Poller
from worker.recorder import Recorder
from worker.repository import Repository
from worker.runtime import Runtime
from worker.sandbox import SandboxServer
from worker.settings import DEFAULT_NOTIFY_QUEUE, load_settings
from worker.tracking import PollPolicy
from worker.webhooks import WebhookSignatureError, sign, verify

ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec-" + "k3y" * 6
NOTIFY_TASK = "billing.operation_ended"
OP_IDS = [f"comms_operation_01h9krwprkeee8fzqspvwy6n{i:02d}" for i in range(20)]


class Receiver:
    """A webhook endpoint on 127.0.0.1 that accepts only correctly signed, fresh notices.

    ``now`` is its clock; ``delay`` seconds of the fake clock pass while it handles a notice
    (a slow receiver), so the next notice of the same run is sent that much later.
    """

    def __init__(self, secret: str, now: Callable[[], datetime], clock: FakeClock | None = None):
        self.secret = secret
        self.now = now
        self.clock = clock
        self.delay = 0.0
        self.deliveries: list[dict[str, Any]] = []
        self.raw: list[tuple[bytes, dict[str, str]]] = []  # every request, as it came
        self.received_at: list[datetime] = []
        self.rejected = 0
        self.fail_next = 0
        self.hold: threading.Event | None = None
        self.arrived = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                code = receiver.receive(body, self.headers)
                if code == 204 and receiver.hold is not None:
                    receiver.hold.wait(60)
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender was killed while we held the answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/optrack"

    def receive(self, body: bytes, headers: Any) -> int:
        with self.lock:
            self.raw.append((body, dict(headers.items())))
            now = self.now()
            try:
                signed_at = verify(self.secret, body, headers.get("X-Optrack-Signature"), now)
            except WebhookSignatureError:
                self.rejected += 1
                return 401
            payload = json.loads(body)
            sent_at = datetime.fromisoformat(payload["sent_at"].replace("Z", "+00:00"))
            assert signed_at == sent_at  # the signed t is the body's sent_at
            assert headers["X-Optrack-Notice-Id"] == str(payload["notice_id"])
            self.received_at.append(now)
            if self.clock is not None and self.delay:
                self.clock.advance(self.delay)
            if self.fail_next:
                self.fail_next -= 1
                return 500
            self.deliveries.append(payload)
        self.arrived.set()
        return 204

    def operations(self) -> list[str]:
        with self.lock:
            return sorted(d["operation"]["id"] for d in self.deliveries)

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(clock: FakeClock) -> Iterator[Receiver]:
    server = Receiver(SECRET, clock.now, clock)
    yield server
    server.close()


@pytest.fixture
def broker(redis_url: str) -> Iterator[Celery]:
    app = Celery("notices-test", broker=redis_url)
    app.conf.update(task_serializer="json", accept_content=["json"])
    yield app
    app.close()


def queued_tasks(redis_url: str) -> list[dict[str, Any]]:
    """The task messages waiting in the notices queue, decoded as a consumer would."""
    client = redis.Redis.from_url(redis_url)
    raw = client.lrange(DEFAULT_NOTIFY_QUEUE, 0, -1)
    client.close()
    messages = []
    for item in raw:
        envelope = json.loads(item)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        headers = envelope["headers"]
        messages.append({"task": headers["task"], "id": headers["id"], "args": args})
    return messages


def end_operation(
    sessions: sessionmaker[Session], op_id: str, now: datetime, status: str = "COMPLETED"
) -> None:
    """The state change that ends an operation, with its notice, in one transaction."""
    with sessions.begin() as session:
        row = Repository(session).get(op_id)
        assert row is not None
        row.status = status
        row.total, row.queued, row.created, row.failed = 5, 0, 4, 1
        row.ended_at = now
        record_end(session, row, now)


def notices(sessions: sessionmaker[Session]) -> list[Notice]:
    with sessions() as session:
        return list(session.scalars(select(Notice).order_by(Notice.id)))


def test_record_end_is_once_per_operation_and_only_for_an_end(
    sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    with sessions.begin() as session:
        Repository(session).add(OP_IDS[:1], clock.now())
    with sessions.begin() as session:
        row = session.get(TrackedOperation, OP_IDS[0])
        assert row is not None
        with pytest.raises(ValueError, match="not ended"):
            record_end(session, row, clock.now())
    end_operation(sessions, OP_IDS[0], clock.now())
    with sessions.begin() as session:
        row = session.get(TrackedOperation, OP_IDS[0])
        assert row is not None
        assert record_end(session, row, clock.now()) is False  # a replayed end
    [notice] = notices(sessions)
    record = json.loads(notice.payload)
    assert record["id"] == OP_IDS[0] and record["status"] == "COMPLETED"
    assert (record["created"], record["failed"], record["total"]) == (4, 1, 5)


def test_the_pollers_end_hook_records_the_whole_final_record(
    sessions: sessionmaker[Session], sandbox: SandboxServer, make_client, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    done = sandbox.add_operation(total=3, duration=0, outcome="CANCELED")
    missing = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
    with sessions.begin() as session:
        Repository(session).add([done.id, missing], clock.now())
    client = make_client()
    policy = PollPolicy(not_found_grace=timedelta(0))  # the first 404 ends tracking
    recorder = Recorder(sessions, policy, on_end=[end_hook])
    poller = Poller(sessions, client, policy, client.clock, recorder)
    poller.refresh([done.id, missing])
    poller.refresh([done.id, missing])  # already ended: no second notice
    by_id = {n.operation_id: json.loads(n.payload) for n in notices(sessions)}
    assert set(by_id) == {done.id, missing}
    assert by_id[done.id]["status"] == "CANCELED" and by_id[done.id]["total"] == 3
    assert by_id[missing]["status"] == "NOT_FOUND" and by_id[missing]["polls"] == 1
    assert by_id[missing]["last_error"].startswith("HTTP 404")
    assert by_id[missing]["tracked_at"] is not None  # re-read whole, not just the 404's values


def test_no_channel_anywhere_owes_no_notice_and_a_channel_on_another_process_does(
    db_url: str, sandbox: SandboxServer, clock: FakeClock
) -> None:
    """Nothing owed where nothing delivers (issue 18: a 10-minute run left 3,708 rows waiting,
    never pruned): the end's row is born delivered, for the event stream, and retention prunes
    it. Owed where another process has a channel, or had one within DELIVERY_REMEMBERED."""
    first, second, third = (
        sandbox.add_operation(total=2, duration=0, outcome="COMPLETED") for _ in range(3)
    )
    settings = load_settings(
        {
            "OPTRACK_DATABASE_URL": db_url,
            "OPTRACK_API_BASE_URL": sandbox.base_url,
            "TWILIO_ACCOUNT_SID": SID,
            "TWILIO_AUTH_TOKEN": TOKEN,
        }
    )
    assert not settings.notices_enabled
    rt = Runtime(settings, clock=clock)
    try:
        with rt.sessions.begin() as session:
            Repository(session).add([first.id, second.id, third.id], clock.now())
        rt.poller.refresh([first.id])
        # Ended, and no channel anywhere: nothing owed.
        assert owed(rt.sessions) == [] and [n.operation_id for n in notices(rt.sessions)] == [
            first.id
        ]
        # A worker with OPTRACK_WEBHOOK_URL starts elsewhere: its heartbeat says so.
        beat = liveness.ProcessHeartbeat(db_url, "worker", clock, delivers_notices=True)
        beat.start()
        deadline = time.monotonic() + 10
        while not notices_seen(rt.sessions) and time.monotonic() < deadline:
            time.sleep(0.05)
        beat.stop()
        clock.advance(3 * 86400.0)  # stopped three days ago: still remembered
        rt.poller.refresh([second.id])
        assert owed(rt.sessions) == [second.id]
        clock.advance(DELIVERY_REMEMBERED.total_seconds())  # gone for longer than that
        rt.poller.refresh([third.id])
        assert owed(rt.sessions) == [second.id]
        assert len(notices(rt.sessions)) == 3  # every end has its row, for the event stream
        with rt.sessions() as session:
            ended = {r.id: r.status for r in session.scalars(select(TrackedOperation))}
        assert set(ended.values()) == {"COMPLETED"}  # every end recorded all the same
    finally:
        rt.close()


def owed(sessions: sessionmaker[Session]) -> list[str]:
    """The operations whose notice still waits to be delivered."""
    return [n.operation_id for n in notices(sessions) if n.delivered_at is None]


def notices_seen(sessions: sessionmaker[Session]) -> bool:
    with sessions() as session:
        return liveness.notices_last_delivered(session) is not None


def test_a_process_with_a_channel_queues_its_notices_before_any_heartbeat(
    db_url: str, sandbox: SandboxServer, clock: FakeClock
) -> None:
    done = sandbox.add_operation(total=2, duration=0, outcome="COMPLETED")
    settings = load_settings(
        {
            "OPTRACK_DATABASE_URL": db_url,
            "OPTRACK_API_BASE_URL": sandbox.base_url,
            "OPTRACK_NOTIFY_TASK": "billing.operation_ended",
            "TWILIO_ACCOUNT_SID": SID,
            "TWILIO_AUTH_TOKEN": TOKEN,
        }
    )
    rt = Runtime(settings, clock=clock)
    try:
        with rt.sessions.begin() as session:
            Repository(session).add([done.id], clock.now())
        rt.poller.refresh([done.id])
        [notice] = notices(rt.sessions)
    finally:
        rt.close()
    assert notice.operation_id == done.id and notice.delivered_at is None
    assert json.loads(notice.payload)["status"] == "COMPLETED"


KILLED_POLLER = """
import os, signal, sys
from worker.runtime import Runtime
from worker.settings import load_settings
from worker.tracking import Outcome
rt = Runtime(load_settings())
counts = rt.poller.refresh([sys.argv[1]])
assert counts.outcomes[Outcome.CHANGED] == 1, counts
print("state change committed", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the worker dies before any notice is sent
"""


@pytest.mark.slow
@pytest.mark.redis
def test_exactly_once_across_a_worker_killed_between_the_end_and_the_send(
    db_url: str,
    sessions: sessionmaker[Session],
    sandbox: SandboxServer,
    receiver: Receiver,
    broker: Celery,
    redis_url: str,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    op = sandbox.add_operation(total=3, duration=0)  # COMPLETED at its first poll
    with sessions.begin() as session:
        Repository(session).add([op.id], clock.now())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(
        OPTRACK_HOME=str(tmp_path),
        OPTRACK_DATABASE_URL=db_url,
        OPTRACK_API_BASE_URL=sandbox.base_url,
        OPTRACK_WEBHOOK_URL=receiver.url,
        OPTRACK_WEBHOOK_SECRET=SECRET,
        TWILIO_ACCOUNT_SID=SID,
        TWILIO_AUTH_TOKEN=TOKEN,
    )
    worker = subprocess.run(
        [sys.executable, "-c", KILLED_POLLER, op.id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == -signal.SIGKILL, worker.stderr
    assert "state change committed" in worker.stdout

    # The end and its notice committed together; nothing was sent.
    with sessions() as session:
        row = session.get(TrackedOperation, op.id)
        assert row is not None and row.status == "COMPLETED"
    [pending] = notices(sessions)
    assert pending.delivered_at is None and pending.attempts == 0
    assert receiver.deliveries == [] and queued_tasks(redis_url) == []

    # The next dispatcher run sends it, once; later runs find nothing to send.
    channels = [
        TaskChannel(broker, NOTIFY_TASK, DEFAULT_NOTIFY_QUEUE),
        WebhookChannel(receiver.url, SECRET),
    ]
    clock.advance(300)  # past the killed worker's own (real) clock
    first = deliver_pending(sessions, clock, channels)
    clock.advance(3600)
    second = deliver_pending(sessions, clock, channels)
    assert first.delivered == (op.id,) and second.delivered == ()
    assert receiver.operations() == [op.id]
    [payload] = receiver.deliveries
    assert payload["event"] == "operation.ended" and payload["notice_id"] == pending.id
    assert payload["operation"]["status"] == "COMPLETED"
    assert payload["operation"]["total"] == 3
    [message] = queued_tasks(redis_url)
    assert message["task"] == NOTIFY_TASK and message["id"] == f"optrack-notice-{pending.id}"
    assert message["args"] == [payload["operation"]]
    [done] = notices(sessions)
    assert done.delivered_at is not None and done.attempts == 1
    assert done.task_sent_at is not None and done.webhook_sent_at is not None


KILLED_DISPATCHER = """
import sys
from datetime import datetime
from worker.db import make_engine, make_sessionmaker
from worker.clock import FakeClock
from worker.notices import WebhookChannel, deliver_pending
url, hook, secret, now = sys.argv[1:]
sessions = make_sessionmaker(make_engine(url))
deliver_pending(sessions, FakeClock(datetime.fromisoformat(now)), [WebhookChannel(hook, secret)])
"""


@pytest.mark.slow
def test_a_dispatcher_killed_after_sending_resends_with_the_same_notice_id(
    db_url: str, sessions: sessionmaker[Session], receiver: Receiver, clock: FakeClock
) -> None:
    with sessions.begin() as session:
        Repository(session).add(OP_IDS[:1], clock.now())
    end_operation(sessions, OP_IDS[0], clock.now())
    receiver.hold = threading.Event()  # the webhook keeps its answer until we let go
    dispatcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_DISPATCHER,
            db_url,
            receiver.url,
            SECRET,
            clock.now().isoformat(),
        ]
    )
    try:
        assert receiver.arrived.wait(60), "the dispatcher never sent"
        dispatcher.send_signal(signal.SIGKILL)
        assert dispatcher.wait(30) == -signal.SIGKILL
    finally:
        receiver.hold.set()
        receiver.hold = None

    # The send was not recorded: the claim holds until its lease runs out, then it goes again.
    channel = WebhookChannel(receiver.url, SECRET)
    assert deliver_pending(sessions, clock, [channel]).delivered == ()
    assert len(receiver.deliveries) == 1
    clock.advance(DeliveryPolicy().lease.total_seconds())
    report = deliver_pending(sessions, clock, [channel])
    channel.close()
    assert report.delivered == (OP_IDS[0],)
    ids = [d["notice_id"] for d in receiver.deliveries]
    assert len(ids) == 2 and len(set(ids)) == 1  # at least once; the receiver drops the repeat


def test_two_dispatchers_never_send_the_same_notice(
    sessions: sessionmaker[Session], receiver: Receiver, clock: FakeClock
) -> None:
    with sessions.begin() as session:
        Repository(session).add(OP_IDS, clock.now())
    for op_id in OP_IDS:
        end_operation(sessions, op_id, clock.now())
    policy = DeliveryPolicy(batch=7)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def dispatcher() -> None:
        channel = WebhookChannel(receiver.url, SECRET)
        try:
            barrier.wait(10)
            while deliver_pending(sessions, clock, [channel], policy).delivered:
                pass
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            channel.close()

    threads = [threading.Thread(target=dispatcher) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert receiver.operations() == sorted(OP_IDS)  # each exactly once
    assert all(n.delivered_at is not None and n.attempts == 1 for n in notices(sessions))


class Drawn(random.Random):
    """Randomness that draws the given values in turn: a jitter a test can name."""

    def __init__(self, *draws: float) -> None:
        super().__init__(0)
        self.draws = list(draws)

    def random(self) -> float:
        return self.draws.pop(0)


def test_failures_back_off_in_the_row_without_sleeping(
    sessions: sessionmaker[Session], receiver: Receiver, clock: FakeClock
) -> None:
    """10 s then 20 s, jittered ±20% by the injected randomness: its top (x1.2), its bottom."""
    with sessions.begin() as session:
        Repository(session).add(OP_IDS[:1], clock.now())
    end_operation(sessions, OP_IDS[0], clock.now(), status="NOT_FOUND")
    channel = WebhookChannel(receiver.url, SECRET)
    policy = DeliveryPolicy(backoff_base=10)
    rng = Drawn(1.0, 0.0)
    receiver.fail_next = 2
    start = clock.now()

    first = deliver_pending(sessions, clock, [channel], policy, rng=rng)
    assert first.failed == ((OP_IDS[0], "webhook: the webhook answered HTTP 500"),)
    [notice] = notices(sessions)
    assert notice.attempts == 1 and notice.next_attempt_at == start + timedelta(seconds=12)
    assert notice.last_error == "webhook: the webhook answered HTTP 500"
    assert notice.claim_token is None and notice.delivered_at is None

    clock.advance(11)  # not due yet: nothing is sent
    assert deliver_pending(sessions, clock, [channel], policy, rng=rng).failed == ()
    clock.advance(1)
    assert deliver_pending(sessions, clock, [channel], policy, rng=rng).failed != ()
    [notice] = notices(sessions)
    assert notice.attempts == 2 and notice.next_attempt_at == start + timedelta(seconds=12 + 16)

    clock.advance(16)
    done = deliver_pending(sessions, clock, [channel], policy, rng=rng)
    assert done.delivered == (OP_IDS[0],)
    [notice] = notices(sessions)
    assert notice.attempts == 3 and notice.last_error is None
    assert notice.delivered_at == clock.now()
    assert receiver.operations() == [OP_IDS[0]]
    assert receiver.deliveries[0]["operation"]["status"] == "NOT_FOUND"
    channel.close()


def test_a_wrong_secret_is_refused_by_the_receiver(
    sessions: sessionmaker[Session], receiver: Receiver, clock: FakeClock
) -> None:
    with sessions.begin() as session:
        Repository(session).add(OP_IDS[:1], clock.now())
    end_operation(sessions, OP_IDS[0], clock.now())
    report = deliver_pending(sessions, clock, [WebhookChannel(receiver.url, "wrong")])
    assert report.failed == ((OP_IDS[0], "webhook: the webhook answered HTTP 401"),)
    assert receiver.rejected == 1 and receiver.deliveries == []


@pytest.mark.redis
def test_a_channel_that_went_out_is_not_sent_again_on_retry(
    sessions: sessionmaker[Session],
    receiver: Receiver,
    broker: Celery,
    redis_url: str,
    clock: FakeClock,
) -> None:
    with sessions.begin() as session:
        Repository(session).add(OP_IDS[:1], clock.now())
    end_operation(sessions, OP_IDS[0], clock.now(), status="CANCELED")
    channels = [
        TaskChannel(broker, NOTIFY_TASK, DEFAULT_NOTIFY_QUEUE),
        WebhookChannel(receiver.url, SECRET),
    ]
    receiver.fail_next = 1
    assert deliver_pending(sessions, clock, channels).failed != ()
    [notice] = notices(sessions)
    assert notice.task_sent_at is not None and notice.webhook_sent_at is None
    clock.advance(60)
    assert deliver_pending(sessions, clock, channels).delivered == (OP_IDS[0],)
    assert len(queued_tasks(redis_url)) == 1  # the task went out once
    assert receiver.operations() == [OP_IDS[0]]


def test_settings_and_the_beat_entry() -> None:
    base = {"OPTRACK_DATABASE_URL": "sqlite:///x.sqlite", "OPTRACK_BROKER_URL": "redis://r"}
    off = celery_config(load_settings(base))["beat_schedule"]
    assert "optrack-deliver-notices" not in off
    on = load_settings({**base, "OPTRACK_NOTIFY_TASK": NOTIFY_TASK})
    assert on.notify_queue == DEFAULT_NOTIFY_QUEUE
    entry = celery_config(on)["beat_schedule"]["optrack-deliver-notices"]
    assert entry["task"] == DELIVER_NOTICES_TASK
    with pytest.raises(Exception, match="OPTRACK_WEBHOOK_SECRET"):
        load_settings({**base, "OPTRACK_WEBHOOK_URL": "https://hooks.example.com/x"})
    assert "whsec" not in repr(
        load_settings(
            {
                **base,
                "OPTRACK_WEBHOOK_URL": "https://h.example.com",
                "OPTRACK_WEBHOOK_SECRET": SECRET,
            }
        )
    )


TASK_PROCESS = """
import sys
from worker.celery_app import app
app.loader.import_default_modules()
result = app.tasks[sys.argv[1]].apply()
assert result.successful(), result.traceback
print(result.result)
"""


@pytest.mark.slow
def test_the_beat_task_delivers_with_the_configured_webhook(
    db_url: str, sessions: sessionmaker[Session], receiver: Receiver, tmp_path: Path
) -> None:
    ended = datetime.now(UTC) - timedelta(minutes=1)  # the task runs on the real clock
    with sessions.begin() as session:
        Repository(session).add(OP_IDS[:3], ended)
    for op_id in OP_IDS[:3]:
        end_operation(sessions, op_id, ended)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(
        OPTRACK_HOME=str(tmp_path),
        OPTRACK_DATABASE_URL=db_url,
        OPTRACK_WEBHOOK_URL=receiver.url,
        OPTRACK_WEBHOOK_SECRET=SECRET,
        TWILIO_ACCOUNT_SID=SID,
        TWILIO_AUTH_TOKEN=TOKEN,
    )
    run = [sys.executable, "-c", TASK_PROCESS, DELIVER_NOTICES_TASK]
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "{'delivered': 3, 'failed': 0}" in done.stdout
    assert receiver.operations() == sorted(OP_IDS[:3])


def test_each_notice_is_signed_at_its_own_send_time(
    sessions: sessionmaker[Session], receiver: Receiver, clock: FakeClock
) -> None:
    """A slow receiver: 45 s pass per notice, so the tenth leaves 405 s after the run began.

    Stamped with the run's start it would be beyond the receiver's 300 s tolerance; stamped
    at its own send, every one is fresh when it arrives.
    """
    with sessions.begin() as session:
        Repository(session).add(OP_IDS[:10], clock.now())
    for op_id in OP_IDS[:10]:
        end_operation(sessions, op_id, clock.now())
    receiver.delay = 45.0
    start = clock.now()
    channel = WebhookChannel(receiver.url, SECRET)
    report = deliver_pending(sessions, clock, [channel])  # one run: a batch of 20 holds all
    channel.close()
    assert sorted(report.delivered) == OP_IDS[:10] and report.failed == ()
    assert receiver.rejected == 0
    sent = [
        datetime.fromisoformat(d["sent_at"].replace("Z", "+00:00")) for d in receiver.deliveries
    ]
    assert sent == [start + timedelta(seconds=45 * i) for i in range(10)]
    assert sent[-1] - start > timedelta(seconds=300)
    assert receiver.received_at == sent  # each arrived at the time it says it was sent
    by_op = {n.operation_id: n for n in notices(sessions)}
    for delivery, at in zip(receiver.deliveries, sent, strict=True):
        row = by_op[delivery["operation"]["id"]]
        assert row.webhook_sent_at == at
        assert row.delivered_at == at + timedelta(seconds=45)  # recorded after its answer


def test_a_run_begins_no_notice_past_its_deadline_and_gives_the_rest_back(
    sessions: sessionmaker[Session], receiver: Receiver, clock: FakeClock
) -> None:
    """A slow receiver (45 s a notice, on the injected clock) and ten notices: a batch takes
    450 s, far past the task's soft time limit (120 s), which stopped it mid-send and held the
    rest for the claim's lease (10 min). With a deadline at 100 s the run sends the three that
    begin before it, then gives the seven others back, due at once and never attempted."""
    with sessions.begin() as session:
        Repository(session).add(OP_IDS[:10], clock.now())
    for op_id in OP_IDS[:10]:
        end_operation(sessions, op_id, clock.now())
    receiver.delay = 45.0
    start = clock.now()
    channel = WebhookChannel(receiver.url, SECRET)
    report = deliver_pending(sessions, clock, [channel], deadline=start + timedelta(seconds=100))
    assert len(report.delivered) == 3 and report.out_of_time == 7
    assert clock.now() == start + timedelta(seconds=135)  # the third ended past the deadline
    rest = [n for n in notices(sessions) if n.delivered_at is None]
    assert len(rest) == 7
    assert all(n.claim_token is None and n.attempts == 0 for n in rest)
    assert all(n.next_attempt_at == clock.now() for n in rest)  # due now, not in 10 minutes
    again = deliver_pending(sessions, clock, [channel])  # the next run takes them
    channel.close()
    assert len(again.delivered) == 7 and len(receiver.deliveries) == 10


def documented_receiver() -> str:
    """The receiver example of docs/operations.md, exactly as printed there."""
    text = (ROOT / "docs" / "operations.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    [code] = [b for b in blocks if b.startswith("# receiver.py")]
    return code


@contextmanager
def documented_receiver_server(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """Run the documented receiver on a free port; yield its URL and, after it stops, its
    output lines."""
    script = tmp_path / "receiver.py"
    script.write_text(documented_receiver())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(OPTRACK_WEBHOOK_SECRET=SECRET, PORT="0", PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    output: list[str] = []
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        match = re.fullmatch(r"listening on port (\d+)\n", first)
        assert match, f"the receiver did not start: {first!r} {process.stderr.read()!r}"  # type: ignore[union-attr]
        yield f"http://127.0.0.1:{match.group(1)}/hooks/optrack", output
    finally:
        process.terminate()
        out, _err = process.communicate(timeout=30)
        output.extend(out.splitlines())


def test_the_documented_receiver_refuses_a_replay_and_takes_a_fresh_notice(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    # A notice sent a year ago, captured on its way (the receiver of that day accepted it).
    year_ago = FakeClock(datetime.now(UTC).replace(microsecond=0) - timedelta(days=365))
    capture = Receiver(SECRET, year_ago.now)
    with sessions.begin() as session:
        Repository(session).add(OP_IDS[:2], year_ago.now())
    end_operation(sessions, OP_IDS[0], year_ago.now())
    channel = WebhookChannel(capture.url, SECRET)
    try:
        assert deliver_pending(sessions, year_ago, [channel]).delivered == (OP_IDS[0],)
    finally:
        channel.close()
        capture.close()
    [(old_body, old_headers)] = capture.raw
    old_header = old_headers["X-Optrack-Signature"]
    old_t, old_v1 = (item.split("=", 1)[1] for item in old_header.split(","))
    assert int(old_t) == int(year_ago.now().timestamp())

    with documented_receiver_server(tmp_path) as (url, output):

        def post(body: bytes, headers: dict[str, str]) -> requests.Response:
            with requests.Session() as http:
                http.trust_env = False
                headers = {"Content-Type": "application/json", **headers}
                return http.post(url, data=body, headers=headers, timeout=10)

        fresh_t = str(int(time.time()))
        replays = {
            "as captured": ({"X-Optrack-Signature": old_header}, "s old"),
            "with a fresh t": (
                {"X-Optrack-Signature": f"t={fresh_t},v1={old_v1}"},
                "does not match",
            ),
            "the old scheme, a fresh timestamp header": (
                {
                    "X-Optrack-Signature": "sha256="
                    + hmac.new(SECRET.encode(), old_body, hashlib.sha256).hexdigest(),
                    "X-Optrack-Timestamp": fresh_t,
                },
                "exactly one t=",
            ),
            "no signature": ({}, "no X-Optrack-Signature header"),
        }
        for name, (headers, reason) in replays.items():
            answer = post(old_body, headers)
            assert answer.status_code == 401, name
            assert reason in answer.reason, (name, answer.reason)

        # A fresh notice from the dispatcher, on the real clock, is taken.
        end_operation(sessions, OP_IDS[1], datetime.now(UTC))
        channel = WebhookChannel(url, SECRET)
        try:
            assert deliver_pending(sessions, SystemClock(), [channel]).delivered == (OP_IDS[1],)
        finally:
            channel.close()
        # The same notice again, correctly signed and fresh (a redelivery): 204, dropped.
        fresh = next(n for n in notices(sessions) if n.operation_id == OP_IDS[1])
        again = Message(fresh.id, OP_IDS[1], json.loads(fresh.payload), datetime.now(UTC))
        body = again.body()
        answer = post(body, {"X-Optrack-Signature": sign(SECRET, body, again.timestamp)})
        assert answer.status_code == 204

    handled = [line for line in output if line.startswith("ended:")]
    assert handled == [f"ended: {fresh.id} {OP_IDS[1]} COMPLETED"]


def test_the_webhook_urls_path_and_query_never_reach_a_log(
    sessions: sessionmaker[Session], receiver: Receiver, clock: FakeClock
) -> None:
    import io
    import logging
    import socket

    from worker import logs

    in_path, in_query = "p4th-t0k3n-" + "x1" * 8, "qu3ry-t0k3n-" + "y2" * 8
    url = receiver.url.replace("/hooks/optrack", f"/hooks/{in_path}?sig={in_query}")
    with socket.socket() as closed:  # a port nothing listens on: the error path too
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}/hooks/{in_path}?sig={in_query}"
    settings = load_settings({"OPTRACK_WEBHOOK_URL": url, "OPTRACK_WEBHOOK_SECRET": SECRET})
    assert {f"/hooks/{in_path}?sig={in_query}"} <= set(settings.secrets)

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    levels = {name: logging.getLogger(name).level for name in root.manager.loggerDict}
    ours, theirs = io.StringIO(), io.StringIO()
    try:
        logs.configure(settings, logging.DEBUG, ours)
        foreign = logging.StreamHandler(theirs)  # an embedding application's: no filter of ours
        foreign.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        root.addHandler(foreign)
        for name in levels:  # every logger at DEBUG
            logging.getLogger(name).setLevel(logging.DEBUG)

        with sessions.begin() as session:
            Repository(session).add(OP_IDS[:2], clock.now())
        end_operation(sessions, OP_IDS[0], clock.now())
        receiver.fail_next = 1
        channel = WebhookChannel(settings.webhook_url or "", SECRET)
        failed = deliver_pending(sessions, clock, [channel], DeliveryPolicy(backoff_base=1))
        clock.advance(2)
        done = deliver_pending(sessions, clock, [channel], DeliveryPolicy(backoff_base=1))
        end_operation(sessions, OP_IDS[1], clock.now())
        refused = deliver_pending(sessions, clock, [WebhookChannel(nowhere, SECRET)])
        shown = [repr(channel), repr(settings), str(failed), str(done), str(refused)]
        shown += [str(n.last_error) for n in notices(sessions)]
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert done.delivered == (OP_IDS[0],) and refused.failed and failed.failed
    # urllib3 did log the request line at DEBUG: without its target.
    assert '"POST *** HTTP/1.1" 500' in ours.getvalue()
    assert '"POST *** HTTP/1.1" 204' in theirs.getvalue()
    for text in (ours.getvalue(), theirs.getvalue(), *shown):
        assert in_path not in text and in_query not in text, text
