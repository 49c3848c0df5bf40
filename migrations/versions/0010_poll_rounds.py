"""poll groups: where a poll round cut short goes on, and the seconds per request measured

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 12:00:00.000000

Additive only: every column is NULL on existing rows (no round in progress, nothing measured
yet), which is how an older release's groups and a group never polled look.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import worker.db

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_AT = ("round_started_at", "resume_start_at", "resume_end_at")


def upgrade() -> None:
    with op.batch_alter_table("poll_groups", schema=None) as batch_op:
        for name in _AT:
            batch_op.add_column(
                sa.Column(name, worker.db.UTCDateTime(timezone=True), nullable=True)
            )
        batch_op.add_column(sa.Column("resume_token", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("resume_after", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("request_seconds", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("poll_groups", schema=None) as batch_op:
        for name in ("request_seconds", "resume_after", "resume_token", *reversed(_AT)):
            batch_op.drop_column(name)
