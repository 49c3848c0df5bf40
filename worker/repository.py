"""All queries on tracked operations, their history, poll groups and the account pause."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Row,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from worker import claims, dialect
from worker.credentials import DEFAULT_ACCOUNT
from worker.db import (
    Base,
    HistoryEntry,
    PollGroup,
    TrackedOperation,
)
from worker.dialect import in_many
from worker.errors import TrackedElsewhere
from worker.operation import Operation
from worker.planning import GroupView, Member, NewGroup, Placement, Waiting
from worker.tracking import (
    ACTIVE_STATES,
    NOT_FOUND,
    PENDING,
    Change,
    Failed,
    Gone,
    Known,
    Observed,
    first_sight_key,
)
from worker.ulid import agrees


@dataclass(frozen=True)
class TrackResult:
    """What ``add`` did: which IDs it started tracking and which were tracked already."""

    added: tuple[str, ...]
    already_tracked: tuple[str, ...]


@dataclass(frozen=True)
class GroupClaim:
    """A poll group claimed by one sweep; its message runs only with the matching token."""

    group_id: int
    token: str
    expires_at: datetime
    # When the group fell due, or falls due: a tick claims up to one tick ahead.
    due_at: datetime


@dataclass(frozen=True, slots=True)
class PollTarget:
    """What a poll needs to ask for one operation."""

    id: str
    remote_created_at: datetime | None
    tracked_at: datetime
    not_before: datetime | None
    # Never seen, in a window covering the time its ID carries (the account's IDs proven to
    # carry it): that time, to the second. A poll lists the window's own range for it.
    id_created_at: datetime | None = None


@dataclass(frozen=True)
class Written:
    """What ``apply`` wrote: rows updated, history rows added, operations that ended."""

    rows: int
    history: int
    ended: tuple[str, ...]


INSERT_BATCH = 1000
# A poll group with no round in progress (``poller``: where a round cut short goes on).
NO_ROUND: dict[str, Any] = dict.fromkeys(
    ("round_started_at", "resume_token", "resume_start_at", "resume_end_at", "resume_after")
)
# An account's IDs carry their creation time once this many of its latest seen operations
# agree, and all of the latest ID_PROOF_SAMPLE do (``ids_carry_time``).
ID_PROOF_MIN = 10
ID_PROOF_SAMPLE = 50
PLACEMENT_LOCK = 0x6F70747261636B  # "optrack": one sweep places operations at a time
_OPERATIONS = TrackedOperation.__table__
log = logging.getLogger(__name__)


class Repository:
    """Queries of one session; the caller owns the transaction."""

    def __init__(self, session: Session) -> None:
        self.session = session

    # --- tracked operations -------------------------------------------------------------

    def add(
        self, operation_ids: Sequence[str], now: datetime, account: str = DEFAULT_ACCOUNT
    ) -> TrackResult:
        """Start tracking the IDs not tracked yet, under ``account``; the next tick places and
        polls them. TrackedElsewhere (the caller rolls back: nothing written) if any is tracked
        under another account."""
        wanted = list(dict.fromkeys(operation_ids))
        added = self._insert_new([_new_row(op_id, now, account) for op_id in wanted])
        result = TrackResult(
            added=tuple(i for i in wanted if i in added),
            already_tracked=tuple(i for i in wanted if i not in added),
        )
        self._refuse_elsewhere(result.already_tracked, account)
        return result

    def _refuse_elsewhere(self, operation_ids: Sequence[str], account: str) -> None:
        """TrackedElsewhere naming both accounts if any of these is another account's."""
        t = TrackedOperation
        elsewhere: dict[str, str] = {}
        for wanted in self._id_filters(sorted(operation_ids)):
            stmt = select(t.id, t.account).where(wanted, t.account != account)
            elsewhere.update({op_id: other for op_id, other in self.session.execute(stmt)})
        if elsewhere:
            raise TrackedElsewhere(account, elsewhere)

    def accounts_of(self, operation_ids: Iterable[str]) -> dict[str, str]:
        """The account of each tracked operation among ``operation_ids``."""
        t = TrackedOperation
        found: dict[str, str] = {}
        for wanted in self._id_filters(sorted(set(operation_ids))):
            found.update(dict(self.session.execute(select(t.id, t.account).where(wanted)).all()))
        return found

    def add_seen(
        self,
        answers: Sequence[Operation],
        now: datetime,
        allowance: timedelta,
        account: str = DEFAULT_ACCOUNT,
    ) -> TrackResult:
        """Start tracking operations as a listing showed them: their state is the first step
        of their history, and their createdAt places them at once. An updatedAt ahead of the
        clocks by more than ``allowance`` is not recorded (``tracking.first_sight_key``)."""
        by_id = {op.id: op for op in answers}
        keys = {op.id: first_sight_key(op, now, allowance) for op in by_id.values()}
        rows = [
            {**_new_row(op.id, now, account), **_state(op, now, keys[op.id]), "version": 1}
            for op in by_id.values()
        ]
        added = self._insert_new(rows)
        history = [
            _history_row(by_id[op_id], 1, now, keys[op_id]) for op_id in by_id if op_id in added
        ]
        for start in range(0, len(history), INSERT_BATCH):
            self.session.execute(insert(HistoryEntry), history[start : start + INSERT_BATCH])
        return TrackResult(
            added=tuple(i for i in by_id if i in added),
            already_tracked=tuple(i for i in by_id if i not in added),
        )

    def _insert_new(self, rows: Sequence[dict[str, Any]]) -> set[str]:
        added: set[str] = set()
        # Bound parameters per statement are limited (65,535 on PostgreSQL, 32,766 on SQLite).
        for start in range(0, len(rows), INSERT_BATCH):
            stmt = (
                dialect.insert(self.session)(TrackedOperation)
                .values(list(rows[start : start + INSERT_BATCH]))
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(TrackedOperation.id)
            )
            added.update(self.session.scalars(stmt))
        return added

    def get(self, operation_id: str) -> TrackedOperation | None:
        """Return one tracked operation or None."""
        return self.session.get(TrackedOperation, operation_id)

    def all(self) -> Sequence[TrackedOperation]:
        """Every tracked operation, the most recently tracked last."""
        stmt = select(TrackedOperation).order_by(TrackedOperation.tracked_at, TrackedOperation.id)
        return self.session.scalars(stmt).all()

    def history(self, operation_id: str) -> Sequence[HistoryEntry]:
        """The stats history of one operation, oldest first."""
        stmt = (
            select(HistoryEntry)
            .where(HistoryEntry.operation_id == operation_id)
            .order_by(HistoryEntry.seq)
        )
        return self.session.scalars(stmt).all()

    def states(
        self, operation_ids: Iterable[str], *, lock: bool = False, account: str | None = None
    ) -> list[Row[Any]]:
        """The stored state of the active operations among ``operation_ids``, by id, as light
        Core rows with the columns of ``tracked_operations``.

        With ``lock`` the rows are locked for the transaction where the backend can
        (PostgreSQL), in id order so two writers never deadlock; SQLite's single write lock,
        taken when the transaction began, does the same. With ``account``, only its operations
        (an answer got with one account's credentials says nothing of another's).
        """
        ids = sorted(set(operation_ids))
        found: list[Row[Any]] = []
        for wanted in self._id_filters(ids):
            stmt = select(_OPERATIONS).where(wanted, _OPERATIONS.c.status.in_(ACTIVE_STATES))
            if account is not None:
                stmt = stmt.where(_OPERATIONS.c.account == account)
            if lock:
                stmt = stmt.with_for_update()
            found.extend(self.session.execute(stmt.order_by(_OPERATIONS.c.id)).all())
        return found

    def _id_filters(self, ids: Sequence[str]) -> Iterable[Any]:
        """``id IN ids`` as one array on PostgreSQL, in chunks on SQLite."""
        return in_many(self.session, _OPERATIONS.c.id, ids)

    def members(self, group_id: int) -> list[PollTarget]:
        """The active operations a group polls, by id (the recorder reads their state)."""
        t = TrackedOperation
        stmt = (
            select(t.id, t.remote_created_at, t.tracked_at, t.not_before)
            .where(t.group_id == group_id, t.status.in_(ACTIVE_STATES))
            .order_by(t.id)
        )
        return [PollTarget(*row) for row in self.session.execute(stmt)]

    def targets(self, operation_ids: Iterable[str]) -> list[PollTarget]:
        """The active operations among ``operation_ids``, as a poll asks for them."""
        return [
            PollTarget(r.id, r.remote_created_at, r.tracked_at, r.not_before)
            for r in self.states(operation_ids)
        ]

    def apply(self, changes: Sequence[Change], now: datetime) -> Written:
        """Write the decided changes: bookkeeping (version, polls, history seq) is kept here.

        The caller holds the rows' locks (``states(..., lock=True)``) and decided the
        changes against them, so each version is written once and each history seq is new.
        """
        observed = [c for c in changes if isinstance(c, Observed)]
        failed = [c for c in changes if isinstance(c, Failed)]
        gone = [c for c in changes if isinstance(c, Gone)]
        self.update_many([_observed_row(c, now) for c in observed])
        self.update_many([_failed_row(c, now) for c in failed])
        self.update_many([_gone_row(c, now) for c in gone])
        history = [
            _history_row(c.answer, c.known.version + 1, now, c.updated_at)
            for c in observed
            if c.history
        ]
        for start in range(0, len(history), INSERT_BATCH):
            self.session.execute(insert(HistoryEntry), history[start : start + INSERT_BATCH])
        ended = tuple(c.known.id for c in observed if c.ended) + tuple(c.known.id for c in gone)
        return Written(len(changes), len(history), ended)

    def update_many(self, rows: Sequence[dict[str, Any]]) -> None:
        """Bulk UPDATE by primary key; every dict holds ``id`` and the same other columns.

        One statement however many rows (see ``dialect.update_many``).
        """
        dialect.update_many(self.session, Base.metadata.tables["tracked_operations"], rows)

    # --- poll groups --------------------------------------------------------------------

    def waiting_accounts(self) -> list[str]:
        """The accounts with active operations no group polls yet, by name."""
        t = TrackedOperation
        stmt = select(t.account).where(t.group_id.is_(None), t.status.in_(ACTIVE_STATES))
        return sorted(set(self.session.scalars(stmt.distinct())))

    def waiting(self, limit: int, account: str = DEFAULT_ACCOUNT) -> list[Waiting]:
        """Active operations of ``account`` no group polls yet, to be placed by the sweep."""
        t = TrackedOperation
        stmt = (
            select(t.id, t.remote_created_at, t.tracked_at, t.last_polled_at)
            .where(t.group_id.is_(None), t.status.in_(ACTIVE_STATES), t.account == account)
            .order_by(t.tracked_at, t.id)
            .limit(limit)
        )
        return [Waiting(*row) for row in self.session.execute(stmt)]

    def ids_carry_time(self, account: str, now: datetime) -> bool:
        """True if ``account``'s IDs are proven to carry their creation time: its latest
        tracked operations that were seen (``ID_PROOF_SAMPLE`` at most) are at least
        ``ID_PROOF_MIN``, and every one's ID time agrees with its createdAt. One bounded
        query; a single disagreement among them withdraws the proof."""
        t = TrackedOperation
        stmt = (
            select(t.id, t.remote_created_at)
            .where(t.account == account, t.remote_created_at.is_not(None))
            .order_by(t.tracked_at.desc())
            .limit(ID_PROOF_SAMPLE)
        )
        sample = self.session.execute(stmt).all()
        return len(sample) >= ID_PROOF_MIN and all(
            created is not None and agrees(op_id, created, now) for op_id, created in sample
        )

    def groups(self, now: datetime) -> dict[str, list[GroupView]]:
        """Every poll group, by account, as the planner reads them (claimed: a poll holds it at
        ``now``): groups never mix accounts. One query, however many accounts."""
        g = PollGroup
        claimed = and_(g.claim_token.is_not(None), g.claim_expires_at > now)
        resuming = g.round_started_at.is_not(None)
        stmt = select(
            g.account,
            g.id,
            g.kind,
            g.start_at,
            g.end_at,
            g.members,
            g.listed,
            g.pages,
            claimed.label("claimed"),
            g.request_seconds,
            resuming.label("resuming"),
            g.next_due_at.label("due_at"),
        ).order_by(g.id)
        by_account: dict[str, list[GroupView]] = {}
        for row in self.session.execute(stmt):
            values = row._asdict()
            by_account.setdefault(values.pop("account"), []).append(GroupView(**values))
        return by_account

    def place(self, plan: Placement, now: datetime, account: str = DEFAULT_ACCOUNT) -> None:
        """Write a placement: new groups (due at once), grown windows, members joining."""
        g = PollGroup
        for group_id, (low, high) in plan.ranges.items():
            self.session.execute(
                update(g).where(g.id == group_id).values(start_at=low, end_at=high)
            )
        for group_id, op_ids in plan.joins.items():
            self._assign(group_id, op_ids)
            self.session.execute(
                update(g).where(g.id == group_id).values(members=g.members + len(op_ids))
            )
        for new in plan.new:
            self.create_group(new, now, account=account)

    def create_group(
        self,
        new: NewGroup,
        now: datetime,
        request_seconds: float | None = None,
        account: str = DEFAULT_ACCOUNT,
    ) -> int:
        """Create a group of ``account`` with its members, due at ``now`` (``request_seconds``:
        what a poll of the group it was cut from measured)."""
        group_id = self.session.scalar(
            insert(PollGroup)
            .values(
                account=account,
                kind=new.kind,
                start_at=new.start_at,
                end_at=new.end_at,
                members=len(new.members),
                next_due_at=new.due_at or now,
                # A new group counts as just changed: the adaptive cadence starts at the interval.
                last_change_at=now,
                consecutive_errors=0,
                created_at=now,
                request_seconds=request_seconds,
            )
            .returning(PollGroup.id)
        )
        assert group_id is not None
        self._assign(group_id, new.members)
        return int(group_id)

    def _assign(self, group_id: int, op_ids: Sequence[str]) -> None:
        for wanted in self._id_filters(list(op_ids)):
            self.session.execute(
                update(TrackedOperation)
                .where(wanted)
                .values(group_id=group_id)
                .execution_options(synchronize_session=False)
            )

    def group_members(self, group_id: int) -> list[Member]:
        """The active members of a group with their createdAt (for a split)."""
        t = TrackedOperation
        stmt = select(t.id, t.remote_created_at).where(
            t.group_id == group_id, t.status.in_(ACTIVE_STATES)
        )
        return [Member(*row) for row in self.session.execute(stmt)]

    def regroup(
        self, group_id: int, parts: Sequence[Sequence[str]], kind: str, now: datetime
    ) -> list[int]:
        """Keep ``parts[0]`` in the group (now of ``kind``); each other part becomes a new
        group, due at ``now``. A round in progress ends: each part begins its own. Returns the
        new groups' ids."""
        first = list(parts[0]) if parts else []
        g = PollGroup
        seconds, account = self.session.execute(
            select(g.request_seconds, g.account).where(g.id == group_id)
        ).one()
        self.session.execute(
            update(g)
            .where(g.id == group_id)
            .values(kind=kind, members=len(first), listed=None, pages=None, **NO_ROUND)
        )
        return [
            self.create_group(NewGroup(kind, tuple(p)), now, seconds, account)
            for p in parts[1:]
            if p
        ]

    def make_due(self, operation_ids: Sequence[str], now: datetime) -> tuple[int, int]:
        """Make the groups of the active operations among ``operation_ids`` due at ``now`` (a
        group due earlier keeps its time). Returns how many groups they are in and how many of
        them no group polls yet."""
        t = TrackedOperation
        group_ids: set[int] = set()
        waiting = 0
        for wanted in self._id_filters(sorted(set(operation_ids))):
            stmt = select(t.group_id).where(wanted, t.status.in_(ACTIVE_STATES))
            for (group_id,) in self.session.execute(stmt):
                if group_id is None:
                    waiting += 1
                else:
                    group_ids.add(int(group_id))
        for wanted in in_many(self.session, PollGroup.id, sorted(group_ids)):
            self.session.execute(
                update(PollGroup)
                .where(wanted, PollGroup.next_due_at > now)
                .values(next_due_at=now)
                .execution_options(synchronize_session=False)
            )
        return len(group_ids), waiting

    def try_lock_placement(self) -> bool:
        """Take the placement lock for this transaction; False if another sweep holds it.

        SQLite's write lock, taken when the transaction began, already serializes sweeps.
        """
        return dialect.try_advisory_lock(self.session, PLACEMENT_LOCK)

    def refresh_range(self, group_id: int) -> None:
        """Set a window's range to its members' createdAt (after a split or a merge)."""
        t = TrackedOperation
        low, high, count = self.session.execute(
            select(
                func.min(t.remote_created_at), func.max(t.remote_created_at), func.count()
            ).where(t.group_id == group_id, t.status.in_(ACTIVE_STATES))
        ).one()
        self.session.execute(
            update(PollGroup)
            .where(PollGroup.id == group_id)
            .values(
                start_at=None if low is None else low.replace(microsecond=0),
                end_at=None if high is None else high.replace(microsecond=0),
                members=int(count),
            )
        )

    def merge(self, into: int, other: int) -> None:
        """Move every member of ``other`` into ``into`` and drop ``other``.

        The merged group is due when the earlier of the two was, and counts the later change
        (the adaptive cadence): a merge delays none of its members.
        """
        g = PollGroup
        times = self.session.execute(
            select(
                func.min(g.next_due_at), func.max(g.last_change_at), func.max(g.request_seconds)
            ).where(g.id.in_((into, other)))
        ).one()
        self.session.execute(
            update(g)
            .where(g.id == into)
            .values(
                next_due_at=times[0],
                last_change_at=times[1],
                request_seconds=times[2],
                **NO_ROUND,  # the other's members were not in its round
            )
            .execution_options(synchronize_session=False)
        )
        self.session.execute(
            update(TrackedOperation)
            .where(TrackedOperation.group_id == other)
            .values(group_id=into)
            .execution_options(synchronize_session=False)
        )
        self.session.execute(delete(PollGroup).where(PollGroup.id == other))
        self.refresh_range(into)

    def claim_due(
        self,
        now: datetime,
        limit: int,
        lease: timedelta,
        resend_after: timedelta | None = None,
        ahead: timedelta = timedelta(0),
        paused: Collection[str] = (),
    ) -> list[GroupClaim]:
        """Claim up to ``limit`` due groups for one sweep, each with a token and a lease.

        Due: by ``now``, or by ``now + ahead`` (the next tick) unless the group is backing
        off after an error (``PollPolicy.claim_ahead``).

        The one claim statement (``claims.claim``): concurrent sweeps never claim one group
        twice; the claims come in the order the groups fell due. A worker that dies mid-poll
        leaves its groups due again when the lease runs out; a claim whose message no worker
        started yet (in the broker, or lost) only ``resend_after`` after it was made (the sweep
        passes the lease when the broker's queue is empty), so a broker nobody consumes does
        not fill with one message per lease. The groups of the ``paused`` accounts wait.
        """
        token = claims.new_token()
        g = PollGroup
        resend = lease if resend_after is None else max(lease, resend_after)
        expired = and_(
            g.claim_expires_at <= now,
            or_(g.claim_started_at.is_not(None), g.claim_expires_at <= now - (resend - lease)),
        )
        expires = now + lease
        rows = claims.claim(
            self.session,
            g,
            claimable=and_(
                g.next_due_at <= now + ahead,  # one range of the due index
                or_(g.next_due_at <= now, g.consecutive_errors == 0),
                or_(g.claim_token.is_(None), expired),
                *([g.account.not_in(sorted(paused))] if paused else []),
            ),
            order_by=[g.next_due_at],
            limit=limit,
            values={"claim_token": token, "claim_expires_at": expires, "claim_started_at": None},
            returning=[g.id, g.next_due_at],
        )
        # Sent in the order they fell due: a worker with a backlog polls the longest waiting
        # first (by id, a group whose polls were cut by their deadline could wait for ever).
        ordered = sorted(rows, key=lambda row: (row[1], row[0]))
        return [GroupClaim(group_id, token, expires, due_at) for group_id, due_at in ordered]

    def start_claim(self, group_id: int, token: str, now: datetime) -> None:
        """Note that a worker started the message of this claim (see ``claim_due``)."""
        self.session.execute(
            update(PollGroup)
            .where(
                PollGroup.id == group_id,
                PollGroup.claim_token == token,
                PollGroup.claim_started_at.is_(None),
            )
            .values(claim_started_at=now)
            .execution_options(synchronize_session=False)
        )

    def claimed_group(self, group_id: int, token: str) -> PollGroup | None:
        """The group if it is still claimed with ``token`` (else another sweep has it)."""
        group = self.session.get(PollGroup, group_id)
        if group is None or group.claim_token != token:
            return None
        return group

    def release(self, claims: Sequence[GroupClaim], now: datetime) -> None:
        """Give claimed groups back, due at ``now`` (their poll message was never sent).

        One statement per token (a sweep's claims share one) and list of ids, whatever the
        number of claims (OPTRACK_MAX_DUE_PER_TICK allows a million)."""
        by_token: dict[str, list[int]] = {}
        for claim in claims:
            by_token.setdefault(claim.token, []).append(claim.group_id)
        for token, group_ids in by_token.items():
            for wanted in in_many(self.session, PollGroup.id, sorted(group_ids)):
                self.session.execute(
                    update(PollGroup)
                    .where(wanted, PollGroup.claim_token == token)
                    .values(claim_token=None, claim_expires_at=None, next_due_at=now)
                    .execution_options(synchronize_session=False)
                )

    def release_unstarted(self, held: Sequence[tuple[int, str]], now: datetime) -> int:
        """Give back the claims (group id, token) whose message no worker started, due at
        ``now``; a claim started meanwhile is left to its poll. Returns how many."""
        g = PollGroup
        given = 0
        for group_id, token in held:
            stmt = (
                update(g)
                .where(g.id == group_id, g.claim_token == token, g.claim_started_at.is_(None))
                .values(claim_token=None, claim_expires_at=None, next_due_at=now)
                .execution_options(synchronize_session=False)
            )
            given += self.session.execute(stmt).rowcount  # type: ignore[attr-defined]
        return given

    def finish(self, group_id: int, token: str, values: dict[str, Any]) -> int | None:
        """Record a group's poll and end its claim; return its active members, None if the
        claim was lost meanwhile.

        The members are counted here, not taken from the poll: a placement may have joined
        some while the poll ran. The group's row is locked first, so a placement that wrote
        its joins has committed them (they are counted) and a later one adds its own to this
        count (SQLite's write lock, taken when the transaction began, does the same).
        """
        g = PollGroup
        held = self.session.scalar(
            select(g.id).where(g.id == group_id, g.claim_token == token).with_for_update()
        )
        if held is None:
            return None
        t = TrackedOperation
        members = int(
            self.session.scalar(
                select(func.count()).where(t.group_id == group_id, t.status.in_(ACTIVE_STATES))
            )
            or 0
        )
        self.session.execute(
            update(g)
            .where(g.id == group_id)
            .values(claim_token=None, claim_expires_at=None, members=members, **values)
            .execution_options(synchronize_session=False)
        )
        return members

    def drop_group(self, group_id: int) -> None:
        """Delete a group that has no active member left."""
        self.session.execute(delete(PollGroup).where(PollGroup.id == group_id))


