"""HTTP tokens minted by `optrack tokens`: what each may see and do, and every query on them.

A token is 256 random bits (``secrets.token_urlsafe``) behind the prefix ``optrack_``; only its
SHA-256 digest is stored. A token that high in entropy needs no salt or slow hash: the digest
cannot be searched back to it. A request's token is hashed and looked up by its digest, and
the digests compared again with ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from worker.accounts import Accounts
from worker.credentials import validate_account_name
from worker.db import HttpToken
from worker.errors import AccountError, TokenError

PREFIX = "optrack_"


@dataclass(frozen=True)
class Access:
    """What a request may do: ``accounts`` None sees every account; read-only changes nothing."""

    accounts: frozenset[str] | None = None
    read_only: bool = False
    token: str | None = None  # the token's name; None: OPTRACK_HTTP_TOKEN or --no-auth

    def sees(self, account: str) -> bool:
        """Whether this access may see and track ``account``'s operations."""
        return self.accounts is None or account in self.accounts


ALL_ACCESS = Access()


@dataclass(frozen=True)
class TokenView:
    """One token as `optrack tokens list` shows it: never the token, nor its digest."""

    name: str
    accounts: tuple[str, ...] | None
    read_only: bool
    created_at: datetime
    revoked_at: datetime | None


def digest(token: str) -> str:
    """The SHA-256 of ``token`` in hex: what the database holds in its place."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def mint() -> str:
    """A new token: 32 random bytes, URL-safe."""
    return PREFIX + secrets.token_urlsafe(32)


def validate_token_name(name: str) -> str:
    """``name`` if it may name a token (the rules of account names), else TokenError."""
    try:
        return validate_account_name(name)
    except AccountError as exc:
        raise TokenError(str(exc).replace("an account name", "a token name")) from None


def _accounts(row: HttpToken) -> tuple[str, ...] | None:
    return None if row.accounts is None else tuple(json.loads(row.accounts))


class Tokens:
    """The http_tokens table."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(
        self, name: str, accounts: Sequence[str], read_only: bool, now: datetime
    ) -> tuple[str, TokenView]:
        """Mint a token named ``name`` for ``accounts`` (empty: every one); the token is
        returned here only. AccountError for an unknown account, TokenError for a name taken."""
        validate_token_name(name)
        wanted = sorted(
            {Accounts(self.session).get(validate_account_name(a)).name for a in accounts}
        )
        if self.session.get(HttpToken, name) is not None:
            raise TokenError(
                f"a token named {name!r} exists already (revoked ones keep their name)"
            )
        token = mint()
        row = HttpToken(
            name=name,
            digest=digest(token),
            accounts=json.dumps(wanted) if wanted else None,
            read_only=read_only,
            created_at=now,
            revoked_at=None,
        )
        self.session.add(row)
        self.session.flush()
        return token, self._view(row)

    def views(self) -> list[TokenView]:
        """Every token, revoked ones included, by name."""
        rows = self.session.scalars(select(HttpToken).order_by(HttpToken.name))
        return [self._view(r) for r in rows]

    def revoke(self, name: str, now: datetime) -> None:
        """Revoke ``name`` for good; TokenError if there is none or it is revoked already."""
        row = self.session.get(HttpToken, validate_token_name(name))
        if row is None:
            raise TokenError(f"no token named {name!r}; see `optrack tokens list`")
        if row.revoked_at is not None:
            raise TokenError(f"token {name!r} is revoked already")
        row.revoked_at = now

    def access(self, token: str) -> Access | None:
        """What ``token`` may do; None if it is no live token."""
        wanted = digest(token)
        row = self.session.scalar(select(HttpToken).where(HttpToken.digest == wanted))
        if row is None or row.revoked_at is not None:
            return None
        if not hmac.compare_digest(row.digest, wanted):
            return None
        names = _accounts(row)
        return Access(None if names is None else frozenset(names), bool(row.read_only), row.name)

    @staticmethod
    def _view(row: HttpToken) -> TokenView:
        return TokenView(
            row.name, _accounts(row), bool(row.read_only), row.created_at, row.revoked_at
        )


def look_up(sessions: sessionmaker[Session], token: str) -> Access | None:
    """What ``token`` may do, read in a session of its own; None if it is no live token."""
    with sessions() as session:
        return Tokens(session).access(token)
