"""Shared fixtures: the sandbox API, fresh databases on SQLite and PostgreSQL, Redis.

Services are real. Outside CI a missing PostgreSQL or Redis skips the tests that need it;
with CI=true it fails them, so a green CI run always means they ran.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from tests.support.services import (
    IN_CI,
    PG_ADMIN_URL,
    REDIS_URL,
    SID,
    TOKEN,
    InventedApi,
    port_open,
    service_missing,
)
from worker.account import DbGate
from worker.client import ApiClient, Timeouts
from worker.clock import FakeClock
from worker.db import make_engine, make_sessionmaker
from worker.migrate import upgrade
from worker.retry_after import RetryPolicy
from worker.sandbox import SandboxServer

# Hypothesis under CI: the same examples on every run, no example database.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, deadline=None)
hypothesis_settings.load_profile("ci" if IN_CI else "default")


@pytest.fixture
def invented_api() -> Iterator[InventedApi]:
    """A second server on a free port, serving invented stats to whoever comes."""
    server = InventedApi()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def sandbox(clock: FakeClock, request: pytest.FixtureRequest) -> Iterator[SandboxServer]:
    """A sandbox API on a free loopback port, no seeded operations, living on the fake clock
    (a slow answer moves the clock on, nobody waits; ``real_time``: a slow answer really
    waits, for the tests of the client's own read timeout)."""
    real = request.node.get_closest_marker("real_time") is not None
    with SandboxServer(
        account_sid=SID,
        auth_token=TOKEN,
        seed=0,
        clock=lambda: clock.now().timestamp(),
        sleep=None if real else clock.sleep,
    ) as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock starting at the real current time (so HTTP-dates from the sandbox agree)."""
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture(scope="session")
def pg_template() -> str:
    """A migrated PostgreSQL template database; each test copies it."""
    if not port_open("127.0.0.1", 5432):
        service_missing("PostgreSQL on 127.0.0.1:5432")
    name = f"optrack_tpl_{os.getpid()}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    upgrade(PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name)
    return name


def _new_pg_database(template: str) -> tuple[str, str]:
    name = f"optrack_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    admin.dispose()
    return name, PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_pg_database(name: str) -> None:
    """Drop a test database, closing whatever still holds it."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test."""
    template = request.getfixturevalue("pg_template")
    name, url = _new_pg_database(template)
    yield url
    drop_pg_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh, migrated SQLite database file for one test."""
    url = f"sqlite:///{tmp_path / 'optrack.sqlite'}"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """The same test on SQLite and on PostgreSQL."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    """A session factory on the test's database."""
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def make_client(sandbox: SandboxServer, clock: FakeClock):  # type: ignore[no-untyped-def]
    """Build an ApiClient on the sandbox with a fake clock and an optional gate."""
    clients: list[ApiClient] = []

    def build(  # type: ignore[no-untyped-def]
        gate=None,
        policy: RetryPolicy | None = None,
        token: str = TOKEN,
        timeouts: Timeouts | None = None,
    ) -> ApiClient:
        client = ApiClient(
            sandbox.base_url,
            SID,
            token,
            timeouts=timeouts or Timeouts(connect=2, read=2, deadline=10),
            policy=policy or RetryPolicy(max_inplace_wait=5.0),
            gate=gate,
            clock=clock,
        )
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.close()


@pytest.fixture
def db_gate(sessions: sessionmaker[Session], clock: FakeClock) -> DbGate:
    """The database-backed account gate on the test's database."""
    engine = sessions.kw["bind"]
    return DbGate(engine, SID, clock)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A real Redis database, flushed before and after the test."""
    if not port_open("127.0.0.1", 6379):
        service_missing("Redis on 127.0.0.1:6379")
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """A vhost of its own on the shared RabbitMQ (other test runs use the same server)."""
    if not port_open("127.0.0.1", 5672):
        service_missing("RabbitMQ on 127.0.0.1:5672")
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    if not Path(ctl).exists():
        service_missing("rabbitmqctl (to create a test vhost)")
    vhost = f"optrack-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def rabbitmqctl(*args: str) -> None:
        subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)

    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault tests' figures (docs/reliability.md)."""
    from tests.support.fault_stack import summary_lines

    for line in summary_lines():
        terminalreporter.write_line(line)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the test item (``item.rep_call``), for fixtures that say
    more when a test failed."""
    outcome = yield
    setattr(item, f"rep_{call.when}", outcome.get_result())


def pytest_configure(config: pytest.Config) -> None:
    """A temporary folder of this run's own. pytest's default keeps the newest three runs'
    folders under /tmp/pytest-of-USER and deletes older ones when a run starts, a running
    one's included: with another test run on the machine, a worker's SQLite file vanished
    under it mid-test ("database did not answer"). ``--basetemp`` still chooses."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="optrack-tests-")
