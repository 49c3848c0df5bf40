"""An upgrade from release 0.1.0 with operations still PROCESSING: every row kept, tracking
carries on to the true end. Real processes: the sandbox API, then today's `optrack run` on the
embedded default (SQLite and its own broker), or today's worker and beat on PostgreSQL + Redis
after `optrack db upgrade`.

The database is written as 0.1.0 leaves it: its schema (revision 0003_reports), each operation
with the first answer the API gave, one history row, its own schedule (``next_poll_at``), a
notice of an operation that ended before the upgrade, and the old beat's last heartbeat.
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, insert

from tests.support.migration_data import snapshot
from tests.support.processes import (
    base_env,
    beat_args,
    celery_process,
    sandbox_process,
    stop,
    wait_for,
    worker_args,
)
from tests.support.services import REDIS_URL
from worker.db import make_engine
from worker.migrate import current_revision, downgrade, head_revision, upgrade
from worker.tracking import ENDED_STATES

pytestmark = pytest.mark.slow

OLD = "0003_reports"
ENDED_BEFORE = "comms_operation_01h9krwprkeee8fzqspvwy0ld01"


def _iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def write_as_0_1_0(url: str, answers: dict[str, dict[str, Any]], now: datetime) -> None:
    """The rows 0.1.0 keeps for operations it polled once, and for one that ended."""
    engine = make_engine(url)
    metadata = MetaData()
    metadata.reflect(engine)
    tables = metadata.tables
    operations, history = [], []
    for op_id, answer in answers.items():
        stats = answer["stats"]
        state = {k: stats[k] for k in ("total", "queued", "created", "failed")}
        operations.append(
            {
                "id": op_id,
                "status": answer["status"],
                **state,
                "remote_created_at": _iso(answer["createdAt"]),
                "remote_updated_at": _iso(answer["updatedAt"]),
                "tracked_at": now - timedelta(seconds=5),
                "last_polled_at": now - timedelta(seconds=1),
                "next_poll_at": now + timedelta(seconds=1),
                "claim_token": None,
                "polls": 1,
                "consecutive_errors": 0,
                "last_error": None,
                "ended_at": None,
                "version": 1,
            }
        )
        history.append(
            {
                "operation_id": op_id,
                "seq": 1,
                "observed_at": now - timedelta(seconds=1),
                "remote_updated_at": _iso(answer["updatedAt"]),
                "status": answer["status"],
                **state,
            }
        )
    done = now - timedelta(days=1)
    operations.append(
        {
            **operations[0],
            "id": ENDED_BEFORE,
            "status": "COMPLETED",
            "total": 5,
            "queued": 0,
            "created": 5,
            "failed": 0,
            "remote_updated_at": done,
            "ended_at": done,
            "version": 2,
            "polls": 2,
        }
    )
    for seq, (status, queued, created) in enumerate([("PROCESSING", 5, 0), ("COMPLETED", 0, 5)]):
        history.append(
            {
                "operation_id": ENDED_BEFORE,
                "seq": seq + 1,
                "observed_at": done,
                "remote_updated_at": done - timedelta(seconds=10 - seq),
                "status": status,
                "total": 5,
                "queued": queued,
                "created": created,
                "failed": 0,
            }
        )
    with engine.begin() as conn:
        conn.execute(insert(tables["tracked_operations"]), operations)
        conn.execute(insert(tables["operation_history"]), history)
        conn.execute(
            insert(tables["notices"]),
            [
                {
                    "operation_id": ENDED_BEFORE,
                    "payload": json.dumps({"id": ENDED_BEFORE, "status": "COMPLETED"}),
                    "created_at": done,
                    "next_attempt_at": done,
                    "attempts": 1,
                    "delivered_at": done,
                }
            ],
        )
        # The old release's beat, stopped a minute ago.
        conn.execute(
            insert(tables["heartbeats"]), [{"name": "beat", "beat_at": now - timedelta(minutes=1)}]
        )
    engine.dispose()


@pytest.mark.parametrize("backend", ["embedded", "postgresql+redis"])
def test_a_0_1_0_database_upgrades_with_every_row_and_tracking_goes_on_to_the_end(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "embedded":
        url = f"sqlite:///{tmp_path / 'optrack.sqlite'}"
        broker = f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    else:
        url = str(request.getfixturevalue("pg_url"))
        broker = REDIS_URL
    env = base_env(
        tmp_path,
        OPTRACK_DATABASE_URL=url,
        OPTRACK_BROKER_URL=broker,
        OPTRACK_POLL_INTERVAL="1",
        OPTRACK_TICK_INTERVAL="0.5",
    )
    with ExitStack() as stack:
        api = stack.enter_context(sandbox_process(env, tmp_path / "sandbox.log"))
        env["OPTRACK_API_BASE_URL"] = api.base_url
        ids = [api.create(total=12, duration=8, fail_ratio=0.25) for _ in range(3)]
        ids.append(api.create(total=10, duration=6, outcome="CANCELED"))
        answers = {
            op_id: api.http.get(f"{api.base_url}/SenderPools/Operations/{op_id}", timeout=5).json()
            for op_id in ids
        }
        _to_old_schema(url)
        write_as_0_1_0(url, answers, datetime.now(UTC))
        before = snapshot(url)

        if backend == "embedded":
            log = (tmp_path / "run.log").open("wb")
            stack.callback(log.close)
            run = subprocess.Popen(
                [sys.executable, "-m", "worker", "run", "--concurrency", "1"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            stack.callback(stop, run)
        else:
            migrated = subprocess.run(
                [sys.executable, "-m", "worker", "db", "upgrade"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert migrated.returncode == 0, migrated.stderr
            assert f"from revision {OLD} to {head_revision()}" in migrated.stdout
            stack.enter_context(celery_process(worker_args("w1"), env, tmp_path / "w1.log"))
            stack.enter_context(
                celery_process(beat_args(tmp_path / "schedule"), env, tmp_path / "beat.log")
            )

        def ended() -> bool:
            rows = snapshot(url)["tracked_operations"]
            return all(row["status"] in ENDED_STATES for row in rows.values())

        wait_for(lambda: current_revision(url) == head_revision(), 60, "the upgrade")
        wait_for(ended, 120, "every operation to end")
        finals = {
            op_id: api.http.get(f"{api.base_url}/SenderPools/Operations/{op_id}", timeout=5).json()
            for op_id in ids
        }

    after = snapshot(url)
    # Every row 0.1.0 wrote is still there with its values; the operations still active then
    # have moved on, keeping what never changes.
    for table, rows in before.items():
        for key, row in rows.items():
            kept = after[table][key]
            fixed = [c for c in row if c in kept]
            if table == "tracked_operations" and row["status"] not in ENDED_STATES:
                fixed = ["id", "tracked_at", "remote_created_at"]
            assert {c: kept[c] for c in fixed} == {c: row[c] for c in fixed}, (table, key)
    # Tracking went on to each operation's true end, its history one row per change.
    history: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(after["operation_history"].values(), key=lambda r: r["seq"]):
        history.setdefault(row["operation_id"], []).append(row)
    for op_id in ids:
        row, final = after["tracked_operations"][(op_id,)], finals[op_id]
        assert row["status"] == final["status"]
        assert [row[k] for k in ("created", "failed")] == [
            final["stats"]["created"],
            final["stats"]["failed"],
        ]
        steps = history[op_id]
        assert [h["seq"] for h in steps] == list(range(1, len(steps) + 1))
        assert len(steps) >= 2 and steps[-1]["status"] == final["status"]
        created = [h["created"] for h in steps]
        assert created == sorted(created)
    if backend == "embedded":
        assert (tmp_path / f"optrack.sqlite.at-{OLD}.bak").exists()


def _to_old_schema(url: str) -> None:
    """An empty database at 0.1.0's schema (``pg_url`` comes migrated to head)."""
    if current_revision(url) is None:
        upgrade(url, OLD)
    else:
        downgrade(url, OLD)
