"""The `optrack` command line, run as a user runs it (a real subprocess, a real database)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.support.processes import base_env
from tests.support.services import TOKEN
from worker import reports
from worker.db import HistoryEntry, TrackedOperation, make_engine, make_sessionmaker
from worker.runtime import Runtime
from worker.sandbox import SandboxServer
from worker.settings import load_settings

GOOD = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
OTHER = "comms_operation_01h9krwprkeee8fzqspvwy6nq9"


@pytest.fixture
def env(tmp_path: Path, db_url: str) -> dict[str, str]:
    return base_env(tmp_path, OPTRACK_DATABASE_URL=db_url)


def optrack(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def tracked(db_url: str) -> list[str]:
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as session:
        ids = list(session.scalars(select(TrackedOperation.id).order_by(TrackedOperation.id)))
    engine.dispose()
    return ids


def test_invalid_id_exits_2_and_writes_nothing(env: dict[str, str], db_url: str) -> None:
    result = optrack(env, "track", GOOD, "not-an-id")
    assert result.returncode == 2
    assert "'not-an-id' is not an operation ID" in result.stderr
    assert "nothing was tracked" in result.stderr
    assert tracked(db_url) == []


def test_track_then_again_is_a_noop_that_says_so(env: dict[str, str], db_url: str) -> None:
    first = optrack(env, "track", GOOD)
    assert first.returncode == 0, first.stderr
    assert f"tracking {GOOD}" in first.stdout
    again = optrack(env, "track", "-", stdin=f"{GOOD}\n{OTHER}\n")
    assert again.returncode == 0, again.stderr
    assert f"already tracked {GOOD}" in again.stdout
    assert f"tracking {OTHER}" in again.stdout
    assert tracked(db_url) == [GOOD, OTHER]


def test_status_and_history_outputs(
    env: dict[str, str], db_url: str, sandbox: SandboxServer
) -> None:
    op = sandbox.add_operation(total=5, duration=3600)
    env["OPTRACK_API_BASE_URL"] = sandbox.base_url
    assert optrack(env, "track", op.id).returncode == 0
    rt = Runtime(load_settings(env))
    rt.poller.refresh([op.id])
    rt.close()

    status = optrack(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    [record] = json.loads(status.stdout)["operations"]
    assert record["id"] == op.id and record["status"] == "PROCESSING"
    assert record["total"] == 5 and record["polls"] == 1

    table = optrack(env, "status")
    assert op.id in table.stdout and "PROCESSING" in table.stdout

    as_csv = optrack(env, "history", op.id, "--csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert len(rows) == 1 and rows[0]["status"] == "PROCESSING" and rows[0]["total"] == "5"
    as_json = json.loads(optrack(env, "history", op.id, "--json").stdout)
    assert as_json["history"][0]["seq"] == int(rows[0]["seq"])

    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as session:
        assert session.scalar(select(func.count()).select_from(HistoryEntry)) == 1
    engine.dispose()
    for output in (status.stdout, table.stdout, as_csv.stdout, status.stderr):
        assert TOKEN not in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("history", "nope"), "is not an operation ID"),
        (("history", GOOD), "is not tracked"),
        (("history", GOOD, "--json", "--csv"), "choose one"),
    ],
)
def test_history_usage_errors_exit_2(
    env: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    result = optrack(env, *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_bad_setting_is_a_clear_usage_error(env: dict[str, str]) -> None:
    env["OPTRACK_POLL_INTERVAL"] = "soon"
    result = optrack(env, "status")
    assert result.returncode == 2
    assert "OPTRACK_POLL_INTERVAL='soon' is not a number" in result.stderr


@pytest.mark.parametrize("raw", ["0", "30"])
def test_a_retry_after_cap_under_a_minute_is_refused_at_start(
    env: dict[str, str], raw: str
) -> None:
    env["OPTRACK_MAX_RETRY_AFTER"] = raw
    result = optrack(env, "status")
    assert result.returncode == 2
    assert f"OPTRACK_MAX_RETRY_AFTER={raw} is below 60 s" in result.stderr
    assert "Traceback" not in result.stderr


def test_credentials_in_the_base_url_exit_2_and_are_not_echoed(env: dict[str, str]) -> None:
    env["OPTRACK_API_BASE_URL"] = f"https://{env['TWILIO_ACCOUNT_SID']}:{TOKEN}@comms.twilio.com/v1"
    result = optrack(env, "status")
    assert result.returncode == 2
    assert "OPTRACK_API_BASE_URL=https://***@comms.twilio.com/v1 holds credentials" in result.stderr
    assert TOKEN not in result.stderr + result.stdout
    assert env["TWILIO_ACCOUNT_SID"] not in result.stderr


def test_a_base_url_without_v1_exits_2(env: dict[str, str]) -> None:
    env["OPTRACK_API_BASE_URL"] = "https://comms.twilio.com"
    result = optrack(env, "status")
    assert result.returncode == 2
    assert "must be the API root, its path ending with /v1" in result.stderr


def test_a_lease_too_short_for_one_request_exits_2(env: dict[str, str]) -> None:
    env["OPTRACK_CLAIM_LEASE"] = "20"  # the request deadline (30 s) alone is longer
    result = optrack(env, "status")
    assert result.returncode == 2
    for name in ("OPTRACK_REQUEST_DEADLINE", "OPTRACK_MAX_INPLACE_WAIT", "OPTRACK_CLAIM_LEASE"):
        assert name in result.stderr


def test_plain_http_to_a_remote_host_is_refused(env: dict[str, str]) -> None:
    env["OPTRACK_API_BASE_URL"] = "http://api.example.com/v1"
    result = optrack(env, "status")
    assert result.returncode == 2
    assert "OPTRACK_ALLOW_INSECURE_HTTP" in result.stderr


def test_status_shows_rejected_credentials(
    env: dict[str, str], db_url: str, sandbox: SandboxServer
) -> None:
    op = sandbox.add_operation(total=5, duration=3600)
    env["OPTRACK_API_BASE_URL"] = sandbox.base_url
    env["TWILIO_AUTH_TOKEN"] = "not-the-token"
    assert optrack(env, "track", op.id).returncode == 0
    rt = Runtime(load_settings(env))
    rt.poller.refresh([op.id])
    rt.close()
    table = optrack(env, "status")
    assert "Polling paused until" in table.stdout
    assert "credentials rejected" in table.stdout and "check TWILIO_*" in table.stdout
    assert "not-the-token" not in table.stdout
    record = json.loads(optrack(env, "status", "--json").stdout)
    assert record["account"]["pause_status_code"] == 401
    assert record["operations"][0]["status"] == "PENDING"  # no operation marked failed


def test_reports_and_the_health_check_read_the_same_grammar(tmp_path: Path) -> None:
    # `report --stuck-after 90` and `health --max-lag 1h30m` each failed once: one grammar now.
    assert reports.parse_span("90") == timedelta(seconds=90)
    assert reports.parse_span("1h30m") == timedelta(minutes=90)
    env = {"OPTRACK_DATABASE_URL": f"sqlite:///{tmp_path / 'optrack.db'}", "PATH": "/usr/bin:/bin"}
    runs = [["db", "upgrade"], ["health", "--max-lag", "1h30m"], ["report", "--stuck-after", "90"]]
    done = [
        subprocess.run(
            [sys.executable, "-m", "worker", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        for argv in runs
    ]
    assert done[0].returncode == 0, done[0].stderr
    assert done[1].returncode in (0, 1) and "not a duration" not in done[1].stderr  # 1: no beat
    assert done[2].returncode == 0, done[2].stderr
    assert "PROCESSING, unchanged > 1m 30s" in done[2].stdout


def test_a_bad_bound_stops_the_cli_with_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(OPTRACK_HOME=str(tmp_path), OPTRACK_POLL_MAX_INTERVAL="1e12")
    result = subprocess.run(
        [sys.executable, "-m", "worker", "status"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "OPTRACK_POLL_MAX_INTERVAL='1e12' must be between 0.5 s and 1 d" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "optrack.sqlite").exists()  # nothing written


def test_a_database_that_does_not_answer_is_one_line_and_exit_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = base_env(
        tmp_path, OPTRACK_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:{port}/optrack"
    )
    for args in (["track", GOOD], ["status"], ["report"], ["dead-letters"]):
        result = optrack(env, *args)
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("optrack: the database does not answer: ")
        assert f"port {port} failed" in lines[0] and "Traceback" not in result.stderr
