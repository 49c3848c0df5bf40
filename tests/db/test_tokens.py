# ruff: noqa: F811  (api: test_http's fixture, imported, then named by each test)
"""Scoped HTTP tokens (`optrack tokens`) over a real socket, on SQLite and PostgreSQL.

A token minted by the CLI is stored as a SHA-256 digest only; one scoped to accounts sees and
tracks only their operations (another account's operation is a 404, another account named is
a 403); a read-only one gets 403 on every request that changes state; a revoked one gets 401.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import MetaData, select

from tests.db.test_http import (  # noqa: F401  (api: the fixture, used by name)
    ACCOUNT_KEY,
    GOOD,
    HTTP_TOKEN,
    OTHER,
    Api,
    api,
)
from tests.support.processes import serve_process
from worker import events, listing
from worker.accounts import Accounts
from worker.credentials import Vault
from worker.db import make_engine
from worker.http import create_app
from worker.tokens import Tokens, digest

THIRD = "comms_operation_01h9krwprkeee8fzqspvwy6nqa"


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, capture_output=True, text=True, timeout=60
    )


def add_account(api: Api, name: str, sid_pair: str) -> None:
    with api.rt.sessions.begin() as session:
        sealed = Vault((ACCOUNT_KEY,)).seal(f"{name}-secret")
        Accounts(session).add(name, "AC" + sid_pair * 16, None, sealed, api.clock.now())


def mint(api: Api, name: str, accounts: tuple[str, ...] = (), read_only: bool = False) -> str:
    with api.rt.sessions.begin() as session:
        token, _ = Tokens(session).add(name, accounts, read_only, api.clock.now())
    return token


def as_token(token: str) -> requests.Session:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {token}"
    return http


def every_text(url: str) -> str:
    """Every value of every row of every table, as one text."""
    engine = make_engine(url)
    metadata = MetaData()
    metadata.reflect(engine)
    with engine.connect() as conn:
        text = repr([list(conn.execute(select(t))) for t in metadata.tables.values()])
    engine.dispose()
    return text


def test_the_cli_mints_lists_and_revokes_and_stores_only_a_digest(api: Api) -> None:
    add_account(api, "acme", "ac")
    minted = run_cli(api.env, "tokens", "add", "acme-reader", "--account", "acme", "--read-only")
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    assert len(token) >= 40 and "\n" not in token
    assert "read-only, acme" in minted.stderr and token not in minted.stderr
    # In the database: the digest, never the token.
    stored = every_text(api.env["OPTRACK_DATABASE_URL"])
    assert token not in stored and digest(token) in stored
    listed = run_cli(api.env, "tokens", "list")
    assert listed.returncode == 0 and "acme-reader" in listed.stdout
    as_json = run_cli(api.env, "tokens", "list", "--json")
    [record] = json.loads(as_json.stdout)["tokens"]
    assert record["name"] == "acme-reader" and record["accounts"] == ["acme"]
    assert record["read_only"] is True and record["revoked_at"] is None
    for out in (listed.stdout + listed.stderr, as_json.stdout + as_json.stderr):
        assert token not in out and digest(token) not in out

    reader = as_token(token)
    assert reader.get(api.url + "/api/v1/operations", timeout=10).status_code == 200

    for args, message in [
        (("tokens", "add", "acme-reader"), "a token named 'acme-reader' exists already"),
        (("tokens", "add", "x", "--account", "nobody"), "no account named 'nobody'"),
        (("tokens", "add", "Not A Name"), "is not a token name"),
        (("tokens", "revoke", "nobody"), "no token named 'nobody'"),
    ]:
        refused = run_cli(api.env, *args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert message in refused.stderr and "Traceback" not in refused.stderr

    revoked = run_cli(api.env, "tokens", "revoke", "acme-reader")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    again = run_cli(api.env, "tokens", "revoke", "acme-reader")
    assert again.returncode == 2 and "revoked already" in again.stderr
    answer = reader.get(api.url + "/api/v1/operations", timeout=10)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert token not in answer.text
    [record] = json.loads(run_cli(api.env, "tokens", "list", "--json").stdout)["tokens"]
    assert record["revoked_at"] is not None


def test_a_scoped_token_sees_and_tracks_only_its_accounts(api: Api) -> None:
    add_account(api, "acme", "ac")
    add_account(api, "globex", "9b")
    assert api.post("/api/v1/operations", {"account": "acme", "ids": [GOOD]}).status_code == 200
    polled = api.sandbox.add_operation(total=10, duration=100).id
    api.track([OTHER, polled])  # default
    api.poll([polled])  # acme's credentials are not the sandbox's: it is not polled
    scoped = as_token(mint(api, "acme-only", ("acme",)))

    def get(path: str, **params: Any) -> requests.Response:
        return scoped.get(api.url + path, params=params, timeout=10)

    listed = get("/api/v1/operations").json()["operations"]
    assert [o["id"] for o in listed] == [GOOD]
    assert [o["id"] for o in get("/api/v1/operations", account="acme").json()["operations"]] == [
        GOOD
    ]
    for path in ("/api/v1/operations", "/api/v1/report", "/api/v1/report.csv", "/api/v1/progress"):
        refused = get(path, account="default")
        assert refused.status_code == 403, path
        assert "does not see account default" in refused.json()["errors"][0]["reason"]
        assert get(path, account="nobody").status_code == 422  # unknown: as for every token
    assert get("/api/v1/report").json()["operations"]["total"] == 1
    assert api.get("/api/v1/report").json()["operations"]["total"] == 3
    progress = get("/api/v1/progress").json()["progress"]
    assert [p["operation"]["id"] for p in progress] == [GOOD]

    # The accounts it sees, with their figures (the dashboard's table).
    assert get("/api/v1/accounts").json() == {
        "accounts": [
            {
                "name": "acme",
                "active": 1,
                "paused": False,
                "paused_until": None,
                "failure_rate": None,
            }
        ]
    }
    every = {a["name"]: a for a in api.get("/api/v1/accounts").json()["accounts"]}
    assert list(every) == ["acme", "default", "globex"]
    assert every["default"]["active"] == 2 and every["globex"]["active"] == 0
    assert every["default"]["failure_rate"] is None  # no sender created or failed yet
    assert listing.AccountFigures("x", 0, created=3, failed=1).failure_rate == 0.25

    # Another account's operation is not there for this token: 404 as for an untracked one.
    for path in ("", "/history", "/history.csv"):
        assert get(f"/api/v1/operations/{GOOD}{path}").status_code == 200, path
        hidden = get(f"/api/v1/operations/{OTHER}{path}")
        assert hidden.status_code == 404, path
        assert hidden.json() == {"errors": [{"id": OTHER, "reason": "not tracked"}]}
    assert get(f"/api/v1/operations/{OTHER}", wait="1s").status_code == 404

    # Routes of every account (not filtered by account) are refused.
    for path in ("/api/v1/dead-letters", "/api/v1/notices", "/api/v1/account"):
        refused = get(path)
        assert refused.status_code == 403, path
        assert "scoped to accounts" in refused.json()["errors"][0]["reason"]

    # Tracking: under its account yes, under any other 403 and nothing written.
    for account in ("default", "globex", "nobody"):
        refused = scoped.post(
            api.url + "/api/v1/operations", json={"account": account, "ids": [THIRD]}, timeout=10
        )
        assert refused.status_code == 403, account
        assert "may not track under account" in refused.json()["errors"][0]["reason"]
    assert api.tracked() == 3
    added = scoped.post(
        api.url + "/api/v1/operations", json={"account": "acme", "ids": [THIRD]}, timeout=10
    )
    assert added.status_code == 200 and added.json()["added"] == [THIRD]

    # The event stream's feed keeps only the token's accounts' operations.
    later = api.clock.now() + timedelta(hours=1)

    def read(feed: events.Feed) -> list[events.Event]:
        with api.rt.sessions() as session:  # one snapshot per read
            return feed.read(session, later)

    acme = read(events.Feed(events.Cursor(0, 0), None, frozenset({"acme"})))
    default = read(events.Feed(events.Cursor(0, 0), None, "default"))
    every = read(events.Feed(events.Cursor(0, 0)))
    assert acme == []
    assert {e.operation_id for e in default} == {e.operation_id for e in every} == {polled}


def test_a_read_only_token_changes_nothing(api: Api) -> None:
    reader = as_token(mint(api, "reader", read_only=True))
    documented = create_app(api.rt, token=HTTP_TOKEN).openapi()["paths"]
    posts = [path for path, methods in documented.items() if "post" in methods]
    assert "/api/v1/operations" in posts and len(posts) >= 3
    for path in posts:
        refused = reader.post(api.url + path, json={"ids": [GOOD]}, timeout=10)
        assert refused.status_code == 403, path
        assert refused.json() == {
            "errors": [{"reason": "token reader is read-only: it changes nothing"}]
        }
        assert "403" in documented[path]["post"]["responses"], path
    assert api.tracked() == 0
    for path in ("/api/v1/operations", "/api/v1/report", "/api/v1/dead-letters"):
        assert reader.get(api.url + path, timeout=10).status_code == 200, path


def test_a_minted_token_stays_out_of_the_log(api: Api, tmp_path: Path) -> None:
    token = mint(api, "ops")
    log = tmp_path / "serve.log"
    with serve_process(api.env, log) as served:
        http = as_token(token)
        ok = http.post(served.url + "/api/v1/operations", json={"ids": [GOOD]}, timeout=10)
        assert ok.status_code == 200
        wrong = as_token(token + "x").get(served.url + "/api/v1/report", timeout=10)
        assert wrong.status_code == 401 and token not in wrong.text
    out = "".join(served.lines) + log.read_text()
    assert '"POST /api/v1/operations HTTP/1.1" 200' in out
    assert token not in out and token[len("optrack_") :][:12] not in out


@pytest.mark.parametrize("name", ["", "x" * 65, "Upper", "_under", "a.b"])
def test_bad_token_names_are_refused(api: Api, name: str) -> None:
    refused = run_cli(api.env, "tokens", "add", name)
    assert refused.returncode == 2 and "is not a token name" in refused.stderr
    assert "Traceback" not in refused.stderr and refused.stdout == ""
