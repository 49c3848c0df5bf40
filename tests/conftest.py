"""Shared fixtures: the sandbox API, fresh databases on SQLite and PostgreSQL, Redis.

Services are real. Outside CI a missing PostgreSQL or Redis skips the tests that need it;
with CI=true it fails them, so a green CI run always means they ran.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from worker.client import ApiClient, Timeouts
from worker.clock import FakeClock
from worker.db import make_engine, make_sessionmaker
from worker.migrate import upgrade
from worker.repository import DbGate
from worker.retry_after import RetryPolicy
from worker.sandbox import SandboxServer

IN_CI = os.environ.get("CI", "").lower() == "true"
PG_ADMIN_URL = os.environ.get(
    "OPTRACK_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# A database number per test session, so that two test runs on one machine do not flush
# each other's queues.
REDIS_URL = os.environ.get(
    "OPTRACK_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{1 + os.getpid() % 15}"
)
SID = "AC" + "0" * 32
TOKEN = "tok-" + "s3cr3t" * 4  # recognisable, so tests can search outputs for it
# Hypothesis under CI: the same examples on every run, no example database.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, deadline=None)
hypothesis_settings.load_profile("ci" if IN_CI else "default")


def service_missing(what: str) -> None:
    """Fail under CI, skip elsewhere."""
    message = f"{what} is not reachable"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing service is a failure)")
    pytest.skip(message)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class InventedApi(http.server.ThreadingHTTPServer):
    """Another host that answers every GET with invented stats and no auth: where a
    redirect leads. ``paths`` records what reached it."""

    daemon_threads = True

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.operation: dict[str, object] = {}
        super().__init__(("127.0.0.1", 0), _InventedHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _InventedHandler(http.server.BaseHTTPRequestHandler):
    server: InventedApi

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        path = self.path.split("?", 1)[0]
        op = {**self.server.operation, "id": path.rsplit("/", 1)[-1]}
        page = {"operations": [self.server.operation], "pagination": {"next": None, "self": "x"}}
        body = json.dumps(op if "/Operations/" in path else page).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


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
def sandbox(clock: FakeClock) -> Iterator[SandboxServer]:
    """A sandbox API on a free loopback port, no seeded operations, living on the fake clock."""
    with SandboxServer(
        account_sid=SID, auth_token=TOKEN, seed=0, clock=lambda: clock.now().timestamp()
    ) as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock starting at the real current time (so HTTP-dates from the sandbox agree)."""
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture(scope="session")
def pg_template() -> str:
    """A migrated PostgreSQL template database; each test copies it."""
    if not _port_open("127.0.0.1", 5432):
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
    if not _port_open("127.0.0.1", 6379):
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
    if not _port_open("127.0.0.1", 5672):
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
    from tests.fault_stack import summary_lines

    for line in summary_lines():
        terminalreporter.write_line(line)
