"""poll groups: the schedule per group of operations instead of per operation

Revision ID: 0004
Revises: 0003_reports
Create Date: 2026-12-01 10:40:00.000000

Every active operation is re-placed into a group by the next tick (``group_id`` starts NULL),
so no operation is lost by the upgrade; a backoff in progress is kept as ``not_before``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import worker.db

revision: str = "0004"
down_revision: str | None = "0003_reports"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
WHEN = worker.db.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "poll_groups",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("start_at", WHEN, nullable=True),
        sa.Column("end_at", WHEN, nullable=True),
        sa.Column("members", sa.Integer(), nullable=False),
        sa.Column("next_due_at", WHEN, nullable=False),
        sa.Column("claim_token", sa.String(length=36), nullable=True),
        sa.Column("claim_expires_at", WHEN, nullable=True),
        sa.Column("last_polled_at", WHEN, nullable=True),
        sa.Column("last_change_at", WHEN, nullable=True),
        sa.Column("listed", sa.Integer(), nullable=True),
        sa.Column("pages", sa.Integer(), nullable=True),
        sa.Column("consecutive_errors", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", WHEN, nullable=False),
        sa.CheckConstraint("kind IN ('list', 'fetch')", name=op.f("ck_poll_groups_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_poll_groups")),
    )
    with op.batch_alter_table("poll_groups", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_poll_groups_next_due_at"), ["next_due_at"])

    with op.batch_alter_table("tracked_operations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("group_id", ID, nullable=True))
        batch_op.add_column(sa.Column("not_before", WHEN, nullable=True))
    op.execute(
        "UPDATE tracked_operations SET not_before = next_poll_at WHERE consecutive_errors > 0"
    )
    with op.batch_alter_table("tracked_operations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tracked_operations_status_next_poll_at"))
        batch_op.drop_column("next_poll_at")
        batch_op.drop_column("claim_token")
        batch_op.create_foreign_key(
            batch_op.f("fk_tracked_operations_group_id_poll_groups"),
            "poll_groups",
            ["group_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch_op.create_index(batch_op.f("ix_tracked_operations_group_id"), ["group_id"])


def downgrade() -> None:
    with op.batch_alter_table("tracked_operations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tracked_operations_group_id"))
        batch_op.drop_constraint(
            batch_op.f("fk_tracked_operations_group_id_poll_groups"), type_="foreignkey"
        )
        batch_op.add_column(sa.Column("claim_token", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("next_poll_at", WHEN, nullable=True))
    # Everything active is due at once after a downgrade: nothing waits for a lost schedule.
    op.execute("UPDATE tracked_operations SET next_poll_at = COALESCE(not_before, tracked_at)")
    with op.batch_alter_table("tracked_operations", schema=None) as batch_op:
        batch_op.alter_column("next_poll_at", existing_type=WHEN, nullable=False)
        batch_op.drop_column("not_before")
        batch_op.drop_column("group_id")
        batch_op.create_index(
            batch_op.f("ix_tracked_operations_status_next_poll_at"), ["status", "next_poll_at"]
        )
    with op.batch_alter_table("poll_groups", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_poll_groups_next_due_at"))
    op.drop_table("poll_groups")
