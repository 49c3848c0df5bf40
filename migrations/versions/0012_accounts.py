"""accounts: many Twilio accounts in one deployment, each operation and poll group in one

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 01:30:00.000000

The ``accounts`` table starts with the row ``default``: the environment's account
(``TWILIO_*``), which holds no credentials. Every existing operation and poll group belongs to
it (the columns' server default, which also files an older release's inserts there). Pauses
and budgets stay keyed by the account SID, as before: the default account's rows are its own.

Downgrade: the accounts and the account columns go. Operations of other accounts are kept,
and the older release polls them with the environment's credentials (remove those accounts
first, `optrack accounts remove NAME --delete-operations`, if that is not wanted).
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

import worker.db

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT = "default"


def upgrade() -> None:
    accounts = op.create_table(
        "accounts",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("account_sid", sa.String(length=64), nullable=True),
        sa.Column("api_key_sid", sa.String(length=64), nullable=True),
        sa.Column("secret", sa.Text(), nullable=True),
        sa.Column("max_requests_per_second", sa.Float(), nullable=True),
        sa.Column("created_at", worker.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("secret_set_at", worker.db.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "max_requests_per_second IS NULL OR max_requests_per_second > 0",
            name=op.f("ck_accounts_budget"),
        ),
        sa.CheckConstraint(
            f"name = '{DEFAULT}' OR (account_sid IS NOT NULL AND secret IS NOT NULL)",
            name=op.f("ck_accounts_credentials"),
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_accounts")),
        sa.UniqueConstraint("account_sid", name=op.f("uq_accounts_account_sid")),
    )
    op.bulk_insert(accounts, [{"name": DEFAULT, "created_at": datetime.now(UTC)}])
    for table in ("poll_groups", "tracked_operations"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("account", sa.String(length=64), server_default=DEFAULT, nullable=False)
            )
            batch_op.create_foreign_key(
                batch_op.f(f"fk_{table}_account_accounts"), "accounts", ["account"], ["name"]
            )
    with op.batch_alter_table("tracked_operations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_tracked_operations_account_status"), ["account", "status"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("tracked_operations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tracked_operations_account_status"))
    for table in ("tracked_operations", "poll_groups"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(batch_op.f(f"fk_{table}_account_accounts"), type_="foreignkey")
            batch_op.drop_column("account")
    op.drop_table("accounts")
