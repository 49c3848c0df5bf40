"""Real notices, sent by the dispatcher over real sockets, verified by the ``standardwebhooks``
library in a receiver as a user would write it: every secret of a rotation, a legacy secret,
the deprecated header beside, a retry's stable webhook-id, a tampered body refused.

The library checks ``webhook-timestamp`` against the wall clock (5 minutes either way), so the
dispatcher's clock starts at the real time; a fake one only to move past a retry's backoff.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from worker.clock import FakeClock
from worker.db import TrackedOperation
from worker.notices import DeliveryPolicy, WebhookChannel, deliver_pending, record_end
from worker.repository import Repository
from worker.settings import load_settings
from worker.webhooks import WebhookSignatureError, verify

NEW = "whsec_" + base64.b64encode(b"new-key-" * 4).decode()
OLD = "whsec_" + base64.b64encode(b"old-key-" * 3).decode()
LEGACY = "legacy-" + "s3cr3t" * 4
OP_IDS = [f"comms_operation_01h9krwprkeee8fzqspvwy6p{i:02d}" for i in range(4)]


class StandardReceiver:
    """A webhook endpoint that verifies with ``standardwebhooks.Webhook(secret)`` only."""

    def __init__(self, secret: str | bytes) -> None:
        self.hook = Webhook(secret)
        self.accepted: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.refused: list[str] = []
        self.fail_next = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                code = receiver.receive(body, dict(self.headers.items()))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def receive(self, body: bytes, headers: dict[str, str]) -> int:
        with self.lock:
            try:
                notice = self.hook.verify(body, headers)
            except WebhookVerificationError as exc:
                self.refused.append(str(exc))
                return 401
            if self.fail_next:
                self.fail_next -= 1
                return 503
            self.accepted.append(({k.lower(): v for k, v in headers.items()}, notice))
            return 204

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[dict[str, StandardReceiver]]:
    made = {
        "new": StandardReceiver(NEW),
        "old": StandardReceiver(OLD),
        "legacy": StandardReceiver(LEGACY.encode()),  # a legacy secret: its UTF-8 bytes
        "other": StandardReceiver("whsec_" + base64.b64encode(b"x" * 32).decode()),
    }
    yield made
    for receiver in made.values():
        receiver.close()


def end(sessions: sessionmaker[Session], op_ids: list[str], now: datetime) -> None:
    with sessions.begin() as session:
        Repository(session).add(op_ids, now)
    for op_id in op_ids:
        with sessions.begin() as session:
            row = session.get(TrackedOperation, op_id)
            assert row is not None
            row.status, row.ended_at = "COMPLETED", now
            row.total, row.queued, row.created, row.failed = 3, 0, 3, 0
            record_end(session, row, now)


def secrets_of(raw: str) -> tuple[str, ...]:
    """The secrets as optrack reads them from its environment."""
    env = {"OPTRACK_WEBHOOK_URL": "http://127.0.0.1/x", "OPTRACK_WEBHOOK_SECRET": raw}
    return load_settings(env).webhook_secrets


def deliver_to(
    receiver: StandardReceiver,
    secrets: tuple[str, ...],
    sessions: sessionmaker[Session],
    clock: FakeClock,
) -> list[str]:
    channel = WebhookChannel(receiver.url, secrets)
    try:
        report = deliver_pending(sessions, clock, [channel], DeliveryPolicy(jitter=0))
    finally:
        channel.close()
    return sorted(report.delivered)


def test_a_receiver_with_either_secret_of_a_rotation_verifies_every_notice(
    sessions: sessionmaker[Session], clock: FakeClock, receivers: dict[str, StandardReceiver]
) -> None:
    secrets = secrets_of(f"{NEW}, {OLD}")
    assert secrets == (NEW, OLD)
    for name, op_id in zip(("new", "old", "other"), OP_IDS, strict=False):
        end(sessions, [op_id], clock.now())
        delivered = deliver_to(receivers[name], secrets, sessions, clock)
        assert delivered == ([] if name == "other" else [op_id]), name
    for name in ("new", "old"):
        [(headers, notice)] = receivers[name].accepted
        assert headers["webhook-id"] == str(notice["notice_id"])
        assert headers["webhook-timestamp"] == str(int(clock.now().timestamp()))
        assert len(headers["webhook-signature"].split(" ")) == 2  # one v1 per secret
        # The deprecated header is still sent, and still verifies with either secret.
        body = json.dumps(notice, sort_keys=True, separators=(",", ":")).encode()
        for secret in secrets:
            verify(secret, body, headers["x-optrack-signature"], clock.now())
    assert receivers["other"].accepted == []
    assert receivers["other"].refused == ["No matching signature found"]


def test_a_legacy_secret_keeps_working_its_utf8_bytes_the_key(
    sessions: sessionmaker[Session], clock: FakeClock, receivers: dict[str, StandardReceiver]
) -> None:
    secrets = secrets_of(LEGACY)
    end(sessions, OP_IDS[:1], clock.now())
    assert deliver_to(receivers["legacy"], secrets, sessions, clock) == OP_IDS[:1]
    [(headers, _notice)] = receivers["legacy"].accepted
    with pytest.raises(WebhookSignatureError):  # the old header with another secret: refused
        verify("not-it", b"{}", headers["x-optrack-signature"], clock.now())
    # Moving on: the whsec_ secret beside the legacy one, each receiver verifies.
    moving = secrets_of(f"{NEW},{LEGACY}")
    end(sessions, OP_IDS[1:2], clock.now())
    assert deliver_to(receivers["legacy"], moving, sessions, clock) == OP_IDS[1:2]


def test_a_retry_carries_the_same_webhook_id_and_its_own_timestamp(
    sessions: sessionmaker[Session], clock: FakeClock, receivers: dict[str, StandardReceiver]
) -> None:
    receiver = receivers["new"]
    receiver.fail_next = 1
    end(sessions, OP_IDS[:1], clock.now())
    first_at = int(clock.now().timestamp())
    assert deliver_to(receiver, (NEW,), sessions, clock) == []
    clock.advance(10)  # the first retry's wait, without jitter
    assert deliver_to(receiver, (NEW,), sessions, clock) == OP_IDS[:1]
    [(headers, notice)] = receiver.accepted
    assert headers["webhook-timestamp"] == str(first_at + 10)
    assert headers["webhook-id"] == str(notice["notice_id"])


def test_a_tampered_body_or_timestamp_fails_verification(
    sessions: sessionmaker[Session], clock: FakeClock, receivers: dict[str, StandardReceiver]
) -> None:
    receiver = receivers["new"]
    captured: list[tuple[bytes, dict[str, str]]] = []
    original = receiver.receive

    def capture(body: bytes, headers: dict[str, str]) -> int:
        captured.append((body, headers))
        return original(body, headers)

    receiver.receive = capture  # type: ignore[method-assign]
    end(sessions, OP_IDS[:1], clock.now())
    assert deliver_to(receiver, (NEW,), sessions, clock) == OP_IDS[:1]
    [(body, headers)] = captured
    tampered = {
        "a body with one count changed": (body.replace(b'"created":3', b'"created":4'), headers),
        "a body with a field added": (body[:-1] + b',"x":1}', headers),
        "another timestamp": (
            body,
            {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) - 1)},
        ),
        "another id": (body, {**headers, "webhook-id": "999"}),
    }
    assert tampered["a body with one count changed"][0] != body
    with requests.Session() as http:
        http.trust_env = False
        for name, (data, sent_headers) in tampered.items():
            answer = http.post(receiver.url, data=data, headers=sent_headers, timeout=10)
            assert answer.status_code == 401, name
        again = http.post(receiver.url, data=body, headers=headers, timeout=10)
        assert again.status_code == 204  # the untouched one still verifies: the test can tell
    assert receiver.refused == ["No matching signature found"] * 4
    assert len(receiver.accepted) == 2


def readme_receiver() -> str:
    """The receiver of the README, exactly as printed there (its indentation removed)."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    [block] = [b for b in re.findall(r"  ```python\n(.*?)  ```", text, re.DOTALL) if "hook.py" in b]
    return textwrap.dedent(block)


