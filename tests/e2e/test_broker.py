"""The embedded broker (``worker.broker``) with real processes on a real SQLite broker file.

A done message is deleted; a live holder keeps what it holds; a dead one's messages come
back (its process gone: at once; frozen, not renewing: once its lease ended, which the clock
proves); what an older release left taken is settled once; two workers on one file run every
message once. The witnesses are the broker file's rows, the clock and the processes' logs.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from celery import Celery
from kombu import Connection
from sqlalchemy import select
from sqlalchemy import text as sa_text

from tests.support.processes import base_env, celery_process, wait_for, worker_args
from worker.broker import kombu_connection
from worker.db import TrackedOperation, make_engine, make_sessionmaker

pytestmark = pytest.mark.slow

# A consumer of the embedded broker, as a worker's main process is one: it takes one message,
# says so with the message's row, and acknowledges it when a line comes on stdin.
HOLD = """
import sys
from kombu import Connection
from worker.broker import kombu_connection
url, transport = kombu_connection(sys.argv[1])
options = {"hold_lease": float(sys.argv[2])}
with Connection(url, transport=transport, transport_options=options) as conn:
    message = conn.SimpleQueue("celery").get(timeout=60)
    print("taken", message.payload, flush=True)
    sys.stdin.readline()
    message.ack()
    print("acked", flush=True)
"""

# A consumer of 0.x, on kombu's own transport: takes ``n`` messages and acknowledges all but
# the last (kombu leaves them visible=0), then holds that one until it is killed.
OLD_RELEASE = """
import sys, time
from kombu import Connection
with Connection(sys.argv[1]) as conn:
    queue = conn.SimpleQueue("celery")
    for left in range(int(sys.argv[2]), 0, -1):
        message = queue.get(timeout=60)
        if left > 1:
            message.ack()
    print("holding", message.payload, flush=True)
    time.sleep(600)
"""


def broker_url(tmp_path: Path) -> str:
    return f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"


def rows(tmp_path: Path, query: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(tmp_path / "broker.sqlite", timeout=30)
    try:
        return db.execute(query).fetchall()
    finally:
        db.close()


def messages(tmp_path: Path) -> list[tuple[Any, ...]]:
    """(id, visible) of every message row."""
    return rows(tmp_path, "SELECT id, visible FROM kombu_message ORDER BY id")


def holds(tmp_path: Path) -> list[tuple[Any, ...]]:
    """(message id, pid, lease end) of every hold row."""
    return rows(tmp_path, "SELECT message_id, pid, lease_until FROM optrack_broker_hold")


@contextmanager
def consumer(tmp_path: Path, lease: float = 60.0) -> Iterator[Any]:
    """A SimpleQueue on the embedded broker through optrack's transport, in this process."""
    url, transport = kombu_connection(broker_url(tmp_path)) or ("", "")
    with Connection(url, transport=transport, transport_options={"hold_lease": lease}) as conn:
        queue = conn.SimpleQueue("celery")
        try:
            yield queue
        finally:
            queue.close()


def publish(tmp_path: Path, *payloads: dict[str, Any]) -> None:
    """Put messages on the queue as any kombu client does."""
    with Connection(broker_url(tmp_path)) as conn:
        queue = conn.SimpleQueue("celery")
        for payload in payloads:
            queue.put(payload)
        queue.close()


@contextmanager
def holder(tmp_path: Path, lease: float) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A process that took one message and holds it; (process, the line it printed)."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, broker_url(tmp_path), str(lease)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        yield process, process.stdout.readline().strip()
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
        process.communicate(timeout=30)


