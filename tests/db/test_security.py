"""Security: the auth token stays secret, TLS is verified, plain http is refused (to the API
and to the webhook), the webhook session takes nothing from the environment, the sandbox
listens on loopback only.

Elsewhere: Celery accepts JSON only, a pickled message is refused
(tests/e2e/test_celery.py::test_track_task_by_name_and_pickle_is_refused); the compose file
publishes no database port and takes its secrets from the environment
(tests/unit/test_compose.py::test_databases_publish_no_ports_and_secrets_come_from_env).
"""

from __future__ import annotations

import ast
import base64
import http.server
import json
import shutil
import ssl
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme

from tests.support.fault_stack import FaultStack, fault_stack
from tests.support.private_services import PG_BIN, private_redis
from tests.support.processes import base_env, sandbox_process, stop, wait_for
from tests.support.services import SID, TOKEN, service_missing
from worker.client import ApiClient, Timeouts
from worker.errors import ConfigError, OptrackError, TransportError
from worker.notices import DeliveryError, Message, WebhookChannel
from worker.retry_after import RetryPolicy
from worker.sandbox import Fault, SandboxServer
from worker.settings import check_base_url, load_settings

ROOT = Path(__file__).resolve().parents[2]
MISSING = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"


def encodings(secret: str) -> list[bytes]:
    """The secret and its traces: the Basic auth header value, and the base64 text that any
    blob containing it turns into (three alignments), as Celery message bodies are base64."""
    raw = secret.encode()
    found = [raw, base64.b64encode(f"{SID}:{secret}".encode())]
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        whole = (offset + len(raw)) // 3 * 4  # base64 groups made only of known bytes
        found.append(encoded[4 if offset else 0 : whole])
    return found


NEEDLES = encodings(TOKEN)


def leaks(blob: bytes | str) -> list[bytes]:
    """Which traces of the token ``blob`` holds."""
    data = blob.encode(errors="surrogateescape") if isinstance(blob, str) else blob
    return [needle for needle in NEEDLES if needle in data]


def test_the_needles_find_the_token_when_it_is_there() -> None:
    body = base64.b64encode(json.dumps({"args": ["x", TOKEN]}).encode())
    assert leaks(body) and leaks(f"Authorization: Basic {NEEDLES[1].decode()}")
    assert leaks(TOKEN) and not leaks("tok-***")


# --- the real stack: every output searched -------------------------------------------------


def redis_contents(port: int) -> list[bytes]:
    """Every key and value in a Redis, Celery message bodies decoded."""
    import redis

    client = redis.Redis(port=port)
    found: list[Any] = []
    for key in client.scan_iter():
        found.append(key)
        kind = client.type(key)
        if kind == b"string":
            found.append(client.get(key) or b"")
        elif kind == b"list":
            found += client.lrange(key, 0, -1)
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                found += [field, value]
        elif kind == b"set":
            found += list(client.smembers(key))
        elif kind == b"zset":
            found += client.zrange(key, 0, -1)
    client.close()
    blobs = [bytes(blob) for blob in found]
    return blobs + [decoded for blob in blobs for decoded in _message_bodies(blob)]


def _message_bodies(blob: bytes) -> list[bytes]:
    try:
        data = json.loads(blob)
    except ValueError:
        return []
    found: list[bytes] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("body"), str):
                try:
                    found.append(base64.b64decode(item["body"]))
                except ValueError:
                    found.append(item["body"].encode())
            stack += list(item.values())
        elif isinstance(item, list):
            stack += item
    return found


def pg_dump(db_url: str) -> bytes:
    """A full dump of a PostgreSQL database (every table, sequence, row)."""
    binary = shutil.which("pg_dump") or str(PG_BIN / "pg_dump")
    if not Path(binary).exists():
        service_missing("pg_dump")
    url = db_url.replace("postgresql+psycopg://", "postgresql://")
    return subprocess.run([binary, url], capture_output=True, check=True, timeout=60).stdout


