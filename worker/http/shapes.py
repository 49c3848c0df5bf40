"""The JSON the API answers around the records (a page, a track result, the progress list).

TypedDicts like the records they hold (``worker.records``, ``worker.reports.shapes``): the
routes fill them, mypy checks each literal, the OpenAPI document derives their schemas.
"""

from __future__ import annotations

from typing import Annotated, TypedDict

import msgspec

from worker.records import OperationRecord, Time
from worker.reports.shapes import EstimateRecord


class TrackAnswer(TypedDict):
    """The IDs tracking started for, and those tracked already, in the order given."""

    added: list[str]
    already_tracked: list[str]


class OperationStep(OperationRecord):
    """An operation's record and its latest history step (what a long poll passes back)."""

    seq: Annotated[
        int | None,
        msgspec.Meta(
            description="The latest history step; pass it as `after` to wait for the next"
        ),
    ]


class OperationsPage(TypedDict):
    """A page of operations in ID order."""

    operations: list[OperationRecord]
    next: Annotated[
        str | None,
        msgspec.Meta(description="The cursor of the next page (opaque); null on the last"),
    ]


class ProgressItem(TypedDict):
    """Where one operation stands: its record and its completion estimate."""

    operation: OperationRecord
    estimate: EstimateRecord


class ProgressPage(TypedDict):
    """The active operations and those ended lately, the most recently tracked first."""

    now: Time
    progress: list[ProgressItem]


class AccountSummary(TypedDict):
    """One account on the dashboard: its active operations, its pause, its failure rate."""

    name: str
    active: Annotated[int, msgspec.Meta(description="Operations PENDING or PROCESSING")]
    paused: Annotated[bool, msgspec.Meta(description="Paused now (Retry-After or credentials)")]
    paused_until: Time | None
    failure_rate: Annotated[
        float | None,
        msgspec.Meta(description="Failed senders / (created + failed); null before any"),
    ]


class AccountsPage(TypedDict):
    """Every account the token sees, by name."""

    accounts: list[AccountSummary]
