"""The SenderPool Operations sandbox, over real sockets (progression uses a fake clock)."""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.services import InventedApi
from worker.sandbox import Fault, SandboxServer, SimulatedOperation
from worker.sandbox.simulation import OPERATION_ID_RE, Outcome, Simulation, format_instant
from worker.ulid import agrees, created_from_id

SID = "AC" + "b" * 32
TOKEN = "s3cret-token-value"
T0 = 1_712_298_000.0  # 2024-04-05T06:20:00Z
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sandbox(clock: FakeClock) -> Iterator[SandboxServer]:
    with SandboxServer(account_sid=SID, auth_token=TOKEN, clock=clock) as server:
        yield server


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.auth = (SID, TOKEN)
        yield session


def op_url(sandbox: SandboxServer, op_id: str) -> str:
    return f"{sandbox.base_url}/SenderPools/Operations/{op_id}"


def list_url(sandbox: SandboxServer) -> str:
    return f"{sandbox.base_url}/SenderPools/Operations"


def only_error(resp: requests.Response) -> dict[str, Any]:
    errors = resp.json()["errors"]
    assert len(errors) == 1 and set(errors[0]) == {"code", "message", "infoUrl", "context"}
    return dict(errors[0])


def test_auth_is_required_everywhere_and_token_never_echoed(sandbox: SandboxServer) -> None:
    op = sandbox.add_operation()
    expected = {
        "errors": [
            {
                "code": 20003,
                "message": "Authenticate",
                "infoUrl": "https://www.twilio.com/docs/errors/20003",
                "context": "null",
            }
        ]
    }
    for auth in (None, (SID, "wrong"), ("AC" + "c" * 32, TOKEN), (SID, TOKEN + "x")):
        for url in (
            op_url(sandbox, op.id),
            list_url(sandbox),
            sandbox.root_url + "/_sandbox/faults",
        ):
            resp = requests.get(url, auth=auth, timeout=5)
            assert resp.status_code == 401
            assert resp.headers["Content-Type"] == "application/json"
            assert resp.json() == expected
    resp = requests.get(op_url(sandbox, op.id), headers={"Authorization": "Basic !!"}, timeout=5)
    assert resp.status_code == 401
    ok = requests.get(op_url(sandbox, op.id), auth=(SID, TOKEN), timeout=5)
    assert ok.status_code == 200 and TOKEN not in ok.text
    log = sandbox.requests_log()
    assert TOKEN not in json.dumps(log) and TOKEN not in repr(sandbox)
    assert {e["status"] for e in log} == {401, 200}


