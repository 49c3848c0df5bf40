"""The accounts table: every query on it, and what authenticates each account's requests.

``default`` is the environment's account and always exists (migration 0012); the others are
added, changed and removed by `optrack accounts`. A stored secret is sealed before it reaches
this module (``credentials.Vault``) and opened only by ``credentials_of``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from worker.credentials import DEFAULT_ACCOUNT, Credentials, Vault, api_username
from worker.db import (
    Account,
    AccountPause,
    PollGroup,
    RequestBudget,
    TrackedOperation,
)
from worker.errors import AccountError, UnknownAccount
from worker.settings import Settings
from worker.tracking import ACTIVE_STATES


@dataclass(frozen=True)
class AccountView:
    """One account as `optrack accounts` shows it: never its secret."""

    name: str
    account_sid: str | None
    api_key_sid: str | None
    stored: bool  # False: the environment's (default)
    max_requests_per_second: float | None
    created_at: datetime
    secret_set_at: datetime | None
    active: int
    ended: int

    @property
    def auth(self) -> str:
        """How its requests authenticate, as shown to people."""
        return "api key" if self.api_key_sid else "auth token"


def credentials_of(account: Account, settings: Settings) -> Credentials:
    """What authenticates ``account``'s requests: the environment's for ``default``, else its
    stored secret opened with OPTRACK_SECRET_KEY (ConfigError if no key opens it)."""
    if account.name == DEFAULT_ACCOUNT or account.secret is None or account.account_sid is None:
        return settings.default_credentials
    secret = Vault(settings.secret_keys).open(account.secret)
    user = api_username(account.account_sid, account.api_key_sid)
    return Credentials(account.account_sid, user, secret)


class Accounts:
    """Queries of one session on the accounts table; the caller owns the transaction."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, name: str) -> Account:
        """The account named ``name``, or UnknownAccount."""
        found = self.session.get(Account, name)
        if found is None:
            raise UnknownAccount(name)
        return found

    def names(self) -> list[str]:
        """Every account's name, in order."""
        return list(self.session.scalars(select(Account.name).order_by(Account.name)))

    def all(self) -> Sequence[Account]:
        """Every account, by name."""
        return self.session.scalars(select(Account).order_by(Account.name)).all()

    def views(self, names: Sequence[str] | None = None) -> list[AccountView]:
        """The accounts (or those named) with how many operations each has, active and ended."""
        t = TrackedOperation
        active = t.status.in_(ACTIVE_STATES)
        counts: dict[str, tuple[int, int]] = {}
        stmt = select(t.account, active.label("active"), func.count()).group_by(t.account, active)
        for account, is_active, count in self.session.execute(stmt):
            now_active, ended = counts.get(account, (0, 0))
            counts[account] = (now_active + count, ended) if is_active else (now_active, count)
        rows = [self.get(n) for n in names] if names is not None else self.all()
        return [
            AccountView(
                row.name,
                row.account_sid,
                row.api_key_sid,
                row.secret is not None,
                row.max_requests_per_second,
                row.created_at,
                row.secret_set_at,
                *counts.get(row.name, (0, 0)),
            )
            for row in rows
        ]

    def paused(self, now: datetime, default_sid: str) -> dict[str, tuple[datetime, str]]:
        """The accounts paused at ``now`` (a 409/429/503's Retry-After, rejected credentials):
        name → (until, reason). ``default_sid``: the environment's SID, the default's key."""
        p = AccountPause
        stmt = (
            select(p.account_sid, p.paused_until, p.reason, Account.name)
            .outerjoin(Account, Account.account_sid == p.account_sid)
            .where(p.paused_until > now)
        )
        found: dict[str, tuple[datetime, str]] = {}
        for sid, until, reason, name in self.session.execute(stmt):
            if name is None and sid == default_sid:
                name = DEFAULT_ACCOUNT
            if name is not None:
                found[name] = (until, reason)
        return found

    def pauses(self, default_sid: str) -> list[tuple[str, AccountPause | None]]:
        """Every account by name with its last pause row (None: never paused); the default
        account's is the environment's SID's."""
        found: list[tuple[str, AccountPause | None]] = []
        for row in self.all():
            sid = default_sid if row.name == DEFAULT_ACCOUNT else row.account_sid
            found.append((row.name, None if sid is None else self.session.get(AccountPause, sid)))
        return found

    def by_sid(self, account_sid: str) -> str | None:
        """The name of the stored account with this SID, if any."""
        return self.session.scalar(select(Account.name).where(Account.account_sid == account_sid))

    def add(
        self,
        name: str,
        account_sid: str,
        api_key_sid: str | None,
        sealed: str,
        now: datetime,
        max_requests_per_second: float | None = None,
    ) -> Account:
        """Store a new account; AccountError if the name or the SID is taken."""
        if self.session.get(Account, name) is not None:
            raise AccountError(f"an account named {name!r} exists already")
        taken = self.by_sid(account_sid)
        if taken is not None:
            raise AccountError(
                f"account SID {account_sid} is account {taken!r} already: one name per SID "
                "(pauses and budgets are the SID's)"
            )
        row = Account(
            name=name,
            account_sid=account_sid,
            api_key_sid=api_key_sid,
            secret=sealed,
            max_requests_per_second=max_requests_per_second,
            created_at=now,
            secret_set_at=now,
        )
        self.session.add(row)
        self.session.flush()
        return row

    def set_secret(self, name: str, sealed: str, api_key_sid: str | None, now: datetime) -> None:
        """Replace a stored account's secret (and its API key, None: its Auth Token)."""
        row = self.get(name)
        if row.name == DEFAULT_ACCOUNT:
            raise AccountError(
                "the default account's credentials are the environment's (TWILIO_AUTH_TOKEN, "
                "or TWILIO_API_KEY and TWILIO_API_SECRET): change them there"
            )
        row.secret, row.api_key_sid, row.secret_set_at = sealed, api_key_sid, now

    def set_budget(self, name: str, rate: float | None) -> None:
        """Set (None: clear) the account's own OPTRACK_MAX_REQUESTS_PER_SECOND."""
        row = self.get(name)
        if row.name == DEFAULT_ACCOUNT:
            raise AccountError(
                "the default account's budget is the environment's: set "
                "OPTRACK_MAX_REQUESTS_PER_SECOND"
            )
        row.max_requests_per_second = rate

    def sealed(self) -> list[tuple[str, str]]:
        """(name, sealed secret) of every stored account (for a key rotation)."""
        stmt = select(Account.name, Account.secret).where(Account.secret.is_not(None))
        rows = self.session.execute(stmt.order_by(Account.name))
        return [(name, secret) for name, secret in rows if secret is not None]

    def reseal(self, name: str, sealed: str) -> None:
        """Write a secret sealed again with the first key (its value is unchanged)."""
        self.session.execute(update(Account).where(Account.name == name).values(secret=sealed))

    def remove(self, name: str, *, delete_operations: bool) -> int:
        """Remove an account; with ``delete_operations`` its operations (and their history and
        notices) go too, else AccountError while it has any. Returns how many were deleted."""
        row = self.get(name)
        if row.name == DEFAULT_ACCOUNT:
            raise AccountError("the default account (the environment's) cannot be removed")
        [view] = self.views([name])
        if (view.active or view.ended) and not delete_operations:
            raise AccountError(
                f"account {name!r} has {view.active} active and {view.ended} ended operation(s); "
                "nothing removed. `--delete-operations` stops tracking them and deletes them "
                "with their history"
            )
        t = TrackedOperation
        deleted = self.session.execute(
            delete(t).where(t.account == name).execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        self.session.execute(delete(PollGroup).where(PollGroup.account == name))
        if row.account_sid is not None:
            for table in (AccountPause, RequestBudget):
                self.session.execute(delete(table).where(table.account_sid == row.account_sid))
        self.session.delete(row)
        return int(deleted)