def test_a_live_consumers_message_is_never_given_to_another(tmp_path: Path) -> None:
    publish(tmp_path, {"n": 1})
    with holder(tmp_path, lease=1.0) as (process, line):
        assert line == "taken {'n': 1}"
        ((message_id, pid, first_lease_end),) = holds(tmp_path)
        assert pid == process.pid
        asked_after = []
        with consumer(tmp_path, lease=1.0) as queue:
            # Three leases past the holder's first one: a lease that was not renewed would
            # have been given back (a consumer looks every quarter lease).
            while (now := time.time()) < first_lease_end + 3.0:
                with pytest.raises(Empty):
                    queue.get(timeout=0.2)
                asked_after.append(now > first_lease_end)
        assert any(asked_after)
        ((held, still_pid, lease_end),) = holds(tmp_path)
        assert (held, still_pid) == (message_id, process.pid) and lease_end > first_lease_end
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write("ack\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "acked"
        assert (messages(tmp_path), holds(tmp_path)) == ([], [])


def test_a_frozen_consumers_message_comes_back_once_its_lease_ended(tmp_path: Path) -> None:
    publish(tmp_path, {"n": 1})
    # A lease of 3 s: renewed every 0.75 s, so it is seldom stopped inside a renewal (which
    # would hold SQLite's write lock while stopped).
    with holder(tmp_path, lease=3.0) as (process, line):
        assert line == "taken {'n': 1}"
        process.send_signal(signal.SIGSTOP)  # alive, but it renews nothing any more
        ((message_id, _, lease_end),) = holds(tmp_path)
        with consumer(tmp_path, lease=3.0) as queue:
            message = queue.get(timeout=60)
            received = time.time()
            assert message.payload == {"n": 1}
            assert received > lease_end  # given back only once the lease had ended
            assert holds(tmp_path)[0][:2] == (message_id, os.getpid())
            message.ack()
        assert messages(tmp_path) == []
        # Woken, the old holder acknowledges what it no longer holds: nothing of another's.
        process.send_signal(signal.SIGCONT)
        assert process.stdin is not None
        process.stdin.write("ack\n")
        process.stdin.flush()
        _, err = process.communicate(timeout=30)
        assert f"message {message_id} was given back while this process held it" in err


def test_a_killed_consumers_message_comes_back_before_its_lease_ends(tmp_path: Path) -> None:
    publish(tmp_path, {"n": 1}, {"n": 2})
    with holder(tmp_path, lease=600.0) as (process, line):
        assert line == "taken {'n': 1}"
        ((_, _, lease_end),) = holds(tmp_path)
        process.kill()
        process.wait(timeout=30)
        with consumer(tmp_path) as queue:
            got = [queue.get(timeout=30), queue.get(timeout=30)]
            assert time.time() < lease_end  # its process is gone: no lease to wait for
            assert sorted(m.payload["n"] for m in got) == [1, 2]
            for message in got:
                message.ack()
    assert (messages(tmp_path), holds(tmp_path)) == ([], [])


def test_what_an_older_release_left_taken_is_settled_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """0.x (kombu's own transport) took four messages, acknowledged three (still visible=0:
    done) and was killed holding the fourth; one more waits. The first consumer of this
    release gives back the rows taken within the window of the last take, the killed one's
    among them, and deletes the older ones; a later start finds nothing to settle."""
    publish(tmp_path, *({"n": n} for n in range(1, 6)))
    old = subprocess.Popen(
        [sys.executable, "-c", OLD_RELEASE, broker_url(tmp_path), "4"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert old.stdout is not None and old.stdout.readline().strip() == "holding {'n': 4}"
    finally:
        old.kill()
        old.communicate(timeout=30)
    assert [visible for _, visible in messages(tmp_path)] == [0, 0, 0, 0, 1]
    # Messages 1 and 2 were done long ago: taken two hours before the last take.
    db = sqlite3.connect(tmp_path / "broker.sqlite")
    with db:
        db.execute(
            "UPDATE kombu_message SET timestamp = datetime(timestamp, '-2 hours') WHERE id <= 2"
        )
    db.close()
    window = timedelta(minutes=36).total_seconds()  # the default's visibility_timeout
    url, transport = kombu_connection(broker_url(tmp_path)) or ("", "")
    options = {"legacy_window": window}
    with (
        caplog.at_level(logging.WARNING, logger="worker.broker"),
        Connection(url, transport=transport, transport_options=options) as conn,
    ):
        queue = conn.SimpleQueue("celery")
        got = []
        while True:
            try:
                got.append(queue.get(timeout=2))
            except Empty:
                break
        # The killed one's (4) and a done one within the window (3, done again: at
        # least once), and the one that waited; 1 and 2 are gone.
        assert sorted(m.payload["n"] for m in got) == [3, 4, 5]
        for message in got:
            message.ack()
        queue.close()
    assert (messages(tmp_path), holds(tmp_path)) == ([], [])
    assert (
        "an older release left 4 message(s) taken: 2 taken within 2160 s of its last take "
        "given back (one may have been held by a killed process), 2 older deleted as done"
    ) in caplog.text
    # A later start (a new process) finds nothing of the older release's to settle.
    publish(tmp_path, {"n": 6})
    again = subprocess.run(
        [sys.executable, "-c", HOLD, broker_url(tmp_path), "60"],
        input="ack\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.stdout.splitlines() == ["taken {'n': 6}", "acked"]
    assert "older release" not in again.stderr
    assert (messages(tmp_path), holds(tmp_path)) == ([], [])


def tracked_ids(db_url: str) -> set[str]:
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as session:
        ids = set(session.scalars(select(TrackedOperation.id)))
    engine.dispose()
    return ids


def test_two_workers_on_one_broker_file_run_every_message_once_and_leave_nothing(
    sqlite_url: str, tmp_path: Path
) -> None:
    """60 `optrack.track` messages from another service, two workers of two processes each on
    the same SQLite broker file: every message received once, in one worker; every one done;
    the broker's tables empty once the workers stopped (kombu's would hold 60 taken rows)."""
    broker = broker_url(tmp_path)
    env = base_env(tmp_path, OPTRACK_BROKER_URL=broker, OPTRACK_DATABASE_URL=sqlite_url)
    ids = [f"comms_operation_01h9krwprkeee8fzqspvwy6{n:03d}" for n in range(60)]
    sender = Celery("another-service", broker=broker, set_as_current=False)
    sent = [sender.send_task("optrack.track", args=[[op]]).id for op in ids]
    sender.close()
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    with (
        celery_process(worker_args("w1", concurrency=2), env, logs[0]),
        celery_process(worker_args("w2", concurrency=2), env, logs[1]),
    ):
        wait_for(lambda: tracked_ids(sqlite_url) == set(ids), 120, "every track to be done")
        wait_for(lambda: messages(tmp_path) == [], 60, "every done message to be deleted")
    text = "".join(log.read_text() for log in logs)
    received = re.findall(r"Task optrack\.track\[([0-9a-f-]+)\] received", text)
    assert sorted(received) == sorted(sent)  # each once
    assert "database is locked" not in text and "gave back" not in text
    assert (messages(tmp_path), holds(tmp_path)) == ([], [])


def test_on_postgresql_a_killed_consumers_message_comes_back_and_done_is_deleted(
    pg_url: str,
) -> None:
    """The same transport on `sqla+postgresql://` (FOR UPDATE SKIP LOCKED, kombu's sequences)."""
    broker = "sqla+" + pg_url
    with Connection(broker) as conn:  # another service publishes with kombu's own transport
        queue = conn.SimpleQueue("celery")
        queue.put({"n": 1})
        queue.close()
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, broker, "600"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "taken {'n': 1}"
    finally:
        process.kill()
        process.communicate(timeout=30)
    url, transport = kombu_connection(broker) or ("", "")
    with Connection(url, transport=transport) as conn:
        queue = conn.SimpleQueue("celery")
        message = queue.get(timeout=30)
        assert message.payload == {"n": 1}
        message.ack()
        queue.close()
    engine = make_engine(pg_url)
    with engine.connect() as db:
        left = db.execute(sa_text("SELECT count(*) FROM kombu_message")).scalar_one()
        held = db.execute(sa_text("SELECT count(*) FROM optrack_broker_hold")).scalar_one()
    engine.dispose()
    assert (left, held) == (0, 0)


def test_a_message_taken_without_acknowledgement_is_deleted_when_handed_out(
    tmp_path: Path,
) -> None:
    """`no_ack` consumers and gets: nothing will acknowledge, so nothing is held."""
    publish(tmp_path, {"n": 1}, {"n": 2})
    url, transport = kombu_connection(broker_url(tmp_path)) or ("", "")
    with Connection(url, transport=transport) as conn:
        consumed = conn.SimpleQueue("celery", no_ack=True)
        assert consumed.get(timeout=30).payload == {"n": 1}
        assert [n for n, _ in messages(tmp_path)] == [2]
        consumed.close()
        got = conn.default_channel.basic_get("celery", no_ack=True)
        assert conn.default_channel.message_to_python(got).payload == {"n": 2}
    assert (messages(tmp_path), holds(tmp_path)) == ([], [])