def test_fetch_renders_the_documented_shape(
    sandbox: SandboxServer, http: requests.Session, clock: FakeClock
) -> None:
    op = sandbox.add_operation(total=1, duration=0.0)
    resp = http.get(op_url(sandbox, op.id), timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.json() == {
        "id": op.id,
        "status": "COMPLETED",
        "stats": {"total": 1, "queued": 0, "created": 1, "failed": 0},
        "createdAt": "2024-04-05T06:20:00Z",
        "updatedAt": "2024-04-05T06:20:00Z",
    }


@pytest.mark.parametrize(
    "bad",
    [
        "nope",
        "comms_operation_",
        "comms_operation_81h9krwprkeee8fzqspvwy6nq8",  # first char must be 0-7
        "comms_operation_01H9KRWPRKEEE8FZQSPVWY6NQ8",  # upper case
        "comms_operation_01h9krwprkeee8fzqspvwy6nqi",  # i is not Crockford
        "comms_operation_01h9krwprkeee8fzqspvwy6nq",  # too short
        "comms_operation_01h9krwprkeee8fzqspvwy6nq8" + "0" * 10,  # too long
        "comms_operation_01h9krwprkeee8fzqspvwy6nq8%0A",  # a trailing newline
        "xcomms_operation_01h9krwprkeee8fzqspvwy6nq8",
    ],
)
def test_invalid_id_is_400_on_operation_id(
    sandbox: SandboxServer, http: requests.Session, bad: str
) -> None:
    resp = http.get(op_url(sandbox, bad), timeout=5)
    assert resp.status_code == 400
    assert only_error(resp)["context"] == "operationId"


def test_unknown_valid_id_is_404(sandbox: SandboxServer, http: requests.Session) -> None:
    resp = http.get(op_url(sandbox, "comms_operation_01h9krwprkeee8fzqspvwy6nq8zz"), timeout=5)
    assert resp.status_code == 404
    error = only_error(resp)
    assert (error["code"], error["message"]) == (20404, "The resource was not found.")


def test_unknown_paths_and_methods(sandbox: SandboxServer, http: requests.Session) -> None:
    assert http.get(sandbox.base_url + "/Nope", timeout=5).status_code == 404
    assert http.post(list_url(sandbox), timeout=5).status_code == 405
    assert http.get(sandbox.root_url + "/_sandbox/nope", timeout=5).status_code == 404
    assert http.get(sandbox.root_url + "/_sandbox/operations", timeout=5).status_code == 405


def test_progression_follows_the_clock(
    sandbox: SandboxServer, http: requests.Session, clock: FakeClock
) -> None:
    op = sandbox.add_operation(total=10, duration=10.0, fail_ratio=0.2)
    url = op_url(sandbox, op.id)

    def at(t: float) -> dict[str, Any]:
        clock.now = T0 + t
        body: dict[str, Any] = http.get(url, timeout=5).json()
        return body

    first = at(0)
    assert first["status"] == "PROCESSING"
    assert first["stats"] == {"total": 10, "queued": 10, "created": 0, "failed": 0}
    mid = at(5.5)
    assert mid["status"] == "PROCESSING"
    assert mid["stats"] == {"total": 10, "queued": 5, "created": 4, "failed": 1}
    assert mid["updatedAt"] == format_instant(T0 + 5)
    assert at(9.99)["stats"]["queued"] == 1
    done = at(10)
    assert done["status"] == "COMPLETED"
    assert done["stats"] == {"total": 10, "queued": 0, "created": 8, "failed": 2}
    assert done["updatedAt"] == format_instant(T0 + 10)
    assert at(1000) == done  # updatedAt is the last change, not "now"


def test_canceled_stops_midway(
    sandbox: SandboxServer, http: requests.Session, clock: FakeClock
) -> None:
    op = sandbox.add_operation(total=10, duration=10.0, outcome="CANCELED")
    clock.now = T0 + 4.9
    assert http.get(op_url(sandbox, op.id), timeout=5).json()["status"] == "PROCESSING"
    clock.now = T0 + 5
    body = http.get(op_url(sandbox, op.id), timeout=5).json()
    assert body["status"] == "CANCELED"
    assert body["stats"] == {"total": 10, "queued": 0, "created": 5, "failed": 0}
    assert body["updatedAt"] == format_instant(T0 + 5)


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(0, 500),
    duration=st.floats(0, 1000),
    fail_ratio=st.floats(0, 1),
    canceled=st.booleans(),
    cancel_at=st.floats(0, 1),
    elapsed=st.lists(st.floats(-10, 2000), min_size=1, max_size=8),
)
def test_stats_invariants(
    total: int,
    duration: float,
    fail_ratio: float,
    canceled: bool,
    cancel_at: float,
    elapsed: list[float],
) -> None:
    outcome: Outcome = "CANCELED" if canceled else "COMPLETED"
    op = SimulatedOperation(
        "comms_operation_01h9krwprkeee8fzqspvwy6nq8",
        T0,
        total,
        duration,
        fail_ratio,
        outcome,
        cancel_at,
    )
    previous = None
    for t in sorted(T0 + e for e in elapsed):
        s = op.state_at(t)
        assert min(s.queued, s.created, s.failed) >= 0
        assert op.created_at <= s.updated_at <= max(t, op.created_at)
        if s.status == "PROCESSING":
            assert s.queued + s.created + s.failed == total and s.queued > 0
        else:
            assert s.status == outcome and s.queued == 0 and s.updated_at == op.ends_at
        if previous is not None:  # progress never goes backwards
            assert s.created >= previous.created and s.failed >= previous.failed
            assert s.updated_at >= previous.updated_at
        previous = s


def test_seeded_operations_are_deterministic() -> None:
    a = Simulation(seed=40, duration=20.0, clock=lambda: T0)
    b = Simulation(seed=40, duration=20.0, clock=lambda: T0 + 99)
    ids = [op.id for op in a.operations()]
    assert len(ids) == 40 and sorted(ids) == sorted(op.id for op in b.operations())
    assert all(OPERATION_ID_RE.fullmatch(i) and len(i) == len("comms_operation_") + 26 for i in ids)
    ops = a.operations()
    assert all(5 <= op.total <= 50 and op.duration == 20.0 for op in ops)
    assert 3 <= sum(op.outcome == "CANCELED" for op in ops) <= 20
    statuses = {op.to_api(T0)["status"] for op in ops}
    assert "PROCESSING" in statuses and len(statuses) >= 2
    assert Simulation(seed=0).operations() == []


