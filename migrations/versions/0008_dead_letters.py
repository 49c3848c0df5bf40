"""dead letters, per-message delivery counts, and when a claim's message was started

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import worker.db

revision: str = "0008"
# Another branch adds 0007: the integrator points this at it when merging.
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task_deliveries",
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("first_at", worker.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_at", worker.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_task_deliveries")),
    )
    op.create_table(
        "dead_letters",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("args", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("created_at", worker.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("replayed_at", worker.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("replay_task_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
        sa.UniqueConstraint("task_id", name=op.f("uq_dead_letters_task_id")),
    )
    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_dead_letters_replayed_at"), ["replayed_at"], unique=False
        )
    with op.batch_alter_table("poll_groups", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("claim_started_at", worker.db.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("poll_groups", schema=None) as batch_op:
        batch_op.drop_column("claim_started_at")
    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dead_letters_replayed_at"))
    op.drop_table("dead_letters")
    op.drop_table("task_deliveries")
