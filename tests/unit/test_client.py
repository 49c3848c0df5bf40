"""The API client over real sockets against the sandbox: answers, errors, Retry-After."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from importlib.metadata import version

import pytest

from tests.support.services import SID, TOKEN, InventedApi
from worker.client import ApiClient, LocalGate, Timeouts
from worker.clock import FakeClock
from worker.errors import (
    AuthError,
    BadRequest,
    InvalidOperationId,
    OperationNotFound,
    RetryLater,
    SchemaError,
    ServerError,
    TransportError,
    UnexpectedRedirect,
    WrongBaseUrl,
    redirect_target,
    storable_text,
)
from worker.operation import Status, parse_served_at
from worker.retry_after import RetryPolicy
from worker.sandbox import Fault, SandboxServer

MISSING = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"


def api_requests(sandbox: SandboxServer) -> list[dict[str, object]]:
    return [r for r in sandbox.requests_log() if str(r["path"]).startswith("/v1/")]


def test_fetch_returns_a_typed_operation(sandbox: SandboxServer, make_client) -> None:
    op = sandbox.add_operation(total=10, duration=3600)
    fetched = make_client().fetch(op.id)
    assert fetched.id == op.id
    assert fetched.status is Status.PROCESSING
    assert fetched.stats.total == 10
    assert fetched.stats.queued + fetched.stats.created + fetched.stats.failed == 10


def test_invalid_id_never_reaches_the_network(sandbox: SandboxServer, make_client) -> None:
    with pytest.raises(InvalidOperationId):
        make_client().fetch(MISSING + "/../../x")
    assert api_requests(sandbox) == []


def test_list_follows_pagination(sandbox: SandboxServer, make_client) -> None:
    ids = {sandbox.add_operation(total=3, duration=3600).id for _ in range(7)}
    client = make_client()
    seen = [op.id for op in client.iter_operations(status=Status.PROCESSING, page_size=3)]
    assert sorted(seen) == sorted(ids)
    assert len(api_requests(sandbox)) == 3  # 3 + 3 + 1


def test_404_is_operation_not_found(sandbox: SandboxServer, make_client) -> None:
    with pytest.raises(OperationNotFound) as info:
        make_client().fetch(MISSING)
    assert info.value.status == 404
    assert info.value.errors[0].code == 20404


def test_a_404_from_the_list_endpoint_means_a_wrong_base_url(
    sandbox: SandboxServer, make_client
) -> None:
    sandbox.add_fault(Fault(kind="status", status=404))  # the API's own 20404 body
    with pytest.raises(WrongBaseUrl, match="OPTRACK_API_BASE_URL") as info:
        make_client().list_page()
    assert not isinstance(info.value, OperationNotFound) and info.value.status == 404


def test_a_base_url_without_v1_gives_wrong_base_url_on_list(
    sandbox: SandboxServer, clock: FakeClock
) -> None:
    op = sandbox.add_operation(total=1, duration=60)
    client = ApiClient(sandbox.root_url, SID, TOKEN, clock=clock)
    with client:
        with pytest.raises(WrongBaseUrl):
            client.list_page()
        # A configuration error pauses the account (every process stops polling) for a minute.
        paused = client.gate.paused_until(clock.now())
        assert paused is not None and paused[1].startswith("configuration error: HTTP 404")
        assert paused[0] == clock.now() + timedelta(seconds=60)
        clock.advance(60)
        # Every fetch answers the API's 20404 too: only the caller, seeing all of them fail at
        # once while List says the base URL is wrong, can tell (issue 11).
        with pytest.raises(OperationNotFound):
            client.fetch(op.id)


@contextmanager
def served(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A local HTTP server answering with ``handler``; yields its /v1 base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_a_404_that_is_not_the_apis_is_not_operation_not_found(clock: FakeClock) -> None:
    class NotTheApi(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html>404 page not found</html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with (
        served(NotTheApi) as url,
        ApiClient(url, SID, TOKEN, clock=clock) as client,
        pytest.raises(WrongBaseUrl),
    ):
        client.fetch(MISSING)


def test_requests_name_this_release_in_their_user_agent(clock: FakeClock) -> None:
    """The User-Agent carries pyproject's version (Twilio support asks for it)."""
    seen: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("User-Agent", ""))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    with (
        served(Recorder) as url,
        ApiClient(url, SID, TOKEN, clock=clock) as client,
        pytest.raises(WrongBaseUrl),
    ):
        client.fetch(MISSING)
    assert seen == [f"optrack/{version('optrack')} (+requests)"]
    assert version("optrack") != "0.1"


def test_400_carries_the_error_list(sandbox: SandboxServer, make_client) -> None:
    sandbox.add_fault(Fault(kind="status", status=400))
    with pytest.raises(BadRequest) as info:
        make_client().fetch(MISSING)
    assert info.value.errors


