"""Retention on SQLite and PostgreSQL: old history goes in batches, final states stay; each
batch walks on from where the last one stopped, along an index."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from tests.support.services import SID, TOKEN
from worker.celery_app import PRUNE_TASK, celery_config
from worker.clock import FakeClock
from worker.db import HistoryEntry, Notice, TrackedOperation
from worker.notices import DeliveryError, Message, deliver_pending, record_end
from worker.repository import Repository
from worker.retention import prune, prune_delivered_notices
from worker.settings import load_settings

DAY = timedelta(days=1)


def op_id(n: int) -> str:
    if n >= 100:
        return f"comms_operation_01h9krwprkeee8fzqspvwy{n:04d}"
    return f"comms_operation_01h9krwprkeee8fzqspvwy6n{n:02d}"


def make_operation(
    sessions: sessionmaker[Session],
    n: int,
    status: str,
    steps: int,
    ended_at: datetime | None,
    first_seen: datetime,
) -> str:
    """An operation with ``steps`` history rows an hour apart, ended at ``ended_at``."""
    with sessions.begin() as session:
        Repository(session).add([op_id(n)], first_seen)
        row = session.get(TrackedOperation, op_id(n))
        assert row is not None
        for seq in range(1, steps + 1):
            observed = first_seen + timedelta(hours=seq)
            session.add(
                HistoryEntry(
                    operation_id=row.id,
                    seq=seq,
                    observed_at=observed,
                    remote_updated_at=observed,
                    status="PROCESSING" if seq < steps or status != "COMPLETED" else status,
                    total=steps,
                    queued=steps - seq,
                    created=seq,
                    failed=0,
                )
            )
        row.status, row.version = status, steps
        row.total, row.queued, row.created, row.failed = steps, 0, steps, 0
        row.ended_at = ended_at
        if ended_at is not None:
            record_end(session, row, ended_at)
    return row.id


def seqs(sessions: sessionmaker[Session]) -> dict[str, list[int]]:
    with sessions() as session:
        found: dict[str, list[int]] = {}
        for entry in session.scalars(select(HistoryEntry).order_by(HistoryEntry.seq)):
            found.setdefault(entry.operation_id, []).append(entry.seq)
        return found


def test_prune_keeps_final_states_and_recent_history(
    sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    now = clock.now()
    long_ago = now - 120 * DAY
    old = [make_operation(sessions, n, "COMPLETED", 5, now - 100 * DAY, long_ago) for n in (1, 2)]
    canceled = make_operation(sessions, 3, "CANCELED", 5, now - 91 * DAY, long_ago)
    recent = make_operation(sessions, 4, "COMPLETED", 3, now - 10 * DAY, now - 11 * DAY)
    active = make_operation(sessions, 5, "PROCESSING", 4, None, long_ago)
    gone = make_operation(sessions, 6, "NOT_FOUND", 0, now - 100 * DAY, long_ago)
    with sessions.begin() as session:  # notices: delivered for old ones but one
        for notice in session.scalars(select(Notice)):
            if notice.operation_id != canceled:
                notice.delivered_at = notice.created_at

    result = prune(sessions, now - 90 * DAY, batch_size=5)

    assert result.history_rows == 12  # 4 + 4 + 4 steps before each final one
    assert result.batches == 3 + 1  # a window of 5 rows per old operation, then 3 notices
    assert result.notices == 3  # delivered notices of ended-before-cutoff operations
    history = seqs(sessions)
    assert history == {
        old[0]: [5],
        old[1]: [5],
        canceled: [5],
        recent: [1, 2, 3],
        active: [1, 2, 3, 4],
    }
    with sessions() as session:
        rows = {r.id: r for r in session.scalars(select(TrackedOperation))}
        assert set(rows) == {*old, canceled, recent, active, gone}  # every final state stays
        assert rows[old[0]].status == "COMPLETED" and rows[old[0]].created == 5
        kept = {n.operation_id for n in session.scalars(select(Notice))}
        assert kept == {canceled, recent}  # undelivered, and too recent

    again = prune(sessions, now - 90 * DAY, batch_size=5)
    assert (again.history_rows, again.notices, again.batches) == (0, 0, 0)


def test_beat_entry_is_opt_in() -> None:
    base = {"OPTRACK_DATABASE_URL": "sqlite:///x.sqlite", "OPTRACK_BROKER_URL": "redis://r"}
    assert "optrack-prune" not in celery_config(load_settings(base))["beat_schedule"]
    # Where notices are delivered, delivered ones are pruned daily, history retention or not.
    hooked = load_settings({**base, "OPTRACK_NOTIFY_TASK": "billing.operation_ended"})
    assert hooked.notice_retention == 7 * DAY and hooked.prune_older_than is None
    assert celery_config(hooked)["beat_schedule"]["optrack-prune"]["task"] == PRUNE_TASK
    settings = load_settings({**base, "OPTRACK_PRUNE_OLDER_THAN": "90d"})
    assert settings.prune_older_than == 90 * DAY
    entry = celery_config(settings)["beat_schedule"]["optrack-prune"]
    assert entry["task"] == PRUNE_TASK and entry["schedule"] == 86400.0


@pytest.mark.slow
def test_cli_prune(db_url: str, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    now = datetime.now(UTC)
    make_operation(sessions, 1, "COMPLETED", 4, now - 100 * DAY, now - 101 * DAY)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(
        OPTRACK_HOME=str(tmp_path / "home"),
        OPTRACK_DATABASE_URL=db_url,
        TWILIO_ACCOUNT_SID=SID,
        TWILIO_AUTH_TOKEN=TOKEN,
    )
    run = [sys.executable, "-m", "worker", "db", "prune"]
    bad = subprocess.run([*run, "--older-than", "soon"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "not a duration" in bad.stderr
    done = subprocess.run(
        [*run, "--older-than", "90d"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pruned 3 history row(s) and 0 delivered notice(s)")
    assert "pruned 0 notice(s) delivered before" in done.stdout
    assert seqs(sessions) == {op_id(1): [4]}


@pytest.mark.slow
def test_the_daily_beat_task_prunes(sqlite_url: str, tmp_path: Path) -> None:
    from worker.db import make_engine, make_sessionmaker

    engine = make_engine(sqlite_url)
    sessions = make_sessionmaker(engine)
    now = datetime.now(UTC)
    make_operation(sessions, 1, "COMPLETED", 6, now - 100 * DAY, now - 101 * DAY)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(
        OPTRACK_HOME=str(tmp_path / "home"),
        OPTRACK_DATABASE_URL=sqlite_url,
        OPTRACK_PRUNE_OLDER_THAN="90d",
    )
    script = (
        "from worker.celery_app import app\n"
        "app.loader.import_default_modules()\n"
        f"print(app.tasks[{PRUNE_TASK!r}].apply().result)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "'history_rows': 5" in done.stdout
    assert seqs(sessions) == {op_id(1): [6]}
    engine.dispose()


@pytest.mark.slow
def test_the_daily_beat_task_prunes_delivered_notices_without_history_retention(
    sqlite_url: str, tmp_path: Path
) -> None:
    from worker.db import make_engine, make_sessionmaker

    engine = make_engine(sqlite_url)
    sessions = make_sessionmaker(engine)
    now = datetime.now(UTC)
    for n, ended in ((1, now - 9 * DAY), (2, now - DAY), (3, now - 30 * DAY)):
        make_operation(sessions, n, "COMPLETED", 3, ended, ended - DAY)
    with sessions.begin() as session:  # 3's notice was never delivered: it is still owed
        for notice in session.scalars(select(Notice).where(Notice.operation_id != op_id(3))):
            notice.delivered_at = notice.created_at
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(
        OPTRACK_HOME=str(tmp_path / "home"),
        OPTRACK_DATABASE_URL=sqlite_url,
        OPTRACK_NOTIFY_TASK="billing.operation_ended",
    )
    script = (
        "from worker.celery_app import app\n"
        "app.loader.import_default_modules()\n"
        f"print(app.tasks[{PRUNE_TASK!r}].apply().result)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "{'history_rows': 0, 'notices': 1}" in done.stdout
    with sessions() as session:
        assert set(session.scalars(select(Notice.operation_id))) == {op_id(2), op_id(3)}
    assert len(seqs(sessions)[op_id(1)]) == 3  # no history retention asked for
    engine.dispose()


class Receiver:
    """A channel that takes every notice but those of ``refused`` (it always fails them)."""

    name = "webhook"

    def __init__(self, refused: str) -> None:
        self.refused = refused
        self.got: list[str] = []

    def send(self, message: Message) -> None:
        if message.operation_id == self.refused:
            raise DeliveryError("HTTP 500")
        self.got.append(message.operation_id)


def test_the_outbox_stays_bounded_when_delivered_notices_are_pruned(
    sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    """Thirty days of 12 ends a day, delivered at once, pruned daily (as the prune task does):
    the outbox never holds more than the last 7 days' notices and the one still owed."""
    per_day, days, keep = 12, 30, 7 * DAY
    receiver = Receiver(refused=op_id(0))
    sizes = []
    for day in range(days):
        for k in range(per_day):
            n = day * per_day + k
            make_operation(sessions, n, "COMPLETED", 1, clock.now(), clock.now() - DAY)
        while deliver_pending(sessions, clock, [receiver]).delivered:
            pass
        prune_delivered_notices(sessions, clock.now() - keep, batch_size=5)
        with sessions() as session:
            sizes.append(len(session.scalars(select(Notice.id)).all()))
        clock.advance(DAY.total_seconds())
    assert len(receiver.got) == per_day * days - 1
    # Delivered 7 days ago to the second stays one more day: 8 days of notices, plus the owed.
    assert max(sizes) == sizes[-1] == 8 * per_day + 1
    with sessions() as session:
        owed = session.scalars(select(Notice).where(Notice.delivered_at.is_(None))).one()
    assert owed.operation_id == op_id(0) and owed.attempts > 1  # pending: never pruned


