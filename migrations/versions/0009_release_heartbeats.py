"""heartbeats: the schema revision of the process that wrote each, to see other releases

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 22:30:00.000000

Additive only: a release before this one writes its heartbeat (``beat``) as it did, and the
column stays NULL there, which is how this release knows an older one still runs.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("heartbeats", schema=None) as batch_op:
        batch_op.add_column(sa.Column("schema_revision", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("heartbeats", schema=None) as batch_op:
        batch_op.drop_column("schema_revision")
