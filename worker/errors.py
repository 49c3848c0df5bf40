"""The optrack error tree.

    OptrackError                      root: everything optrack raises on purpose
    ├── ConfigError                   a setting in the environment is unusable
    ├── InvalidOperationId            an operation ID does not match the API's pattern
    ├── NotTracked                    a report or command names an ID that is not tracked
    ├── WebhookSignatureError         a received notice's signature is missing, stale or wrong
    ├── InvalidMessage                a task message's arguments can never be processed
    ├── MigrationError                a migration would break the data; nothing was changed
    ├── NotWaiting                    a dead letter asked for is unknown or replayed already
    ├── NoticeNotFound                a notice asked for is unknown (never was, or pruned)
    ├── NoDelivery                    a resend asked where no process delivers notices
    ├── BrokerError                   the broker did not take a message
    ├── AccountError                  an account named cannot be used or changed as asked
    │   ├── UnknownAccount            no account has that name
    │   └── TrackedElsewhere          an operation ID is tracked under another account
    ├── TokenError                    an HTTP token cannot be minted or revoked as asked
    └── ApiError                      anything that went wrong talking to the API
        ├── TransportError            no HTTP answer: connection refused or dropped, timeout
        ├── SchemaError               a 200 whose body breaks the documented schema
        ├── UnstorableAnswer          an answer the database refused to store (recorded in
        │                             its place, not raised): its operation backs off
        └── HttpError                 an error status; carries the API's error list
            ├── BadRequest            400: our request was wrong; do not retry
            ├── AuthError             401/403: credentials rejected; pause the account
            ├── OperationNotFound     404 (20404) from a fetch: the API does not know the ID
            ├── WrongBaseUrl          404 from List (which has none), or a 404 without 20404:
            │                         OPTRACK_API_BASE_URL is wrong; says nothing of operations
            ├── UnexpectedRedirect    3xx: never followed; what it points to is not the API
            └── ServerError           500 (and other 5xx but 503): never retried in place
    RetryLater                        409/429/503 paused the account past what may be waited
                                      in place: "call again not before T"

``RetryLater`` is what the client raises when the account is paused for longer than it may
wait in place; the caller turns it into a scheduled time, never a sleep.

Text the API sends into an error (a message, a Location) passes ``storable_text`` at the client:
an error's text ends up in ``last_error`` and the pause's reason, which every database must take.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

# The answers the API documents as "wait, then call again" (with Retry-After) and "credentials
# rejected": one definition each, for the client, health, reports and the CLI.
THROTTLE_STATUSES = frozenset({409, 429, 503})
AUTH_STATUSES = frozenset({401, 403})
# The status an account pause carries for a 404 no API route gives: OPTRACK_API_BASE_URL is wrong.
CONFIG_ERROR_STATUS = 404
CUT_MARK = "…"


def storable_text(value: str, limit: int) -> str:
    """``value`` as every database stores it: NUL removed (PostgreSQL refuses it), lone
    surrogates replaced by U+FFFD (no UTF-8 encodes them), at most ``limit`` characters."""
    # Bounded first, so a huge body costs no more than the text kept (plus NULs removed).
    text = value[: limit * 2].replace("\x00", "")
    # A surrogate pair written as two code points becomes its character; a lone one, U+FFFD.
    text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if len(text) <= limit and len(value) <= limit * 2:
        return text
    return text[: max(0, limit - len(CUT_MARK))] + CUT_MARK[:limit]


class OptrackError(Exception):
    """Raised for every failure optrack reports on purpose."""


class ConfigError(OptrackError):
    """Raised when a setting read from the environment cannot be used."""


class InvalidOperationId(OptrackError, ValueError):
    """Raised when a string is not a whole, valid SenderPool operation ID."""

    def __init__(self, value: str, reason: str) -> None:
        self.value = value
        self.reason = reason
        super().__init__(f"{value!r} is not an operation ID: {reason}")


class MigrationError(OptrackError):
    """Raised when a migration would leave the database inconsistent; nothing was committed."""


class NotTracked(OptrackError):
    """Raised when an operation ID is valid but optrack does not track it."""

    def __init__(self, operation_id: str, *more: str) -> None:
        self.operation_id = operation_id
        self.operation_ids = (operation_id, *more)
        if not more:
            super().__init__(
                f"{operation_id} is not tracked; start with `optrack track {operation_id}`"
            )
            return
        super().__init__(
            f"{len(self.operation_ids)} operations are not tracked: "
            + ", ".join(self.operation_ids)
            + "; start with `optrack track ID...`"
        )


class NotWaiting(OptrackError):
    """Raised when dead letters asked to be replayed are unknown or replayed already."""

    def __init__(self, letter_ids: list[int]) -> None:
        self.letter_ids = letter_ids
        super().__init__(f"no dead letter waiting with id {', '.join(map(str, letter_ids))}")


class NoticeNotFound(OptrackError):
    """Raised when notices asked for are unknown (never recorded, or pruned after delivery)."""

    def __init__(self, notice_ids: list[int]) -> None:
        self.notice_ids = notice_ids
        super().__init__(f"no notice with id {', '.join(map(str, notice_ids))}")


class NoDelivery(OptrackError):
    """Raised when notices would be resent where no process delivers them."""


class BrokerError(OptrackError):
    """Raised when the broker did not take a message (refused, unreachable)."""


class AccountError(OptrackError):
    """Raised when an account named cannot be used or changed as asked (a usage error)."""


class UnknownAccount(AccountError):
    """Raised when no account has the name given."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no account named {name!r}; see `optrack accounts list`")


