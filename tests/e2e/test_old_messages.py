"""Messages optrack 0.1.0 left in the broker are work after an upgrade, never dead letters.

tests/fixtures/messages_0_1_0.json holds them as 0.1.0 published them (protocol 2: headers,
properties, body ``[args, kwargs, embed]``). They are published raw through kombu onto a real
broker (Redis, and the embedded SQLAlchemy transport on SQLite) and consumed by a real worker
process on the sandbox API. Two things change at publish, and only these: the capture's
operation IDs become the sandbox's, and beat's absolute ``expires`` moves after now (an expired
tick is dropped by Celery, which would prove nothing). 0.1.0's beat tick drives the sweeps.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from sqlalchemy import select

from tests.support.processes import (
    Sandbox,
    base_env,
    celery_process,
    sandbox_process,
    wait_for,
    worker_args,
)
from worker import dead_letters
from worker.db import TaskDelivery, TrackedOperation, make_engine, make_sessionmaker

pytestmark = pytest.mark.slow

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "messages_0_1_0.json").read_text())
MESSAGES: dict[str, dict[str, Any]] = {m["name"]: m for m in FIXTURE["messages"]}
CAPTURED_IDS = (
    "comms_operation_01h9krwprkeee8fzqspvwy6na1",
    "comms_operation_01h9krwprkeee8fzqspvwy6na2",
)
OLD_POLLS = ("poll_by_tick", "poll_by_tick_list", "poll_keyword", "poll_ids_only")


@pytest.fixture(params=["redis", "embedded"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(broker URL, database URL): Redis + PostgreSQL, or SQLite + SQLite (the embedded)."""
    if request.param == "redis":
        return request.getfixturevalue("redis_url"), request.getfixturevalue("pg_url")
    return f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}", request.getfixturevalue("sqlite_url")


def publish(broker: str, name: str, ids: dict[str, str], task_id: str | None = None) -> str:
    """Publish fixture message ``name`` as 0.1.0 did; returns its task id. ``task_id``: a
    new id, as beat gives each of its sends."""
    text = json.dumps(MESSAGES[name])
    for captured, real in ids.items():
        text = text.replace(captured, real)
    message = json.loads(text)
    headers, properties = message["headers"], message["properties"]
    if task_id is not None:
        headers["id"] = headers["root_id"] = properties["correlation_id"] = task_id
    if headers["expires"] is not None:
        headers["expires"] = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    with Connection(broker) as conn:
        conn.Producer().publish(
            json.dumps(message["body"]),
            exchange=properties["delivery_info"]["exchange"],
            routing_key=properties["delivery_info"]["routing_key"],
            headers=headers,
            content_type=message["content-type"],
            content_encoding=message["content-encoding"],
            correlation_id=properties["correlation_id"],
            reply_to=properties["reply_to"],
            delivery_mode=properties["delivery_mode"],
            priority=properties["priority"],
            retry=True,
        )
    return str(headers["id"])


def gets(api: Sandbox, op_id: str) -> int:
    """GET requests the API received for one operation."""
    return sum(1 for r in api.requests() if r["method"] == "GET" and r["path"].endswith(op_id))


def succeeded(log: Path, task: str, task_id: str) -> str:
    """The worker's line saying message ``task_id`` succeeded, with its result; waits for it."""
    pattern = re.compile(rf"Task {re.escape(task)}\[{task_id}\] succeeded in [^\n]*")
    wait_for(lambda: pattern.search(log.read_text()) is not None, 60, f"{task}[{task_id}]")
    found = pattern.search(log.read_text())
    assert found is not None
    return found.group(0)


def polled(db_url: str, ids: list[str]) -> bool:
    """True once every operation of ``ids`` was seen by the API (a GET or a List page)."""
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as session:
        stmt = select(TrackedOperation.id).where(TrackedOperation.last_polled_at.is_not(None))
        seen = set(session.scalars(stmt))
    engine.dispose()
    return seen >= set(ids)


def test_every_message_of_0_1_0_is_done_by_todays_worker(
    stack: tuple[str, str], tmp_path: Path
) -> None:
    broker, db_url = stack
    env = base_env(
        tmp_path,
        OPTRACK_BROKER_URL=broker,
        OPTRACK_DATABASE_URL=db_url,
        # An hour between polls: only a translated old poll makes a group due again.
        OPTRACK_POLL_INTERVAL="3600",
        OPTRACK_POLL_STRATEGY="fetch",  # one GET per operation: the request log names it
    )
    log = tmp_path / "worker.log"
    with sandbox_process(env, tmp_path / "sandbox.log") as api:
        env["OPTRACK_API_BASE_URL"] = api.base_url
        real = [api.create(total=10, duration=3600) for _ in CAPTURED_IDS]
        ids = dict(zip(CAPTURED_IDS, real, strict=True))
        with celery_process(worker_args("w1"), env, log):
            # 0.1.0's tracks (by name, by keyword, its own delay), then beat's four entries.
            sent = {
                name: publish(broker, name, ids)
                for name in (
                    "track_by_name",
                    "track_by_name_keyword",
                    "track_delay",
                    "tick_by_beat",
                    "discover_by_beat",
                    "deliver_notices_by_beat",
                    "prune_by_beat",
                )
            }
            for name, task_id in sent.items():
                succeeded(log, MESSAGES[name]["headers"]["task"], task_id)
            wait_for(lambda: polled(db_url, real), 60, "the first sight of both operations")

            # A tick alone claims nothing: the next poll of every group is an hour away.
            control = publish(broker, "tick_by_beat", ids, str(uuid.uuid4()))
            assert "'claimed': 0}" in succeeded(log, "optrack.tick", control)
            # Each old poll, then a tick: both operations are asked again.
            for name in OLD_POLLS:
                before = {i: gets(api, i) for i in real}
                sent[name] = publish(broker, name, ids)
                tick = publish(broker, "tick_by_beat", ids, str(uuid.uuid4()))
                assert "'groups': 1, 'waiting': 0}" in succeeded(log, "optrack.poll", sent[name])
                assert "'claimed': 1}" in succeeded(log, "optrack.tick", tick)
                wait_for(
                    lambda: all(gets(api, i) > before[i] for i in real),  # noqa: B023  (waited here)
                    60,
                    f"the operations of {name} to be polled",
                )

    text = log.read_text()
    for name in OLD_POLLS:
        assert f"optrack.poll[{sent[name]}] received" in text
    assert text.count("a message of optrack 0.1.0 for 2 operation(s)") == len(OLD_POLLS)
    assert " ERROR" not in text and "Traceback" not in text and "dead letter" not in text
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as session:
        assert set(session.scalars(select(TrackedOperation.id))) == set(real)
        assert dead_letters.letters(session) == []
        assert list(session.scalars(select(TaskDelivery))) == []
    engine.dispose()
