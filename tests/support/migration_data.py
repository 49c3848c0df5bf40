"""Realistic rows for every table any revision has, for the migration tests.

``rows_for(columns)`` gives, for each table that exists at a revision, rows holding exactly the
columns that exist there: operations in every status, their history, groups of both kinds,
notices delivered and pending, a pause, a budget, deliveries and dead letters, heartbeats. A
table or a column this module does not know fails the test, so a new migration cannot go
untested with data.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import MetaData, insert, inspect, select

from worker.db import make_engine

Snapshot = dict[str, dict[tuple[Any, ...], dict[str, Any]]]
Columns = dict[str, set[str]]

T0 = datetime(2026, 11, 20, 9, 30, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """A time ``seconds`` after T0."""
    return T0 + timedelta(seconds=seconds)


def _operation(
    suffix: str, status: str, counts: tuple[int, int, int, int] | None, **extra: Any
) -> dict[str, Any]:
    total, queued, created, failed = counts if counts else (None, None, None, None)
    row: dict[str, Any] = {
        "id": f"comms_operation_01h9krwprkeee8fzqspvwy{suffix}",
        "status": status,
        "total": total,
        "queued": queued,
        "created": created,
        "failed": failed,
        "remote_created_at": at(0) if counts else None,
        "remote_updated_at": at(40) if counts else None,
        "tracked_at": at(1),
        "last_polled_at": at(41) if counts else None,
        "next_poll_at": at(50),
        "claim_token": None,
        "group_id": None,
        "not_before": None,
        "not_found_since": None,
        "polls": 3 if counts else 0,
        "consecutive_errors": 0,
        "last_error": None,
        "ended_at": None,
        "version": 2 if counts else 0,
        "account": "default",
    }
    row.update(extra)
    return row


OPERATIONS = [
    _operation("pend01", "PENDING", None),
    _operation("proc01", "PROCESSING", (30, 18, 11, 1), group_id=1, claim_token="c-1"),
    _operation(
        "proc02",
        "PROCESSING",
        (12, 12, 0, 0),
        group_id=2,
        consecutive_errors=3,
        last_error="ServerError: HTTP 500 (20500) Internal error; café ✓",
        next_poll_at=at(300),
        not_before=at(300),
    ),
    _operation("done01", "COMPLETED", (20, 0, 19, 1), ended_at=at(40), group_id=1),
    _operation("canc01", "CANCELED", (20, 10, 10, 0), ended_at=at(40)),
    _operation(
        "gone01",
        "NOT_FOUND",
        None,
        ended_at=at(120),
        not_found_since=at(60),
        consecutive_errors=4,
        last_error="NotFound: HTTP 404 (20404)",
    ),
]

GROUPS = [
    {
        "id": 1,
        "kind": "list",
        "start_at": at(0),
        "end_at": at(0),
        "members": 2,
        "next_due_at": at(50),
        "claim_token": "0b6f6f0e-5a3c-4f0b-9a55-2a1c3f2d9e01",
        "claim_expires_at": at(110),
        "claim_started_at": at(51),
        "last_polled_at": at(41),
        "last_change_at": at(41),
        "listed": 1000,
        "pages": 2,
        "consecutive_errors": 0,
        "last_error": None,
        "created_at": at(2),
        # A listing cut after its first page, going on at the second.
        "round_started_at": at(51),
        "resume_token": "eyJrZXkiOiBbMTc2MzYzMTAwMCwgImNvbW1zX29wZXJhdGlvbl8wMSJdfQ",
        "resume_start_at": at(-86401),
        "resume_end_at": at(1),
        "resume_after": None,
        "request_seconds": 2.75,
        "account": "default",
    },
    {
        "id": 2,
        "kind": "fetch",
        "start_at": None,
        "end_at": None,
        "members": 1,
        "next_due_at": at(300),
        "claim_token": None,
        "claim_expires_at": None,
        "claim_started_at": None,
        "last_polled_at": at(200),
        "last_change_at": None,
        "listed": None,
        "pages": None,
        "consecutive_errors": 1,
        "last_error": "ServerError: HTTP 500",
        "created_at": at(2),
        # GETs cut after the first member, going on after it.
        "round_started_at": at(200),
        "resume_token": None,
        "resume_start_at": None,
        "resume_end_at": None,
        "resume_after": "comms_operation_01h9krwprkeee8fzqspvwyproc01",
        "request_seconds": 0.125,
        "account": "default",
    },
]


def _history(operation: dict[str, Any]) -> list[dict[str, Any]]:
    if operation["total"] is None:
        return []
    first = {
        "operation_id": operation["id"],
        "seq": 1,
        "observed_at": at(11),
        "remote_updated_at": at(10),
        "status": "PROCESSING",
        "total": operation["total"],
        "queued": operation["total"],
        "created": 0,
        "failed": 0,
    }
    last = {
        **first,
        "seq": 2,
        "observed_at": at(41),
        "remote_updated_at": at(40),
        "status": operation["status"],
        "queued": operation["queued"],
        "created": operation["created"],
        "failed": operation["failed"],
    }
    return [first, last]


NOTICES = [
    {
        "id": 1,
        "operation_id": OPERATIONS[3]["id"],
        "payload": json.dumps({"id": OPERATIONS[3]["id"], "status": "COMPLETED"}),
        "created_at": at(41),
        "next_attempt_at": at(41),
        "claim_token": None,
        "attempts": 1,
        "task_sent_at": at(42),
        "webhook_sent_at": at(42),
        "delivered_at": at(42),
        "last_error": None,
    },
    {
        "id": 2,
        "operation_id": OPERATIONS[4]["id"],
        "payload": json.dumps({"id": OPERATIONS[4]["id"], "status": "CANCELED"}),
        "created_at": at(41),
        "next_attempt_at": at(400),
        "claim_token": "5d0f4a3e-0000-4000-8000-000000000001",
        "attempts": 3,
        "task_sent_at": at(42),
        "webhook_sent_at": None,
        "delivered_at": None,
        "last_error": "webhook: HTTP 502",
    },
]

OTHER_TABLES: dict[str, list[dict[str, Any]]] = {
    "account_pauses": [
        {
            "account_sid": "AC" + "1" * 32,
            "paused_until": at(90),
            "reason": "HTTP 429 (20429) Too Many Requests",
            "status_code": 429,
            "updated_at": at(60),
            "consecutive_throttles": 2,
            "credentials_rejected_at": at(30),
            "credentials_error": "HTTP 401: credentials rejected (Authenticate); check TWILIO_*",
        }
    ],
    "request_budgets": [{"account_sid": "AC" + "1" * 32, "next_slot_at": at(61)}],
    "heartbeats": [
        {"name": "beat", "beat_at": at(58), "schema_revision": None},
        {"name": "worker:optrack@host-1:4242", "beat_at": at(59), "schema_revision": "0009"},
    ],
    "http_tokens": [
        {
            "name": "acme-readonly",
            "digest": "5" * 64,
            "accounts": '["acme-eu"]',
            "read_only": True,
            "created_at": at(7),
            "revoked_at": None,
        },
        {
            "name": "ops",
            "digest": "6" * 64,
            "accounts": None,
            "read_only": False,
            "created_at": at(8),
            "revoked_at": at(9),
        },
    ],
    "task_deliveries": [
        {
            "task_id": "8c1d2e3f-0000-4000-8000-00000000000a",
            "task": "optrack.poll",
            "deliveries": 2,
            "first_at": at(30),
            "last_at": at(45),
        }
    ],
    "dead_letters": [
        {
            "id": 1,
            "task": "optrack.track",
            "task_id": "8c1d2e3f-0000-4000-8000-00000000000b",
            "args": '[["comms_operation_01h9krwprkeee8fzqspvwyzzz01"]]',
            "reason": "InvalidMessage: not a list",
            "deliveries": 5,
            "created_at": at(70),
            "replayed_at": None,
            "replay_task_id": None,
        },
        {
            "id": 2,
            "task": "optrack.poll",
            "task_id": "8c1d2e3f-0000-4000-8000-00000000000c",
            "args": '[7, "token"]',
            "reason": "WorkerLostError",
            "deliveries": 5,
            "created_at": at(71),
            "replayed_at": at(80),
            "replay_task_id": "8c1d2e3f-0000-4000-8000-00000000000d",
        },
    ],
}

# The migration adds ``default`` itself (the environment's account); one more beside it.
ACCOUNTS = [
    {
        "name": "acme-eu",
        "account_sid": "AC" + "2" * 32,
        "api_key_sid": "SK" + "3" * 32,
        "secret": "gAAAAABnotarealtokenbutopaquetextstoredasis==",
        "max_requests_per_second": 2.5,
        "created_at": at(5),
        "secret_set_at": at(6),
    }
]

# Insert order: parents before children.
ALL_ROWS: dict[str, list[dict[str, Any]]] = {
    "accounts": ACCOUNTS,
    "poll_groups": GROUPS,
    "tracked_operations": OPERATIONS,
    "operation_history": [
        {"id": n, **row}
        for n, row in enumerate((row for op in OPERATIONS for row in _history(op)), start=1)
    ],
    "notices": NOTICES,
    **OTHER_TABLES,
}

# Values a column gets when a migration adds it to rows that existed before.
ADDED_COLUMN_VALUES: dict[tuple[str, str], Any] = {
    ("tracked_operations", "group_id"): None,
    ("tracked_operations", "not_found_since"): None,
    ("account_pauses", "consecutive_throttles"): 0,
    ("account_pauses", "credentials_rejected_at"): None,
    ("account_pauses", "credentials_error"): None,
    ("poll_groups", "claim_started_at"): None,
    **{
        ("poll_groups", name): None
        for name in (
            "round_started_at",
            "resume_token",
            "resume_start_at",
            "resume_end_at",
            "resume_after",
            "request_seconds",
        )
    },
    ("heartbeats", "schema_revision"): None,
    # 0012: every operation and group that existed belongs to the environment's account.
    ("tracked_operations", "account"): "default",
    ("poll_groups", "account"): "default",
    # 0004's downgrade brings back the per-operation claim, with no claim held.
    ("tracked_operations", "claim_token"): None,
}
# Added columns whose value a migration derives from the row (checked by the test itself).
DERIVED_COLUMNS = {("tracked_operations", "not_before"), ("tracked_operations", "next_poll_at")}


def rows_for(columns: dict[str, set[str]]) -> dict[str, list[dict[str, Any]]]:
    """The rows for the tables and columns of one revision (``columns``: table → names)."""
    unknown = set(columns) - set(ALL_ROWS)
    assert not unknown, f"no migration test rows for table(s) {sorted(unknown)}: add them here"
    rows: dict[str, list[dict[str, Any]]] = {}
    for table, names in columns.items():
        known = set(ALL_ROWS[table][0])
        missing = names - known
        assert not missing, f"no migration test value for {table}.{sorted(missing)}: add it here"
        rows[table] = [{k: v for k, v in row.items() if k in names} for row in ALL_ROWS[table]]
    return rows


def columns(url: str) -> Columns:
    """The tables of the database and their column names."""
    engine = make_engine(url)
    inspector = inspect(engine)
    columns = {
        table: {column["name"] for column in inspector.get_columns(table)}
        for table in inspector.get_table_names()
        if table != "alembic_version"
    }
    engine.dispose()
    return columns


def fill(url: str) -> Columns:
    """Insert the rows of the revision the database is at; return its tables' columns."""
    present = columns(url)
    rows = rows_for(present)
    engine = make_engine(url)
    metadata = MetaData()
    metadata.reflect(engine)
    with engine.begin() as conn:
        for table in ALL_ROWS:  # parents first
            if table in rows:
                conn.execute(insert(metadata.tables[table]), rows[table])
    engine.dispose()
    return present


def snapshot(url: str) -> Snapshot:
    """Every row of every table, by primary key."""
    engine = make_engine(url)
    metadata = MetaData()
    metadata.reflect(engine)
    snapshot: Snapshot = {}
    with engine.connect() as conn:
        for name, table in metadata.tables.items():
            if name == "alembic_version":
                continue
            key = [column.name for column in table.primary_key.columns]
            snapshot[name] = {
                tuple(row[k] for k in key): dict(row)
                for row in conn.execute(select(table)).mappings()
            }
    engine.dispose()
    return snapshot
