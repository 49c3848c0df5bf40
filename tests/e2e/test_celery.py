"""Celery with real brokers: Redis, RabbitMQ, and the embedded SQLAlchemy transport on SQLite.

Another service enqueues by task name with plain JSON, without importing optrack.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from celery import Celery
from kombu import Connection
from sqlalchemy import select

from tests.support.private_services import free_port
from tests.support.processes import base_env, celery_process, wait_for, worker_args
from worker import dead_letters
from worker.broker import kombu_connection
from worker.celery_app import waiting_messages
from worker.db import TaskDelivery, TrackedOperation, make_engine, make_sessionmaker

pytestmark = pytest.mark.slow

JSON_ID = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
PICKLED_ID = "comms_operation_01h9krwprkeee8fzqspvwy6nq9"


@pytest.fixture(params=["redis", "rabbitmq", "embedded"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(broker URL, database URL): Redis or RabbitMQ + PostgreSQL, or SQLite + SQLite."""
    if request.param in ("redis", "rabbitmq"):
        broker = request.getfixturevalue(f"{request.param}_url")
        return broker, request.getfixturevalue("pg_url")
    return f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}", request.getfixturevalue("sqlite_url")


def tracked_ids(db_url: str) -> set[str]:
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as session:
        ids = set(session.scalars(select(TrackedOperation.id)))
    engine.dispose()
    return ids


def test_track_task_by_name_and_pickle_is_refused(stack: tuple[str, str], tmp_path: Path) -> None:
    broker, db_url = stack
    env = base_env(tmp_path, OPTRACK_BROKER_URL=broker, OPTRACK_DATABASE_URL=db_url)
    log = tmp_path / "worker.log"
    sender = Celery("another-service", broker=broker)
    sender.conf.broker_connection_retry_on_startup = True
    with celery_process(worker_args("w1"), env, log):
        # FIFO on one worker process: once the JSON task ran, the pickled one was handled.
        sender.send_task("optrack.track", args=[[PICKLED_ID]], serializer="pickle")
        sender.send_task("optrack.track", args=[[JSON_ID]], serializer="json")
        wait_for(lambda: JSON_ID in tracked_ids(db_url), 60, "the JSON task to be handled")
    sender.close()
    assert tracked_ids(db_url) == {JSON_ID}
    text = log.read_text()
    assert "ContentDisallowed" in text or "disallowed" in text.lower()


def test_invalid_ids_from_a_service_write_nothing(stack: tuple[str, str], tmp_path: Path) -> None:
    broker, db_url = stack
    env = base_env(tmp_path, OPTRACK_BROKER_URL=broker, OPTRACK_DATABASE_URL=db_url)
    log = tmp_path / "worker.log"
    sender = Celery("another-service", broker=broker)
    sender.conf.broker_connection_retry_on_startup = True
    with celery_process(worker_args("w1"), env, log):
        sender.send_task("optrack.track", args=[[JSON_ID, "../../etc/passwd"]])
        sender.send_task("optrack.track", args=[[PICKLED_ID]])
        wait_for(lambda: PICKLED_ID in tracked_ids(db_url), 60, "the valid task")
    sender.close()
    assert tracked_ids(db_url) == {PICKLED_ID}
    assert "'../../etc/passwd' is not an operation ID" in log.read_text()


