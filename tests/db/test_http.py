"""The HTTP API over a real socket (uvicorn on a free port) on SQLite and PostgreSQL.

Data comes the real way: operations tracked through the API, polled from the sandbox by the
real poller on the fake clock; answers are compared with what the CLI's formatters print.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from kombu import Connection
from sqlalchemy import func, select

from tests.support.hooks import notices_in_every_state
from tests.support.processes import base_env, serve_process
from tests.support.services import SID, TOKEN
from worker import dead_letters, health, liveness, outbox, reports
from worker.accounts import Accounts
from worker.clock import FakeClock
from worker.credentials import Vault
from worker.db import TrackedOperation
from worker.http import create_app, paging
from worker.http.server import running
from worker.records import operation_record, utc_text
from worker.reports.formats import (
    STATUS_COLORS,
    SUMMARY_CSV_FIELDS,
    history_record,
    summary_record,
)
from worker.repository import Repository
from worker.runtime import Runtime
from worker.sandbox import SandboxServer
from worker.settings import load_settings

HTTP_TOKEN = "http-" + "t0k3n" * 6  # recognisable in any output
GOOD = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
OTHER = "comms_operation_01h9krwprkeee8fzqspvwy6nq9"
JSON_TYPE = {"Content-Type": "application/json"}
ACCOUNT_KEY = "x8r0ZrkNVk8w3cQbWJ0XoVh0yW7yQ6mQ2m3sV9b8a1c="


@dataclass
class Api:
    url: str
    rt: Runtime
    clock: FakeClock
    sandbox: SandboxServer
    env: dict[str, str]
    http: requests.Session

    def get(self, path: str, **params: Any) -> requests.Response:
        return self.http.get(self.url + path, params=params, timeout=10)

    def post(self, path: str, body: Any) -> requests.Response:
        return self.http.post(self.url + path, json=body, timeout=10)

    def track(self, ids: list[str]) -> dict[str, Any]:
        response = self.post("/api/v1/operations", {"ids": ids})
        assert response.status_code == 200, response.text
        return dict(response.json())

    def poll(self, ids: list[str]) -> None:
        self.rt.poller.refresh(ids)

    def tracked(self) -> int:
        with self.rt.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(TrackedOperation)) or 0)


def serve_app(rt: Runtime, **kwargs: Any) -> Any:
    return running(create_app(rt, **{"token": HTTP_TOKEN, **kwargs}))


@pytest.fixture
def api(tmp_path: Path, db_url: str, sandbox: SandboxServer, clock: FakeClock) -> Iterator[Api]:
    env = base_env(
        tmp_path,
        OPTRACK_DATABASE_URL=db_url,
        OPTRACK_API_BASE_URL=sandbox.base_url,
        OPTRACK_HTTP_TOKEN=HTTP_TOKEN,
    )
    rt = Runtime(load_settings(env), clock=clock)
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {HTTP_TOKEN}"
    with serve_app(rt) as server:
        yield Api(server.url, rt, clock, sandbox, env, http)
    http.close()
    rt.close()


def api_paths(rt: Runtime) -> list[str]:
    """Every GET path of the API (from its OpenAPI document), a valid ID in the templates."""
    documented = create_app(rt, token=HTTP_TOKEN).openapi()["paths"]
    paths = [*(p for p, methods in documented.items() if "get" in methods), "/api/v1/openapi.json"]
    return [p.replace("{operation_id}", GOOD) for p in paths if p.startswith("/api/")]


# --- auth ----------------------------------------------------------------------------------


def test_every_api_path_needs_the_token_and_healthz_does_not(api: Api) -> None:
    paths = api_paths(api.rt)
    assert "/api/v1/openapi.json" in paths and len(paths) >= 9
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": HTTP_TOKEN}):
        for path in paths:
            answer = requests.get(api.url + path, headers=headers, timeout=10)
            assert answer.status_code == 401, (path, headers)
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
            assert answer.json()["errors"][0]["reason"].startswith("missing or wrong token")
    for wrong in (HTTP_TOKEN[:-1], HTTP_TOKEN + "x", HTTP_TOKEN.upper(), "é" * 8):
        answer = requests.post(
            api.url + "/api/v1/operations",
            json={"ids": [GOOD]},
            headers={"Authorization": f"Bearer {wrong}".encode()},
            timeout=10,
        )
        assert answer.status_code == 401
    assert api.tracked() == 0
    # With the token every path answers (404 for the untracked ID, but not 401).
    for path in paths:
        with api.http.get(api.url + path, timeout=10, stream=True) as answer:  # /events streams
            assert answer.status_code != 401, path
    assert requests.get(api.url + "/healthz", timeout=10).status_code in (200, 503)
    page = requests.get(api.url + "/", timeout=10)
    assert page.status_code == 200 and "optrack" in page.text
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]


def test_no_auth_app_serves_the_api_without_a_token(api: Api) -> None:
    with serve_app(api.rt, token=None) as open_server:
        answer = requests.get(open_server.url + "/api/v1/operations", timeout=10)
    assert answer.status_code == 200 and answer.json() == {"operations": [], "next": None}


def test_openapi_document_lists_the_api(api: Api) -> None:
    doc = api.get("/api/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert {
        "/api/v1/operations",
        "/api/v1/operations/{operation_id}",
        "/api/v1/operations/{operation_id}/history",
        "/api/v1/report",
        "/api/v1/report.csv",
        "/api/v1/events",
        "/healthz",
    } <= set(doc["paths"])
    assert "ids" in json.dumps(doc["paths"]["/api/v1/operations"]["post"]["requestBody"])
    assert "HTTPBearer" in doc["components"]["securitySchemes"]


# --- tracking ------------------------------------------------------------------------------


def test_track_validates_every_id_first_and_writes_nothing_on_error(api: Api) -> None:
    answer = api.post("/api/v1/operations", {"ids": [GOOD, "not-an-id", 7, "../etc/passwd"]})
    assert answer.status_code == 422
    errors = answer.json()["errors"]
    assert [(e["id"], e["index"]) for e in errors] == [
        ("not-an-id", 1),
        (None, 2),
        ("../etc/passwd", 3),
    ]
    assert "must start with 'comms_operation_'" in errors[0]["reason"]
    assert errors[1]["reason"] == "expected a string"
    assert api.tracked() == 0

    assert api.track([GOOD, GOOD]) == {"added": [GOOD], "already_tracked": []}
    assert api.track([OTHER, GOOD]) == {"added": [OTHER], "already_tracked": [GOOD]}
    assert api.tracked() == 2


def test_track_under_an_account(api: Api) -> None:
    with api.rt.sessions.begin() as session:
        sealed = Vault((ACCOUNT_KEY,)).seal("acme-secret")
        Accounts(session).add("acme", "AC" + "ac" * 16, None, sealed, api.clock.now())
    answer = api.post("/api/v1/operations", {"account": "acme", "ids": [GOOD]})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"added": [GOOD], "already_tracked": []}
    for body, reason in [
        ({"account": "default", "ids": [OTHER, GOOD]}, f"{GOOD} is tracked under account 'acme'"),
        ({"ids": [GOOD]}, "nothing was tracked under account 'default'"),
        ({"account": "nobody", "ids": [OTHER]}, "no account named 'nobody'"),
        ({"account": "Not A Name", "ids": [OTHER]}, "is not an account name"),
        ({"account": 7, "ids": [OTHER]}, "account must be a string"),
    ]:
        refused = api.post("/api/v1/operations", body)
        assert refused.status_code == 422, refused.text
        assert reason in refused.json()["errors"][0]["reason"]
    assert api.tracked() == 1
    with api.rt.sessions() as session:
        assert Repository(session).accounts_of([GOOD]) == {GOOD: "acme"}

    # The views take the account: operations and the report.
    api.track([OTHER])
    every = api.get("/api/v1/operations").json()["operations"]
    assert {(o["id"], o["account"]) for o in every} == {(GOOD, "acme"), (OTHER, "default")}
    only = api.get("/api/v1/operations", account="acme").json()["operations"]
    assert [(o["id"], o["account"]) for o in only] == [(GOOD, "acme")]
    report = api.get("/api/v1/report", account="default").json()
    assert report["operations"]["total"] == 1
    assert api.get("/api/v1/report").json()["operations"]["total"] == 2
    csv_row = api.get("/api/v1/report.csv", account="acme").text.splitlines()
    assert len(csv_row) == 2
    progress = api.get("/api/v1/progress", account="acme").json()["progress"]
    assert [p["operation"]["id"] for p in progress] == [GOOD]
    paths = ("/api/v1/operations", "/api/v1/report", "/api/v1/report.csv", "/api/v1/progress")
    for path in (*paths, "/api/v1/events"):
        refused = api.get(path, account="nobody")
        assert refused.status_code == 422
        assert "no account named 'nobody'" in refused.json()["errors"][0]["reason"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "body must be JSON"),
        (b"[]", 'body must be an object with a list "ids"'),
        (b'{"ids": "comms_operation_01h9krwprkeee8fzqspvwy6nq8"}', 'list "ids"'),
        (b'{"ids": []}', "ids is empty"),
        (b"", "body must be"),
    ],
)
def test_malformed_bodies_are_422_with_a_reason(api: Api, body: bytes, reason: str) -> None:
    answer = api.http.post(api.url + "/api/v1/operations", data=body, headers=JSON_TYPE, timeout=10)
    assert answer.status_code == 422
    assert reason in answer.json()["errors"][0]["reason"]
    assert api.tracked() == 0


@pytest.mark.parametrize("token", [HTTP_TOKEN, None])
def test_a_state_change_must_be_json_so_no_other_site_can_send_it(api: Api, token: Any) -> None:
    # text/plain, a form or multipart: what a page on another site may POST without a
    # preflight. Refused with or without the token; nothing tracked.
    body = json.dumps({"ids": [GOOD]})
    with serve_app(api.rt, token=token) as server:
        for content_type in (
            "text/plain",
            "text/plain; charset=utf-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonp",
            None,
        ):
            headers = {} if content_type is None else {"Content-Type": content_type}
            answer = api.http.post(
                server.url + "/api/v1/operations", data=body, headers=headers, timeout=10
            )
            assert answer.status_code == 415, (content_type, answer.text)
            assert "Content-Type: application/json" in answer.json()["errors"][0]["reason"]
        assert api.tracked() == 0
        kinds = ("application/json", "Application/JSON; charset=utf-8")
        for content_type in kinds:
            answer = api.http.post(
                server.url + "/api/v1/operations",
                data=body,
                headers={"Content-Type": content_type},
                timeout=10,
            )
            assert answer.status_code == 200, (content_type, answer.text)
    assert api.tracked() == 1


def test_a_host_header_that_names_another_site_is_refused(api: Api) -> None:
    # DNS rebinding: evil.example resolved to 127.0.0.1 sends its own name as Host.
    with serve_app(api.rt, token=None) as server:
        port = int(server.url.rsplit(":", 1)[1])
        for host in (
            "evil.example",
            f"evil.example:{port}",
            f"127.0.0.1.evil.example:{port}",
            f"localhost.:{port + 1}",
            f"127.0.0.1:{port + 1}",
            "127.0.0.1",
            f"10.0.0.1:{port}",
            f"[::2]:{port}",
            f"::1:{port}",
            "",
        ):
            for method, path in (("GET", "/api/v1/operations"), ("GET", "/healthz"), ("GET", "/")):
                answer = requests.request(
                    method, server.url + path, headers={"Host": host}, timeout=10
                )
                assert answer.status_code == 400, (host, path, answer.text)
                assert "OPTRACK_HTTP_ALLOWED_HOSTS" in answer.json()["errors"][0]["reason"]
            post = requests.post(
                server.url + "/api/v1/operations",
                json={"ids": [GOOD]},
                headers={"Host": host},
                timeout=10,
            )
            assert post.status_code == 400
        assert api.tracked() == 0
        for host in (
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            f"LOCALHOST.:{port}",
            f"[::1]:{port}",
        ):
            answer = requests.get(
                server.url + "/api/v1/operations", headers={"Host": host}, timeout=10
            )
            assert answer.status_code == 200, (host, answer.text)
    with serve_app(api.rt, token=None, allowed_hosts=("ops.example.com",)) as server:
        for host, status in (
            ("ops.example.com", 200),
            ("ops.example.com:443", 200),
            ("x.example", 400),
        ):
            answer = requests.get(server.url + "/healthz", headers={"Host": host}, timeout=10)
            assert answer.status_code in ((200, 503) if status == 200 else (400,)), host


def test_bodies_are_capped(api: Api) -> None:
    ids = [f"comms_operation_01h9krwprkeee8fzqspvwy{n:06d}" for n in range(10_001)]
    too_many = api.post("/api/v1/operations", {"ids": ids})
    assert too_many.status_code == 413
    assert "at most 10,000 per request" in too_many.json()["errors"][0]["reason"]
    assert api.tracked() == 0

    huge = json.dumps({"ids": [GOOD], "pad": "x" * (1024 * 1024)})
    big = api.http.post(api.url + "/api/v1/operations", data=huge, headers=JSON_TYPE, timeout=10)
    assert big.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams
        yield b'{"ids": ["' + GOOD.encode() + b'"], "pad": "'
        for _ in range(300):
            yield b"y" * 4096
        yield b'"}'

    streamed = api.http.post(
        api.url + "/api/v1/operations", data=chunks(), headers=JSON_TYPE, timeout=10
    )
    assert streamed.status_code == 413
    assert api.tracked() == 0

    assert api.track(ids[:10_000])["added"] == ids[:10_000]  # the cap itself is accepted


# --- reading -------------------------------------------------------------------------------


def test_operation_and_history_match_the_cli(api: Api) -> None:
    op = api.sandbox.add_operation(total=10, duration=100)
    api.track([op.id])
    api.poll([op.id])
    api.clock.advance(30)
    api.poll([op.id])

    record = api.get(f"/api/v1/operations/{op.id}").json()
    with api.rt.sessions() as session:
        row = reports.get_operation(session, op.id)
        seq = record.pop("seq")  # its latest history step, for ?wait=…&after=seq
        assert record == operation_record(row)  # the fields of `optrack status --json`, same values
        expected = history_record(reports.operation_history(session, op.id, api.clock.now()))
    assert seq == expected["history"][-1]["seq"]
    assert record["status"] == "PROCESSING" and record["polls"] == 2
    assert api.get(f"/api/v1/operations/{op.id}/history").json() == expected
    assert len(expected["history"]) == 2 and expected["estimate"]["eta"] is not None

    # And the CLI itself prints the same (its clock is the wall clock: `now` differs).
    out = subprocess.run(
        [sys.executable, "-m", "worker", "history", op.id, "--json"],
        env=api.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    from_cli = json.loads(out)
    assert {k: v for k, v in from_cli.items() if k not in ("now", "estimate")} == {
        k: v for k, v in expected.items() if k not in ("now", "estimate")
    }
    status = subprocess.run(
        [sys.executable, "-m", "worker", "status", "--json"],
        env=api.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert json.loads(status)["operations"] == [record]

    csv_answer = api.get(f"/api/v1/operations/{op.id}/history.csv")
    assert csv_answer.headers["Content-Type"].startswith("text/csv")
    assert csv_answer.text.splitlines()[0].startswith("seq,observed_at,remote_updated_at")
    assert len(csv_answer.text.splitlines()) == 3


def test_unknown_and_invalid_ids(api: Api) -> None:
    missing = api.get(f"/api/v1/operations/{GOOD}")
    assert missing.status_code == 404
    assert missing.json() == {"errors": [{"id": GOOD, "reason": "not tracked"}]}
    assert api.get(f"/api/v1/operations/{GOOD}/history").status_code == 404
    for bad in ("nope", "comms_operation_", GOOD.upper()):
        answer = api.get(f"/api/v1/operations/{bad}")
        assert answer.status_code == 422
        assert answer.json()["errors"][0]["id"] == bad
        assert api.get(f"/api/v1/operations/{bad}/history").status_code == 422


def test_keyset_pages_with_an_opaque_cursor(api: Api) -> None:
    ops = [api.sandbox.add_operation(total=2, duration=5) for _ in range(23)]
    ids = [op.id for op in ops]
    api.track(ids)
    api.poll(ids[:5])  # five PROCESSING, the rest PENDING
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 10}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/api/v1/operations", **params).json()
        pages += 1
        seen += [op["id"] for op in page["operations"]]
        cursor = page["next"]
        if cursor is None:
            break
        assert GOOD not in cursor and "comms_operation" not in cursor  # opaque
        # Tracking more while paging neither repeats nor shifts what was seen.
        api.track([OTHER])
    assert pages == 3
    assert seen == sorted(ids)  # OTHER sorts before the cursor: not seen, nothing repeated
    processing = api.get("/api/v1/operations", status="processing", limit=1000).json()
    assert sorted(op["id"] for op in processing["operations"]) == sorted(ids[:5])
    both = api.http.get(
        api.url + "/api/v1/operations",
        params=[("status", "PENDING"), ("status", "PROCESSING")],
        timeout=10,
    ).json()
    assert len(both["operations"]) == 24 and both["next"] is None


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"cursor": "garbage!"}, "cursor is not one this API gave out"),
        ({"cursor": "eyJ2IjoyfQ"}, "cursor is not one this API gave out"),  # {"v":2}
        ({"status": "DONE"}, "unknown status DONE"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "ten"}, "limit"),
    ],
)
def test_bad_list_parameters_are_422(api: Api, params: dict[str, Any], reason: str) -> None:
    answer = api.get("/api/v1/operations", **params)
    assert answer.status_code == 422
    assert reason in answer.json()["errors"][0]["reason"]


def test_report_and_csv_match_the_report_builders(api: Api) -> None:
    ops = [api.sandbox.add_operation(total=4, duration=10) for _ in range(3)]
    api.track([op.id for op in ops])
    api.poll([op.id for op in ops])
    api.clock.advance(20)
    api.poll([ops[0].id])  # ended by now
    answer = api.get("/api/v1/report", since="1h")
    with api.rt.sessions() as session:
        period = reports.Period.parse("1h", None, api.clock.now())
        summary = reports.summarize(
            session, period, reports.parse_span("30m"), api.clock.now(), (), 100
        )
    assert answer.json() == summary_record(summary)
    assert answer.json()["operations"]["by_status"]["COMPLETED"] == 1
    filtered = api.get("/api/v1/report", status="PROCESSING").json()
    assert filtered["operations"]["total"] == 2 and filtered["statuses"] == ["PROCESSING"]
    as_csv = api.get("/api/v1/report.csv").text.splitlines()
    assert as_csv[0].split(",") == list(SUMMARY_CSV_FIELDS) and len(as_csv) == 2
    for params, reason in (
        ({"since": "yesterday"}, "is not a time"),
        ({"stuck_after": "long"}, "is not a span"),
        ({"since": "1h", "until": "2h"}, "the period is empty"),
    ):
        bad = api.get("/api/v1/report", **params)
        assert bad.status_code == 422 and reason in bad.json()["errors"][0]["reason"]


def test_progress_keeps_just_ended_operations_in_sight(api: Api) -> None:
    quick = api.sandbox.add_operation(total=4, duration=10)
    slow = api.sandbox.add_operation(total=100, duration=200)
    api.track([quick.id, slow.id])
    api.poll([quick.id, slow.id])
    api.clock.advance(20)
    api.poll([quick.id, slow.id])
    items = api.get("/api/v1/progress").json()["progress"]
    by_id = {item["operation"]["id"]: item for item in items}
    assert by_id[quick.id]["operation"]["status"] == "COMPLETED"
    assert by_id[quick.id]["estimate"]["note"] == "ended"
    assert by_id[slow.id]["estimate"]["eta"] is not None
    api.clock.advance(3600)  # an hour later the ended one has left the list
    later = api.get("/api/v1/progress", recent="10m").json()["progress"]
    assert [item["operation"]["id"] for item in later] == [slow.id]


def test_account_shows_a_credentials_error(api: Api) -> None:
    assert api.get("/api/v1/account").json()["paused"] is False
    api.rt.gate.pause(
        api.clock.now() + timedelta(seconds=60), "credentials rejected (HTTP 401)", 401
    )
    account = api.get("/api/v1/account").json()
    assert account["paused"] is True and account["credentials_rejected"] is True
    assert account["pause_status_code"] == 401 and "credentials" in account["pause_reason"]


def bury(api: Api, task_id: str, args: list[Any]) -> None:
    with api.rt.sessions.begin() as session:
        dead_letters.bury(
            session,
            task_id=task_id,
            task="optrack.track",
            args=args,
            reason="started 5 times without ending (OPTRACK_MAX_DELIVERIES)",
            deliveries=5,
            now=api.clock.now(),
        )


def test_dead_letters_are_listed_and_replayed_onto_the_broker(api: Api) -> None:
    bury(api, "given-up-1", [[GOOD]])
    bury(api, "given-up-2", [[OTHER]])
    listed = api.get("/api/v1/dead-letters").json()["dead_letters"]
    with api.rt.sessions() as session:
        assert listed == [dead_letters.as_json(x) for x in dead_letters.letters(session)]
    first, second = (x["id"] for x in listed)
    assert [x["args"] for x in listed] == [[[GOOD]], [[OTHER]]]
    replay = api.url + "/api/v1/dead-letters/replay"
    # Like every state change: the token, and JSON (a cross-site form post is a 415).
    assert requests.post(replay, json={"all": True}, timeout=10).status_code == 401
    form = api.http.post(replay, data="all=true", timeout=10)
    assert form.status_code == 415
    for bad in ({}, {"ids": []}, {"ids": [first], "all": True}, {"ids": [0]}, {"idz": [1]}, []):
        answer = api.post("/api/v1/dead-letters/replay", bad)
        assert answer.status_code == 422, (bad, answer.text)
        assert answer.json()["errors"][0]["reason"]
    unknown = api.post("/api/v1/dead-letters/replay", {"ids": [first, 999]})
    assert unknown.status_code == 404
    assert unknown.json()["errors"] == [
        {"reason": "no dead letter waiting with id 999", "index": 1}
    ]
    assert len(api.get("/api/v1/dead-letters").json()["dead_letters"]) == 2  # nothing sent

    done = api.post("/api/v1/dead-letters/replay", {"ids": [second]}).json()["replayed"]
    assert [(x["id"], x["task"]) for x in done] == [(second, "optrack.track")]
    rest = api.post("/api/v1/dead-letters/replay", {"all": True}).json()["replayed"]
    assert [x["id"] for x in rest] == [first]
    assert api.post("/api/v1/dead-letters/replay", {"all": True}).json() == {"replayed": []}
    assert api.get("/api/v1/dead-letters").json() == {"dead_letters": []}
    kept = api.get("/api/v1/dead-letters", replayed="true").json()["dead_letters"]
    assert {x["id"]: x["replay_task_id"] for x in kept} == {
        second: done[0]["task_id"],
        first: rest[0]["task_id"],
    }
    # The messages are on the broker of the settings (the embedded one here), as sent.
    with Connection(api.rt.settings.broker_url) as broker:
        queue = broker.SimpleQueue("celery")
        sent = [queue.get(timeout=10) for _ in range(2)]
        for message in sent:
            message.ack()
        queue.close()
    assert [(m.headers["id"], m.headers["task"], m.payload[0]) for m in sent] == [
        (done[0]["task_id"], "optrack.track", [[OTHER]]),
        (rest[0]["task_id"], "optrack.track", [[GOOD]]),
    ]


def test_healthz_is_503_with_the_reasons_then_200(api: Api) -> None:
    sick = requests.get(api.url + "/healthz", timeout=10)
    assert sick.status_code == 503
    assert "beat has never ticked" in sick.json()["problems"][0]
    with api.rt.sessions.begin() as session:
        health.beat_ticked(session, api.clock.now())
    well = requests.get(api.url + "/healthz", timeout=10)
    assert well.status_code == 200 and well.json()["ok"] is True
    api.rt.gate.pause(
        api.clock.now() + timedelta(seconds=60), "credentials rejected (HTTP 401)", 401
    )
    rejected = requests.get(api.url + "/healthz", timeout=10).json()
    assert rejected["ok"] is False and "credentials rejected" in rejected["problems"][0]
    bad = requests.get(api.url + "/healthz", params={"max_lag": "soon"}, timeout=10)
    assert bad.status_code == 422


def test_healthz_when_the_database_is_gone(tmp_path: Path, clock: FakeClock) -> None:
    env = {"OPTRACK_DATABASE_URL": f"sqlite:///{tmp_path / 'never-migrated.sqlite'}"}
    rt = Runtime(load_settings(env), clock=clock)
    with serve_app(rt) as server:
        answer = requests.get(server.url + "/healthz", timeout=10)
    rt.close()
    assert answer.status_code == 503
    assert "not migrated" in answer.json()["problems"][0]


# --- CORS ----------------------------------------------------------------------------------


def test_no_cors_unless_configured(api: Api) -> None:
    origin = {"Origin": "https://ops.example.com"}
    plain = api.http.get(api.url + "/api/v1/operations", headers=origin, timeout=10)
    assert "Access-Control-Allow-Origin" not in plain.headers
    preflight = requests.options(
        api.url + "/api/v1/operations",
        headers={**origin, "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    assert "Access-Control-Allow-Origin" not in preflight.headers
    with serve_app(api.rt, cors_origins=("https://ops.example.com",)) as server:
        allowed = requests.options(
            server.url + "/api/v1/operations",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
            timeout=10,
        )
        other = requests.options(
            server.url + "/api/v1/operations",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
            timeout=10,
        )
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://ops.example.com"
    assert "Access-Control-Allow-Origin" not in other.headers


# --- `optrack serve` -----------------------------------------------------------------------


@pytest.fixture
def serve_env(tmp_path: Path) -> dict[str, str]:
    return base_env(tmp_path, OPTRACK_HTTP_TOKEN=HTTP_TOKEN)


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_serve_refuses_to_start_without_a_token(serve_env: dict[str, str]) -> None:
    del serve_env["OPTRACK_HTTP_TOKEN"]
    result = run_cli(serve_env, "serve")
    assert result.returncode == 2 and "OPTRACK_HTTP_TOKEN is not set" in result.stderr
    remote = run_cli(serve_env, "serve", "--no-auth", "--host", "0.0.0.0")
    assert remote.returncode == 2 and "--no-auth is refused on 0.0.0.0" in remote.stderr
    serve_env["OPTRACK_HTTP_TOKEN"] = "short"
    weak = run_cli(serve_env, "serve")
    assert weak.returncode == 2 and "use at least 16" in weak.stderr
    assert "short" not in weak.stderr
    serve_env["OPTRACK_HTTP_PORT"] = "70000"
    assert run_cli(serve_env, "serve", "--no-auth").returncode == 2


def test_serve_binds_loopback_and_keeps_the_token_out_of_output(
    serve_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.db.test_security import listening_addresses

    log = tmp_path / "serve.log"
    with serve_process(serve_env, log) as served:
        port = int(served.url.rsplit(":", 1)[1])
        assert served.url.startswith("http://127.0.0.1:")
        assert listening_addresses(port) == {"0100007F"}
        # Not a terminal: the link names the variable, not the token.
        assert "#token=$OPTRACK_HTTP_TOKEN" in served.lines[1]
        auth = {"Authorization": f"Bearer {HTTP_TOKEN}"}
        assert requests.post(
            served.url + "/api/v1/operations", json={"ids": [GOOD]}, headers=auth, timeout=10
        ).json() == {"added": [GOOD], "already_tracked": []}
        wrong = {"Authorization": f"Bearer {HTTP_TOKEN}x"}
        assert requests.get(served.url + "/api/v1/report", headers=wrong, timeout=10).status_code
    err = log.read_text()
    assert '"POST /api/v1/operations HTTP/1.1" 200' in err
    out = "".join(served.lines) + err
    assert HTTP_TOKEN not in out and TOKEN not in out and SID not in out


def test_serve_no_auth_on_loopback(serve_env: dict[str, str], tmp_path: Path) -> None:
    with serve_process(serve_env, tmp_path / "serve.log", "--no-auth") as served:
        assert "no auth: loopback only" in served.lines[1]
        answer = requests.get(served.url + "/api/v1/operations", timeout=10)
        assert answer.status_code == 200
        # Another site's page: a "simple" cross-site POST, and a rebound name as Host.
        simple = requests.post(
            served.url + "/api/v1/operations",
            data=json.dumps({"ids": [GOOD]}),
            headers={"Content-Type": "text/plain", "Origin": "https://evil.example"},
            timeout=10,
        )
        assert simple.status_code == 415
        port = served.url.rsplit(":", 1)[1]
        rebound = requests.get(
            served.url + "/api/v1/operations", headers={"Host": f"evil.example:{port}"}, timeout=10
        )
        assert rebound.status_code == 400
        listed = requests.get(served.url + "/api/v1/operations", timeout=10).json()
        assert listed["operations"] == []


def test_serve_says_when_the_port_is_taken(serve_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(serve_env, "serve", "--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OPTRACK_HTTP_PORT": "http"}, "OPTRACK_HTTP_PORT='http' is not a whole number"),
        ({"OPTRACK_HTTP_PORT": "65536"}, "must be between 0 and 65535"),
        ({"OPTRACK_HTTP_TOKEN": "abc"}, "OPTRACK_HTTP_TOKEN is 3 characters"),
        ({"OPTRACK_HTTP_TOKEN": "a" * 16 + " b"}, "must not contain spaces"),
        ({"OPTRACK_HTTP_CORS_ORIGINS": "*"}, "is not an origin"),
        ({"OPTRACK_HTTP_CORS_ORIGINS": "https://a.example/path"}, "is not an origin"),
        ({"OPTRACK_HTTP_ALLOWED_HOSTS": "*.example.com"}, "is not a host name or IP"),
        ({"OPTRACK_HTTP_ALLOWED_HOSTS": "https://ops.example.com"}, "is not a host name or IP"),
        ({"OPTRACK_HTTP_ALLOWED_HOSTS": "ops.example.com:8080"}, "is not a host name or IP"),
        ({"OPTRACK_HTTP_ALLOWED_HOSTS": "-a.example"}, "is not a host name or IP"),
        (
            {"OPTRACK_HTTP_ALLOWED_HOSTS": ",".join(f"h{n}.example" for n in range(65))},
            "at most 64",
        ),
    ],
)
def test_http_settings_are_checked(env: dict[str, str], message: str) -> None:
    from worker.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")):
        load_settings(env)


def test_http_settings_defaults_and_the_token_is_a_secret() -> None:
    default = load_settings({})
    assert (default.http_host, default.http_port, default.http_token) == ("127.0.0.1", 8080, "")
    assert default.http_cors_origins == ()
    settings = load_settings(
        {
            "OPTRACK_HTTP_HOST": "0.0.0.0",
            "OPTRACK_HTTP_PORT": "9000",
            "OPTRACK_HTTP_TOKEN": HTTP_TOKEN,
            "OPTRACK_HTTP_CORS_ORIGINS": "https://a.example, https://b.example:8443/",
        }
    )
    assert settings.http_cors_origins == ("https://a.example", "https://b.example:8443")
    assert default.http_allowed_hosts == ()
    hosts = load_settings({"OPTRACK_HTTP_ALLOWED_HOSTS": "Ops.Example.com., 10.0.0.5, [::1], api"})
    assert hosts.http_allowed_hosts == ("ops.example.com", "10.0.0.5", "::1", "api")
    assert HTTP_TOKEN in settings.secrets and HTTP_TOKEN not in repr(settings)


def test_the_listening_socket_says_tcp_so_answers_are_not_held_by_nagle() -> None:
    # asyncio sets TCP_NODELAY on accepted sockets only when the socket's proto is TCP; with
    # proto 0 every answer waited ~40 ms for delayed ACKs (bench/http.py found it).
    from worker.http.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_api_answers_are_not_cached_and_the_page_is_framed_by_nobody(api: Api) -> None:
    answer = api.get("/api/v1/operations")
    assert answer.headers["Cache-Control"] == "no-store"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    page = requests.get(api.url + "/", timeout=10)
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert "server" not in {k.lower() for k in page.headers}


def test_the_http_token_is_redacted_from_log_lines() -> None:
    import io
    import logging

    from worker import logs

    settings = load_settings({"OPTRACK_HTTP_TOKEN": HTTP_TOKEN})
    out = io.StringIO()
    handler = logs.make_handler(settings, out)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "sent %s", (HTTP_TOKEN,), None)
    handler.handle(record)
    assert HTTP_TOKEN not in out.getvalue() and "sent ***" in out.getvalue()


def test_the_page_takes_the_statuses_colours_from_the_one_palette(api: Api) -> None:
    page = requests.get(api.url + "/", timeout=10)
    assert '<link rel="stylesheet" href="/palette.css">' in page.text
    palette = requests.get(api.url + "/palette.css", timeout=10)
    assert palette.status_code == 200
    assert palette.headers["content-type"].startswith("text/css")
    for status, color in STATUS_COLORS.items():
        assert f"--{status.lower().replace('_', '-')}: {color};" in palette.text
    css = requests.get(api.url + "/static/app.css", timeout=10).text
    assert "--processing:" not in css  # one definition: the palette


# --- completion notices ----------------------------------------------------------------------

NOTICE_OPS = [f"comms_operation_01h9krwprkeee8fzqspvwy6s{i:02d}" for i in range(4)]


def test_notices_are_listed_by_page_and_filter_and_shown(api: Api) -> None:
    ids = notices_in_every_state(api.rt.sessions, api.clock, NOTICE_OPS)
    page = api.get("/api/v1/notices", limit=3).json()
    assert [n["id"] for n in page["notices"]] == [ids["unsent"], ids["owed"], ids["failed"]]
    rest = api.get("/api/v1/notices", limit=3, cursor=page["next"]).json()
    assert [n["id"] for n in rest["notices"]] == [ids["delivered"]] and rest["next"] is None
    now = api.clock.now()
    with api.rt.sessions() as session:  # the records `optrack notices list --json` prints
        every = outbox.page(session, outbox.Filter(), now, 10).notices
        assert page["notices"] + rest["notices"] == [outbox.record(r, now) for r in every]
    assert [n["status"] for n in page["notices"] + rest["notices"]] == [
        "unsent",
        "owed",
        "failed",
        "delivered",
    ]

    def ids_of(**params: Any) -> list[int]:
        answer = api.get("/api/v1/notices", **params)
        assert answer.status_code == 200, answer.text
        return [n["id"] for n in answer.json()["notices"]]

    assert ids_of(status=["failed", "OWED"]) == [ids["owed"], ids["failed"]]
    assert ids_of(operation=NOTICE_OPS[0]) == [ids["delivered"]]
    failed_at = page["notices"][2]["created_at"]
    assert ids_of(since=failed_at, until=page["notices"][1]["created_at"]) == [ids["failed"]]

    shown = api.get(f"/api/v1/notices/{ids['delivered']}").json()
    assert shown["status"] == "delivered" and shown["operation"]["id"] == NOTICE_OPS[0]
    assert shown["operation"]["status"] == "COMPLETED"

    operations_cursor = paging.encode(GOOD)
    for params, reason in [
        ({"status": "lost"}, "unknown notice status lost"),
        ({"cursor": "garbage"}, "cursor is not one this API gave out"),
        ({"cursor": operations_cursor}, "cursor is not one this API gave out"),
        ({"operation": "comms_op"}, "comms_operation_"),
        ({"since": "yesterday-ish"}, "is not a time"),
        ({"limit": "0"}, "limit"),
    ]:
        answer = api.get("/api/v1/notices", **params)
        assert answer.status_code == 422, params
        assert reason in answer.json()["errors"][0]["reason"], (params, answer.text)
    assert api.get("/api/v1/notices/999999").json() == {
        "errors": [{"reason": "no notice with id 999999"}]
    }
    assert api.get("/api/v1/notices/999999").status_code == 404
    for bad in ("0", "abc", str(2**63)):
        assert api.get(f"/api/v1/notices/{bad}").status_code == 422, bad


def test_notices_are_resent_behind_the_token_and_only_where_something_delivers(
    api: Api,
) -> None:
    ids = notices_in_every_state(api.rt.sessions, api.clock, NOTICE_OPS)
    resend = "/api/v1/notices/resend"
    body = {"ids": [ids["delivered"]]}
    assert requests.post(api.url + resend, json=body, timeout=10).status_code == 401
    form = api.http.post(api.url + resend, data="ids=1", timeout=10)
    assert form.status_code == 415
    refused = api.post(resend, body)
    assert refused.status_code == 409
    assert "no process delivers notices" in refused.json()["errors"][0]["reason"]

    with api.rt.sessions.begin() as session:  # a worker with a channel, alive a minute ago
        liveness.notices_delivered(session, api.clock.now())
    unknown = api.post(resend, {"ids": [ids["delivered"], 999999]})
    assert unknown.status_code == 404
    assert unknown.json() == {"errors": [{"reason": "no notice with id 999999", "index": 1}]}
    assert api.get(f"/api/v1/notices/{ids['delivered']}").json()["status"] == "delivered"
    for _ in range(2):  # twice: the same one owed notice
        answer = api.post(resend, body)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"resent": [ids["delivered"]], "sending": []}
    again = api.get(f"/api/v1/notices/{ids['delivered']}").json()
    assert again["status"] == "owed" and again["next_attempt_at"] == utc_text(api.clock.now())
    everything = api.post(resend, {"since": "30d"}).json()
    assert everything == {"resent": sorted(ids.values()), "sending": []}
    latest = {"resent": [ids["unsent"]], "sending": []}  # ended just now: the only one
    assert api.post(resend, {"since": "1s"}).json() == latest

    for bad in (
        {},
        {"ids": []},
        {"ids": [0]},
        {"ids": [1], "since": "1d"},
        {"until": "1d"},
        {"since": "yesterday-ish"},
        {"since": "1d", "until": "2d"},
        {"all": True},
        [1],
    ):
        answer = api.post(resend, bad)
        assert answer.status_code == 422, (bad, answer.text)
        assert answer.json()["errors"][0]["reason"], bad
