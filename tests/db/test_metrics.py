"""Prometheus metrics, scraped from the real HTTP endpoint after known polls, on SQLite and
PostgreSQL; counters added up across processes (multiprocess mode), gauges from the database."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from tests.support.services import SID, TOKEN
from worker import dead_letters, sweep
from worker.account import DbGate
from worker.client import ApiClient, Timeouts
from worker.clock import FakeClock
from worker.metrics import Metrics, MetricsServer, build_registry, serve
from worker.poller import Poller
from worker.recorder import Recorder
from worker.repository import GroupClaim, Repository
from worker.retry_after import RetryPolicy
from worker.sandbox import Fault, SandboxServer
from worker.tracking import PollPolicy

MISSING = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
# The first 404 ends tracking (the grace: test_recording.py).
POLICY = PollPolicy(
    interval=timedelta(seconds=10),
    max_interval=timedelta(seconds=10),
    not_found_grace=timedelta(0),
)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    response.raise_for_status()
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def servers() -> Iterator[list[MetricsServer]]:
    started: list[MetricsServer] = []
    yield started
    for server in started:
        server.close()


def test_values_after_a_known_sequence_of_polls(
    sessions: sessionmaker[Session],
    sandbox: SandboxServer,
    db_gate: DbGate,
    clock: FakeClock,
    servers: list[MetricsServer],
) -> None:
    moving = sandbox.add_operation(total=10, duration=3600)
    broken = sandbox.add_operation(total=10, duration=3600)
    sandbox.add_fault(Fault(kind="status", status=429, retry_after="2", match=moving.id))
    sandbox.add_fault(Fault(kind="status", status=500, match=broken.id))
    metrics = Metrics()
    client = ApiClient(
        sandbox.base_url,
        SID,
        TOKEN,
        timeouts=Timeouts(2, 2),
        policy=RetryPolicy(max_inplace_wait=5, max_wake_jitter=0),  # an exact wait, for sums
        gate=db_gate,
        clock=clock,
        observer=metrics,
    )
    start = clock.now()
    with sessions.begin() as session:
        Repository(session).add([moving.id, broken.id, MISSING], start)
    registry = build_registry(sessions, clock, multiproc_dir=None, local=metrics)
    servers.append(serve(registry, "127.0.0.1", 0))
    port = servers[0].port

    before = scrape(port)
    assert value(before, "optrack_operations", status="PENDING") == 3
    assert value(before, "optrack_poll_lag_seconds") == 0
    assert (
        value(
            before, "optrack_api_responses_total", account="default", endpoint="fetch", code="200"
        )
        == 0
    )

    poller = Poller(sessions, client, POLICY, clock, Recorder(sessions, POLICY))
    claims: list[GroupClaim] = []
    sweep.sweep(sessions, start, POLICY, limit=10, paused_until=None, send=claims.append)
    [claim] = claims  # three new operations: one GET group
    counts = poller.poll(claim.group_id, claim.token)
    metrics.observe_polls(counts)  # what the poll task does with the counts
    client.close()
    assert clock.now() == start + timedelta(seconds=2)  # the 429's pause, waited in place
    sweep.place(sessions, clock.now(), POLICY)  # the seen operation joins a group of its own
    # The group of the operation in error was due one interval after its poll started
    # (start + 10 s), the seen one's one interval after it was seen (start + 12 s).
    clock.advance(100)

    after = scrape(port)
    for code, count in (("200", 1), ("429", 1), ("500", 1), ("404", 1)):
        assert (
            value(
                after, "optrack_api_responses_total", account="default", endpoint="fetch", code=code
            )
            == count
        )
    assert value(after, "optrack_account_pauses_total", account="default", code="429") == 1
    assert value(after, "optrack_account_pause_seconds_count") == 1
    assert value(after, "optrack_account_pause_seconds_sum") == 2.0
    assert value(after, "optrack_account_pause_seconds_bucket", le="1.0") == 0
    assert value(after, "optrack_account_pause_seconds_bucket", le="2.0") == 1
    assert value(after, "optrack_polls_total", outcome="changed") == 1
    assert value(after, "optrack_polls_total", outcome="error") == 1
    assert value(after, "optrack_polls_total", outcome="not_found") == 1
    assert value(after, "optrack_polls_total", outcome="unchanged") == 0
    assert value(after, "optrack_history_rows_written_total") == 1
    assert value(after, "optrack_operations", status="PROCESSING") == 1
    assert value(after, "optrack_operations", status="PENDING") == 1
    assert value(after, "optrack_operations", status="NOT_FOUND") == 1
    assert value(after, "optrack_operations", status="COMPLETED") == 0
    assert value(after, "optrack_poll_lag_seconds") == 92.0
    assert value(after, "optrack_notices_pending") == 0
    assert value(after, "optrack_database_up") == 1


COUNTING_PROCESS = """
from worker.metrics import Metrics
m = Metrics()
for _ in range(5):
    m.answered("fetch", 200)