def test_wrong_token_pauses_the_account_and_never_shows_the_token(
    sandbox: SandboxServer, make_client, clock: FakeClock
) -> None:
    gate = LocalGate()
    client = make_client(gate=gate, token="wrong-" + TOKEN)
    with pytest.raises(AuthError) as info:
        client.fetch(MISSING)
    assert TOKEN not in str(info.value) and TOKEN not in repr(info.value)
    paused = gate.paused_until(clock.now())
    assert paused is not None and "credentials rejected" in paused[1]
    assert SID  # the SID is not secret; only the token is


def test_500_is_never_retried(sandbox: SandboxServer, make_client) -> None:
    op = sandbox.add_operation(total=1, duration=60)
    sandbox.add_fault(Fault(kind="status", status=500))
    with pytest.raises(ServerError):
        make_client().fetch(op.id)
    assert [r["status"] for r in api_requests(sandbox)] == [500]


def test_short_retry_after_pauses_then_waits_in_place(
    sandbox: SandboxServer, make_client, clock: FakeClock
) -> None:
    op = sandbox.add_operation(total=1, duration=60)
    sandbox.add_fault(Fault(kind="status", status=429, retry_after="3"))
    gate = RecordingGate(clock)
    fetched = make_client(gate=gate).fetch(op.id)
    assert fetched.id == op.id
    # The pause was recorded for the account before the client slept, and it slept 3 s (and a
    # jitter of at most a quarter of that).
    assert gate.events[0][0] == "pause" and gate.events[0][1] == 3.0
    [slept] = clock.slept
    assert 3.0 <= slept <= 3.75
    assert [r["status"] for r in api_requests(sandbox)] == [429, 200]


@pytest.mark.parametrize("status", [409, 503])
def test_http_date_retry_after(
    sandbox: SandboxServer, make_client, clock: FakeClock, status: int
) -> None:
    op = sandbox.add_operation(total=1, duration=60)
    sandbox.add_fault(
        Fault(kind="status", status=status, retry_after="30", retry_after_form="date")
    )
    gate = LocalGate()
    with pytest.raises(RetryLater) as info:
        make_client(gate=gate).fetch(op.id)
    wait = (info.value.not_before - clock.now()).total_seconds()
    assert 27 <= wait <= 31  # whole-second HTTP-date, a little clock skew
    assert clock.slept == []  # no worker sleeps for a long pause
    assert len(api_requests(sandbox)) == 1