def add_history(sessions: sessionmaker[Session], op: str, seqs: list[int], at: datetime) -> None:
    """History rows with the given seqs (gaps allowed: a version can pass without a row)."""
    with sessions.begin() as session:
        for seq in seqs:
            session.add(
                HistoryEntry(
                    operation_id=op,
                    seq=seq,
                    observed_at=at,
                    remote_updated_at=at,
                    status="PROCESSING",
                    total=1,
                    queued=1,
                    created=0,
                    failed=0,
                )
            )


def mixed_operations(sessions: sessionmaker[Session], now: datetime) -> dict[str, list[int]]:
    """Old, recent and active operations with interleaved IDs; returns what a prune keeps."""
    old, recent = now - 100 * DAY, now - 10 * DAY
    keep: dict[str, list[int]] = {}
    for n in range(24):
        kind = n % 6
        steps = 1 + (n * 7) % 9
        if kind == 0:  # ended long ago: only its last row stays
            keep[make_operation(sessions, n, "COMPLETED", steps, old, old - DAY)] = [steps]
        elif kind == 1:  # still processing, started long ago: all of it stays
            keep[make_operation(sessions, n, "PROCESSING", steps, None, old - DAY)] = list(
                range(1, steps + 1)
            )
        elif kind == 2:  # ended lately: all of it stays
            op = make_operation(sessions, n, "CANCELED", steps, recent, recent - DAY)
            keep[op] = list(range(1, steps + 1))
        elif kind == 3:  # ended long ago, never answered: no history at all
            make_operation(sessions, n, "NOT_FOUND", 0, old, old - DAY)
        elif kind == 4:  # ended long ago, seqs with gaps: the highest stays, not the longest run
            op = make_operation(sessions, n, "CANCELED", 0, old, old - DAY)
            add_history(sessions, op, [2, 3, 9, 14], old - DAY)
            keep[op] = [14]
        else:  # ended long ago, longer than every batch size below
            keep[make_operation(sessions, n, "COMPLETED", 25, old, old - DAY)] = [25]
    with sessions.begin() as session:  # half the notices delivered
        for notice in session.scalars(select(Notice)):
            if int(notice.operation_id[-2:]) % 4 < 2:
                notice.delivered_at = notice.created_at
    return keep


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 5000])
def test_every_batch_size_prunes_exactly_the_old_steps(
    sessions: sessionmaker[Session], clock: FakeClock, batch_size: int
) -> None:
    now = clock.now()
    keep = mixed_operations(sessions, now)
    before = sum(len(v) for v in seqs(sessions).values())
    with sessions() as session:
        notices_before = {n.operation_id: n.delivered_at for n in session.scalars(select(Notice))}
        ended_at = {r.id: r.ended_at for r in session.scalars(select(TrackedOperation))}
    cutoff = now - 90 * DAY
    gone_notices = {
        op
        for op, delivered in notices_before.items()
        if delivered is not None and ended_at[op] is not None and ended_at[op] < cutoff
    }

    result = prune(sessions, cutoff, batch_size=batch_size)

    assert seqs(sessions) == keep
    assert result.history_rows == before - sum(len(v) for v in keep.values())
    assert result.notices == len(gone_notices) > 0
    with sessions() as session:
        left = {n.operation_id for n in session.scalars(select(Notice))}
        assert left == set(notices_before) - gone_notices
        assert len(list(session.scalars(select(TrackedOperation.id)))) == 24  # no row goes
    again = prune(sessions, cutoff, batch_size=batch_size)
    assert (again.history_rows, again.notices, again.batches) == (0, 0, 0)


