"""Two accounts side by side on the real stack (sandbox, worker and beat as processes, Redis,
PostgreSQL): a 429 storm, then revoked credentials, on one account leave the other's polling
untouched, as the sandbox's request log of each account shows."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from celery import Celery
from cryptography.fernet import Fernet
from sqlalchemy import select

from tests.support.processes import (
    Sandbox,
    base_env,
    beat_args,
    celery_process,
    sandbox_process,
    wait_for,
    worker_args,
)
from tests.support.services import SID
from worker.db import AccountPause, TrackedOperation, make_engine, make_sessionmaker

pytestmark = pytest.mark.slow
ACME_SID = "AC" + "ac" * 16
ACME_TOKEN = "acme-auth-token-0123456789"
ACME_KEY = "SK" + "5e" * 16
ACME_SECRET = "acme-api-key-secret-0123456789"
INTERVAL = 1.0  # OPTRACK_POLL_INTERVAL


def optrack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def two(
    tmp_path: Path, pg_url: str, redis_url: str
) -> Iterator[tuple[Sandbox, Sandbox, dict[str, str]]]:
    """The sandbox serving the default account and acme (by its API key); a worker and beat;
    acme added with `optrack accounts add`."""
    env = base_env(
        tmp_path,
        OPTRACK_DATABASE_URL=pg_url,
        OPTRACK_BROKER_URL=redis_url,
        OPTRACK_POLL_STRATEGY="fetch",
        OPTRACK_POLL_INTERVAL=str(INTERVAL),
        OPTRACK_TICK_INTERVAL="0.5",
        OPTRACK_MAX_INPLACE_WAIT="0",
        OPTRACK_SECRET_KEY=Fernet.generate_key().decode(),
        ACME_API_SECRET=ACME_SECRET,
    )
    account = f"{ACME_SID}:{ACME_TOKEN}:{ACME_KEY}:{ACME_SECRET}"
    with (
        ExitStack() as stack,
        sandbox_process(env, tmp_path / "sandbox.log", "--account", account) as api,
    ):
        env["OPTRACK_API_BASE_URL"] = api.base_url
        added = optrack(
            env, "accounts", "add", "acme", "--account-sid", ACME_SID,
            "--api-key-sid", ACME_KEY, "--secret-env", "ACME_API_SECRET",
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        stack.enter_context(celery_process(worker_args("w1", 2), env, tmp_path / "w1.log"))
        stack.enter_context(celery_process(beat_args(tmp_path / "s"), env, tmp_path / "beat.log"))
        yield api, api.as_account(ACME_KEY, ACME_SECRET), env


def fetches(
    log: list[dict[str, object]], op_id: str, after: float = 0.0
) -> list[dict[str, object]]:
    return [e for e in log if str(e["path"]).endswith(op_id) and float(e["t"]) > after]  # type: ignore[arg-type]


def test_a_429_storm_and_revoked_credentials_on_one_account_leave_the_other_fresh(
    two: tuple[Sandbox, Sandbox, dict[str, str]], pg_url: str, tmp_path: Path
) -> None:
    default, acme, env = two
    mine = [default.create(total=60, duration=600) for _ in range(2)]
    theirs = [acme.create(total=60, duration=600) for _ in range(2)]
    assert optrack(env, "track", *mine).returncode == 0
    tracked = optrack(env, "track", "--account", "acme", theirs[0])
    assert tracked.returncode == 0, tracked.stderr
    # Another service sends the task by name, with the account after the IDs.
    sender = Celery(broker=env["OPTRACK_BROKER_URL"])
    sender.send_task("optrack.track", args=[[theirs[1]], "acme"])
    sender.close()
    wait_for(
        lambda: (
            all(fetches(acme.requests(), op) for op in theirs)
            and all(fetches(default.requests(), op) for op in mine)
        ),
        60,
        "both accounts polled",
    )

    # acme: a storm of Retry-After: 0 (each waits longer than the last), then a revoked key.
    acme.fault(kind="status", status=429, retry_after="0", count=4)  # waits 1+2+4+8 s at least
    acme.fault(kind="status", status=401, count=100_000)
    wait_for(lambda: any(e["status"] == 429 for e in acme.requests()), 30, "acme's first 429")
    storm = min(float(e["t"]) for e in acme.requests() if e["status"] == 429)
    wait_for(lambda: any(e["status"] == 401 for e in acme.requests()), 90, "acme's first 401")
    revoked = min(float(e["t"]) for e in acme.requests() if e["status"] == 401)
    # Meanwhile and after, the default account's operations are asked every interval or so:
    # each at least 5 more times after acme's key was revoked.
    wait_for(
        lambda: all(len(fetches(default.requests(), op, revoked)) >= 5 for op in mine),
        60,
        "the default account polled on after acme's 401",
    )
    log = default.requests()
    acme_log = acme.requests()

    # The default account was never throttled, refused, paused or slowed by acme's answers.
    assert {e["status"] for e in fetches(log, mine[0]) + fetches(log, mine[1])} == {200}
    assert all(e["user"] == SID for e in log)
    for op in mine:  # during acme's storm (15 s at least) too, not only after it
        during = [e for e in fetches(log, op, storm) if float(e["t"]) < revoked]  # type: ignore[arg-type]
        assert len(during) >= 5, f"{op}: asked {len(during)} times during acme's 429 storm"
    # acme: asked with its own key only, throttled and refused on its own; while refused, it
    # is asked about once per AUTH pause (60 s), not every interval.
    assert {e["user"] for e in acme_log} == {ACME_KEY}
    assert {e["status"] for e in acme_log} == {200, 429, 401}
    assert len([e for e in acme_log if float(e["t"]) > revoked]) <= 2

    engine = make_engine(pg_url)
    with make_sessionmaker(engine)() as session:
        pauses = {p.account_sid: p for p in session.scalars(select(AccountPause))}
        accounts = dict(
            session.execute(select(TrackedOperation.id, TrackedOperation.account)).all()
        )
    engine.dispose()
    assert SID not in pauses or pauses[SID].credentials_rejected_at is None
    assert pauses[ACME_SID].credentials_rejected_at is not None
    assert accounts == {**dict.fromkeys(mine, "default"), **dict.fromkeys(theirs, "acme")}

    # `optrack status` and `health` say which account: acme, and only acme.
    status = json.loads(optrack(env, "status", "--json").stdout)
    by_name = {a["name"]: a for a in status["accounts"]}
    assert by_name["acme"]["credentials_rejected"] is True
    assert by_name["default"]["credentials_rejected"] is False
    assert status["account"]["credentials_rejected"] is False
    health = optrack(env, "health", "--max-lag", "1h", "--json")
    problems = json.loads(health.stdout)["problems"]
    assert [p for p in problems if "credentials" in p] and all(
        p.endswith("(account acme)") for p in problems if "credentials" in p
    )
    for output in (health.stdout + health.stderr, json.dumps(status)):
        assert ACME_SECRET not in output
    for log_file in tmp_path.glob("*.log"):
        assert ACME_SECRET not in log_file.read_text(errors="replace")