class TrackedElsewhere(AccountError):
    """Raised when operation IDs are already tracked under another account: nothing written."""

    def __init__(self, account: str, elsewhere: dict[str, str]) -> None:
        self.account = account
        self.elsewhere = dict(elsewhere)
        shown = sorted(elsewhere.items())[:10]
        more = f" (and {len(elsewhere) - 10} more)" if len(elsewhere) > 10 else ""
        super().__init__(
            f"nothing was tracked under account {account!r}: "
            + ", ".join(f"{op_id} is tracked under account {other!r}" for op_id, other in shown)
            + more
        )


class TokenError(OptrackError):
    """Raised when an HTTP token cannot be minted or revoked as asked (a usage error)."""


class InvalidMessage(OptrackError, ValueError):
    """Raised when a task message's arguments can never be processed: rejected once, never
    retried (``optrack.track`` given something other than a list)."""


class WebhookSignatureError(OptrackError):
    """Raised by ``worker.webhooks.verify`` when a notice must not be trusted; says why."""


@dataclass(frozen=True)
class ApiErrorDetail:
    """One entry of the API's ``{"errors": [...]}`` list."""

    code: int | None
    message: str
    info_url: str | None = None
    context: str | None = None


class ApiError(OptrackError):
    """Raised when a call to the SenderPool Operations API did not give a usable answer."""


class TransportError(ApiError):
    """Raised when no HTTP answer arrived: connection refused or dropped, or a timeout."""


class SchemaError(ApiError):
    """Raised when a 200 answer's body breaks the documented schema; nothing of it is stored."""


class UnstorableAnswer(ApiError):
    """Recorded in place of an answer the database refused to store: that operation alone
    backs off, as after a failed poll; the rest of its write is recorded."""


class HttpError(ApiError):
    """Raised for an error status; carries the status and the API's error list."""

    def __init__(self, status: int, errors: tuple[ApiErrorDetail, ...], url: str) -> None:
        self.status = status
        self.errors = errors
        self.url = url
        detail = "; ".join(f"{e.code}: {e.message}" for e in errors) or "no error body"
        super().__init__(f"HTTP {status} from {url}: {detail}")


class BadRequest(HttpError):
    """Raised on 400: the request was malformed; retrying it cannot help."""


class AuthError(HttpError):
    """Raised on 401/403: the account SID or auth token was rejected."""


class OperationNotFound(HttpError):
    """Raised on 404 (20404) from a fetch: the API does not know the operation (yet, or now).

    Not proof on its own: a new operation may not be replicated yet, and a base URL without
    ``/v1`` makes every route answer 20404; the caller decides when it is true.
    """


class WrongBaseUrl(HttpError):
    """Raised on a 404 that cannot be about one operation: from the List endpoint (which has no
    404) or without the API's 20404 code. The base URL is wrong; no operation ends because of it.
    """

    def __init__(self, status: int, errors: tuple[ApiErrorDetail, ...], url: str) -> None:
        super().__init__(status, errors, url)
        self.args = (
            f"{self.args[0]} (a 404 no API route gives: check OPTRACK_API_BASE_URL, "
            "which must end with the API root, /v1)",
        )


class UnexpectedRedirect(HttpError):
    """Raised on a 3xx: redirects are never followed, so nothing from another host is recorded.

    The message names the status and the Location's host (never its credentials, path or query).
    """

    def __init__(self, status: int, location: str | None, url: str) -> None:
        self.location_host = redirect_target(location)
        super().__init__(status, (), url)
        self.args = (f"HTTP {status} from {url}: a redirect to {self.location_host}, not followed",)


def redirect_target(location: str | None) -> str:
    """The host (and port) a Location header points to, for messages; never its userinfo."""
    if not location:
        return "nowhere (no Location header)"
    location = storable_text(location, 2000)
    try:
        parts = urlsplit(location.strip())
        host, port = parts.hostname, parts.port
    except ValueError:  # a broken port or IPv6 literal
        return "an unreadable Location"
    if not host:
        return "a path on the same host"
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}" if port is not None else shown


class ServerError(HttpError):
    """Raised on 500 and other unexpected 5xx: never retried in place."""


class RetryLater(OptrackError):
    """Raised when the account is paused longer than may be waited: retry at ``not_before``."""

    def __init__(self, not_before: datetime, reason: str) -> None:
        self.not_before = not_before
        self.reason = reason
        super().__init__(f"account paused until {not_before.isoformat()}: {reason}")
