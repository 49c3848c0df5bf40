"""Private Redis and PostgreSQL servers that a fault test may stop, kill and restart.

The shared servers on 6379 and 5432 serve other engineers and other tests: never touch them.
These run on free ports, with their files in the test's temporary folder, and are stopped at
the end of the test whatever happens. A missing server binary is a skip outside CI and a
failure with CI=true (``service_missing``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text

from tests.support.services import service_missing
from worker.migrate import upgrade

PG_BIN = Path(os.environ.get("OPTRACK_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    """A TCP port nobody listens on right now (on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


class PrivateRedis:
    """``redis-server`` on a free port; ``stop``/``start`` keep the port (and, with AOF, data)."""

    def __init__(self, folder: Path, *, appendonly: bool = True) -> None:
        if shutil.which("redis-server") is None:
            service_missing("redis-server (to start a private Redis)")
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        assert self.process is None, "already running"
        args = [
            "redis-server",
            *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always"),
            *("--dir", str(self.folder), "--daemonize", "no", "--protected-mode", "yes"),
        ]
        with (self.folder / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        _wait(self.ping, 20, f"the private Redis on port {self.port}")

    def ping(self) -> bool:
        import redis

        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM (Redis writes its AOF and exits) and wait until the port is closed."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        _wait(lambda: not _answers(self.port), 10, "the private Redis to close its port")


@contextmanager
def private_redis(folder: Path, *, appendonly: bool = True) -> Iterator[PrivateRedis]:
    """A running private Redis, stopped at exit."""
    server = PrivateRedis(folder, appendonly=appendonly)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (initdb in a temporary folder) on a free port.

    As root, the server runs as the ``postgres`` OS user (``runuser``), as PostgreSQL refuses
    to run as root; otherwise as the current user.
    """

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
            service_missing(f"PostgreSQL server binaries in {PG_BIN} (to start a private one)")
        # Not under pytest's tmp_path: its folders are private to us, the server's user must
        # be able to reach this one.
        self.folder = Path(tempfile.mkdtemp(prefix="optrack-pg-"))
        self.data = self.folder / "data"
        self.sockets = self.folder / "sockets"
        self.port = free_port()
        self.sockets.mkdir()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.folder, "postgres", "postgres")
            shutil.chown(self.sockets, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_root else []
        result = subprocess.run(
            [*prefix, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr[-2000:]}")

    def init(self) -> None:
        """Create the cluster: trust auth for ``postgres``, no fsync (a test's data only)."""
        self._run(
            str(PG_BIN / "initdb"),
            *("-D", str(self.data), "-U", "postgres", "-A", "trust"),
            *("-E", "UTF8", "--no-sync", "--no-instructions"),
        )

    def _ctl(self, action: str, *extra: str) -> None:
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off -c max_connections=60"
        )
        self._run(
            str(PG_BIN / "pg_ctl"),
            action,
            *("-D", str(self.data), "-o", options, "-l", str(self.folder / "server.log")),
            *("-w", "-t", "60", *extra),
        )

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        self._ctl("start")

    def stop(self) -> None:
        """Stop with ``-m fast``: open connections are cut, as in a real restart."""
        if (self.data / "postmaster.pid").exists():
            self._ctl("stop", "-m", "fast")

    def restart(self) -> None:
        """``pg_ctl restart -m fast``."""
        self._ctl("restart", "-m", "fast")

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_migrated_database(self, name: str = "optrack") -> str:
        """Create database ``name`` and migrate it to head; return its URL."""
        admin = create_engine(self.admin_url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = self.admin_url(name)
        upgrade(url)
        return url


@contextmanager
def private_postgres(keep_log: Path) -> Iterator[PrivatePostgres]:
    """A running private PostgreSQL cluster; stopped and deleted at exit, its log kept."""
    server = PrivatePostgres()
    try:
        server.init()
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            if (server.folder / "server.log").exists():
                shutil.copyfile(server.folder / "server.log", keep_log)
            shutil.rmtree(server.folder, ignore_errors=True)