def test_invalid_input_is_rejected_once_with_the_reason_never_retried(
    stack: tuple[str, str], tmp_path: Path
) -> None:
    broker, db_url = stack
    env = base_env(tmp_path, OPTRACK_BROKER_URL=broker, OPTRACK_DATABASE_URL=db_url)
    log = tmp_path / "worker.log"
    sender = Celery("another-service", broker=broker)
    sender.conf.broker_connection_retry_on_startup = True
    with celery_process(worker_args("w1"), env, log):
        not_a_list = sender.send_task("optrack.track", args=[JSON_ID]).id
        bad_id = sender.send_task("optrack.track", args=[[JSON_ID, "not-an-id"]]).id
        malformed = sender.send_task("optrack.poll", args=[1]).id  # one argument of two
        sender.send_task("optrack.track", args=[[PICKLED_ID]])
        wait_for(lambda: PICKLED_ID in tracked_ids(db_url), 60, "the valid task")
    sender.close()
    text = log.read_text()
    assert (
        f"optrack.track[{not_a_list}] rejected, not retried: optrack.track takes a JSON list"
        in text
    )
    assert f"optrack.track[{bad_id}] rejected, not retried: 'not-an-id' is not an operation ID" in (
        text
    )
    for task_id in (not_a_list, bad_id):
        assert text.count(f"Task optrack.track[{task_id}] received") == 1  # once, no retry
    assert tracked_ids(db_url) == {PICKLED_ID}
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as session:
        # Rejected is not a dead letter; a message that failed unforeseen is one.
        (letter,) = dead_letters.letters(session)
        assert (letter.task, letter.task_id, letter.args) == ("optrack.poll", malformed, [1])
        assert letter.reason.startswith("TypeError: ") and letter.deliveries == 1
        assert list(session.scalars(select(TaskDelivery))) == []  # every counter dropped
    engine.dispose()


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_dead_letters_are_shown_listed_and_replayed(stack: tuple[str, str], tmp_path: Path) -> None:
    broker, db_url = stack
    env = base_env(tmp_path, OPTRACK_BROKER_URL=broker, OPTRACK_DATABASE_URL=db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        dead_letters.bury(
            session,
            task_id="given-up-1",
            task="optrack.track",
            args=[[JSON_ID]],
            reason="started 5 times without ending (OPTRACK_MAX_DELIVERIES)",
            deliveries=5,
            now=datetime.now(UTC),
        )
    status = json.loads(run_cli(env, "status", "--json").stdout)
    assert status["dead_letters"] == 1
    assert "1 dead letter(s)" in run_cli(env, "status").stdout
    listed = json.loads(run_cli(env, "dead-letters", "--json").stdout)["dead_letters"]
    assert [(x["task"], x["args"], x["deliveries"]) for x in listed] == [
        ("optrack.track", [[JSON_ID]], 5)
    ]
    usage = run_cli(env, "dead-letters", "replay")
    assert usage.returncode == 2 and "or --all" in usage.stderr
    unknown = run_cli(env, "dead-letters", "replay", "999")
    assert unknown.returncode == 2 and "no dead letter waiting with id 999" in unknown.stderr

    with celery_process(worker_args("w1"), env, tmp_path / "worker.log"):
        replayed = run_cli(env, "dead-letters", "replay", "--all")
        assert replayed.returncode == 0, replayed.stderr
        assert f"replayed dead letter {listed[0]['id']} (optrack.track)" in replayed.stdout
        wait_for(lambda: JSON_ID in tracked_ids(db_url), 60, "the replayed message to run")
    assert json.loads(run_cli(env, "dead-letters", "--json").stdout)["dead_letters"] == []
    assert json.loads(run_cli(env, "status", "--json").stdout)["dead_letters"] == 0
    again = run_cli(env, "dead-letters", "--json", "--replayed")
    (kept,) = json.loads(again.stdout)["dead_letters"]
    assert kept["replayed_at"] is not None and kept["replay_task_id"]
    engine.dispose()


@pytest.mark.parametrize("kind", ["redis", "rabbitmq", "embedded"])
def test_the_tick_reads_how_many_messages_wait_on_every_broker(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """What a tick asks before it claims (``waiting_messages``): 0 for a queue never used
    (on Redis an empty queue is no key), then the messages published and not taken; None for
    a broker that does not answer."""
    if kind == "redis":
        broker = request.getfixturevalue("redis_url")
    elif kind == "rabbitmq":
        broker = request.getfixturevalue("rabbitmq_url")
    else:
        broker = f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    app = Celery("depth", broker=broker, set_as_current=False)
    app.conf.task_default_queue = f"polls-{uuid.uuid4().hex}"
    try:
        assert waiting_messages(app) == 0
        app.send_task("optrack.poll", args=[1, "token"])
        app.send_task("optrack.poll", args=[2, "token"])
        # RabbitMQ routes a publish after the call returns (no publisher confirms).
        wait_for(lambda: waiting_messages(app) == 2, 10, "two messages waiting")
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(app.conf.task_default_queue)
        assert waiting_messages(app) == 0
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(app.conf.task_default_queue)
        app.close()
    gone = Celery("depth", broker=f"redis://127.0.0.1:{free_port()}/0", set_as_current=False)
    gone.conf.broker_transport_options = {"max_retries": 1}
    assert waiting_messages(gone) is None
    gone.close()


# A consumer of the embedded broker that takes one message, says so, and never acknowledges.
TAKE_ONE = """
import sys, time
from kombu import Connection
from worker.broker import kombu_connection
url, transport = kombu_connection(sys.argv[1])
with Connection(url, transport=transport) as conn:
    queue = conn.SimpleQueue("celery")
    queue.get(timeout=30)
    print("taken", flush=True)
    time.sleep(120)
"""


def test_a_message_the_embedded_broker_handed_to_a_killed_process_comes_back(
    tmp_path: Path,
) -> None:
    """A SIGKILLed `optrack run` held an `optrack.track` message it had not acknowledged: a
    new consumer of the embedded broker gets it again (worker.broker: its holder is gone)."""
    broker = f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    sender = Celery("another-service", broker=broker, set_as_current=False)
    sent = sender.send_task("optrack.track", args=[[JSON_ID]]).id
    assert waiting_messages(sender) == 1
    taker = subprocess.Popen(
        [sys.executable, "-c", TAKE_ONE, broker], stdout=subprocess.PIPE, text=True
    )
    try:
        assert taker.stdout is not None and taker.stdout.readline().strip() == "taken"
    finally:
        taker.kill()  # SIGKILL: no clean close, nothing handed back
        taker.wait(timeout=10)
        if taker.stdout is not None:
            taker.stdout.close()
    try:
        assert waiting_messages(sender) == 0  # held by the dead process until a consumer looks
        url, transport = kombu_connection(broker) or ("", "")
        with Connection(url, transport=transport) as conn:
            message = conn.SimpleQueue("celery").get(timeout=30)
            assert (message.headers["id"], message.decode()[0]) == (sent, [[JSON_ID]])
            message.ack()
        assert waiting_messages(sender) == 0
    finally:
        sender.close()
