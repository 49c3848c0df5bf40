"""The one claim statement, for poll groups (the sweep) and notices (the dispatcher).

``UPDATE t SET <claim> WHERE id IN (SELECT id ... FOR UPDATE SKIP LOCKED LIMIT n) AND
<claimable> RETURNING ...``: on PostgreSQL two concurrent claimers skip each other's rows; on
SQLite the statement runs under the database's single write lock, so the second sees the rows
claimed (the condition is checked again in the UPDATE for that). A claimer that dies leaves
its rows claimable again when the claim's lease runs out.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from worker import dialect


def new_token() -> str:
    """A claim token: whoever holds it may write the rows it claimed."""
    return str(uuid.uuid4())


def claim(
    session: Session,
    model: Any,
    *,
    claimable: ColumnElement[bool],
    order_by: Sequence[Any],
    limit: int,
    values: Mapping[str, Any],
    returning: Sequence[Any],
) -> list[tuple[Any, ...]]:
    """Claim up to ``limit`` rows of ``model`` that are ``claimable``, oldest by ``order_by``
    first, setting ``values`` (the token, the lease); the ``returning`` columns of each, by id."""
    due = select(model.id).where(claimable).order_by(*order_by).limit(limit)
    stmt = (
        update(model)
        .where(model.id.in_(dialect.skip_locked(due, session).scalar_subquery()), claimable)
        .values(dict(values))
        .returning(*returning)
        .execution_options(synchronize_session=False)
    )
    return sorted((tuple(row) for row in session.execute(stmt)), key=lambda row: row[0])
