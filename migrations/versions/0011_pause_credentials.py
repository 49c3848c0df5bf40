"""account pause: the credentials' rejection kept as its own fact, until an answer accepts them

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 10:00:00.000000

Additive only: both columns are NULL on existing rows (no rejection known). Credentials still
wrong after the upgrade are rejected again by the first request, and recorded then.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import worker.db

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("account_pauses", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "credentials_rejected_at", worker.db.UTCDateTime(timezone=True), nullable=True
            )
        )
        batch_op.add_column(sa.Column("credentials_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("account_pauses", schema=None) as batch_op:
        batch_op.drop_column("credentials_error")
        batch_op.drop_column("credentials_rejected_at")
