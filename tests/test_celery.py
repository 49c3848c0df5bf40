"""Celery with real brokers: Redis, RabbitMQ, and the embedded SQLAlchemy transport on SQLite.

Another service enqueues by task name with plain JSON, without importing optrack.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import select

from tests.processes import base_env, celery_process, wait_for, worker_args
from worker.db import TrackedOperation, make_engine, make_sessionmaker

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