def test_ulid_ids_carry_their_createdat_and_random_ones_do_not() -> None:
    sim = Simulation(clock=lambda: T0)
    plain = sim.add_operations(50, created_at=T0 - 3600.25)
    sim.ulid_ids = True
    timed = sim.add_operations(50, created_at=T0 - 3600.25)
    now = datetime.fromtimestamp(T0, UTC)
    created = datetime.fromtimestamp(T0 - 3600.25, UTC)
    assert all(OPERATION_ID_RE.fullmatch(op.id) for op in plain + timed)
    assert len({op.id for op in timed}) == 50  # the tail stays random
    assert {created_from_id(op.id, now) for op in timed} == {created}
    assert not any(agrees(op.id, created, now) for op in plain)


def walk(http: requests.Session, sandbox: SandboxServer, first: str) -> list[dict[str, Any]]:
    pages: list[dict[str, Any]] = []
    url: str | None = first
    while url is not None:
        resp = http.get(url, timeout=5)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body) == {"operations", "pagination"}
        assert body["pagination"]["self"].startswith("/v1/SenderPools/Operations?")
        pages.append(body)
        nxt = body["pagination"]["next"]
        url = None if nxt is None else sandbox.root_url + nxt
    return pages


def test_list_orders_and_paginates(
    sandbox: SandboxServer, http: requests.Session, clock: FakeClock
) -> None:
    made = [sandbox.add_operation(created_at=T0 + (i % 4)) for i in range(10)]
    pages = walk(http, sandbox, list_url(sandbox) + "?pageSize=3")
    assert [len(p["operations"]) for p in pages] == [3, 3, 3, 1]
    seen = [(o["createdAt"], o["id"]) for p in pages for o in p["operations"]]
    assert seen == sorted((format_instant(o.created_at), o.id) for o in made)
    assert pages[0]["pagination"]["self"] == "/v1/SenderPools/Operations?pageSize=3"
    assert "pageSize=3" in pages[0]["pagination"]["next"]
    assert "pageToken=" in pages[1]["pagination"]["self"]
    again = http.get(sandbox.root_url + pages[1]["pagination"]["self"], timeout=5).json()
    assert again["operations"] == pages[1]["operations"]
    default = http.get(list_url(sandbox), timeout=5).json()
    assert len(default["operations"]) == 10 and default["pagination"]["next"] is None
    exact = http.get(list_url(sandbox) + "?pageSize=10", timeout=5).json()
    assert exact["pagination"]["next"] is None


def test_pagination_is_stable_while_operations_progress(
    sandbox: SandboxServer, http: requests.Session, clock: FakeClock
) -> None:
    made = [sandbox.add_operation(created_at=T0 + i, duration=100.0) for i in range(6)]
    first = http.get(list_url(sandbox) + "?status=PROCESSING&pageSize=2", timeout=5).json()
    assert [o["id"] for o in first["operations"]] == [made[0].id, made[1].id]
    clock.now = T0 + 101.5  # the first two complete, the rest still run
    nxt = first["pagination"]["next"]
    assert "status=PROCESSING" in nxt
    second = http.get(sandbox.root_url + nxt, timeout=5).json()
    assert [o["id"] for o in second["operations"]] == [made[2].id, made[3].id]


def test_list_filters(sandbox: SandboxServer, http: requests.Session, clock: FakeClock) -> None:
    for i in range(5):
        sandbox.add_operation(created_at=T0 + 10 * i, duration=0.0 if i % 2 else 1e6)
    url = list_url(sandbox)

    def created(query: str) -> list[str]:
        resp = http.get(f"{url}?{query}", timeout=5)
        assert resp.status_code == 200, resp.text
        return [o["createdAt"] for o in resp.json()["operations"]]

    clock.now = T0 + 100
    start, end = format_instant(T0 + 10), format_instant(T0 + 30)
    assert created(f"startDate={start}&endDate={end}") == [format_instant(T0 + 20)]
    assert created("startDate=2024-04-05T08:20:10%2B02:00") == [
        format_instant(T0 + 20),
        format_instant(T0 + 30),
        format_instant(T0 + 40),
    ]
    assert created("status=COMPLETED") == [format_instant(T0 + 10), format_instant(T0 + 30)]
    assert len(created("status=PROCESSING")) == 3
    assert created("status=CANCELED") == []


