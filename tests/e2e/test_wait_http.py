"""Waiting over HTTP on the real stack (sandbox, worker, beat and `optrack serve` as processes on
PostgreSQL and Redis), over real sockets: the long poll ``?wait=&after=`` and the event stream,
resumed with Last-Event-ID."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine, text

from tests.support.processes import (
    Sandbox,
    Served,
    base_env,
    beat_args,
    celery_process,
    sandbox_process,
    serve_process,
    wait_for,
    worker_args,
)

pytestmark = pytest.mark.slow
HTTP_TOKEN = "wait-" + "l0ngp0ll" * 4
AUTH = {"Authorization": f"Bearer {HTTP_TOKEN}"}
UNKNOWN = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"  # valid, but the sandbox never made it
# A transaction of a long poll's or a stream's read still open a quarter of a second after its
# last statement: one kept across a sleep (0.5 s) would be; a look ends in milliseconds.
HELD = text(
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    " AND state LIKE 'idle in transaction%' AND now() - state_change > interval '0.25 seconds'"
    " AND (query LIKE '%max(operation_history.seq)%' OR query LIKE '%ORDER BY notices.id%')"
)


@pytest.fixture
def stack(tmp_path: Path, redis_url: str, pg_url: str) -> Iterator[tuple[Sandbox, Served, str]]:
    env = base_env(
        tmp_path,
        OPTRACK_DATABASE_URL=pg_url,
        OPTRACK_BROKER_URL=redis_url,
        OPTRACK_POLL_INTERVAL="1",
        OPTRACK_TICK_INTERVAL="0.5",
        OPTRACK_NOT_FOUND_GRACE="0",
        OPTRACK_HTTP_TOKEN=HTTP_TOKEN,
    )
    with ExitStack() as stack, sandbox_process(env, tmp_path / "sandbox.log") as api:
        env["OPTRACK_API_BASE_URL"] = api.base_url
        stack.enter_context(celery_process(worker_args("w1"), env, tmp_path / "w1.log"))
        stack.enter_context(celery_process(beat_args(tmp_path / "sched"), env, tmp_path / "b.log"))
        served = stack.enter_context(serve_process(env, tmp_path / "serve.log"))
        yield api, served, pg_url


def get(served: Served, path: str, **params: Any) -> requests.Response:
    return requests.get(served.url + path, params=params, headers=AUTH, timeout=90)


def track(served: Served, *ids: str) -> None:
    answer = requests.post(
        served.url + "/api/v1/operations", json={"ids": list(ids)}, headers=AUTH, timeout=10
    )
    assert answer.status_code == 200, answer.text


@dataclass
class Stream:
    """An SSE stream read by a thread: its events (id, event, data) and comments, as they come."""

    response: requests.Response
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    comments: list[tuple[float, str]] = field(default_factory=list)

    def read(self) -> None:
        fields: dict[str, str] = {}
        try:
            for line in self.response.iter_lines(chunk_size=1, decode_unicode=True):
                if line.startswith(":"):
                    self.comments.append((time.monotonic(), line))
                elif line:
                    name, _, value = line.partition(": ")
                    fields[name] = value
                elif "data" in fields:
                    self.events.append((fields["id"], fields["event"], json.loads(fields["data"])))
                    fields = {}
                else:
                    fields = {}
        except (requests.RequestException, AttributeError, ValueError):
            return  # closed by the test

    def ended(self, op_id: str) -> bool:
        return any(kind == "end" and data["id"] == op_id for _, kind, data in self.events)


@pytest.fixture
def streams() -> Iterator[Any]:
    opened: list[Stream] = []

    def open_stream(served: Served, last_event_id: str | None = None, **params: str) -> Stream:
        headers = dict(AUTH)
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        response = requests.get(
            served.url + "/api/v1/events", params=params, headers=headers, stream=True, timeout=60
        )
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = Stream(response)
        threading.Thread(target=stream.read, daemon=True).start()
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        stream.response.close()


def test_long_poll_answers_at_each_step_and_at_the_end(
    stack: tuple[Sandbox, Served, str],
) -> None:
    api, served, _ = stack
    op = api.create(total=8, duration=6)
    still = api.create(total=1, duration=300)  # no step for minutes
    track(served, op, still)
    first = get(served, f"/api/v1/operations/{op}").json()
    seen = [first["seq"]]
    answers = 0
    while True:
        started = time.monotonic()
        answer = get(served, f"/api/v1/operations/{op}", wait="30s", after=seen[-1] or 0)
        assert answer.status_code == 200
        record = answer.json()
        assert time.monotonic() - started < 20  # a step comes every second or so
        answers += 1
        if record["status"] in ("COMPLETED", "CANCELED", "NOT_FOUND"):
            break
        assert record["seq"] > (seen[-1] or 0)  # answered because of a step after `after`
        seen.append(record["seq"])
    assert record["status"] == "COMPLETED" and record["created"] == 8
    assert answers >= 2 and seen == sorted(set(seen), key=lambda s: s or 0)

    started = time.monotonic()  # already ended: at once
    assert get(served, f"/api/v1/operations/{op}", wait="60s").json()["status"] == "COMPLETED"
    assert time.monotonic() - started < 2

    current = get(served, f"/api/v1/operations/{still}").json()
    wait_for(
        lambda: get(served, f"/api/v1/operations/{still}").json()["seq"] is not None, 30, "a step"
    )
    current = get(served, f"/api/v1/operations/{still}").json()
    started = time.monotonic()  # nothing happens: 200 with the record when the wait runs out
    answer = get(served, f"/api/v1/operations/{still}", wait="2s", after=current["seq"])
    took = time.monotonic() - started
    assert answer.status_code == 200 and 1.9 <= took < 5
    assert answer.json()["seq"] == current["seq"] and answer.json()["status"] == "PROCESSING"

    too_long = get(served, f"/api/v1/operations/{still}", wait="61s")
    assert too_long.status_code == 422
    assert "at most 60s" in too_long.json()["errors"][0]["reason"]
    assert get(served, f"/api/v1/operations/{UNKNOWN}", wait="5s").status_code == 404


def test_waiting_clients_hold_no_thread_and_no_connection(
    stack: tuple[Sandbox, Served, str], streams: Any, request: pytest.FixtureRequest
) -> None:
    api, served, pg_url = stack
    still = api.create(total=1, duration=300)
    track(served, still)
    wait_for(
        lambda: get(served, f"/api/v1/operations/{still}").json()["seq"] is not None, 30, "a step"
    )
    seq = get(served, f"/api/v1/operations/{still}").json()["seq"]
    for _ in range(5):
        streams(served)
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    request.addfinalizer(engine.dispose)
    # More waiters than the server's thread pool (40): a waiting request must hold none.
    with ThreadPoolExecutor(max_workers=60) as pool:
        waits = [
            pool.submit(get, served, f"/api/v1/operations/{still}", wait="8s", after=seq)
            for _ in range(60)
        ]
        time.sleep(2)
        for _ in range(5):
            started = time.monotonic()
            assert get(served, "/api/v1/account").status_code == 200  # a sync route: a thread
            assert time.monotonic() - started < 1.5
            with engine.connect() as conn:
                held = conn.scalar(HELD)
            assert held == 0  # no transaction of a look kept open between looks
            time.sleep(0.3)
        assert all(w.result().status_code == 200 for w in waits)


def test_the_event_stream_and_its_resume_with_last_event_id(
    stack: tuple[Sandbox, Served, str], streams: Any
) -> None:
    api, served, _ = stack
    quiet = api.create(total=1, duration=300)
    track(served, quiet)
    everything = streams(served)
    only_quiet = streams(served, ids=quiet)  # a step at most: its heartbeats show
    a = api.create(total=6, duration=4)
    b = api.create(total=10, duration=4, outcome="CANCELED")
    track(served, a, b, UNKNOWN)
    wait_for(lambda: all(everything.ended(op) for op in (a, b, UNKNOWN)), 90, "three ends streamed")
    events = list(everything.events)
    ids = [event_id for event_id, _, _ in events]
    parts = [tuple(int(p) for p in i.split("-")) for i in ids]
    assert parts == sorted(parts) and len(set(ids)) == len(ids)
    kinds = {(data["id"], kind, data["status"]) for _, kind, data in events}
    assert (a, "end", "COMPLETED") in kinds and (a, "change", "COMPLETED") in kinds
    assert (b, "end", "CANCELED") in kinds and (UNKNOWN, "end", "NOT_FOUND") in kinds
    changes_of_a = [d["seq"] for _, k, d in events if k == "change" and d["id"] == a]
    assert changes_of_a == sorted(changes_of_a) and len(changes_of_a) >= 2

    # Resumed after the k-th event: exactly the events after it, none twice, each kind (and
    # each operation's events) in the same order; a change and an end of two operations may
    # interleave differently, and their ids say where the feed was when each was sent.
    k = len(events) // 3
    resumed = streams(served, last_event_id=ids[k])
    missed = [(kind, data) for _, kind, data in events[k + 1 :]]
    wait_for(lambda: len(resumed.events) >= len(missed), 20, "the missed events")
    time.sleep(1.5)  # and nothing more
    got = [(kind, data) for _, kind, data in resumed.events]
    assert len(got) == len(missed)
    for kind in ("change", "end"):
        assert [e for e in got if e[0] == kind] == [e for e in missed if e[0] == kind]
    for op_id in (a, b, UNKNOWN):
        assert [e for e in got if e[1]["id"] == op_id] == [e for e in missed if e[1]["id"] == op_id]
    resumed_ids = [tuple(int(p) for p in i.split("-")) for i, _, _ in resumed.events]
    assert resumed_ids == sorted(resumed_ids) and resumed_ids[0] > parts[k]
    # Filtered from the start: only a's events, the same as in the full stream.
    only_a = streams(served, last_event_id="0-0", ids=a)
    wait_for(lambda: only_a.ended(a), 20, "a's end")
    assert [e[1:] for e in only_a.events] == [e[1:] for e in events if e[2]["id"] == a]

    # A heartbeat comment after 15 s of quiet.
    wait_for(lambda: any("heartbeat" in c for _, c in only_quiet.comments), 40, "a heartbeat")
    bad = requests.get(
        served.url + "/api/v1/events", headers={**AUTH, "Last-Event-ID": "x"}, timeout=10
    )
    assert bad.status_code == 422
    assert get(served, "/api/v1/events", ids="not-an-id").status_code == 422