def optrack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, capture_output=True, timeout=60
    )


def exercise_every_path(stack: FaultStack) -> list[str]:
    """Track operations through errors of every kind, a 401 last; return their IDs."""
    ids = [stack.create(total=6, duration=3, fail_ratio=0.5) for _ in range(3)]
    for fault in (
        {"kind": "status", "status": 500},
        {"kind": "status", "status": 429, "retry_after": "1"},
        {"kind": "status", "status": 400},
        {"kind": "malformed", "variant": "wrong_id"},
        {"kind": "drop"},
        {"kind": "slow", "delay": 2.0},
    ):
        stack.sandbox.fault(**fault)
    stack.track(ids)
    stack.wait_until_all_ended(60)
    # A 401 pauses the account for a minute: last.
    stack.sandbox.fault(kind="status", status=401)
    late = stack.create(total=5, duration=60)
    stack.track([late])
    wait_for(lambda: any(r["status"] == 401 for r in stack.api_log()), 30, "the 401")
    wait_for(lambda: "credentials rejected" in stack.logs(), 30, "the 401 to be logged")
    return [*ids, late]


@pytest.mark.slow
def test_the_token_appears_in_no_output_of_the_real_stack(tmp_path: Path, pg_url: str) -> None:
    outputs: dict[str, bytes] = {}
    with (
        private_redis(tmp_path / "redis") as redis,
        fault_stack(
            tmp_path,
            db_url=pg_url,
            redis=redis,
            OPTRACK_READ_TIMEOUT="1",
            OPTRACK_BAD_REQUEST_BACKOFF="1",  # the 400's operation must end within the test
        ) as stack,
    ):
        ids = exercise_every_path(stack)
        for args in (
            ("status",),
            ("status", "--json"),
            ("history", ids[0]),
            ("history", ids[0], "--json"),
            ("history", ids[0], "--csv"),
            ("track", ids[0]),
            ("track", "../../etc/passwd"),
        ):
            result = optrack(stack.env, *args)
            outputs[f"optrack {' '.join(args)}"] = result.stdout + result.stderr
        assert b"credentials rejected" in outputs["optrack status"]
        # With the workers gone, beat's ticks and a service's task wait in Redis: inspect them.
        for name in ("w1", "w2"):
            stack.stop(name)
        from celery import Celery

        sender = Celery("another-service", broker=redis.url())
        sender.send_task("optrack.track", args=[[MISSING]])
        sender.close()
        wait_for(lambda: len(redis_contents(redis.port)) > 4, 30, "messages queued in Redis")
        outputs["redis"] = b"\n".join(redis_contents(redis.port))
        assert b"optrack.track" in outputs["redis"] and b"optrack.tick" in outputs["redis"]
    outputs["postgresql dump"] = pg_dump(pg_url)
    assert b"credentials rejected" in outputs["postgresql dump"]  # account_pauses.reason
    for path in sorted(tmp_path.rglob("*")):  # logs, beat schedule, Redis's append-only file
        if path.is_file():
            outputs[str(path.relative_to(tmp_path))] = path.read_bytes()
    assert any(name.endswith(".log") for name in outputs)

    found = {name: leaks(blob) for name, blob in outputs.items() if leaks(blob)}
    assert found == {}, f"the auth token leaked into: {sorted(found)}"