def _new_row(op_id: str, now: datetime, account: str) -> dict[str, Any]:
    return {
        "id": op_id,
        "account": account,
        "status": PENDING,
        "tracked_at": now,
        "polls": 0,
        "consecutive_errors": 0,
        "version": 1,
    }


def _state(op: Operation, now: datetime, updated_at: datetime | None = None) -> dict[str, Any]:
    """The columns of an operation's state as the API gave it; ``updated_at``: the ordering
    key decided for it (an updatedAt ahead of the clocks is not kept), else its updatedAt."""
    ended = op.status.value not in ACTIVE_STATES
    updated_at = op.updated_at if updated_at is None else updated_at
    return {
        "status": op.status.value,
        "total": op.stats.total,
        "queued": op.stats.queued,
        "created": op.stats.created,
        "failed": op.stats.failed,
        "remote_created_at": op.created_at,
        "remote_updated_at": updated_at,
        "ended_at": updated_at if ended else None,
        "last_polled_at": now,
    }


def _bookkept(known: Known, **columns: Any) -> dict[str, Any]:
    """A row's new columns, and the bookkeeping every recorded poll moves: polls, version."""
    return {"id": known.id, **columns, "polls": known.polls + 1, "version": known.version + 1}


def _observed_row(change: Observed, now: datetime) -> dict[str, Any]:
    known = change.known
    # An end leaves its group; a first sight is placed again by its createdAt.
    group_id = None if change.ended or change.first_sight else known.group_id
    return _bookkept(
        known,
        **_state(change.answer, now, change.updated_at),
        consecutive_errors=0,
        last_error=None,
        not_before=None,
        not_found_since=None,
        group_id=group_id,
    )


def _failed_row(change: Failed, now: datetime) -> dict[str, Any]:
    return _bookkept(
        change.known,
        consecutive_errors=change.known.consecutive_errors + 1,
        last_polled_at=now,
        last_error=change.error,
        not_before=change.not_before,
        not_found_since=change.not_found_since,
    )


def _gone_row(change: Gone, now: datetime) -> dict[str, Any]:
    return _bookkept(
        change.known,
        status=NOT_FOUND,
        ended_at=now,
        last_polled_at=now,
        last_error=change.detail,
        not_before=None,
        group_id=None,
    )


def _history_row(
    op: Operation, seq: int, now: datetime, updated_at: datetime | None = None
) -> dict[str, Any]:
    stats = op.stats
    return {
        "operation_id": op.id,
        "seq": seq,
        "observed_at": now,
        "remote_updated_at": op.updated_at if updated_at is None else updated_at,
        "status": op.status.value,
        "total": stats.total,
        "queued": stats.queued,
        "created": stats.created,
        "failed": stats.failed,
    }
