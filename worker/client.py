"""The SenderPool Operations API client: one requests.Session, typed answers, typed errors.

Every 409/429/503 pauses the whole account through an ``AccountGate`` *before* anything waits,
so no other process calls during the pause. A pause short enough is waited in place; a longer
one is raised as ``RetryLater(not_before)``. A 500 is never retried here.

Every request has an overall deadline (``Timeouts.deadline``: connect, headers and the whole
body). requests' and urllib3's read timeout applies to each socket read, so a body trickled one
byte at a time would never time out; the body is therefore streamed with ``read1`` (at most one
socket read per call) and the socket's timeout set to what is left of the deadline before each.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import requests
import urllib3

from worker import __version__
from worker.clock import Clock, SystemClock
from worker.errors import (
    AUTH_STATUSES,
    THROTTLE_STATUSES,
    ApiErrorDetail,
    AuthError,
    BadRequest,
    HttpError,
    OperationNotFound,
    RetryLater,
    SchemaError,
    ServerError,
    TransportError,
    UnexpectedRedirect,
    WrongBaseUrl,
    storable_text,
)
from worker.gate import AccountGate, LocalGate
from worker.operation import (
    Operation,
    Page,
    Status,
    decode_operation,
    decode_page,
    format_datetime,
    parse_served_at,
    validate_operation_id,
)
from worker.retry_after import RetryPolicy, ThrottleWait

log = logging.getLogger(__name__)
NOT_FOUND_CODE = 20404  # the API's "resource not found": only this ends an operation
MAX_PAGES = 10_000  # 10 million operations at 1,000 a page: a `next` that never ends is a bug
# How long credentials rejected by the API stop all polling before one more try.
AUTH_PAUSE_SECONDS = 60.0
# How long a 404 that proves a wrong base URL stops all polling before one more try.
CONFIG_PAUSE_SECONDS = 60.0
USER_AGENT = f"optrack/{__version__} (+requests)"
MAX_BODY_BYTES = 64 << 20  # a List page of 1,000 operations is about 250 KB
_READ_CHUNK = 64 << 10


class RequestBudget(Protocol):
    """The account's request budget, shared by every process that calls the API."""

    def reserve(self, now: datetime, max_wait: float) -> float:
        """Take the next request slot: the seconds to wait for it (RetryLater if too long)."""
        ...


class ApiObserver(Protocol):
    """Told about every API answer and account pause (metrics); must not raise."""

    def answered(self, endpoint: str, status: int | None) -> None:
        """One request to ``endpoint`` ("fetch" or "list") ended: its status, None if no answer."""
        ...

    def paused(self, seconds: float, status: int) -> None:
        """A 409/429/503 paused the account for ``seconds``."""
        ...


def next_page_token(page: Page, seen: set[str]) -> str:
    """The token of the page after ``page``; SchemaError if pagination would never end."""
    token = page.next_token
    assert token is not None
    if token in seen or len(seen) >= MAX_PAGES:
        raise SchemaError(f"pagination.next repeats or never ends (after {len(seen)} pages)")
    seen.add(token)
    return token


@dataclass(frozen=True)
class Timeouts:
    """Connect and read timeouts, and the deadline of a whole request, in seconds."""

    connect: float = 5.0
    read: float = 15.0  # between two socket reads
    deadline: float = 30.0  # connect + headers + the last byte of the body


@dataclass(frozen=True)
class _Answer:
    """An HTTP answer read whole within the deadline."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class _DeadlinePassed(Exception):
    """The request's overall deadline passed before its answer was whole."""


