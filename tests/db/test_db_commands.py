"""`optrack db …` and the embedded default's own migration, run as a user runs them.

An embedded database of an older revision is backed up (SQLite's online backup API) before
anything migrates it, and the output says where; `db current`, `history`, `upgrade` and
`downgrade` are thin wrappers over Alembic that say what they did.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.support.migration_data import ALL_ROWS, fill, snapshot
from tests.support.processes import base_env
from worker.migrate import current_revision, head_revision, upgrade

OLD = "0003_reports"  # the head of release 0.1.0


def optrack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_any_command_backs_an_old_embedded_database_up_before_it_migrates(
    tmp_path: Path,
) -> None:
    path = tmp_path / "optrack.sqlite"
    url = f"sqlite:///{path}"
    upgrade(url, OLD)
    fill(url)
    before = snapshot(url)
    env = base_env(tmp_path, OPTRACK_DATABASE_URL=url)

    result = optrack(env, "status", "--json")
    assert result.returncode == 0, result.stderr
    backup = path.with_name(f"optrack.sqlite.at-{OLD}.bak")
    assert f"backup of revision {OLD}: {backup}" in result.stderr
    assert result.stdout.count("comms_operation_") == len(ALL_ROWS["tracked_operations"])
    # The backup is the database as it was: its revision, every row.
    assert current_revision(f"sqlite:///{backup}") == OLD
    assert snapshot(f"sqlite:///{backup}") == before
    with sqlite3.connect(backup) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert current_revision(url) == head_revision()

    # At head, nothing more is copied or said.
    again = optrack(env, "status", "--json")
    assert again.returncode == 0 and "backup" not in again.stderr
    assert sorted(p.name for p in tmp_path.glob("*.bak")) == [backup.name]


def test_a_new_embedded_database_needs_no_backup(tmp_path: Path) -> None:
    env = base_env(tmp_path, OPTRACK_DATABASE_URL=f"sqlite:///{tmp_path / 'new.sqlite'}")
    result = optrack(env, "status")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert list(tmp_path.glob("*.bak")) == []


def test_db_current_history_downgrade_and_upgrade(tmp_path: Path, db_url: str) -> None:
    env = base_env(tmp_path, OPTRACK_DATABASE_URL=db_url)
    fill(db_url)
    rows = snapshot(db_url)["tracked_operations"]
    head = head_revision()

    current = optrack(env, "db", "current")
    assert (current.returncode, current.stdout) == (0, f"{head} (head)\n")
    history = optrack(env, "db", "history").stdout.splitlines()
    assert history[0].endswith("(head, current)") and f"-> {head}:" in history[0]
    assert history[-1].startswith("(base) -> 0001:")

    down = optrack(env, "db", "downgrade", "-1")
    assert down.returncode == 0, down.stderr
    previous = current_revision(db_url)
    assert previous is not None and previous != head
    assert f"from revision {head} to {previous}" in down.stdout
    said = optrack(env, "db", "current").stdout
    assert said == f"{previous}; this release's is {head}: run `optrack db upgrade`\n"

    up = optrack(env, "db", "upgrade")
    assert up.returncode == 0, up.stderr
    assert f"from revision {previous} to {head}" in up.stdout
    assert snapshot(db_url)["tracked_operations"] == rows
    sqlite = db_url.startswith("sqlite")
    assert ("backup of revision" in down.stdout) is sqlite
    assert ("backup of revision" in up.stdout) is sqlite


def test_an_unknown_revision_exits_2_and_changes_nothing(tmp_path: Path, sqlite_url: str) -> None:
    env = base_env(tmp_path, OPTRACK_DATABASE_URL=sqlite_url)
    result = optrack(env, "db", "downgrade", "0099")
    assert result.returncode == 2
    assert "no revision '0099'" in result.stderr and "Traceback" not in result.stderr
    assert current_revision(sqlite_url) == head_revision()
    assert list(tmp_path.glob("*.bak")) == []
