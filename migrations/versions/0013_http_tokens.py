"""http_tokens: tokens of the HTTP API, stored as SHA-256 digests, scoped to accounts

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 02:20:00.000000

Minted by `optrack tokens add`; OPTRACK_HTTP_TOKEN stays the all-access token beside them.
Downgrade: the table goes, and with it every minted token (OPTRACK_HTTP_TOKEN still works).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import worker.db

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "http_tokens",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("accounts", sa.Text(), nullable=True),
        sa.Column("read_only", sa.Boolean(), nullable=False),
        sa.Column("created_at", worker.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", worker.db.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_http_tokens")),
        sa.UniqueConstraint("digest", name=op.f("uq_http_tokens_digest")),
    )


def downgrade() -> None:
    op.drop_table("http_tokens")