class ApiClient:
    """Calls the SenderPool Operations API and returns typed objects."""

    def __init__(
        self,
        base_url: str,
        account_sid: str,
        auth_token: str,
        *,
        timeouts: Timeouts = Timeouts(),
        policy: RetryPolicy = RetryPolicy(),
        gate: AccountGate | None = None,
        clock: Clock | None = None,
        session: requests.Session | None = None,
        max_inplace_retries: int = 3,
        observer: ApiObserver | None = None,
        budget: RequestBudget | None = None,
        rng: random.Random | None = None,
        credentials_hint: str = "check TWILIO_*",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts
        self.policy = policy
        self.gate: AccountGate = gate or LocalGate()
        self.clock: Clock = clock or SystemClock()
        self.max_inplace_retries = max_inplace_retries
        self.requests_sent = 0  # every HTTP request made, in-place retries included
        self.observer = observer
        self.budget = budget
        self.credentials_hint = credentials_hint  # where a 401/403 says to look
        self.rng = rng or random.Random()  # jitter of waits; seeded in tests
        self.session = session or requests.Session()
        self.session.auth = (account_sid, auth_token)
        self.session.headers.update({"Accept": "application/json", "User-Agent": USER_AGENT})
        # Never pick up credentials from ~/.netrc or proxies from the environment silently.
        self.session.trust_env = False

    def close(self) -> None:
        """Close pooled connections."""
        self.session.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fetch(self, operation_id: str) -> Operation:
        """Fetch one operation; the ID is validated before it reaches the URL.

        Its ``served_at`` is the answer's `Date` header (None if absent or unusable).
        """
        op_id = validate_operation_id(operation_id)
        body, served_at = self._get(f"/SenderPools/Operations/{op_id}", None, "fetch")
        return decode_operation(body, expected_id=op_id, served_at=served_at)

    def list_page(
        self,
        *,
        status: Status | None = None,
        start_date: datetime | None = None,
        end_date: datetime | None = None,
        page_size: int = 50,
        page_token: str | None = None,
    ) -> Page:
        """Fetch one page of the List endpoint; the page and each operation carry ``served_at``."""
        if not 1 <= page_size <= 1000:
            raise ValueError(f"page_size must be 1..1000, got {page_size}")
        params: dict[str, str] = {"pageSize": str(page_size)}
        if status is not None:
            params["status"] = Status(status).value
        if start_date is not None:
            params["startDate"] = format_datetime(start_date)
        if end_date is not None:
            params["endDate"] = format_datetime(end_date)
        if page_token is not None:
            params["pageToken"] = page_token
        body, served_at = self._get("/SenderPools/Operations", params, "list")
        return decode_page(body, served_at=served_at)

    def iter_operations(
        self,
        *,
        status: Status | None = None,
        start_date: datetime | None = None,
        end_date: datetime | None = None,
        page_size: int = 1000,
    ) -> Iterator[Operation]:
        """Yield every operation matching the filters, following ``pagination.next``."""
        token: str | None = None
        seen: set[str] = set()
        while True:
            page = self.list_page(
                status=status,
                start_date=start_date,
                end_date=end_date,
                page_size=page_size,
                page_token=token,
            )
            yield from page.operations
            if page.next_token is None:
                return
            token = next_page_token(page, seen)

    def _wait_for_gate(self, retries_left: int) -> None:
        """Honor the account's pause: wait in place if short, else raise RetryLater.

        After each wait the pause is read again before anything is sent (another process may
        have recorded a longer one meanwhile), and waits end with jitter so that every waiting
        process does not call at the same instant.
        """
        waited = 0.0
        while True:
            now = self.clock.now()
            paused = self.gate.paused_until(now)
            if paused is None:
                return
            until, reason = paused
            remaining = (until - now).total_seconds()
            if retries_left <= 0 or waited + remaining > self.policy.max_inplace_wait:
                raise RetryLater(until, reason)
            self.clock.sleep(self.policy.wake_after(remaining, self.rng))
            waited += remaining

    def _get(
        self, path: str, params: Mapping[str, str] | None, endpoint: str
    ) -> tuple[bytes, datetime | None]:
        """The JSON body of a 200 answer and its `Date`; every other answer raises."""
        url = self.base_url + path
        for attempt in range(1, self.max_inplace_retries + 2):
            self._wait_for_gate(self.max_inplace_retries + 1 - attempt)
            if self.budget is not None:
                self.clock.sleep(
                    self.budget.reserve(self.clock.now(), self.policy.max_inplace_wait)
                )
            sent_at = self.clock.now()
            try:
                response = self._send(url, params)
            except TransportError:
                if self.observer is not None:
                    self.observer.answered(endpoint, None)
                raise
            if self.observer is not None:
                self.observer.answered(endpoint, response.status)
            if response.status == 200:
                self.gate.answered_ok(sent_at)
                served_at = parse_served_at(response.headers.get("Date"), self.clock.now())
                return _json_body(response), served_at
            if 300 <= response.status < 400:
                # Never followed: another host's answer must not be recorded as the API's.
                raise UnexpectedRedirect(response.status, response.headers.get("Location"), url)
            errors = _error_list(response.body)
            status = response.status
            if status in THROTTLE_STATUSES:
                now = self.clock.now()
                header = response.headers.get("Retry-After")
                # Counted for the account, by every process: a storm grows its waits.
                throttles = self.gate.count_throttle(now, status)
                wait = self.policy.throttle_wait(header, now, throttles, self.rng)
                if wait.capped:
                    log.warning(
                        "HTTP %d on %s asked for Retry-After %.40r, longer than "
                        "OPTRACK_MAX_RETRY_AFTER: the account waits %g s instead",
                        status,
                        path,
                        header,
                        wait.seconds,
                    )
                reason = f"HTTP {status} ({_first_message(errors)}); {_wait_reason(header, wait)}"
                self.gate.pause(now + timedelta(seconds=wait.seconds), reason, status)
                if self.observer is not None:
                    self.observer.paused(wait.seconds, status)
                continue
            now = self.clock.now()
            raise _http_error(status, errors, url, endpoint, now, self.gate, self.credentials_hint)
        until = self.gate.paused_until(self.clock.now())
        raise RetryLater(until[0] if until else self.clock.now(), "still throttled after retries")

    def _send(self, url: str, params: Mapping[str, str] | None) -> _Answer:
        self.requests_sent += 1
        limit = self.timeouts.deadline
        ends = time.monotonic() + limit
        try:
            response = self.session.get(
                url,
                params=params,
                timeout=(min(self.timeouts.connect, limit), min(self.timeouts.read, limit)),
                allow_redirects=False,
                stream=True,
            )
        except requests.Timeout as exc:
            raise TransportError(f"timed out calling {url}: {type(exc).__name__}") from None
        except requests.RequestException as exc:
            raise TransportError(f"no answer from {url}: {type(exc).__name__}") from None
        try:
            body = _read_body(response, ends, self.timeouts.read)
        except _DeadlinePassed:
            raise TransportError(
                f"timed out calling {url}: no whole answer within the {limit:g} s deadline"
            ) from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if time.monotonic() >= ends:
                raise TransportError(
                    f"timed out calling {url}: no whole answer within the {limit:g} s deadline"
                ) from None
            raise TransportError(f"answer from {url} cut short: {type(exc).__name__}") from None
        finally:
            response.close()
        return _Answer(response.status_code, response.headers, body)


def _read_body(response: requests.Response, ends: float, read_timeout: float) -> bytes:
    """The whole body, or _DeadlinePassed once the monotonic clock reaches ``ends``."""
    raw: urllib3.BaseHTTPResponse = response.raw
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    parts: list[bytes] = []
    size = 0
    while True:
        remaining = ends - time.monotonic()
        if remaining <= 0:
            raise _DeadlinePassed
        if isinstance(sock, socket.socket):  # ssl.SSLSocket too
            sock.settimeout(min(read_timeout, remaining))
        chunk = raw.read1(_READ_CHUNK, decode_content=True)
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise SchemaError(f"the answer's body is larger than {MAX_BODY_BYTES >> 20} MiB")
        parts.append(chunk)


def _json_body(response: _Answer) -> bytes:
    """The body of an answer that says it is JSON (the caller decodes and checks it)."""
    content_type = response.headers.get("Content-Type", "")
    if "json" not in content_type.lower():
        raise SchemaError(f"expected a JSON answer, got Content-Type {content_type[:60]!r}")
    return response.body


def _error_list(raw: bytes) -> tuple[ApiErrorDetail, ...]:
    """The API's ``{"errors": [...]}`` list; tolerant, since error bodies are best effort.

    Its text is made storable here (``storable_text``): it reaches ``last_error`` and the
    account pause's reason, and a NUL or a lone surrogate there would fail the whole write.
    """
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return ()
    items = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return ()
    details = []
    for item in items[:20]:
        if not isinstance(item, dict):
            continue
        code = item.get("code")
        context = item.get("context")
        details.append(
            ApiErrorDetail(
                code=code if isinstance(code, int) and not isinstance(code, bool) else None,
                message=storable_text(str(item.get("message", "")), 500),
                info_url=storable_text(str(item["infoUrl"]), 500) if item.get("infoUrl") else None,
                context=None if context in (None, "null") else storable_text(str(context), 200),
            )
        )
    return tuple(details)


def _wait_reason(header: str | None, wait: ThrottleWait) -> str:
    """Why the account waits this long, for the pause's reason (`optrack status`)."""
    if wait.capped:
        return f"Retry-After {header!r:.40} capped at {wait.seconds:g} s"
    if wait.source == "header":
        return "Retry-After honored"
    shown = "none" if header is None else repr(header[:40])
    return f"Retry-After {shown}: a minimum wait of {wait.seconds:.1f} s"


def _first_message(errors: tuple[ApiErrorDetail, ...]) -> str:
    return errors[0].message if errors else "no error body"


def _http_error(
    status: int,
    errors: tuple[ApiErrorDetail, ...],
    url: str,
    endpoint: str,
    now: datetime,
    gate: AccountGate,
    hint: str = "check TWILIO_*",
) -> HttpError:
    if status == 400:
        return BadRequest(status, errors, url)
    if status in AUTH_STATUSES:
        reason = f"HTTP {status}: credentials rejected ({_first_message(errors)}); {hint}"
        gate.pause(now + timedelta(seconds=AUTH_PAUSE_SECONDS), reason, status)
        return AuthError(status, errors, url)
    if status == 404:
        # The List endpoint has no 404, and a 404 without the API's 20404 is not the API's
        # answer (a proxy, a wrong path): the base URL is wrong, the operation is not gone.
        if endpoint == "fetch" and any(e.code == NOT_FOUND_CODE for e in errors):
            return OperationNotFound(status, errors, url)
        wrong = WrongBaseUrl(status, errors, url)
        # A configuration error: every process stops polling (no operation ends of it) and
        # `optrack status` and `optrack health` show why.
        reason = f"configuration error: {wrong}"
        gate.pause(now + timedelta(seconds=CONFIG_PAUSE_SECONDS), reason[:500], status)
        return wrong
    return ServerError(status, errors, url)
