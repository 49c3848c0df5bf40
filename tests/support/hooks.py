"""A webhook endpoint on 127.0.0.1 for notice tests: it answers ``status`` to every POST,
records what came, and can hold its answer until released (a dispatcher mid-send)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Hook:
    """Answers ``status`` (204 by default) and keeps each notice's headers and body."""

    def __init__(self, status: int = 204) -> None:
        self.status = status
        self.received: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.hold: threading.Event | None = None  # set: the answer waits for it
        self.arrived = threading.Event()
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with hook.lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    hook.received.append((headers, json.loads(body)))
                    status = hook.status
                hook.arrived.set()
                if hook.hold is not None:
                    hook.hold.wait(60)
                self.send_response(status)
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

    def notice_ids(self) -> list[int]:
        """The ``notice_id`` of each POST, in the order they came."""
        with self.lock:
            return [int(body["notice_id"]) for _headers, body in self.received]

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


SECRET = "whsec_" + "c2VjcmV0LWtleS1vZi0zMi1ieXRlcy1mb3ItdGVzdHM="  # 32 bytes


def end(sessions: Any, op_id: str, now: Any, *, owed: bool = True) -> int:
    """Track and end ``op_id`` (COMPLETED) with its notice, the real way; the notice's id."""
    from sqlalchemy import select

    from worker.db import Notice, TrackedOperation
    from worker.notices import record_end
    from worker.repository import Repository

    with sessions.begin() as session:
        Repository(session).add([op_id], now)
    with sessions.begin() as session:
        row = session.get(TrackedOperation, op_id)
        row.status, row.ended_at = "COMPLETED", now
        row.total, row.queued, row.created, row.failed = 3, 0, 3, 0
        record_end(session, row, now, owed=owed)
    with sessions() as session:
        return int(session.scalar(select(Notice.id).where(Notice.operation_id == op_id)))


def deliver(sessions: Any, clock: Any, hook: Hook) -> Any:
    """One dispatcher run to ``hook``, as beat's task runs it (no jitter: exact due times)."""
    from worker.notices import DeliveryPolicy, WebhookChannel, deliver_pending

    channel = WebhookChannel(hook.url, SECRET)
    try:
        return deliver_pending(sessions, clock, [channel], DeliveryPolicy(jitter=0))
    finally:
        channel.close()


def notices_in_every_state(sessions: Any, clock: Any, op_ids: list[str]) -> dict[str, int]:
    """Four notices, each ended a minute after the last: delivered, failed, owed and unsent
    (ended where nothing delivered); their ids by status."""
    ok, down = Hook(204), Hook(500)
    try:
        ids = {"delivered": end(sessions, op_ids[0], clock.now())}
        assert deliver(sessions, clock, ok).delivered == (op_ids[0],)
        clock.advance(60)
        ids["failed"] = end(sessions, op_ids[1], clock.now())
        assert deliver(sessions, clock, down).failed
        clock.advance(60)
        ids["owed"] = end(sessions, op_ids[2], clock.now())
        clock.advance(60)
        ids["unsent"] = end(sessions, op_ids[3], clock.now(), owed=False)
    finally:
        ok.close()
        down.close()
    return ids