@pytest.mark.parametrize(
    ("query", "context"),
    [
        ("startDate=yesterday", "startDate"),
        ("startDate=2024-04-05T06:20:00", "startDate"),  # no time zone
        ("endDate=2024-04-05", "endDate"),
        ("status=DONE", "status"),
        ("status=", "status"),
        ("pageSize=0", "pageSize"),
        ("pageSize=1001", "pageSize"),
        ("pageSize=ten", "pageSize"),
        ("pageToken=%%%", "pageToken"),
        ("pageToken=" + base64.urlsafe_b64encode(b'{"v":1}').decode(), "pageToken"),
    ],
)
def test_bad_list_parameters(
    sandbox: SandboxServer, http: requests.Session, query: str, context: str
) -> None:
    resp = http.get(f"{list_url(sandbox)}?{query}", timeout=5)
    assert resp.status_code == 400
    error = only_error(resp)
    assert error["context"] == context and error["code"] == 21614


def test_page_token_must_match_filters(sandbox: SandboxServer, http: requests.Session) -> None:
    for _ in range(3):
        sandbox.add_operation()
    nxt = http.get(list_url(sandbox) + "?pageSize=1&status=PROCESSING", timeout=5).json()
    token = re.search(r"pageToken=([^&]+)", nxt["pagination"]["next"])
    assert token is not None
    resp = http.get(f"{list_url(sandbox)}?pageSize=1&pageToken={token.group(1)}", timeout=5)
    assert resp.status_code == 400 and only_error(resp)["context"] == "pageToken"


@pytest.mark.parametrize(
    ("status", "code"), [(409, 77701), (429, 20429), (500, 20500), (503, 20503), (403, 20403)]
)
def test_status_faults_use_documented_bodies(
    sandbox: SandboxServer, http: requests.Session, status: int, code: int
) -> None:
    sandbox.add_fault(Fault("status", status=status))
    resp = http.get(list_url(sandbox), timeout=5)
    assert resp.status_code == status and only_error(resp)["code"] == code
    expected = "1" if status in (409, 429, 503) else None
    assert resp.headers.get("Retry-After") == expected
    if status == 409:
        assert only_error(resp)["message"] == (
            "Account not ready. Please retry according to the Retry-After response header."
        )
    assert http.get(list_url(sandbox), timeout=5).status_code == 200  # count 1 is used up


def test_a_status_fault_may_carry_any_message_nul_and_lone_surrogates_included(
    sandbox: SandboxServer, http: requests.Session
) -> None:
    message = "bad\x00byte, lone \ud800 and \udfff, then " + "x" * 5000
    fault = {"kind": "status", "status": 500, "message": message}
    assert (
        http.post(sandbox.root_url + "/_sandbox/faults", json=fault, timeout=5).status_code == 201
    )
    resp = http.get(list_url(sandbox), timeout=5)
    error = only_error(resp)
    assert (resp.status_code, error["code"], error["message"]) == (500, 20500, message)
    # Sent as JSON escapes: the body itself is valid UTF-8.
    assert b"\\u0000" in resp.content and b"\\ud800" in resp.content
    resp.content.decode("utf-8")


def test_fault_queue_over_http(
    sandbox: SandboxServer, http: requests.Session, clock: FakeClock
) -> None:
    control = sandbox.root_url + "/_sandbox/faults"
    op = sandbox.add_operation()
    faults: list[dict[str, Any]] = [
        {"kind": "status", "status": 429, "retry_after": "7", "count": 2, "match": op.id},
        {"kind": "status", "status": 503, "retry_after": 30, "retry_after_form": "date"},
        {"kind": "status", "status": 409, "retry_after": "-5", "retry_after_form": "raw"},
        {"kind": "status", "status": 503, "retry_after": None},
    ]
    for fault in faults:
        assert http.post(control, json=fault, timeout=5).status_code == 201
    assert len(http.get(control, timeout=5).json()["faults"]) == 4
    assert http.get(control, timeout=5).status_code == 200  # control requests consume nothing
    fetch, listing = op_url(sandbox, op.id), list_url(sandbox)
    first = http.get(listing, timeout=5)  # the op-specific fault does not match the list
    assert first.status_code == 503
    assert parsedate_to_datetime(first.headers["Retry-After"]).timestamp() == T0 + 30
    for _ in range(2):
        resp = http.get(fetch, timeout=5)
        assert (resp.status_code, resp.headers["Retry-After"]) == (429, "7")
    raw = http.get(fetch, timeout=5)
    assert (raw.status_code, raw.headers["Retry-After"]) == (409, "-5")
    last = http.get(fetch, timeout=5)
    assert last.status_code == 503 and "Retry-After" not in last.headers
    assert http.get(fetch, timeout=5).status_code == 200
    http.post(control, json={"kind": "drop"}, timeout=5)
    assert http.delete(control, timeout=5).json() == {"faults": []}
    assert http.get(fetch, timeout=5).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "teleport"},
        {"status": 503},
        {"kind": "status", "status": 418},
        {"kind": "status", "retry_after": "soon"},
        {"kind": "status", "retry_after": "1\r\nX-Evil: 1", "retry_after_form": "raw"},
        {"kind": "slow", "delay": -1},
        {"kind": "malformed", "variant": "weird"},
        {"kind": "status", "count": 0},
        {"kind": "status", "colour": "red"},
        {"kind": "redirect", "status": 503},
        {"kind": "status", "status": 302},
        {"kind": "redirect", "location": "javascript:alert(1)"},
        {"kind": "redirect", "location": "http://x/\r\nX-Evil: 1"},
        {"kind": "trickle", "interval": 0},
        {"kind": "stale", "lag": -1},
        {"kind": "future_updated_at", "offset": 1e12},
        {"kind": "status", "date_offset": "soon"},
        {"kind": "status", "message": 42},
        {"kind": "status", "message": "x" * 100_001},
        [1, 2],
    ],
)
def test_bad_fault_bodies(sandbox: SandboxServer, http: requests.Session, body: Any) -> None:
    resp = http.post(sandbox.root_url + "/_sandbox/faults", json=body, timeout=5)
    assert resp.status_code == 400, resp.text
    assert sandbox.simulation.faults() == []


