"""`optrack accounts`: accounts as data, their secrets sealed, never shown (real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from tests.support.processes import base_env
from worker.credentials import Vault
from worker.db import Account, TrackedOperation, make_engine, make_sessionmaker

SID_A = "AC" + "a1" * 16
KEY_A = "SK" + "b2" * 16
SECRET = "s3cret-api-key-value-0123456789abcdef"
KEY = Fernet.generate_key().decode()


@pytest.fixture
def env(tmp_path: Path, db_url: str) -> dict[str, str]:
    return base_env(tmp_path, OPTRACK_DATABASE_URL=db_url, OPTRACK_SECRET_KEY=KEY)


def optrack(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def stored(db_url: str) -> dict[str, Account]:
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as session:
        rows = {row.name: row for row in session.scalars(select(Account))}
    engine.dispose()
    return rows


def test_an_account_added_from_stdin_is_sealed_and_never_shown(
    env: dict[str, str], db_url: str
) -> None:
    added = optrack(
        env, "accounts", "add", "acme", "--account-sid", SID_A, "--api-key-sid", KEY_A,
        stdin=SECRET + "\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert f"account acme added: {SID_A}, with API key {KEY_A}" in added.stdout

    rows = stored(db_url)
    assert set(rows) == {"default", "acme"}
    row = rows["acme"]
    assert row.secret is not None and SECRET not in row.secret
    assert Vault((KEY,)).open(row.secret) == SECRET  # sealed, with the key of the environment
    assert SECRET not in repr(row.__dict__)

    listed = optrack(env, "accounts", "list", "--json")
    shown = optrack(env, "accounts", "show", "acme")
    for result in (added, listed, shown):
        assert SECRET not in result.stdout + result.stderr
    records = {r["name"]: r for r in json.loads(listed.stdout)["accounts"]}
    assert records["acme"] | {"created_at": None, "secret_set_at": None} == {
        "name": "acme",
        "account_sid": SID_A,
        "api_key_sid": KEY_A,
        "auth": "api key",
        "credentials": "stored (encrypted)",
        "max_requests_per_second": None,
        "created_at": None,
        "secret_set_at": None,
        "active_operations": 0,
        "ended_operations": 0,
    }
    assert records["default"]["credentials"] == "environment"
    assert records["default"]["account_sid"] == env["TWILIO_ACCOUNT_SID"]


def test_the_secret_from_a_variable_or_a_file(
    env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file-0123456789\n")
    env["ACME_TOKEN"] = "from-a-variable-0123456789"
    by_env = optrack(
        env, "accounts", "add", "one", "--account-sid", SID_A, "--secret-env", "ACME_TOKEN"
    )
    assert by_env.returncode == 0, by_env.stderr
    other_sid = "AC" + "c3" * 16
    by_file = optrack(
        env, "accounts", "add", "two", "--account-sid", other_sid,
        "--secret-file", str(secret_file),
    )  # fmt: skip
    assert by_file.returncode == 0, by_file.stderr
    rows = stored(db_url)
    vault = Vault((KEY,))
    assert vault.open(rows["one"].secret or "") == "from-a-variable-0123456789"
    assert vault.open(rows["two"].secret or "") == "from-a-file-0123456789"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("add", "Acme!", "--account-sid", SID_A), "is not an account name"),
        (("add", "acme", "--account-sid", "AC123"), "is not an account SID"),
        (("add", "acme", "--account-sid", SID_A, "--api-key-sid", "SKnope"), "not an API key SID"),
        (("add", "default", "--account-sid", SID_A), "`default` is the environment's account"),
        (("add", "acme", "--account-sid", SID_A, "--secret-env", "NOT_SET"), "is not set"),
        (("add", "acme", "--account-sid", SID_A, "--secret-file", "/nonexistent"), "--secret-file"),
        (("show", "nobody"), "no account named 'nobody'"),
        (("remove", "default"), "cannot be removed"),
        (("set-secret", "default"), "the default account's credentials are the environment's"),
        (("set-budget", "acme", "0"), "0"),
        (("set-budget", "default", "5"), "OPTRACK_MAX_REQUESTS_PER_SECOND"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(
    env: dict[str, str], db_url: str, args: tuple[str, ...], message: str
) -> None:
    result = optrack(env, "accounts", *args, stdin=SECRET)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert set(stored(db_url)) == {"default"}


def test_without_a_secret_key_nothing_is_stored(env: dict[str, str], db_url: str) -> None:
    del env["OPTRACK_SECRET_KEY"]
    result = optrack(env, "accounts", "add", "acme", "--account-sid", SID_A, stdin=SECRET)
    assert result.returncode == 2
    assert "OPTRACK_SECRET_KEY is not set" in result.stderr
    assert set(stored(db_url)) == {"default"}


def test_a_name_or_a_sid_is_taken_once(env: dict[str, str], db_url: str) -> None:
    assert (
        optrack(env, "accounts", "add", "acme", "--account-sid", SID_A, stdin=SECRET).returncode
        == 0
    )
    again = optrack(env, "accounts", "add", "acme", "--account-sid", "AC" + "d4" * 16, stdin=SECRET)
    assert again.returncode == 2
    assert "an account named 'acme' exists already" in again.stderr
    same_sid = optrack(env, "accounts", "add", "other", "--account-sid", SID_A, stdin=SECRET)
    assert same_sid.returncode == 2
    assert f"account SID {SID_A} is account 'acme' already" in same_sid.stderr
    env_sid = optrack(
        env, "accounts", "add", "env", "--account-sid", env["TWILIO_ACCOUNT_SID"], stdin=SECRET
    )
    assert env_sid.returncode == 2
    assert "is the default account's" in env_sid.stderr
    assert set(stored(db_url)) == {"default", "acme"}


def test_secret_rotation_and_key_rotation(env: dict[str, str], db_url: str) -> None:
    assert (
        optrack(env, "accounts", "add", "acme", "--account-sid", SID_A, stdin=SECRET).returncode
        == 0
    )
    rotated = optrack(
        env, "accounts", "set-secret", "acme", "--api-key-sid", KEY_A, stdin="new-secret-42"
    )
    assert rotated.returncode == 0, rotated.stderr
    row = stored(db_url)["acme"]
    assert row.api_key_sid == KEY_A
    assert Vault((KEY,)).open(row.secret or "") == "new-secret-42"

    new_key = Fernet.generate_key().decode()
    env["OPTRACK_SECRET_KEY"] = f"{new_key},{KEY}"
    resealed = optrack(env, "accounts", "rotate-key")
    assert resealed.returncode == 0, resealed.stderr
    assert "1 secret(s) sealed with the first key" in resealed.stdout
    assert Vault((new_key,)).open(stored(db_url)["acme"].secret or "") == "new-secret-42"

    env["OPTRACK_SECRET_KEY"] = Fernet.generate_key().decode()  # neither key: refused, said so
    lost = optrack(env, "accounts", "rotate-key")
    assert lost.returncode == 2
    assert "cannot be decrypted with any key of OPTRACK_SECRET_KEY" in lost.stderr


def test_budget_and_remove(env: dict[str, str], db_url: str) -> None:
    assert (
        optrack(env, "accounts", "add", "acme", "--account-sid", SID_A, stdin=SECRET).returncode
        == 0
    )
    assert optrack(env, "accounts", "set-budget", "acme", "2.5").returncode == 0
    assert stored(db_url)["acme"].max_requests_per_second == 2.5
    assert optrack(env, "accounts", "set-budget", "acme", "off").returncode == 0
    assert stored(db_url)["acme"].max_requests_per_second is None
    removed = optrack(env, "accounts", "remove", "acme")
    assert removed.returncode == 0, removed.stderr
    assert set(stored(db_url)) == {"default"}


def test_tracking_under_an_account_and_removing_it(env: dict[str, str], db_url: str) -> None:
    op = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
    assert (
        optrack(env, "accounts", "add", "acme", "--account-sid", SID_A, stdin=SECRET).returncode
        == 0
    )
    unknown = optrack(env, "track", "--account", "nobody", op)
    assert unknown.returncode == 2
    assert "no account named 'nobody'" in unknown.stderr
    tracked = optrack(env, "track", "--account", "acme", op)
    assert tracked.returncode == 0, tracked.stderr
    assert f"tracking {op} (account acme)" in tracked.stdout
    elsewhere = optrack(env, "track", op)
    assert elsewhere.returncode == 2
    assert f"nothing was tracked under account 'default': {op} is tracked under account 'acme'" in (
        elsewhere.stderr
    )
    assert "Traceback" not in elsewhere.stderr

    other = "comms_operation_01h9krwprkeee8fzqspvwy6nq9"
    assert optrack(env, "track", other).returncode == 0
    only = json.loads(optrack(env, "status", "--json", "--account", "acme").stdout)
    assert [(o["id"], o["account"]) for o in only["operations"]] == [(op, "acme")]
    assert [a["name"] for a in only["accounts"]] == ["acme"]
    every = json.loads(optrack(env, "status", "--json").stdout)
    assert {o["id"]: o["account"] for o in every["operations"]} == {op: "acme", other: "default"}
    report = json.loads(optrack(env, "report", "--json", "--account", "default").stdout)
    assert report["operations"]["total"] == 1
    assert optrack(env, "history", op, "--account", "acme").returncode == 0
    wrong = optrack(env, "history", op, "--account", "default")
    assert wrong.returncode == 2
    assert f"{op} is tracked under account 'acme', not 'default'" in wrong.stderr
    assert optrack(env, "status", "--account", "nobody").returncode == 2
    assert optrack(env, "report", "--account", "nobody").returncode == 2

    refused = optrack(env, "accounts", "remove", "acme")
    assert refused.returncode == 2
    assert "account 'acme' has 1 active and 0 ended operation(s); nothing removed" in refused.stderr
    assert set(stored(db_url)) == {"default", "acme"}
    removed = optrack(env, "accounts", "remove", "acme", "--delete-operations")
    assert removed.returncode == 0, removed.stderr
    assert "account acme removed; 1 operation(s) deleted" in removed.stdout
    assert set(stored(db_url)) == {"default"}
    assert optrack(env, "track", op).returncode == 0  # free to track under default now
    assert set(tracked_ids(db_url)) == {op, other}


def tracked_ids(db_url: str) -> list[str]:
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as session:
        ids = list(session.scalars(select(TrackedOperation.id)))
    engine.dispose()
    return ids


def test_watch_and_wait_take_an_account(env: dict[str, str]) -> None:
    op = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
    other = "comms_operation_01h9krwprkeee8fzqspvwy6nq9"
    new = "comms_operation_01h9krwprkeee8fzqspvwy6nqa"
    assert (
        optrack(env, "accounts", "add", "acme", "--account-sid", SID_A, stdin=SECRET).returncode
        == 0
    )
    assert optrack(env, "track", "--account", "acme", op).returncode == 0
    assert optrack(env, "track", other).returncode == 0

    wide = {**env, "COLUMNS": "200"}
    acme = optrack(wide, "watch", "--once", "--account", "acme")
    assert acme.returncode == 0, acme.stderr
    assert op in acme.stdout and other not in acme.stdout
    default = optrack(wide, "watch", "--once", "--account", "default")
    assert other in default.stdout and op not in default.stdout
    for command in (("watch", "--once"), ("wait", "--timeout", "1s")):
        refused = optrack(env, *command, "--account", "default", op, other)
        assert refused.returncode == 2, command
        assert f"not of account 'default': {op} is tracked under account 'acme'" in refused.stderr
        assert other not in refused.stderr and "Traceback" not in refused.stderr
        unknown = optrack(env, *command, "--account", "nobody", op)
        assert unknown.returncode == 2 and "no account named 'nobody'" in unknown.stderr

    # wait --track --account: the new ID is tracked under that account (it then times out).
    waited = optrack(env, "wait", "--track", "--account", "acme", "--timeout", "1s", new)
    assert waited.returncode == 124, waited.stderr
    every = json.loads(optrack(env, "status", "--json").stdout)
    assert {o["id"]: o["account"] for o in every["operations"]}[new] == "acme"
