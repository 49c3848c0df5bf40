"""Bearer token on every /api/ request, and what it may do (``tokens.Access``).

OPTRACK_HTTP_TOKEN is compared in constant time and may do everything; any other token is
looked up by its SHA-256 (`optrack tokens`). No live token: 401. A read-only token asking to
change state: 403. The access is put on ``request.state.access`` for the routes to filter by.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from worker.http.problems import Problem
from worker.tokens import ALL_ACCESS, Access

# auto_error=False: a missing header gets our 401 (with WWW-Authenticate), not FastAPI's 403.
_scheme = HTTPBearer(
    auto_error=False,
    description="Authorization: Bearer $OPTRACK_HTTP_TOKEN, or a token of `optrack tokens add`",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_scheme)]
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def access_of(request: Request) -> Access:
    """What the request's token may do (set by ``BearerAuth``; all access without auth)."""
    found = getattr(request.state, "access", ALL_ACCESS)
    assert isinstance(found, Access)
    return found


def forbidden(reason: str) -> Problem:
    """A 403 in the standard ``{"errors": [...]}`` body."""
    return Problem(403, [{"reason": reason}])


class BearerAuth:
    """A FastAPI dependency; ``token=None`` means `--no-auth` (allowed on loopback only)."""

    def __init__(
        self, token: str | None, look_up: Callable[[str], Access | None] | None = None
    ) -> None:
        self._token = None if token is None else token.encode()
        self._look_up = look_up  # minted tokens (``tokens.look_up``)

    def __call__(self, request: Request, credentials: Credentials) -> None:
        if self._token is None:
            request.state.access = ALL_ACCESS
            return
        given = "" if credentials is None else credentials.credentials
        # compare_digest: the time taken says nothing about how much of the token matched.
        if hmac.compare_digest(given.encode("utf-8", "replace"), self._token):
            request.state.access = ALL_ACCESS
            return
        access = None
        if given and self._look_up is not None:
            access = self._look_up(given)
        if access is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing or wrong token (or a revoked one): send Authorization: Bearer "
                "$OPTRACK_HTTP_TOKEN or a token of `optrack tokens add`",
                headers={"WWW-Authenticate": 'Bearer realm="optrack"'},
            )
        if access.read_only and request.method not in SAFE_METHODS:
            raise forbidden(f"token {access.token} is read-only: it changes nothing")
        request.state.access = access


def all_accounts(request: Request) -> None:
    """A dependency of deployment-wide routes (dead letters, notices, the pause): 403 for a
    token scoped to accounts."""
    access = access_of(request)
    if access.accounts is not None:
        raise forbidden(
            f"token {access.token} is scoped to accounts; this route is for a token of "
            "every account"
        )
