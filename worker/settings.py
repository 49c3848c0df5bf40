"""Settings, read from the environment once into a frozen object and passed down."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from worker import webhook_signing as signing
from worker.credentials import Credentials, api_username, parse_secret_keys
from worker.durations import parse_duration
from worker.errors import ConfigError
from worker.retry_after import DEFAULT_MAX_RETRY_AFTER, MIN_MAX_RETRY_AFTER

DEFAULT_API_BASE_URL = "https://comms.twilio.com/v1"
DEFAULT_HOME = Path(".optrack")
DEFAULT_DISCOVERY_WINDOW = timedelta(days=7)
# A delivered notice is kept this long, then retention deletes it (it served its purpose).
DEFAULT_NOTICE_RETENTION = timedelta(days=7)
LOG_FORMATS = ("text", "json")
# Not Celery's default queue: optrack's own workers consume that one and would drop the task.
DEFAULT_NOTIFY_QUEUE = "optrack.notices"
POLL_STRATEGIES = ("auto", "list", "fetch")
DEFAULT_HTTP_PORT = 8080
# A guessable token is no lock: at least this many characters (token_urlsafe(32) gives 43).
MIN_HTTP_TOKEN = 16
# OPTRACK_HTTP_ALLOWED_HOSTS: at most this many names, each a DNS name or an IP address.
MAX_ALLOWED_HOSTS = 64
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# The hard time limit comes this much after the soft one (a tenth, at least 5 s), for the
# task to log and write what it learned.
HARD_LIMIT_GRACE = 0.1
HARD_LIMIT_GRACE_MIN = 5.0
DAY = 86400.0


@dataclass(frozen=True)
class Bound:
    """The smallest and largest value a number setting takes; ``unit`` as the README shows it."""

    minimum: float
    maximum: float
    unit: str = "s"

    def text(self) -> str:
        """The range as the README's configuration table writes it: ``0.5 s..1 d``, ``1..1000``,
        ``0.1..10000 per s``."""
        if self.unit == "s":
            return f"{self.show(self.minimum)}..{self.show(self.maximum)}"
        return f"{self.minimum:g}..{self.maximum:.15g}" + (f" {self.unit}" if self.unit else "")

    def show(self, value: float) -> str:
        """One end of the range, with its unit: whole days as days."""
        if self.unit == "s":
            if value >= DAY and value % DAY == 0:
                return f"{value / DAY:g} d"
            return f"{value:g} s"
        return f"{value:.15g}" + (f" {self.unit}" if self.unit else "")


# Every duration and count setting, with its documented range (the README's "range" column,
# kept equal by tests/unit/test_settings.py). A value outside it stops the command at start (exit 2)
# instead of overflowing a datetime on the first tick.
BOUNDS: Mapping[str, Bound] = {
    "OPTRACK_POLL_INTERVAL": Bound(0.5, DAY),
    "OPTRACK_POLL_MAX_INTERVAL": Bound(0.5, DAY),
    "OPTRACK_MAX_RETRY_AFTER": Bound(MIN_MAX_RETRY_AFTER, 7 * DAY),
    "OPTRACK_MAX_INPLACE_WAIT": Bound(0.0, 30.0),
    "OPTRACK_TICK_INTERVAL": Bound(0.2, 3600.0),
    "OPTRACK_BATCH_SIZE": Bound(1, 1000, ""),
    "OPTRACK_LIST_THRESHOLD": Bound(1, 1_000_000, ""),
    "OPTRACK_MAX_REQUESTS_PER_SECOND": Bound(0.1, 10_000.0, "per s"),
    "OPTRACK_PENDING_LOOKBACK": Bound(0.0, 30 * DAY),
    "OPTRACK_INTAKE_LOOKBACK": Bound(1.0, 3600.0),
    "OPTRACK_MAX_DUE_PER_TICK": Bound(1, 1_000_000, ""),
    "OPTRACK_CLAIM_LEASE": Bound(10.0, DAY),
    "OPTRACK_POLL_TIME_LIMIT": Bound(5.0, DAY),
    "OPTRACK_CLOCK_ALLOWANCE": Bound(0.0, 3600.0),
    "OPTRACK_NOT_FOUND_GRACE": Bound(0.0, DAY),
    "OPTRACK_RESEND_AFTER": Bound(10.0, 7 * DAY),
    "OPTRACK_MAX_DELIVERIES": Bound(1, 100, ""),
    "OPTRACK_BAD_REQUEST_BACKOFF": Bound(1.0, DAY),
    "OPTRACK_BAD_REQUEST_MAX_BACKOFF": Bound(60.0, 7 * DAY),
    "OPTRACK_CONNECT_TIMEOUT": Bound(0.1, 300.0),
    "OPTRACK_READ_TIMEOUT": Bound(0.1, 3600.0),
    "OPTRACK_REQUEST_DEADLINE": Bound(1.0, 300.0),
    "OPTRACK_DISCOVERY_INTERVAL": Bound(10.0, 7 * DAY),
    "OPTRACK_DISCOVERY_WINDOW": Bound(60.0, 366 * DAY),
    "OPTRACK_PRUNE_OLDER_THAN": Bound(3600.0, 36600 * DAY),
    "OPTRACK_NOTICE_RETENTION": Bound(3600.0, 366 * DAY),
    "OPTRACK_METRICS_PORT": Bound(1, 65535, ""),
    "OPTRACK_HTTP_PORT": Bound(0, 65535, ""),
}
DEFAULT_RESEND_AFTER = 600.0
DEFAULT_MAX_DELIVERIES = 5


@dataclass(frozen=True)
class Settings:
    """Everything optrack reads from the environment; see the README's configuration table."""

    database_url: str
    broker_url: str
    api_base_url: str = DEFAULT_API_BASE_URL
    account_sid: str = ""
    auth_token: str = field(default="", repr=False)
    # The default account may authenticate with an API key instead (TWILIO_API_KEY/_SECRET).
    api_key_sid: str = ""
    api_key_secret: str = field(default="", repr=False)
    # Fernet keys sealing the stored accounts' secrets (OPTRACK_SECRET_KEY); the first seals.
    secret_keys: tuple[str, ...] = field(default=(), repr=False)
    poll_interval: float = 10.0
    max_retry_after: float = DEFAULT_MAX_RETRY_AFTER
    tick_interval: float = 2.0
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    # One request, whole: connect, headers and the last byte of the body.
    request_deadline: float = 30.0
    max_inplace_wait: float = 5.0
    batch_size: int = 50
    allow_insecure_http: bool = False
    # Polling at scale (README "Scale"): strategy, adaptive cadence, sweep size.
    poll_strategy: str = "auto"
    poll_max_interval: float = 10.0
    # The account's request budget, kept by every worker together; None: no budget.
    max_requests_per_second: float | None = None
    list_threshold: int = 5
    pending_lookback: float = 86400.0
    # How long before its tracking a newly handed operation is first looked for (one List
    # page over that recent window learns many createdAt at once; README "Scale").
    intake_lookback: float = 60.0
    max_due_per_tick: int = 20000
    # How long a sweep's claim holds its operations; a killed worker's operations wait this long.
    claim_lease: float = 120.0
    # Celery's soft time limit on every task (the hard one a little later); None: the lease.
    poll_time_limit: float | None = None
    # How far an updatedAt may run ahead of the answer's Date (or the local clock) and still
    # order answers; past it the answer is judged by its counts alone.
    clock_allowance: float = 60.0
    # A 404 ends tracking only once 404s have lasted this long (0: at the first).
    not_found_grace: float = 60.0
    # A claimed group whose message no worker has started is sent again only after this long
    # (at least the lease): ticks do not pile up messages while no worker consumes them.
    resend_after: float = DEFAULT_RESEND_AFTER
    # The most times one task message is started; the next delivery makes it a dead letter.
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    # A 400 for an operation: its next request after this, doubling with each 400 in a row up
    # to the maximum (our request was wrong; asking every few minutes for ever cannot help).
    bad_request_backoff: float = 300.0
    bad_request_max_backoff: float = 21600.0
    # Operations: discovery, completion notices, metrics, logs, retention (README "Operations").
    discovery_interval: float | None = None
    discovery_window: timedelta = DEFAULT_DISCOVERY_WINDOW
    notify_task: str | None = None
    notify_queue: str = DEFAULT_NOTIFY_QUEUE
    webhook_url: str | None = field(default=None, repr=False)  # path and query may hold a token
    # Each signs every notice (a rotation holds two); whsec_<base64> or a legacy string.
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_dir: str | None = None
    log_format: str = "text"
    prune_older_than: timedelta | None = None
    notice_retention: timedelta = DEFAULT_NOTICE_RETENTION
    # `optrack serve` (README "HTTP API and dashboard").
    http_host: str = "127.0.0.1"
    http_port: int = DEFAULT_HTTP_PORT
    http_token: str = field(default="", repr=False)
    http_cors_origins: tuple[str, ...] = ()
    # Host names the API answers besides the address it listens on (a proxy's, a port map's).
    http_allowed_hosts: tuple[str, ...] = ()

    @property
    def task_soft_time_limit(self) -> float:
        """Seconds a task may run before Celery raises SoftTimeLimitExceeded in it."""
        return self.claim_lease if self.poll_time_limit is None else self.poll_time_limit

    @property
    def task_time_limit(self) -> float:
        """Seconds after which Celery kills a task's process (it ignored the soft limit)."""
        soft = self.task_soft_time_limit
        return soft + max(HARD_LIMIT_GRACE_MIN, soft * HARD_LIMIT_GRACE)

    @property
    def redacted_token(self) -> str:
        """The auth token as it may appear anywhere: never the token itself."""
        return "***" if self.auth_token else "(unset)"

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never appear in a log line (the webhook URL's path and query too)."""
        hook = () if self.webhook_url is None else url_secrets(self.webhook_url)
        # A whsec_ secret's base64 alone too, should anything ever show it without its prefix.
        keys = [s.removeprefix(signing.PREFIX) for s in self.webhook_secrets]
        values = (self.auth_token, self.api_key_secret, *self.secret_keys)
        found = (*values, *self.webhook_secrets, *keys, self.http_token, *hook)
        return tuple(s for s in found if s)

    @property
    def default_credentials(self) -> Credentials:
        """The environment's account (``default``): an API key's if one is set, else the SID's
        Auth Token (empty values when unset: the API rejects them, `health` says so)."""
        if self.api_key_sid:
            user = api_username(self.account_sid, self.api_key_sid)
            return Credentials(self.account_sid, user, self.api_key_secret)
        return Credentials(self.account_sid, self.account_sid, self.auth_token)

    @property
    def notices_enabled(self) -> bool:
        """True when completion notices have somewhere to go."""
        return bool(self.notify_task or self.webhook_url)


def _number(raw: str, name: str, bound: Bound, *, whole: bool) -> float:
    """``raw`` as a number within ``bound``, or ConfigError naming ``name`` and the bound."""
    shown = raw.strip() if len(raw.strip()) <= 40 else raw.strip()[:40] + "…"
    try:
        value = float(int(raw)) if whole else float(raw)
    except (ValueError, OverflowError):
        kind = "a whole number" if whole else "a number of seconds"
        raise ConfigError(f"{name}={shown!r} is not {kind}") from None
    if not bound.minimum <= value <= bound.maximum:  # NaN fails both
        raise ConfigError(
            f"{name}={shown!r} must be between {bound.show(bound.minimum)} and "
            f"{bound.show(bound.maximum)}"
        )
    return value


def _is_number(raw: str) -> bool:
    try:
        float(raw)
    except ValueError:
        return False
    return True


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    return _number(raw, name, BOUNDS[name], whole=False)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    return int(_number(raw, name, BOUNDS[name], whole=True))


def _max_retry_after(env: Mapping[str, str]) -> float:
    name = "OPTRACK_MAX_RETRY_AFTER"
    raw = env.get(name, "").strip()
    if not raw:
        return DEFAULT_MAX_RETRY_AFTER
    bound = BOUNDS[name]
    try:
        return _number(raw, name, bound, whole=False)
    except ConfigError:
        value = float(raw) if _is_number(raw) else math.nan
        if not value < MIN_MAX_RETRY_AFTER:  # above the bound, or not a number: as said
            raise
    # Below the minimum has its own message: what the cap is for.
    if value < MIN_MAX_RETRY_AFTER:
        raise ConfigError(
            f"OPTRACK_MAX_RETRY_AFTER={value:g} is below {MIN_MAX_RETRY_AFTER:g} s: it caps only "
            "absurd Retry-After values, and a lower cap would call the API before it allows. "
            f"Leave it unset ({DEFAULT_MAX_RETRY_AFTER:g} s) or set at least "
            f"{MIN_MAX_RETRY_AFTER:g}."
        )
    return value


def _resend_after(env: Mapping[str, str], claim_lease: float) -> float:
    name = "OPTRACK_RESEND_AFTER"
    if not env.get(name, "").strip():
        return max(DEFAULT_RESEND_AFTER, claim_lease)
    value = _float(env, name, DEFAULT_RESEND_AFTER)
    if value < claim_lease:
        raise ConfigError(
            f"{name}={value:g} is shorter than OPTRACK_CLAIM_LEASE={claim_lease:g}: a message "
            "still waiting in the broker would be sent again while its claim holds"
        )
    return value


def _optional_float(env: Mapping[str, str], name: str) -> float | None:
    if not env.get(name, "").strip():
        return None
    return _float(env, name, 0.0)


def _duration(env: Mapping[str, str], name: str) -> timedelta | None:
    raw = env.get(name, "")
    if not raw.strip():
        return None
    try:
        seconds = parse_duration(raw).total_seconds()
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    bound = BOUNDS[name]
    if not bound.minimum <= seconds <= bound.maximum:
        raise ConfigError(
            f"{name}={raw.strip()!r} must be between {bound.show(bound.minimum)} and "
            f"{bound.show(bound.maximum)}"
        )
    return timedelta(seconds=seconds)


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or choices[0]
    if raw not in choices:
        raise ConfigError(f"{name}={raw!r} must be one of {', '.join(choices)}")
    return raw


def _webhook(env: Mapping[str, str]) -> tuple[str | None, tuple[str, ...]]:
    url = env.get("OPTRACK_WEBHOOK_URL", "").strip() or None
    secret = env.get("OPTRACK_WEBHOOK_SECRET", "")
    if url is None:
        return None, (secret,) if secret else ()  # unused; still redacted from logs
    try:
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname
    except ValueError:  # e.g. an unclosed [ of an IPv6 address
        scheme, host = "", None
    if scheme not in ("http", "https") or not host:
        raise ConfigError(
            "OPTRACK_WEBHOOK_URL must be an http(s) URL with a host, such as "
            f"https://hooks.example.com/optrack (got scheme {scheme!r}, host {host!r})"
        )
    allow_http = env.get("OPTRACK_WEBHOOK_ALLOW_INSECURE_HTTP", "").lower() in ("1", "true", "yes")
    if scheme == "http" and not (is_loopback(host) or allow_http):
        # Only the host: a webhook URL's path or query often holds a token of its own.
        raise ConfigError(
            f"OPTRACK_WEBHOOK_URL is plain http to the non-loopback host {host!r}: the notices "
            "would travel in clear. Use https, or set OPTRACK_WEBHOOK_ALLOW_INSECURE_HTTP=1 if "
            "you mean it (a private network)."
        )
    if not secret:
        raise ConfigError(
            "OPTRACK_WEBHOOK_URL is set but OPTRACK_WEBHOOK_SECRET is empty; make one with: "
            + signing.MAKE_ONE
        )
    try:
        return url, signing.split_secrets(secret)
    except signing.BadSecret as exc:  # its message never holds the secret
        raise ConfigError(f"OPTRACK_WEBHOOK_SECRET: {exc}") from None


def _api_key(env: Mapping[str, str]) -> tuple[str, str]:
    key = env.get("TWILIO_API_KEY", "").strip()
    secret = env.get("TWILIO_API_SECRET", "").strip()
    if bool(key) != bool(secret):
        given, missing = ("TWILIO_API_KEY", "TWILIO_API_SECRET")[:: 1 if key else -1]
        raise ConfigError(f"{given} is set but {missing} is not: an API key needs both")
    if key and not re.fullmatch(r"SK[0-9a-f]{32}", key):
        raise ConfigError("TWILIO_API_KEY must be an API key SID: SK and 32 lower-case hex digits")
    return key, secret


def _metrics(env: Mapping[str, str]) -> tuple[int | None, str | None]:
    # prometheus_client picks multiprocess mode from this variable when it is first imported.
    folder = env.get("PROMETHEUS_MULTIPROC_DIR", "").strip() or None
    if not env.get("OPTRACK_METRICS_PORT", "").strip():
        return None, folder
    port = _int(env, "OPTRACK_METRICS_PORT", 0)
    if folder is None:
        raise ConfigError(
            "OPTRACK_METRICS_PORT is set but PROMETHEUS_MULTIPROC_DIR is not: set it to a "
            "folder the worker can write, so the counts of every worker process add up"
        )
    return port, folder


def _http_token(env: Mapping[str, str]) -> str:
    token = env.get("OPTRACK_HTTP_TOKEN", "").strip()
    if token and len(token) < MIN_HTTP_TOKEN:
        # The message never shows the token itself.
        raise ConfigError(
            f"OPTRACK_HTTP_TOKEN is {len(token)} characters; use at least {MIN_HTTP_TOKEN}, "
            "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError("OPTRACK_HTTP_TOKEN must not contain spaces or control characters")
    return token


def _cors_origins(env: Mapping[str, str]) -> tuple[str, ...]:
    origins = []
    for raw in env.get("OPTRACK_HTTP_CORS_ORIGINS", "").split(","):
        origin = raw.strip().rstrip("/")
        if not origin:
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise ConfigError(
                f"OPTRACK_HTTP_CORS_ORIGINS: {origin!r} is not an origin such as "
                "https://ops.example.com (scheme and host, no path; no wildcard)"
            )
        origins.append(origin)
    return tuple(dict.fromkeys(origins))


def _allowed_hosts(env: Mapping[str, str]) -> tuple[str, ...]:
    name = "OPTRACK_HTTP_ALLOWED_HOSTS"
    hosts = [h.strip().lower().rstrip(".") for h in env.get(name, "").split(",") if h.strip()]
    if len(hosts) > MAX_ALLOWED_HOSTS:
        raise ConfigError(f"{name} names {len(hosts)} hosts; at most {MAX_ALLOWED_HOSTS}")
    for host in hosts:
        try:
            ipaddress.ip_address(host.strip("[]"))
            continue
        except ValueError:
            pass
        labels = host.split(".")
        if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
            shown = host if len(host) <= 60 else host[:60] + "…"
            raise ConfigError(
                f"{name}: {shown!r} is not a host name or IP address such as ops.example.com "
                "(no scheme, port, path or wildcard)"
            )
    return tuple(dict.fromkeys(h.strip("[]") for h in hosts))


def url_secrets(url: str) -> tuple[str, ...]:
    """The parts of ``url`` that may hold a token: its credentials, and its path with its query
    (the request target, as urllib3 logs it at DEBUG), unless that is only ``/``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return (url,)
    found = [parts.netloc.rsplit("@", 1)[0]] if "@" in parts.netloc else []
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    if target not in ("", "/"):
        found.append(target)
    if parts.fragment:
        found.append(parts.fragment)
    return tuple(found)


def is_loopback(host: str | None) -> bool:
    """True for localhost and any loopback address (all of 127/8, ::1)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def mask_url(url: str) -> str:
    """``url`` as it may be shown: credentials, query and fragment replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    found = re.search(r"[?#]", tail)
    path, mark = (tail[: found.start()], found.group()) if found else (tail, "")
    return f"{scheme}{sep}{netloc}{path}" + (f"{mark}***" if mark else "")


def check_base_url(url: str, allow_insecure_http: bool) -> str:
    """Return the API root ``url`` without a trailing slash, or raise ConfigError.

    It must be http(s) with a host, name the API root (a path ending with ``/v1``) and hold no
    credentials, query or fragment. Plain http only to loopback, or when allowed. Messages show
    the URL masked: credentials in it are never echoed.
    """
    name = "OPTRACK_API_BASE_URL"
    shown = mask_url(url)
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ConfigError(f"{name}={shown!r} holds spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number 0-65535
    except ValueError:
        raise ConfigError(f"{name}={shown!r} is not a URL such as {DEFAULT_API_BASE_URL}") from None
    if "@" in parts.netloc:
        raise ConfigError(
            f"{name}={shown} holds credentials; remove them from the URL: optrack sends "
            "TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN itself, and a URL is shown in logs"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}={shown!r} must be an http(s) URL")
    if parts.scheme == "http" and not (is_loopback(parts.hostname) or allow_insecure_http):
        raise ConfigError(
            f"{name}={shown!r} is plain http to a non-loopback host; the auth token "
            "would travel in clear. Use https, or set OPTRACK_ALLOW_INSECURE_HTTP=1 if you mean it."
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ConfigError(
            f"{name}={shown!r} must not have a query or fragment: it is the API root, "
            f"such as {DEFAULT_API_BASE_URL}"
        )
    segments = parts.path.rstrip("/").split("/")
    if segments[-1] != "v1" or any(seg in (".", "..") for seg in segments):
        raise ConfigError(
            f"{name}={shown!r} must be the API root, its path ending with /v1 "
            f"(such as {DEFAULT_API_BASE_URL}): any other path makes every route answer 404"
        )
    return url.rstrip("/")


def check_lease(settings: Settings) -> Settings:
    """Return ``settings`` if a poll message fits inside its claim's lease, else ConfigError.

    A message stops calling once what is left of its claim is less than one request may take
    (``OPTRACK_REQUEST_DEADLINE`` plus an in-place wait, ``OPTRACK_MAX_INPLACE_WAIT``), so that
    must leave it at least half the lease; and the task's time limit must end within the lease.
    """
    s = settings
    request = s.request_deadline + s.max_inplace_wait
    if request > s.claim_lease / 2:
        raise ConfigError(
            f"OPTRACK_REQUEST_DEADLINE={s.request_deadline:g} plus OPTRACK_MAX_INPLACE_WAIT="
            f"{s.max_inplace_wait:g} is {request:g} s, more than half of OPTRACK_CLAIM_LEASE="
            f"{s.claim_lease:g}: a poll message could outlive its claim. Raise the lease to at "
            f"least {2 * request:g} or shorten the others."
        )
    limit = s.task_soft_time_limit
    if limit > s.claim_lease:
        raise ConfigError(
            f"OPTRACK_POLL_TIME_LIMIT={limit:g} is longer than OPTRACK_CLAIM_LEASE="
            f"{s.claim_lease:g}: a poll message would run on after its claim expired and "
            "another worker took its group. Leave it unset (the lease) or lower it."
        )
    if limit < request:
        raise ConfigError(
            f"OPTRACK_POLL_TIME_LIMIT={limit:g} is shorter than one request may take "
            f"(OPTRACK_REQUEST_DEADLINE + OPTRACK_MAX_INPLACE_WAIT = {request:g} s)"
        )
    return settings


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from ``env`` (default: os.environ); raise ConfigError on a bad value."""
    env = os.environ if env is None else env
    home = Path(env.get("OPTRACK_HOME", str(DEFAULT_HOME)))
    allow_http = env.get("OPTRACK_ALLOW_INSECURE_HTTP", "").lower() in ("1", "true", "yes")
    webhook_url, webhook_secrets = _webhook(env)
    metrics_port, metrics_dir = _metrics(env)
    claim_lease = _float(env, "OPTRACK_CLAIM_LEASE", 120.0)
    settings = Settings(
        database_url=env.get("OPTRACK_DATABASE_URL") or f"sqlite:///{home / 'optrack.sqlite'}",
        broker_url=env.get("OPTRACK_BROKER_URL") or f"sqla+sqlite:///{home / 'broker.sqlite'}",
        api_base_url=check_base_url(
            env.get("OPTRACK_API_BASE_URL") or DEFAULT_API_BASE_URL, allow_http
        ),
        account_sid=env.get("TWILIO_ACCOUNT_SID", ""),
        auth_token=env.get("TWILIO_AUTH_TOKEN", ""),
        api_key_sid=_api_key(env)[0],
        api_key_secret=_api_key(env)[1],
        secret_keys=parse_secret_keys(env.get("OPTRACK_SECRET_KEY", "")),
        poll_interval=_float(env, "OPTRACK_POLL_INTERVAL", 10.0),
        max_retry_after=_max_retry_after(env),
        tick_interval=_float(env, "OPTRACK_TICK_INTERVAL", 2.0),
        connect_timeout=_float(env, "OPTRACK_CONNECT_TIMEOUT", 5.0),
        read_timeout=_float(env, "OPTRACK_READ_TIMEOUT", 15.0),
        request_deadline=_float(env, "OPTRACK_REQUEST_DEADLINE", 30.0),
        max_inplace_wait=_float(env, "OPTRACK_MAX_INPLACE_WAIT", 5.0),
        batch_size=_int(env, "OPTRACK_BATCH_SIZE", 50),
        poll_strategy=_choice(env, "OPTRACK_POLL_STRATEGY", POLL_STRATEGIES),
        # Adaptive cadence is an opt-in: unset, idle operations keep the poll interval.
        poll_max_interval=max(
            _float(env, "OPTRACK_POLL_MAX_INTERVAL", 0.0),
            _float(env, "OPTRACK_POLL_INTERVAL", 10.0),
        ),
        max_requests_per_second=_optional_float(env, "OPTRACK_MAX_REQUESTS_PER_SECOND"),
        list_threshold=_int(env, "OPTRACK_LIST_THRESHOLD", 5),
        pending_lookback=_float(env, "OPTRACK_PENDING_LOOKBACK", 86400.0),
        intake_lookback=_float(env, "OPTRACK_INTAKE_LOOKBACK", 60.0),
        max_due_per_tick=_int(env, "OPTRACK_MAX_DUE_PER_TICK", 20000),
        claim_lease=claim_lease,
        resend_after=_resend_after(env, claim_lease),
        max_deliveries=_int(env, "OPTRACK_MAX_DELIVERIES", DEFAULT_MAX_DELIVERIES),
        bad_request_backoff=_float(env, "OPTRACK_BAD_REQUEST_BACKOFF", 300.0),
        bad_request_max_backoff=_float(env, "OPTRACK_BAD_REQUEST_MAX_BACKOFF", 21600.0),
        poll_time_limit=_optional_float(env, "OPTRACK_POLL_TIME_LIMIT"),
        clock_allowance=_float(env, "OPTRACK_CLOCK_ALLOWANCE", 60.0),
        not_found_grace=_float(env, "OPTRACK_NOT_FOUND_GRACE", 60.0),
        allow_insecure_http=allow_http,
        discovery_interval=_optional_float(env, "OPTRACK_DISCOVERY_INTERVAL"),
        discovery_window=_duration(env, "OPTRACK_DISCOVERY_WINDOW") or DEFAULT_DISCOVERY_WINDOW,
        notify_task=env.get("OPTRACK_NOTIFY_TASK", "").strip() or None,
        notify_queue=env.get("OPTRACK_NOTIFY_QUEUE", "").strip() or DEFAULT_NOTIFY_QUEUE,
        webhook_url=webhook_url,
        webhook_secrets=webhook_secrets,
        metrics_port=metrics_port,
        metrics_host=env.get("OPTRACK_METRICS_HOST", "").strip() or "127.0.0.1",
        metrics_dir=metrics_dir,
        log_format=_choice(env, "OPTRACK_LOG_FORMAT", LOG_FORMATS),
        prune_older_than=_duration(env, "OPTRACK_PRUNE_OLDER_THAN"),
        notice_retention=_duration(env, "OPTRACK_NOTICE_RETENTION") or DEFAULT_NOTICE_RETENTION,
        http_host=env.get("OPTRACK_HTTP_HOST", "").strip() or "127.0.0.1",
        http_port=_int(env, "OPTRACK_HTTP_PORT", DEFAULT_HTTP_PORT),
        http_token=_http_token(env),
        http_cors_origins=_cors_origins(env),
        http_allowed_hosts=_allowed_hosts(env),
    )
    return check_lease(settings)