m.answered("list", None)
m.paused(30.0, 503)
"""


def test_counters_add_up_across_processes(
    sessions: sessionmaker[Session],
    clock: FakeClock,
    tmp_path: Path,
    servers: list[MetricsServer],
) -> None:
    folder = tmp_path / "prom"
    folder.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    for _ in range(3):  # three worker processes, one after the other
        subprocess.run([sys.executable, "-c", COUNTING_PROCESS], env=env, check=True, timeout=60)
    registry = build_registry(sessions, clock, multiproc_dir=str(folder))
    servers.append(serve(registry, "127.0.0.1", 0))

    samples = scrape(servers[0].port)
    assert (
        value(
            samples, "optrack_api_responses_total", account="default", endpoint="fetch", code="200"
        )
        == 15
    )
    assert (
        value(
            samples, "optrack_api_responses_total", account="default", endpoint="list", code="none"
        )
        == 3
    )
    assert value(samples, "optrack_account_pauses_total", account="default", code="503") == 3
    assert value(samples, "optrack_account_pause_seconds_sum") == 90.0
    assert value(samples, "optrack_operations", status="PENDING") == 0  # still from the DB


def test_a_database_that_does_not_answer_is_reported(
    clock: FakeClock, tmp_path: Path, servers: list[MetricsServer]
) -> None:
    from worker.db import make_engine, make_sessionmaker

    engine = make_engine(f"sqlite:///{tmp_path / 'missing' / 'no.sqlite'}")
    registry = build_registry(make_sessionmaker(engine), clock, multiproc_dir=None)
    servers.append(serve(registry, "127.0.0.1", 0))
    samples = scrape(servers[0].port)
    assert value(samples, "optrack_database_up") == 0
    engine.dispose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_a_real_worker_with_two_processes_serves_them(
    sqlite_url: str, sandbox: SandboxServer, tmp_path: Path
) -> None:
    ops = [sandbox.add_operation(total=5, duration=3600).id for _ in range(4)]
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(
        OPTRACK_HOME=str(tmp_path / "home"),
        OPTRACK_DATABASE_URL=sqlite_url,
        OPTRACK_API_BASE_URL=sandbox.base_url,
        OPTRACK_TICK_INTERVAL="0.5",
        OPTRACK_POLL_INTERVAL="0.5",
        OPTRACK_BATCH_SIZE="1",
        OPTRACK_METRICS_PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"),
        TWILIO_ACCOUNT_SID=SID,
        TWILIO_AUTH_TOKEN=TOKEN,
    )
    track = [sys.executable, "-m", "worker", "track", *ops]
    subprocess.run(track, env=env, check=True, timeout=60, capture_output=True)
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", "run", "--concurrency", "2"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        samples: Samples = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # waits for start-up, asserts nothing on time
            try:
                samples = scrape(port)
            except requests.ConnectionError:
                samples = {}
            fetched = value(
                samples,
                "optrack_api_responses_total",
                account="default",
                endpoint="fetch",
                code="200",
            )
            if fetched >= 8 and value(samples, "optrack_operations", status="PROCESSING") == 4:
                break
            time.sleep(0.2)
        else:
            log.flush()
            said = (tmp_path / "worker.log").read_text(errors="replace").splitlines()
            tail = "\n".join(said[-60:])
            pytest.fail(f"no polls counted: {samples}\nthe worker's last lines:\n{tail}")
        pids = {p.name.split("_")[-1] for p in (tmp_path / "prom").glob("counter_*.db")}
        assert len(pids) >= 2, "both pool processes counted"
    finally:
        worker.terminate()
        worker.wait(60)
        log.close()


def test_alerting_gauges_pause_credentials_stalest_change_dead_letters(
    sessions: sessionmaker[Session],
    sandbox: SandboxServer,
    db_gate: DbGate,
    clock: FakeClock,
    servers: list[MetricsServer],
) -> None:
    op = sandbox.add_operation(total=10, duration=3600)
    with sessions.begin() as session:
        Repository(session).add([op.id], clock.now())
    registry = build_registry(sessions, clock, multiproc_dir=None, account_sid=SID)
    servers.append(serve(registry, "127.0.0.1", 0))
    port = servers[0].port
    quiet = scrape(port)
    for name in ("optrack_account_paused", "optrack_credentials_rejected"):
        assert value(quiet, name, account="default") == 0, name
        assert (name, (("account", "default"),)) in quiet, name
    assert value(quiet, "optrack_account_active_operations", account="default") == 1
    for name in (
        "optrack_processing_unchanged_seconds",  # PENDING only: nothing PROCESSING yet
        "optrack_dead_letters",
    ):
        assert (name, ()) in quiet and value(quiet, name) == 0, name

    client = ApiClient(sandbox.base_url, SID, TOKEN, timeouts=Timeouts(2, 2), clock=clock)
    Poller(sessions, client, POLICY, clock, Recorder(sessions, POLICY)).refresh([op.id])
    client.close()
    with sessions() as session:
        changed = Repository(session).get(op.id)
        assert changed is not None and changed.remote_updated_at is not None
        stalest = changed.remote_updated_at
    clock.advance(600)
    db_gate.pause(clock.now() + timedelta(seconds=60), "credentials rejected (HTTP 401)", 401)
    later = scrape(port)
    expected = (clock.now() - stalest).total_seconds()
    assert value(later, "optrack_processing_unchanged_seconds") == expected >= 600
    assert value(later, "optrack_account_paused", account="default") == 1
    assert value(later, "optrack_credentials_rejected", account="default") == 1
    clock.advance(61)  # the pause is over; the credentials stand rejected until a 200
    over = scrape(port)
    assert value(over, "optrack_account_paused", account="default") == 0
    assert value(over, "optrack_credentials_rejected", account="default") == 1
    db_gate.paused_until(clock.now())
    db_gate.answered_ok(clock.now())
    assert value(scrape(port), "optrack_credentials_rejected", account="default") == 0

    with sessions.begin() as session:  # a message given up on, then replayed
        dead_letters.bury(
            session,
            task_id="given-up",
            task="optrack.track",
            args=[[op.id]],
            reason="started 5 times without ending",
            deliveries=5,
            now=clock.now(),
        )
    assert value(scrape(port), "optrack_dead_letters") == 1
    with sessions.begin() as session:
        (letter,) = dead_letters.letters(session)
        dead_letters.mark_replayed(session, letter.id, "again", clock.now())
    assert value(scrape(port), "optrack_dead_letters") == 0


def test_the_account_gauges_and_counters_carry_each_accounts_name(
    sessions: sessionmaker[Session], clock: FakeClock, servers: list[MetricsServer]
) -> None:
    from worker.accounts import Accounts

    acme_sid = "AC" + "ac" * 16
    with sessions.begin() as session:
        Accounts(session).add("acme", acme_sid, None, "sealed-opaque", clock.now())
        Repository(session).add(["comms_operation_01h9krwprkeee8fzqspvwy6nq8"], clock.now())
        Repository(session).add(
            [f"comms_operation_01h9krwprkeee8fzqspvwy6nq{n}" for n in "9a"], clock.now(), "acme"
        )
    engine = sessions.kw["bind"]
    DbGate(engine, acme_sid, clock).pause(clock.now() + timedelta(seconds=60), "HTTP 401", 401)
    local = Metrics()
    local.for_account("acme").answered("fetch", 429)
    local.for_account("acme").paused(5.0, 429)
    local.answered("fetch", 200)
    registry = build_registry(sessions, clock, multiproc_dir=None, local=local, account_sid=SID)
    servers.append(serve(registry, "127.0.0.1", 0))
    samples = scrape(servers[0].port)
    active = "optrack_account_active_operations"
    assert value(samples, active, account="default") == 1
    assert value(samples, active, account="acme") == 2
    for name in ("optrack_account_paused", "optrack_credentials_rejected"):
        assert value(samples, name, account="acme") == 1, name
        assert value(samples, name, account="default") == 0, name
    responses = "optrack_api_responses_total"
    assert value(samples, responses, account="acme", endpoint="fetch", code="429") == 1
    assert value(samples, responses, account="default", endpoint="fetch", code="200") == 1
    assert value(samples, responses, account="default", endpoint="fetch", code="429") == 0
    pauses = "optrack_account_pauses_total"
    assert value(samples, pauses, account="acme", code="429") == 1
