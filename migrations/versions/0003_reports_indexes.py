"""reports: index the tracked time every report's period filters and sorts on

Revision ID: 0003_reports
Revises: 0002
Create Date: 2026-11-27 02:20:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003_reports"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # `report --since/--until` filters on tracked_at; the HTML overview and `watch` sort on it.
    with op.batch_alter_table("tracked_operations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_tracked_operations_tracked_at"), ["tracked_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("tracked_operations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tracked_operations_tracked_at"))