def test_slow_and_drop_faults(sandbox: SandboxServer, http: requests.Session) -> None:
    sandbox.add_fault(Fault("slow", delay=0.3))
    sandbox.add_fault(Fault("drop"))
    began = time.monotonic()
    assert http.get(list_url(sandbox), timeout=5).status_code == 200
    assert time.monotonic() - began >= 0.3
    with pytest.raises(requests.ConnectionError):
        http.get(list_url(sandbox), timeout=5)
    assert http.get(list_url(sandbox), timeout=5).status_code == 200
    assert [e["status"] for e in sandbox.requests_log()] == [200, 0, 200]


def test_a_slow_answer_waits_on_the_injected_sleep(
    clock: FakeClock, http: requests.Session
) -> None:
    def sleep(seconds: float) -> None:  # a fake clock's sleep: time moves, nobody waits
        clock.now += seconds

    with SandboxServer(account_sid=SID, auth_token=TOKEN, clock=clock, sleep=sleep) as sandbox:
        sandbox.add_fault(Fault("slow", delay=600))
        began = time.monotonic()
        resp = http.get(list_url(sandbox), timeout=5)
        assert resp.status_code == 200 and time.monotonic() - began < 5
        assert clock.now == T0 + 600
        # Logged when it arrived; its Date says when it was answered.
        assert [e["t"] for e in sandbox.requests_log()] == [T0]
        assert parsedate_to_datetime(resp.headers["Date"]).timestamp() == T0 + 600


@pytest.mark.parametrize("listing", [False, True])
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
def test_malformed_faults(
    sandbox: SandboxServer, http: requests.Session, variant: str, listing: bool
) -> None:
    op = sandbox.add_operation()
    sandbox.add_fault(Fault("malformed", variant=variant))
    resp = http.get(list_url(sandbox) if listing else op_url(sandbox, op.id), timeout=5)
    assert resp.status_code == 200
    if variant == "not_json":
        with pytest.raises(ValueError):
            resp.json()
        return
    body = resp.json()
    item = body["operations"][0] if listing and variant != "missing_field" else body
    if variant == "wrong_content_type":
        assert not resp.headers["Content-Type"].startswith("application/json")
    elif variant == "missing_field":
        assert ("operations" not in body) if listing else ("status" not in body)
    elif variant == "negative_count":
        assert item["stats"]["queued"] == -1
    elif variant == "unknown_status":
        assert item["status"] not in ("PROCESSING", "COMPLETED", "CANCELED")
    elif variant == "bad_date":
        assert not DATE_RE.match(item["updatedAt"])
    else:
        assert item["id"] != op.id


def test_malformed_fault_shows_even_without_data(
    sandbox: SandboxServer, http: requests.Session
) -> None:
    sandbox.add_fault(Fault("malformed", variant="unknown_status", count=2))
    unknown = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
    assert http.get(op_url(sandbox, unknown), timeout=5).json()["status"] == "PAUSED"
    listing = http.get(list_url(sandbox), timeout=5).json()
    assert listing["operations"][0]["status"] == "PAUSED"