def test_long_retry_after_is_capped_with_a_warning(
    sandbox: SandboxServer, make_client, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    sandbox.add_fault(Fault(kind="status", status=429, retry_after="86400"))
    policy = RetryPolicy(max_retry_after=120, max_inplace_wait=5)
    with caplog.at_level("WARNING", logger="worker.client"), pytest.raises(RetryLater) as info:
        make_client(policy=policy).fetch(MISSING)
    assert info.value.not_before - clock.now() == timedelta(seconds=120)
    assert "capped at 120 s" in info.value.reason
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "'86400'" in record.getMessage() and "waits 120 s" in record.getMessage()


def test_retry_after_900_is_honored_whole(
    sandbox: SandboxServer, make_client, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    sandbox.add_fault(Fault(kind="status", status=429, retry_after="900"))
    with caplog.at_level("WARNING"), pytest.raises(RetryLater) as info:
        make_client(policy=RetryPolicy()).fetch(MISSING)  # the default cap: 6 hours
    assert info.value.not_before - clock.now() == timedelta(seconds=900)
    assert caplog.records == []  # nothing was capped


@pytest.mark.parametrize("raw", ["soon", "-3", ""])
def test_garbage_retry_after_gets_the_minimum_wait(
    sandbox: SandboxServer, make_client, clock: FakeClock, raw: str
) -> None:
    sandbox.add_fault(
        Fault(kind="status", status=429, retry_after=raw, retry_after_form="raw", count=10)
    )
    policy = RetryPolicy(min_throttle_wait=60, max_inplace_wait=5)
    with pytest.raises(RetryLater) as info:
        make_client(policy=policy).fetch(MISSING)
    wait = (info.value.not_before - clock.now()).total_seconds()
    assert 60 <= wait <= 90  # the first minimum wait: 60 s jittered up to 90
    assert "a minimum wait" in info.value.reason
    assert len(api_requests(sandbox)) == 1


@pytest.mark.parametrize(
    ("retry_after", "form"),
    [("0", "seconds"), ("Thu, 01 Jan 2004 00:00:00 GMT", "raw"), ("0.01", "seconds")],
)
def test_a_retry_after_zero_storm_costs_a_handful_of_requests(
    sandbox: SandboxServer, make_client, clock: FakeClock, retry_after: str, form: str
) -> None:
    sandbox.add_fault(
        Fault(kind="status", status=429, retry_after=retry_after, retry_after_form=form, count=50)
    )
    began = clock.now()
    with pytest.raises(RetryLater) as info:
        make_client().fetch(MISSING)
    statuses = [r["status"] for r in api_requests(sandbox)]
    assert statuses == [429] * len(statuses) and 3 <= len(statuses) <= 4
    # No two requests at the same instant: each wait at least doubles the one before.
    assert clock.slept[0] >= 1.0
    assert all(b >= 2 * a / 1.5 for a, b in zip(clock.slept, clock.slept[1:], strict=False))
    assert (info.value.not_before - began).total_seconds() >= 1 + 2 + 4


def test_a_running_pause_stops_calls_before_they_start(
    sandbox: SandboxServer, make_client, clock: FakeClock
) -> None:
    gate = LocalGate()
    gate.pause(clock.now() + timedelta(seconds=60), "HTTP 429 elsewhere", 429)
    with pytest.raises(RetryLater):
        make_client(gate=gate).fetch(MISSING)
    assert api_requests(sandbox) == []


@pytest.mark.parametrize(
    "variant",
    [
        "not_json",
        "wrong_content_type",
        "missing_field",
        "negative_count",
        "unknown_status",
        "bad_date",
        "wrong_id",
    ],
)
def test_malformed_200_is_a_schema_error(sandbox: SandboxServer, make_client, variant: str) -> None:
    op = sandbox.add_operation(total=1, duration=60)
    sandbox.add_fault(Fault(kind="malformed", variant=variant))
    with pytest.raises(SchemaError):
        make_client().fetch(op.id)


def test_dropped_connection_is_a_transport_error(sandbox: SandboxServer, make_client) -> None:
    sandbox.add_fault(Fault(kind="drop"))
    with pytest.raises(TransportError):
        make_client().fetch(MISSING)


@pytest.mark.real_time
def test_slow_answer_times_out(sandbox: SandboxServer, make_client) -> None:
    sandbox.add_fault(Fault(kind="slow", delay=3.0))
    with pytest.raises(TransportError, match="timed out"):
        make_client().fetch(MISSING)  # read timeout is 2 s in these tests


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_never_followed(
    sandbox: SandboxServer, make_client, invented_api: InventedApi, status: int
) -> None:
    op = sandbox.add_operation(total=10, duration=3600)
    invented_api.operation = {**op.to_api(0), "stats": {"total": 1010, "queued": 1010}}
    sandbox.add_fault(Fault(kind="redirect", status=status, location=invented_api.url, count=2))
    client = make_client()
    with pytest.raises(UnexpectedRedirect) as fetched:
        client.fetch(op.id)
    with pytest.raises(UnexpectedRedirect) as listed:
        client.list_page(page_size=10)
    assert invented_api.paths == []  # nothing was asked of the other host
    port = invented_api.server_address[1]
    for info in (fetched, listed):
        assert info.value.status == status
        assert f"HTTP {status}" in str(info.value) and f"127.0.0.1:{port}" in str(info.value)
    assert [r["status"] for r in api_requests(sandbox)] == [status, status]  # no retry either
    assert client.fetch(op.id).stats.total == 10


def test_a_redirect_error_never_shows_credentials(sandbox: SandboxServer, make_client) -> None:
    location = f"https://{SID}:{TOKEN}@evil.example:8443/v1/steal?token={TOKEN}"
    sandbox.add_fault(Fault(kind="redirect", location=location))
    with pytest.raises(UnexpectedRedirect) as info:
        make_client().fetch(MISSING)
    shown = str(info.value) + repr(info.value) + repr(vars(info.value))
    assert "evil.example:8443" in str(info.value)
    assert TOKEN not in shown and SID not in shown and "steal" not in shown


@pytest.mark.parametrize(
    ("value", "limit", "stored"),
    [
        ("Internal server error.", 500, "Internal server error."),
        ("a\x00b\x00", 500, "ab"),  # PostgreSQL refuses NUL in text
        ("lone \ud800 high, lone \udfff low", 500, "lone \ufffd high, lone \ufffd low"),
        ("\udfff\ud800", 500, "\ufffd\ufffd"),  # a pair in the wrong order is two lone ones
        ("a pair \ud83d\ude00 as two code points", 500, "a pair \U0001f600 as two code points"),
        ("\U0001f600 ünïcödé ✓", 500, "\U0001f600 ünïcödé ✓"),  # real text is kept as it is
        ("x" * 501, 500, "x" * 499 + "…"),
        ("x" * 500, 500, "x" * 500),
        ("\x00" * 600 + "ok", 500, "ok"),  # NULs removed count for nothing
        ("x" * 10_000_000, 5, "xxxx…"),
        ("abc", 0, ""),
        ("", 10, ""),
    ],
)
def test_storable_text_strips_nul_replaces_lone_surrogates_and_caps(
    value: str, limit: int, stored: str
) -> None:
    assert storable_text(value, limit) == stored
    assert len(stored) <= limit
    stored.encode("utf-8")


def test_an_error_body_with_nul_lone_surrogates_and_no_end_is_made_storable(
    sandbox: SandboxServer, make_client
) -> None:
    message = "bad \x00 byte, lone \ud800 surrogate, " + "then more " * 1000
    sandbox.add_fault(Fault(kind="status", status=500, message=message))
    with pytest.raises(ServerError) as info:
        make_client().list_page()
    [error] = info.value.errors
    assert error.message.startswith("bad  byte, lone \ufffd surrogate, then more")
    assert len(error.message) == 500 and error.message.endswith("…")
    assert "\x00" not in str(info.value)
    str(info.value).encode("utf-8")


def test_a_redirect_target_is_storable_text() -> None:
    assert redirect_target("http://ev\x00il.exam\udc80ple:81/x") == "evil.exam\ufffdple:81"


@pytest.mark.parametrize("listing", [False, True])
def test_a_trickled_body_ends_at_the_deadline(
    sandbox: SandboxServer, make_client, listing: bool
) -> None:
    op = sandbox.add_operation(total=3, duration=3600)
    # One byte every 0.1 s: each read is far within the 2 s read timeout, and the body (about
    # 200 bytes) would take 20 s. The deadline of 1 s ends it.
    sandbox.add_fault(Fault(kind="trickle", interval=0.1))
    client = make_client(timeouts=Timeouts(connect=2, read=2, deadline=1))
    with pytest.raises(TransportError, match=r"within the 1 s deadline"):
        client.list_page() if listing else client.fetch(op.id)
    assert client.fetch(op.id).id == op.id  # the next request is answered at once


def test_a_slow_answer_within_the_deadline_is_read_whole(
    sandbox: SandboxServer, make_client
) -> None:
    ids = {sandbox.add_operation(total=3, duration=3600).id for _ in range(3)}
    sandbox.add_fault(Fault(kind="trickle", interval=0.001))
    page = make_client(timeouts=Timeouts(connect=2, read=2, deadline=20)).list_page()
    assert {o.id for o in page.operations} == ids


def test_each_answer_carries_its_date_header(
    sandbox: SandboxServer, make_client, clock: FakeClock
) -> None:
    op = sandbox.add_operation(total=3, duration=3600)
    client = make_client()
    clock.advance(0.6)  # the header has whole seconds
    second = clock.now().replace(microsecond=0)
    assert client.fetch(op.id).served_at == second
    page = client.list_page()
    assert page.served_at == second and [o.served_at for o in page.operations] == [second]
    sandbox.add_fault(Fault(kind="future_updated_at", offset=0, date_offset=-600, count=2))
    assert client.fetch(op.id).served_at == second - timedelta(seconds=600)
    assert client.list_page().operations[0].served_at == second - timedelta(seconds=600)
    # served_at is about the answer, not the operation: equal operations stay equal.
    assert client.fetch(op.id) == page.operations[0]


NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "served_at"),
    [
        ("Thu, 01 Jan 2026 12:00:05 GMT", NOW + timedelta(seconds=5)),
        ("Thu, 01 Jan 2026 13:00:05 +0100", NOW + timedelta(seconds=5)),
        ("Thursday, 01-Jan-26 12:00:05 GMT", NOW + timedelta(seconds=5)),
        ("Thu Jan  1 12:00:05 2026", NOW + timedelta(seconds=5)),
        (None, None),
        ("", None),
        ("yesterday", None),
        ("Thu, 01 Jan 2026 12:00:05 IST", None),  # India, Ireland or Israel: unknown
        ("Fri, 01 Jan 10000 00:00:00 GMT", None),  # no API answers from year 10000
        ("Sat, 01 Jan 1000 00:00:00 GMT", None),
        ("x" * 10_000, None),
    ],
)
def test_a_date_header_is_an_aware_instant_or_none(header: str | None, served_at: object) -> None:
    assert parse_served_at(header, NOW) == served_at


class RecordingGate(LocalGate):
    """A LocalGate that remembers pauses, to prove the pause comes before the wait."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.events: list[tuple[str, float]] = []

    def pause(self, until, reason: str, status: int) -> None:  # type: ignore[no-untyped-def]
        self.events.append(("pause", (until - self.clock.now()).total_seconds()))
        assert self.clock.slept == [], "the client slept before recording the pause"
        super().pause(until, reason, status)
