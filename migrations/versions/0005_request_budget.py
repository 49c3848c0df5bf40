"""the account's request budget, shared by every worker

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 11:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import worker.db

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "request_budgets",
        sa.Column("account_sid", sa.String(length=64), nullable=False),
        sa.Column("next_slot_at", worker.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("account_sid", name=op.f("pk_request_budgets")),
    )


def downgrade() -> None:
    op.drop_table("request_budgets")