def test_request_log(sandbox: SandboxServer, http: requests.Session, clock: FakeClock) -> None:
    log_url = sandbox.root_url + "/_sandbox/requests"
    http.get(list_url(sandbox) + "?status=COMPLETED&pageSize=5", timeout=5)
    clock.now = T0 + 3
    http.get(op_url(sandbox, "bad"), timeout=5)
    http.post(sandbox.root_url + "/_sandbox/operations", json={}, timeout=5)
    entries = http.get(log_url, timeout=5).json()["requests"]
    assert entries == [
        {
            "t": T0,
            "method": "GET",
            "path": "/v1/SenderPools/Operations",
            "query": "status=COMPLETED&pageSize=5",
            "user": sandbox.account_sid,
            "status": 200,
        },
        {
            "t": T0 + 3,
            "method": "GET",
            "path": "/v1/SenderPools/Operations/bad",
            "query": "",
            "user": sandbox.account_sid,
            "status": 400,
        },
    ]
    assert http.delete(log_url, timeout=5).status_code == 200
    assert http.get(log_url, timeout=5).json() == {"requests": []}


def test_control_operations(sandbox: SandboxServer, http: requests.Session) -> None:
    url = sandbox.root_url + "/_sandbox/operations"
    chosen = "comms_operation_7zzzzzzzzzzzzzzzzzzzzzzzzz"
    body = {"id": chosen, "total": 3, "created_at": "2024-01-01T00:00:00+01:00", "duration": 0}
    resp = http.post(url, json=body, timeout=5)
    assert resp.status_code == 201
    assert resp.json()["createdAt"] == "2023-12-31T23:00:00Z"
    assert resp.json()["stats"] == {"total": 3, "queued": 0, "created": 3, "failed": 0}
    assert http.get(op_url(sandbox, chosen), timeout=5).json() == resp.json()
    defaults = http.post(url, json={}, timeout=5).json()
    assert defaults["status"] == "PROCESSING" and defaults["stats"]["total"] == 10
    for bad, context in [
        ({"id": chosen}, "id"),
        ({"id": "nope"}, "id"),
        ({"outcome": "LOST"}, "outcome"),
        ({"total": -1}, "total"),
        ({"total": "3"}, "total"),
        ({"fail_ratio": 2}, "fail_ratio"),
        ({"created_at": "noon"}, "created_at"),
        ({"count": 2}, "count"),
    ]:
        resp = http.post(url, json=bad, timeout=5)
        assert resp.status_code == 400 and only_error(resp)["context"] == context, bad
    assert http.post(url, data=b"{", timeout=5).status_code == 400


def test_bulk_creation_is_quick_and_listable(
    sandbox: SandboxServer, http: requests.Session
) -> None:
    began = time.monotonic()
    resp = http.post(
        sandbox.root_url + "/_sandbox/operations/bulk",
        json={"count": 10_000, "total": 5, "outcome": "CANCELED"},
        timeout=10,
    )
    assert resp.status_code == 201
    ids = resp.json()["ids"]
    assert len(set(ids)) == 10_000
    pages = walk(http, sandbox, list_url(sandbox) + "?pageSize=1000")
    listed = [o["id"] for p in pages for o in p["operations"]]
    assert listed == sorted(ids)
    assert time.monotonic() - began < 5


def test_concurrent_clients(sandbox: SandboxServer) -> None:
    op = sandbox.add_operation()
    failures: list[int] = []

    def client() -> None:
        with requests.Session() as session:
            for _ in range(20):
                resp = session.get(op_url(sandbox, op.id), auth=(SID, TOKEN), timeout=5)
                if resp.status_code != 200:
                    failures.append(resp.status_code)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and len(sandbox.requests_log()) == 160


def test_stop_closes_keep_alive_connections(clock: FakeClock) -> None:
    server = SandboxServer(account_sid=SID, auth_token=TOKEN, clock=clock).start()
    url = list_url(server)
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    with requests.Session() as session:
        session.auth = (SID, TOKEN)
        assert session.get(url, timeout=5).status_code == 200
        server.stop()
        server.stop()
        with pytest.raises(requests.ConnectionError):
            session.get(url, timeout=5)


