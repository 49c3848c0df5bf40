"""Intake: operation IDs handed to optrack become tracked operations, all or nothing."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from worker.operation import validate_operation_id
from worker.repository import Repository, TrackResult


def track(
    sessions: sessionmaker[Session], operation_ids: Sequence[str], now: datetime
) -> TrackResult:
    """Validate every ID first, then start tracking the new ones in one transaction."""
    valid = [validate_operation_id(op_id) for op_id in operation_ids]
    with sessions.begin() as session:
        return Repository(session).add(valid, now)