@pytest.mark.slow
def test_the_token_appears_in_no_file_of_the_embedded_default(tmp_path: Path) -> None:
    """`optrack run` (SQLite database, SQLite broker, beat embedded): every file it writes."""
    env = base_env(tmp_path, OPTRACK_POLL_INTERVAL="1", OPTRACK_TICK_INTERVAL="0.5")
    (tmp_path / "home").mkdir()  # see test_fuzz.py::test_optrack_track_on_a_fresh_home
    with sandbox_process(env, tmp_path / "sandbox.log") as api:
        env["OPTRACK_API_BASE_URL"] = api.base_url
        ids = [api.create(total=4, duration=2) for _ in range(2)]
        api.fault(kind="status", status=500)
        api.fault(kind="status", status=503, retry_after="1", retry_after_form="date")
        assert optrack(env, "track", *ids).returncode == 0
        with (tmp_path / "run.log").open("wb") as out:
            run = subprocess.Popen(
                [sys.executable, "-m", "worker", "run", "-c", "1"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:

            def ended() -> bool:
                report = json.loads(optrack(env, "status", "--json").stdout)
                return all(op["status"] == "COMPLETED" for op in report["operations"])

            wait_for(ended, 60, "the operations to end")
        finally:
            stop(run)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "broker.sqlite" for p in files)
    found = {str(p.relative_to(tmp_path)): leaks(p.read_bytes()) for p in files}
    assert {name: hits for name, hits in found.items() if hits} == {}


@pytest.mark.real_time
def test_no_exception_or_repr_shows_the_token(sandbox: SandboxServer, make_client) -> None:  # type: ignore[no-untyped-def]
    op = sandbox.add_operation(total=3, duration=60)
    policy = RetryPolicy(max_retry_after=0.05, max_inplace_wait=0.01)
    raised: list[BaseException] = []
    for fault in (
        Fault(kind="status", status=400),
        Fault(kind="status", status=403),
        Fault(kind="status", status=404),
        Fault(kind="status", status=429, retry_after="1"),
        Fault(kind="status", status=500),
        Fault(kind="drop"),
        Fault(kind="slow", delay=3.0),
        Fault(kind="malformed", variant="not_json"),
        Fault(kind="redirect", location=f"https://{SID}:{TOKEN}@elsewhere.example/{TOKEN}"),
    ):
        sandbox.add_fault(fault)
        with pytest.raises(OptrackError) as info:
            make_client(policy=policy).fetch(op.id)
        raised.append(info.value)
    with pytest.raises(OptrackError) as info:
        make_client(token="wrong-" + TOKEN).fetch(op.id)  # 401 from the sandbox itself
    raised.append(info.value)
    for exc in raised:
        shown = "".join(traceback.format_exception(exc)) + repr(exc) + repr(vars(exc))
        assert not leaks(shown), f"{type(exc).__name__} shows the token"
    settings = load_settings({"TWILIO_AUTH_TOKEN": TOKEN, "TWILIO_ACCOUNT_SID": SID})
    assert not leaks(repr(settings)) and not leaks(str(settings))
    assert settings.redacted_token == "***"


# --- TLS -------------------------------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests_seen = 0

    def do_GET(self) -> None:
        type(self).requests_seen += 1
        body = b'{"errors": []}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An https server on 127.0.0.1 with a certificate from a CA nobody trusts; (URL, CA file)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    _Recorder.requests_seen = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}/v1", ca_file
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_tls_is_verified_a_self_signed_server_is_refused(
    tls_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, ca_file = tls_server
    # Not even a CA bundle from the environment is trusted (the session ignores the env).
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(ca_file))
    with ApiClient(url, SID, TOKEN, timeouts=Timeouts(connect=2, read=2)) as client:
        assert client.session.verify is True
        with pytest.raises(TransportError, match="SSLError"):
            client.fetch(MISSING)
    assert _Recorder.requests_seen == 0, "a request (with credentials) got through"
    # The server itself is fine: a client that trusts its CA gets an answer.
    answer = requests.get(f"{url}/SenderPools/Operations/{MISSING}", verify=str(ca_file))
    assert answer.status_code == 404 and _Recorder.requests_seen == 1


def test_no_code_turns_tls_verification_off() -> None:
    offenders = []
    for path in sorted((ROOT / "worker").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.keyword) and node.arg == "verify":
                offenders.append(f"{path.name}:{node.lineno} verify=")
            if not isinstance(node, ast.Attribute):
                continue
            if isinstance(node.ctx, ast.Store) and node.attr in ("verify", "check_hostname"):
                offenders.append(f"{path.name}:{node.lineno} .{node.attr} =")
            if node.attr == "_create_unverified_context":
                offenders.append(f"{path.name}:{node.lineno} unverified context")
    assert offenders == []


# --- plain http --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allow", "accepted"),
    [
        ("https://comms.twilio.com/v1", "", True),
        ("http://127.0.0.1:8900/v1", "", True),
        ("http://localhost:8900/v1", "", True),
        ("http://[::1]:8900/v1", "", True),
        ("http://127.8.9.10/v1", "", True),  # all of 127/8 is loopback
        ("http://comms.twilio.com/v1", "", False),
        ("http://10.0.0.5:8900/v1", "", False),
        ("http://0.0.0.0:8900/v1", "", False),
        ("http://127.0.0.1.evil.example/v1", "", False),
        ("http://localhost.evil.example/v1", "", False),
        ("http://comms.twilio.com/v1", "0", False),
        ("http://comms.twilio.com/v1", "no", False),
        ("http://sandbox:8900/v1", "1", True),
        ("http://sandbox:8900/v1", "true", True),
        ("ftp://comms.twilio.com/v1", "1", False),
        ("comms.twilio.com/v1", "1", False),
        ("https:///v1", "", False),
    ],
)
def test_plain_http_needs_loopback_or_an_explicit_yes(url: str, allow: str, accepted: bool) -> None:
    env = {"OPTRACK_API_BASE_URL": url, "OPTRACK_ALLOW_INSECURE_HTTP": allow}
    if accepted:
        assert load_settings(env).api_base_url == url.rstrip("/")
        return
    with pytest.raises(ConfigError, match="OPTRACK_API_BASE_URL") as info:
        load_settings(env)
    if url.startswith("http://"):
        assert "OPTRACK_ALLOW_INSECURE_HTTP=1" in str(info.value)
    with pytest.raises(ConfigError):
        check_base_url(url, allow_insecure_http=allow in ("1", "true"))


