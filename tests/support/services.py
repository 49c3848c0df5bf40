"""What the tests share besides fixtures: where the services are, the test credentials, and a
fake host that answers with invented stats (where a redirect would lead).

Test modules import these from here, never from ``conftest``.
"""

from __future__ import annotations

import http.server
import json
import os
import socket

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
PG_ADMIN_URL = os.environ.get(
    "OPTRACK_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# A database number per test session, so that two test runs on one machine do not flush
# each other's queues; 12 and 13 are the benchmarks' (bench.accounts, bench.sweep and
# bench.stream), which flush theirs.
REDIS_URL = os.environ.get(
    "OPTRACK_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{1 + os.getpid() % 11}"
)
SID = "AC" + "0" * 32
TOKEN = "tok-" + "s3cr3t" * 4  # recognisable, so tests can search outputs for it


def service_missing(what: str) -> None:
    """Fail under CI, skip elsewhere."""
    message = f"{what} is not reachable"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing service is a failure)")
    pytest.skip(message)


def port_open(host: str, port: int) -> bool:
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
