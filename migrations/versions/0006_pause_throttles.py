"""account pause: count consecutive throttles, shared by every process

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
# The integrator's 0004 comes first: set this to "0004" when merging it.
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("account_pauses", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("consecutive_throttles", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("account_pauses", schema=None) as batch_op:
        batch_op.drop_column("consecutive_throttles")