@pytest.mark.parametrize(
    ("url", "allow", "accepted"),
    [
        ("https://hooks.example.com/optrack", "", True),
        ("http://127.0.0.1:9000/hook", "", True),
        ("http://localhost:9000/hook", "", True),
        ("http://[::1]:9000/hook", "", True),
        ("http://hooks.example.com/t0ken", "", False),
        ("http://10.0.0.5:9000/t0ken", "", False),
        ("http://0.0.0.0:9000/t0ken", "", False),
        ("http://127.0.0.1.evil.example/t0ken", "", False),
        ("http://hooks.example.com/t0ken", "0", False),
        ("http://hooks.example.com/t0ken", "1", True),
        ("http://receiver:8080/hook", "true", True),
        ("ftp://hooks.example.com/t0ken", "1", False),
        ("hooks.example.com/t0ken", "", False),
        ("http://[/t0ken", "", False),
    ],
)
def test_plain_http_webhooks_need_loopback_or_an_explicit_yes(
    url: str, allow: str, accepted: bool
) -> None:
    env = {
        "OPTRACK_WEBHOOK_URL": url,
        "OPTRACK_WEBHOOK_SECRET": "whsec-x",
        "OPTRACK_WEBHOOK_ALLOW_INSECURE_HTTP": allow,
    }
    if accepted:
        assert load_settings(env).webhook_url == url
        return
    with pytest.raises(ConfigError, match="OPTRACK_WEBHOOK_URL") as info:
        load_settings(env)
    assert "t0ken" not in str(info.value)  # a webhook URL's path may hold a secret of its own
    if url.startswith("http://") and "[" not in url:
        assert "OPTRACK_WEBHOOK_ALLOW_INSECURE_HTTP=1" in str(info.value)


def test_the_api_http_switch_does_not_open_the_webhook() -> None:
    env = {
        "OPTRACK_WEBHOOK_URL": "http://hooks.example.com/x",
        "OPTRACK_WEBHOOK_SECRET": "whsec-x",
        "OPTRACK_ALLOW_INSECURE_HTTP": "1",
    }
    with pytest.raises(ConfigError, match="OPTRACK_WEBHOOK_ALLOW_INSECURE_HTTP"):
        load_settings(env)


