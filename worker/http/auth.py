"""Bearer token on every /api/ request: compared in constant time, 401 otherwise."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

# auto_error=False: a missing header gets our 401 (with WWW-Authenticate), not FastAPI's 403.
_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer $OPTRACK_HTTP_TOKEN")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_scheme)]


class BearerAuth:
    """A FastAPI dependency; ``token=None`` means `--no-auth` (allowed on loopback only)."""

    def __init__(self, token: str | None) -> None:
        self._token = None if token is None else token.encode()

    def __call__(self, credentials: Credentials) -> None:
        if self._token is None:
            return
        given = b"" if credentials is None else credentials.credentials.encode("utf-8", "replace")
        # compare_digest: the time taken says nothing about how much of the token matched.
        if not hmac.compare_digest(given, self._token):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing or wrong token: send Authorization: Bearer $OPTRACK_HTTP_TOKEN",
                headers={"WWW-Authenticate": 'Bearer realm="optrack"'},
            )
