"""Settings, read from the environment once into a frozen object and passed down."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from worker.errors import ConfigError
from worker.retry_after import DEFAULT_MAX_RETRY_AFTER

DEFAULT_API_BASE_URL = "https://comms.twilio.com/v1"
DEFAULT_HOME = Path(".optrack")


@dataclass(frozen=True)
class Settings:
    """Everything optrack reads from the environment; see the README's configuration table."""

    database_url: str
    broker_url: str
    api_base_url: str = DEFAULT_API_BASE_URL
    account_sid: str = ""
    auth_token: str = field(default="", repr=False)
    poll_interval: float = 10.0
    max_retry_after: float = DEFAULT_MAX_RETRY_AFTER
    tick_interval: float = 2.0
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    max_inplace_wait: float = 5.0
    batch_size: int = 50
    allow_insecure_http: bool = False

    @property
    def redacted_token(self) -> str:
        """The auth token as it may appear anywhere: never the token itself."""
        return "***" if self.auth_token else "(unset)"


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if not value >= minimum or value == float("inf"):
        raise ConfigError(f"{name}={raw!r} must be a finite number >= {minimum}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name}={raw!r} must be between {minimum} and {maximum}")
    return value


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(url: str, allow_insecure_http: bool) -> str:
    """Return ``url`` without a trailing slash if it is https, loopback http, or allowed http."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"OPTRACK_API_BASE_URL={url!r} must be an http(s) URL")
    if parts.scheme == "http" and not (_is_loopback(parts.hostname) or allow_insecure_http):
        raise ConfigError(
            f"OPTRACK_API_BASE_URL={url!r} is plain http to a non-loopback host; the auth token "
            "would travel in clear. Use https, or set OPTRACK_ALLOW_INSECURE_HTTP=1 if you mean it."
        )
    return url.rstrip("/")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from ``env`` (default: os.environ); raise ConfigError on a bad value."""
    env = os.environ if env is None else env
    home = Path(env.get("OPTRACK_HOME", str(DEFAULT_HOME)))
    allow_http = env.get("OPTRACK_ALLOW_INSECURE_HTTP", "").lower() in ("1", "true", "yes")
    return Settings(
        database_url=env.get("OPTRACK_DATABASE_URL") or f"sqlite:///{home / 'optrack.sqlite'}",
        broker_url=env.get("OPTRACK_BROKER_URL") or f"sqla+sqlite:///{home / 'broker.sqlite'}",
        api_base_url=check_base_url(
            env.get("OPTRACK_API_BASE_URL") or DEFAULT_API_BASE_URL, allow_http
        ),
        account_sid=env.get("TWILIO_ACCOUNT_SID", ""),
        auth_token=env.get("TWILIO_AUTH_TOKEN", ""),
        poll_interval=_float(env, "OPTRACK_POLL_INTERVAL", 10.0, minimum=0.5),
        max_retry_after=_float(env, "OPTRACK_MAX_RETRY_AFTER", DEFAULT_MAX_RETRY_AFTER),
        tick_interval=_float(env, "OPTRACK_TICK_INTERVAL", 2.0, minimum=0.2),
        connect_timeout=_float(env, "OPTRACK_CONNECT_TIMEOUT", 5.0, minimum=0.1),
        read_timeout=_float(env, "OPTRACK_READ_TIMEOUT", 15.0, minimum=0.1),
        max_inplace_wait=_float(env, "OPTRACK_MAX_INPLACE_WAIT", 5.0),
        batch_size=_int(env, "OPTRACK_BATCH_SIZE", 50, 1, 1000),
        allow_insecure_http=allow_http,
    )


def ensure_sqlite_dirs(settings: Settings) -> None:
    """Create the parent folders of SQLite files named by the database and broker URLs."""
    for url in (settings.database_url, settings.broker_url):
        if "sqlite:///" in url:
            path = url.split("sqlite:///", 1)[1].split("?", 1)[0]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