def test_each_batch_continues_after_the_last_one_handled(
    sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    """A row that appears behind the cursor is not seen by the rest of the run: no batch goes
    back over what the batches before it handled (the quadratic prune re-read it all)."""
    now = clock.now()
    ops = [
        make_operation(sessions, n, "COMPLETED", 5, now - 100 * DAY, now - 101 * DAY)
        for n in range(4)
    ]
    batches: list[tuple[str, int]] = []

    def on_batch(kind: str, deleted: int) -> None:
        batches.append((kind, deleted))
        if len(batches) == 1:  # the first operation is done: a stray old row behind the cursor
            add_history(sessions, ops[0], [0], now - 101 * DAY)

    result = prune(sessions, now - 90 * DAY, batch_size=5, on_batch=on_batch)

    assert result.history_rows == 4 * 4
    assert batches[:4] == [("history", 4)] * 4  # a window of 5 rows per operation
    assert seqs(sessions)[ops[0]] == [0, 5]  # behind the cursor: left for the next run
    assert all(seqs(sessions)[op] == [5] for op in ops[1:])
    assert prune(sessions, now - 90 * DAY, batch_size=5).history_rows == 1
    assert seqs(sessions)[ops[0]] == [5]


def test_every_prune_statement_walks_an_index(
    sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    """No statement scans operation_history or notices whole, nor sorts them: each batch is an
    index range from the cursor and key lookups, so it costs the same however far the run is."""
    now = clock.now()
    mixed_operations(sessions, now)
    engine = sessions.kw["bind"]
    statements: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        prune(sessions, now - 90 * DAY, batch_size=7)
        prune_delivered_notices(sessions, now - 50 * DAY, batch_size=2)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    queries = [
        (sql, params)
        for sql, params in statements
        if sql.lstrip().upper().startswith(("SELECT", "DELETE"))
        and ("operation_history" in sql or "notices" in sql)
    ]
    assert len(queries) > 10
    postgres = engine.dialect.name == "postgresql"
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if postgres:
            # Tiny test tables are cheaper to scan and sort whole: ask which plan exists without
            # those shortcuts (the benchmark shows the planner takes it on a large table).
            for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
                cursor.execute(f"SET {setting} = off")
        for sql, params in queries:
            cursor.execute(("EXPLAIN " if postgres else "EXPLAIN QUERY PLAN ") + sql, params)
            plan = [str(row[0] if postgres else row[-1]) for row in cursor.fetchall()]
            text = "\n".join(plan)
            for table in ("operation_history", "notices"):
                assert f"Seq Scan on {table}" not in text, (sql, text)
                assert f"SCAN {table}" not in text, (sql, text)
            assert "TEMP B-TREE" not in text and " Sort " not in f" {text} ", (sql, text)
    finally:
        raw.close()
