"""`optrack notices list | show | resend`, run as processes on SQLite and PostgreSQL, over
notices the dispatcher really sent to a local webhook (or failed to); resend twice, and while
a dispatcher holds the notice mid-send."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.support.hooks import SECRET, Hook, deliver, end, notices_in_every_state
from tests.support.processes import base_env
from worker import liveness
from worker.clock import FakeClock
from worker.db import Notice

OP_IDS = [f"comms_operation_01h9krwprkeee8fzqspvwy6r{i:02d}" for i in range(6)]


@pytest.fixture
def hook() -> Iterator[Hook]:
    made = Hook()
    yield made
    made.close()


def cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, capture_output=True, text=True, timeout=60
    )
    return done.returncode, done.stdout, done.stderr


def listed(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    code, out, err = cli(env, "notices", "list", "--json", *args)
    assert code == 0, err
    return list(json.loads(out)["notices"])


def row(sessions: sessionmaker[Session], notice_id: int) -> Notice:
    with sessions() as session:
        found = session.get(Notice, notice_id)
        assert found is not None
        return found


def test_list_and_show_say_where_each_notice_stands(
    db_url: str, sessions: sessionmaker[Session], clock: FakeClock, tmp_path: Path
) -> None:
    ids = notices_in_every_state(sessions, clock, OP_IDS)
    env = base_env(tmp_path, OPTRACK_DATABASE_URL=db_url)
    every = listed(env)
    assert [(n["id"], n["status"]) for n in every] == [
        (ids[s], s)
        for s in ("unsent", "owed", "failed", "delivered")  # the newest first
    ]
    failed = next(n for n in every if n["status"] == "failed")
    assert (
        failed["attempts"] == 1 and failed["last_error"] == "webhook: the webhook answered HTTP 500"
    )
    delivered = next(n for n in every if n["status"] == "delivered")
    assert delivered["next_attempt_at"] is None and delivered["webhook_sent_at"] is not None
    assert [n["id"] for n in listed(env, "--status", "FAILED", "--status", "owed")] == [
        ids["owed"],
        ids["failed"],
    ]
    assert [n["id"] for n in listed(env, "--operation", OP_IDS[1])] == [ids["failed"]]
    assert [n["id"] for n in listed(env, "--limit", "2")] == [ids["unsent"], ids["owed"]]
    # Ended a minute apart: --since the second end takes it and those after, --until the first.
    second = failed["created_at"]
    assert [n["id"] for n in listed(env, "--since", second, "--until", every[1]["created_at"])] == [
        ids["failed"]
    ]

    code, out, err = cli(env, "notices", "show", str(ids["delivered"]))
    assert code == 0, err
    shown = json.loads(out)
    assert shown["status"] == "delivered" and shown["operation"]["id"] == OP_IDS[0]
    assert shown["operation"]["status"] == "COMPLETED" and shown["operation"]["created"] == 3
    code, out, _err = cli(env, "notices", "list")  # the table
    assert code == 0 and "4 notice(s)" in out and "HTTP 500" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "--status", "lost"], "'lost' is not one of"),
        (["list", "--since", "yesterday-ish"], "'yesterday-ish' is not a time"),
        (["list", "--since", "2026-02-01", "--until", "2026-01-01"], "the period is empty"),
        (["list", "--operation", "comms_op"], "comms_operation_"),
        (["list", "--limit", "0"], "--limit"),
        (["show", "999999"], "no notice with id 999999"),
        (["show", "0"], "is not in the range"),
        (["resend"], "give the IDs of the notices to resend, or --since"),
        (["resend", "1", "--since", "1d"], "not both"),
        (["resend", "--until", "1d"], "or --since"),
        (["resend", "999999", "999998"], "no notice with id 999998, 999999; nothing was resent"),
    ],
)
def test_bad_input_exits_2_saying_what_was_wrong(
    db_url: str, tmp_path: Path, args: list[str], message: str
) -> None:
    env = base_env(
        tmp_path, OPTRACK_DATABASE_URL=db_url, OPTRACK_WEBHOOK_URL="http://127.0.0.1:9/x"
    )
    env["OPTRACK_WEBHOOK_SECRET"] = SECRET
    code, out, err = cli(env, "notices", *args)
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err


def test_resend_sends_again_once_however_often_it_is_asked(
    db_url: str, sessions: sessionmaker[Session], clock: FakeClock, tmp_path: Path, hook: Hook
) -> None:
    ids = notices_in_every_state(sessions, clock, OP_IDS)
    env = base_env(tmp_path, OPTRACK_DATABASE_URL=db_url)
    # Nothing delivers notices anywhere: a resend would wait for ever, so it is refused.
    code, out, err = cli(env, "notices", "resend", str(ids["delivered"]))
    assert code == 1 and "no process delivers notices" in err and "Traceback" not in err
    assert row(sessions, ids["delivered"]).delivered_at is not None  # nothing changed

    with sessions.begin() as session:  # a worker with a channel was alive a minute ago
        liveness.notices_delivered(session, clock.now())
    for _ in range(2):  # twice: still one notice owed
        code, out, err = cli(env, "notices", "resend", str(ids["delivered"]))
        assert code == 0, err
        assert out == f"resent 1 notice(s), due now: {ids['delivered']}\n"
    again = row(sessions, ids["delivered"])
    assert again.delivered_at is None and again.webhook_sent_at is None and again.attempts == 1
    clock.advance(3600)  # past the CLI's (real) clock: due
    assert deliver(sessions, clock, hook).delivered == (OP_IDS[0], OP_IDS[1], OP_IDS[2])
    assert deliver(sessions, clock, hook).delivered == ()
    assert sorted(hook.notice_ids()) == sorted([ids["delivered"], ids["failed"], ids["owed"]])
    [(headers, _body)] = [r for r in hook.received if r[1]["notice_id"] == ids["delivered"]]
    assert headers["webhook-id"] == str(ids["delivered"])  # the same id: receivers drop it

    # A range: every notice whose operation ended in it, whatever its status, the unsent too.
    code, out, err = cli(env, "notices", "resend", "--since", "30d")
    assert code == 0, err
    assert out.startswith("resent 4 notice(s), due now: ")
    clock.advance(3600)
    assert len(deliver(sessions, clock, hook).delivered) == 4
    assert len(hook.notice_ids()) == 3 + 4


def test_resend_leaves_a_notice_being_sent_to_that_send(
    db_url: str, sessions: sessionmaker[Session], clock: FakeClock, tmp_path: Path, hook: Hook
) -> None:
    """A dispatcher holds the notice mid-send (the receiver keeps its answer): resend does not
    take its claim over, so the send's result is recorded and no second dispatcher sends it
    meanwhile; once delivered, a resend sends it again."""
    notice_id = end(sessions, OP_IDS[0], clock.now())
    env = base_env(tmp_path, OPTRACK_DATABASE_URL=db_url, OPTRACK_WEBHOOK_URL=hook.url)
    env["OPTRACK_WEBHOOK_SECRET"] = SECRET  # a channel here: resend needs no heartbeat
    hook.hold = threading.Event()
    reports: list[Any] = []
    sender = threading.Thread(target=lambda: reports.append(deliver(sessions, clock, hook)))
    sender.start()
    try:
        assert hook.arrived.wait(30)
        code, out, err = cli(env, "notices", "resend", str(notice_id))
        assert code == 0, err
        assert out == f"no notice to resend\nbeing sent now, left to that send: {notice_id}\n"
        assert [n["status"] for n in listed(env)] == ["sending"]
        assert deliver(sessions, clock, Hook()).delivered == ()  # claimed: nobody else sends it
    finally:
        hook.hold.set()
        sender.join(30)
    [report] = reports
    assert report.delivered == (OP_IDS[0],) and report.lost_claims == 0
    assert [n["status"] for n in listed(env)] == ["delivered"]
    code, out, err = cli(env, "notices", "resend", str(notice_id))
    assert out == f"resent 1 notice(s), due now: {notice_id}\n", err
    with sessions() as session:
        assert session.scalars(select(Notice.id)).all() == [notice_id]  # never a second row