def test_a_plain_http_webhook_stops_the_command_at_start(tmp_path: Path) -> None:
    env = base_env(
        tmp_path,
        OPTRACK_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}",
        OPTRACK_WEBHOOK_URL="http://hooks.example.com/optrack",
        OPTRACK_WEBHOOK_SECRET="whsec-x",
    )
    done = subprocess.run(
        [sys.executable, "-m", "worker", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "OPTRACK_WEBHOOK_URL" in done.stderr
    assert "OPTRACK_WEBHOOK_ALLOW_INSECURE_HTTP=1" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "db.sqlite").exists()  # stopped before anything was written


# --- the webhook session -------------------------------------------------------------------


class _Hop(http.server.BaseHTTPRequestHandler):
    """Records every request; ``/redirect`` answers 302 to ``target``, anything else 204."""

    seen: list[tuple[str, str, dict[str, str]]]
    target = ""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append((self.command, self.path, dict(self.headers.items())))
        if self.path.endswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.target)
        else:
            self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def hop_servers() -> Iterator[list[tuple[str, list[tuple[str, str, dict[str, str]]]]]]:
    """Three recording servers on 127.0.0.1: (URL, requests seen) each."""
    servers, found = [], []
    for _ in range(3):
        seen: list[tuple[str, str, dict[str, str]]] = []
        handler = type("Hop", (_Hop,), {"seen": seen})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        found.append((f"http://127.0.0.1:{server.server_address[1]}", seen))
    yield found
    for server in servers:
        server.shutdown()
        server.server_close()


def test_the_webhook_session_ignores_proxies_and_netrc_and_follows_no_redirect(
    hop_servers: list[tuple[str, list[tuple[str, str, dict[str, str]]]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (hook, hook_seen), (proxy, proxy_seen), (elsewhere, elsewhere_seen) = hop_servers
    _Hop.target = elsewhere + "/stolen"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login intruder password n3trc-secret\n")
    netrc.chmod(0o600)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.setenv("http_proxy", proxy)
    monkeypatch.setenv("NETRC", str(netrc))

    # The environment is live: requests' defaults send through the proxy, with netrc's login.
    with requests.Session() as plain:
        assert plain.post(hook + "/control", data=b"{}", timeout=10).status_code == 204
    [(_, path, headers)] = proxy_seen
    assert path == hook + "/control" and headers["Authorization"].startswith("Basic ")
    proxy_seen.clear()

    message = Message(1, MISSING, {"id": MISSING}, datetime.now(UTC))
    channel = WebhookChannel(hook + "/hooks/optrack", "whsec-x")
    try:
        channel.send(message)
    finally:
        channel.close()
    [(method, path, headers)] = hook_seen
    assert (method, path) == ("POST", "/hooks/optrack")  # straight to the hook, no proxy
    assert "Authorization" not in headers and proxy_seen == []

    redirecting = WebhookChannel(hook + "/redirect", "whsec-x")
    try:
        with pytest.raises(DeliveryError, match="HTTP 302"):
            redirecting.send(message)
    finally:
        redirecting.close()
    assert elsewhere_seen == [] and proxy_seen == []  # the redirect was not followed


# --- the sandbox listens on loopback -------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """Local addresses in LISTEN state on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_the_sandbox_binds_loopback_unless_told(tmp_path: Path) -> None:
    with SandboxServer() as server:
        assert server.host == "127.0.0.1" and server.root_url.startswith("http://127.0.0.1:")
    with sandbox_process(base_env(tmp_path), tmp_path / "sandbox.log") as api:
        port = int(api.base_url.rsplit(":", 1)[1].split("/", 1)[0])
        assert api.base_url.startswith("http://127.0.0.1:")
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, and nothing else