def test_serve_forever_in_a_subprocess() -> None:
    code = (
        "from worker.sandbox.server import serve_forever;"
        f"serve_forever('127.0.0.1', 0, {SID!r}, {TOKEN!r}, 7, 20.0)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        match = re.fullmatch(r"sandbox listening on (http://127\.0\.0\.1:\d+/v1)", line)
        assert match, line
        resp = requests.get(
            match.group(1) + "/SenderPools/Operations", auth=(SID, TOKEN), timeout=5
        )
        expected = [op.id for op in Simulation(seed=7).operations()]
        assert sorted(o["id"] for o in resp.json()["operations"]) == sorted(expected)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert err == "" and TOKEN not in out


# --- faults of a misbehaving API (issue 11) --------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307])
def test_redirect_fault_points_elsewhere(
    sandbox: SandboxServer, http: requests.Session, invented_api: InventedApi, status: int
) -> None:
    op = sandbox.add_operation(total=10, duration=100)
    invented_api.operation = {**op.to_api(T0), "stats": {**op.to_api(T0)["stats"], "total": 1010}}
    sandbox.add_fault(Fault("redirect", status=status, location=invented_api.url, count=2))
    listing = list_url(sandbox) + "?pageSize=5"
    resp = http.get(listing, timeout=5, allow_redirects=False)
    assert resp.status_code == status
    assert resp.headers["Location"] == f"{invented_api.url}/v1/SenderPools/Operations?pageSize=5"
    assert invented_api.paths == []
    followed = http.get(listing, timeout=5)  # what a client that follows redirects records
    assert followed.json()["operations"][0]["stats"]["total"] == 1010
    assert invented_api.paths == ["/v1/SenderPools/Operations?pageSize=5"]
    assert http.get(listing, timeout=5).json()["operations"][0]["stats"]["total"] == 10


def test_redirect_fault_defaults_to_a_port_where_nothing_answers(
    sandbox: SandboxServer, http: requests.Session
) -> None:
    sandbox.add_fault(Fault("redirect"))
    resp = http.get(list_url(sandbox), timeout=5, allow_redirects=False)
    assert resp.status_code == 302
    assert resp.headers["Location"] == "http://127.0.0.1:9/v1/SenderPools/Operations"


def test_date_header_follows_the_simulation_clock(
    sandbox: SandboxServer, http: requests.Session, clock: FakeClock
) -> None:
    clock.now = T0 + 42.7
    resp = http.get(list_url(sandbox), timeout=5)
    assert parsedate_to_datetime(resp.headers["Date"]).timestamp() == T0 + 42


def test_future_updated_at_fault_and_a_wrong_date_header(
    sandbox: SandboxServer, http: requests.Session, clock: FakeClock
) -> None:
    op = sandbox.add_operation(total=10, duration=10)
    clock.now = T0 + 3.5
    sandbox.add_fault(Fault("future_updated_at", offset=30 * 86400, match=op.id))
    sandbox.add_fault(Fault("future_updated_at", offset=600, date_offset=-3600, count=1))
    shifted = http.get(op_url(sandbox, op.id), timeout=5)
    assert shifted.json()["updatedAt"] == format_instant(T0 + 3 + 30 * 86400)
    assert shifted.json()["stats"]["created"] == 3  # the stats are today's
    assert parsedate_to_datetime(shifted.headers["Date"]).timestamp() == T0 + 3
    page = http.get(list_url(sandbox), timeout=5)
    assert page.json()["operations"][0]["updatedAt"] == format_instant(T0 + 3 + 600)
    assert parsedate_to_datetime(page.headers["Date"]).timestamp() == T0 + 3 - 3600
    assert http.get(op_url(sandbox, op.id), timeout=5).json()["updatedAt"] == format_instant(T0 + 3)


@pytest.mark.parametrize("listing", [False, True])
def test_stale_fault_shows_the_past_with_todays_updated_at(
    sandbox: SandboxServer, http: requests.Session, clock: FakeClock, listing: bool
) -> None:
    op = sandbox.add_operation(total=10, duration=10)
    clock.now = T0 + 8.5
    url = list_url(sandbox) if listing else op_url(sandbox, op.id)

    def shown() -> dict[str, Any]:
        body = http.get(url, timeout=5).json()
        return dict(body["operations"][0] if listing else body)

    current = shown()
    sandbox.add_fault(Fault("stale", lag=2))
    stale = shown()
    assert current["stats"]["created"] == 8 and stale["stats"]["created"] == 6
    assert stale["updatedAt"] == current["updatedAt"] == format_instant(T0 + 8)
    clock.now = T0 + 10.5  # ended: a stale answer can show it PROCESSING again
    sandbox.add_fault(Fault("stale", lag=1))
    assert shown()["status"] == "PROCESSING" and shown()["status"] == "COMPLETED"


def test_a_new_operation_answers_404_until_replicated(
    sandbox: SandboxServer, http: requests.Session, clock: FakeClock
) -> None:
    control = sandbox.root_url + "/_sandbox/operations"
    created = http.post(control, json={"total": 3, "not_found_for": 5}, timeout=5).json()
    url = op_url(sandbox, created["id"])
    for t in (0, 4.9):
        clock.now = T0 + t
        resp = http.get(url, timeout=5)
        assert resp.status_code == 404 and only_error(resp)["code"] == 20404
        assert http.get(list_url(sandbox), timeout=5).json()["operations"] == []
    clock.now = T0 + 5
    assert http.get(url, timeout=5).json()["id"] == created["id"]
    assert [o["id"] for o in http.get(list_url(sandbox), timeout=5).json()["operations"]] == [
        created["id"]
    ]
    bad = http.post(control, json={"not_found_for": -1}, timeout=5)
    assert bad.status_code == 400 and only_error(bad)["context"] == "not_found_for"


def test_trickle_fault_sends_the_body_byte_by_byte(
    sandbox: SandboxServer, http: requests.Session
) -> None:
    op = sandbox.add_operation(total=3, duration=60)
    sandbox.add_fault(Fault("trickle", interval=0.005, match=op.id))
    began = time.monotonic()
    resp = http.get(op_url(sandbox, op.id), timeout=5, stream=True)
    chunks = list(resp.raw.stream(1024, decode_content=False))
    # Never faster than one byte per interval; each read gets whatever arrived (one byte or so).
    assert time.monotonic() - began >= 0.005 * (len(b"".join(chunks)) - 1)
    assert json.loads(b"".join(chunks))["id"] == op.id
    assert http.get(op_url(sandbox, op.id), timeout=5).json()["id"] == op.id  # used up


def test_a_retry_after_zero_storm_is_expressible(
    sandbox: SandboxServer, http: requests.Session
) -> None:
    control = sandbox.root_url + "/_sandbox/faults"
    fault = {"kind": "status", "status": 429, "retry_after": "0", "count": 25}
    assert http.post(control, json=fault, timeout=5).status_code == 201
    answers = [http.get(list_url(sandbox), timeout=5) for _ in range(26)]
    assert [(r.status_code, r.headers.get("Retry-After")) for r in answers[:25]] == [
        (429, "0")
    ] * 25
    assert answers[25].status_code == 200


def test_the_log_can_name_the_operations_each_answer_carried(
    clock: FakeClock, http: requests.Session
) -> None:
    """``log_ids`` (`optrack sandbox --log-ids`): a List page logs its operations' IDs, a fetch
    its one; an error logs none. Off, no request carries IDs."""
    with SandboxServer(account_sid=SID, auth_token=TOKEN, clock=clock, log_ids=True) as sandbox:
        ops = [sandbox.add_operation(duration=60) for _ in range(3)]
        page = http.get(list_url(sandbox), params={"pageSize": "2"}, timeout=5).json()
        http.get(op_url(sandbox, ops[2].id), timeout=5)
        http.get(op_url(sandbox, "comms_operation_" + "0" * 26), timeout=5)
        log = sandbox.requests_log()
    listed = [op["id"] for op in page["operations"]]
    assert len(listed) == 2 and set(listed) <= {op.id for op in ops}
    assert [(e["status"], e.get("ids")) for e in log] == [
        (200, listed),
        (200, [ops[2].id]),
        (404, None),
    ]
    with SandboxServer(account_sid=SID, auth_token=TOKEN, clock=clock) as quiet:
        op = quiet.add_operation()
        http.get(op_url(quiet, op.id), timeout=5)
        assert "ids" not in quiet.requests_log()[0]


def test_each_account_has_its_own_operations_faults_and_log(sandbox: SandboxServer) -> None:
    other_sid, key, secret = "AC" + "c" * 32, "SK" + "d" * 32, "key-secret"
    other = sandbox.add_account(other_sid, "other-token")
    sandbox.add_api_key(other_sid, key, secret)
    mine, theirs = sandbox.add_operation(total=3), other.add_operation(total=4)
    assert mine.id != theirs.id
    other.add_fault(Fault("status", status=429, retry_after="5", count=1))
    token = sandbox._token  # the first account's, as the sandbox fixture set it

    def get(user: str, password: str, op_id: str) -> int:
        url = f"{sandbox.base_url}/SenderPools/Operations/{op_id}"
        return requests.get(url, auth=(user, password), timeout=5).status_code

    # The first account neither sees the other's operation nor gets its fault.
    assert get(sandbox.account_sid, token, theirs.id) == 404
    assert get(sandbox.account_sid, token, mine.id) == 200
    # The other account, by its API key: its fault first, then its operation; never mine.
    assert get(key, secret, theirs.id) == 429
    assert get(key, secret, theirs.id) == 200
    assert get(other_sid, "other-token", mine.id) == 404
    sandbox.revoke(key)
    assert get(key, secret, theirs.id) == 401
    assert [(e["user"], e["status"]) for e in other.requests_log()] == [
        (key, 429),
        (key, 200),
        (other_sid, 404),
        (key, 401),
    ]
    assert [e["status"] for e in sandbox.requests_log()] == [404, 200]