def test_the_readme_receiver_verifies_real_notices(
    sessions: sessionmaker[Session], clock: FakeClock, tmp_path: Path
) -> None:
    script = tmp_path / "hook.py"
    script.write_text(readme_receiver())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(OPTRACK_WEBHOOK_SECRET=OLD, PORT="0")  # it knows the old secret only
    process = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        match = re.fullmatch(r"listening on port (\d+)\n", first)
        assert match, (first, process.stderr.read() if process.stderr else "")
        url = f"http://127.0.0.1:{match.group(1)}/hooks"
        end(sessions, OP_IDS[:2], clock.now())
        channel = WebhookChannel(url, secrets_of(f"{NEW},{OLD}"))  # mid-rotation
        try:
            report = deliver_pending(sessions, clock, [channel], DeliveryPolicy(jitter=0))
        finally:
            channel.close()
        assert sorted(report.delivered) == OP_IDS[:2]
        with requests.Session() as http:  # a forgery: signed with a key it does not hold
            http.trust_env = False
            forged = b'{"event":"operation.ended","notice_id":1,"operation":{}}'
            fake = Webhook("whsec_" + base64.b64encode(b"f" * 32).decode())
            stamp = clock.now()
            headers = {
                "webhook-id": "1",
                "webhook-timestamp": str(int(stamp.timestamp())),
                "webhook-signature": fake.sign("1", stamp, forged),
            }
            assert http.post(url, data=forged, headers=headers, timeout=10).status_code == 401
    finally:
        process.terminate()
        out, _err = process.communicate(timeout=30)
    assert sorted(line for line in out.splitlines() if line.startswith("ended:")) == [
        f"ended: {op_id} COMPLETED" for op_id in OP_IDS[:2]
    ]
