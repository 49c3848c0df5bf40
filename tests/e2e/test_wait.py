"""`optrack wait` as a user's script runs it: a subprocess beside a real sandbox, worker and beat
on PostgreSQL and Redis, each exit code checked (0, 1, 2, 124, 3)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.processes import (
    Sandbox,
    base_env,
    beat_args,
    celery_process,
    sandbox_process,
    worker_args,
)

pytestmark = pytest.mark.slow
UNKNOWN = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"  # valid, but the sandbox never made it


def optrack(
    env: dict[str, str], *args: str, stdin: str = "", timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def stack(tmp_path: Path, redis_url: str, pg_url: str) -> Iterator[tuple[Sandbox, dict[str, str]]]:
    env = base_env(
        tmp_path,
        OPTRACK_DATABASE_URL=pg_url,
        OPTRACK_BROKER_URL=redis_url,
        OPTRACK_POLL_INTERVAL="1",
        OPTRACK_TICK_INTERVAL="0.5",
        OPTRACK_NOT_FOUND_GRACE="0",
    )
    with ExitStack() as stack, sandbox_process(env, tmp_path / "sandbox.log") as api:
        env["OPTRACK_API_BASE_URL"] = api.base_url
        stack.enter_context(celery_process(worker_args("w1"), env, tmp_path / "w1.log"))
        stack.enter_context(celery_process(beat_args(tmp_path / "sched"), env, tmp_path / "b.log"))
        yield api, env


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


def test_wait_exit_codes_on_the_real_stack(stack: tuple[Sandbox, dict[str, str]]) -> None:
    api, env = stack
    quick = api.create(total=6, duration=3)
    other = api.create(total=4, duration=2)
    canceled = api.create(total=10, duration=3, outcome="CANCELED")
    failing = api.create(total=8, duration=2, fail_ratio=0.25)
    slow = api.create(total=50, duration=120)

    # 2: an invalid ID, or an untracked one, named; nothing waited for.
    bad = optrack(env, "wait", quick, "not-an-id")
    assert bad.returncode == 2, bad.stderr
    assert "'not-an-id' is not an operation ID" in bad.stderr
    untracked = optrack(env, "wait", quick, other)
    assert untracked.returncode == 2, untracked.stderr
    assert quick in untracked.stderr and other in untracked.stderr
    assert "not tracked" in untracked.stderr and "Traceback" not in untracked.stderr

    # 0: tracked first by --track, IDs from stdin, every one ended.
    started = time.monotonic()
    ok = optrack(env, "wait", "--track", "--timeout", "60s", "-", stdin=f"{quick}\n{other}\n")
    took = time.monotonic() - started
    assert ok.returncode == 0, ok.stderr
    assert f"COMPLETED {quick} 6+0/6" in ok.stdout and f"COMPLETED {other} 4+0/4" in ok.stdout
    assert took < 30
    # An operation already ended answers at once.
    started = time.monotonic()
    again = optrack(env, "wait", "--json", quick)
    assert again.returncode == 0 and time.monotonic() - started < 10
    payload = json.loads(again.stdout)
    assert payload["outcome"] == "ok" and payload["exit_code"] == 0
    assert [(o["id"], o["status"], o["unmet"]) for o in payload["operations"]] == [
        (quick, "COMPLETED", None)
    ]

    # 1: CANCELED when COMPLETED was asked; NOT_FOUND; more failed senders than allowed.
    optrack(env, "track", canceled, UNKNOWN, failing, slow)
    not_completed = optrack(env, "wait", "--for", "completed", "--json", canceled, quick)
    assert not_completed.returncode == 1, not_completed.stderr
    unmet = {o["id"]: o["unmet"] for o in json.loads(not_completed.stdout)["operations"]}
    assert unmet == {canceled: "CANCELED, not COMPLETED", quick: None}
    assert optrack(env, "wait", canceled).returncode == 0  # an end was all that was asked
    gone = optrack(env, "wait", UNKNOWN, "--timeout", "60s")
    assert gone.returncode == 0, gone.stderr  # NOT_FOUND is an end ...
    assert f"NOT_FOUND {UNKNOWN}" in gone.stdout
    gone_completed = optrack(env, "wait", "--for", "completed", UNKNOWN)
    assert gone_completed.returncode == 1  # ... but not COMPLETED
    assert "NOT_FOUND, not COMPLETED" in gone_completed.stderr
    too_many = optrack(env, "wait", "--max-failed", "1", "--timeout", "60s", failing)
    assert too_many.returncode == 1, too_many.stderr
    assert "2 senders failed, more than 1" in too_many.stderr
    assert optrack(env, "wait", "--max-failed", "2", failing).returncode == 0

    # 124: the timeout came first; the operation still active is said.
    started = time.monotonic()
    late = optrack(env, "wait", "--timeout", "2s", "--json", slow, quick)
    took = time.monotonic() - started
    assert late.returncode == 124, late.stderr
    assert 2 <= took < 15
    payload = json.loads(late.stdout)
    assert payload["outcome"] == "timeout"
    assert [o["status"] for o in payload["operations"]] == ["PROCESSING", "COMPLETED"]
    plain = optrack(env, "wait", "--timeout", "1", slow)
    assert plain.returncode == 124 and f"still active: {slow}" in plain.stderr

    # 3: optrack's database cannot be reached.
    down = {**env, "OPTRACK_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed_port()}/x"}
    unreachable = optrack(down, "wait", "--timeout", "5s", slow)
    assert unreachable.returncode == 3, unreachable.stderr
    assert "the database does not answer" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr
