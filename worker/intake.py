"""Intake: operation IDs handed to optrack become tracked operations, all or nothing."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from worker.accounts import Accounts
from worker.credentials import DEFAULT_ACCOUNT, validate_account_name
from worker.operation import validate_operation_id
from worker.repository import Repository, TrackResult


def track(
    sessions: sessionmaker[Session],
    operation_ids: Sequence[str],
    now: datetime,
    account: str = DEFAULT_ACCOUNT,
) -> TrackResult:
    """Validate every ID and the account first, then start tracking the new ones under
    ``account`` in one transaction: UnknownAccount, or TrackedElsewhere naming both accounts
    if an ID is another account's, and nothing is written."""
    valid = [validate_operation_id(op_id) for op_id in operation_ids]
    validate_account_name(account)
    with sessions.begin() as session:
        Accounts(session).get(account)
        return Repository(session).add(valid, now, account)
