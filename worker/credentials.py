"""Accounts and their credentials: names, SIDs, and how a secret is kept at rest.

An account is a Twilio account (a subaccount, typically one per customer) that optrack polls
with its own credentials: its Auth Token, or one of its API keys (``SK…`` and its secret), both
HTTP Basic. The environment's account (``TWILIO_*``) is the account named ``default``; others
are rows of the ``accounts`` table, each secret sealed with Fernet under ``OPTRACK_SECRET_KEY``
(``Vault``; several keys, comma-separated, let the key rotate: the first seals, all open).
Nothing here prints a secret: ``Credentials`` and ``Vault`` keep theirs out of ``repr``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from worker.errors import AccountError, ConfigError

DEFAULT_ACCOUNT = "default"
# Lower case, digits, '-' and '_': safe in a URL, a metric label and a shell without quoting.
ACCOUNT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
ACCOUNT_SID = re.compile(r"AC[0-9a-f]{32}")
API_KEY_SID = re.compile(r"SK[0-9a-f]{32}")
MAX_SECRET = 512
KEY_HINT = (
    "generate one with: python -c 'from cryptography.fernet import Fernet; "
    "print(Fernet.generate_key().decode())'"
)


def validate_account_name(name: str) -> str:
    """``name`` if it may name an account, else AccountError saying what a name is."""
    if not isinstance(name, str) or not ACCOUNT_NAME.fullmatch(name):
        shown = repr(name)[:70]
        raise AccountError(
            f"{shown} is not an account name: 1 to 63 lower-case letters, digits, '-' or '_', "
            "beginning with a letter or digit"
        )
    return name


def validate_sid(value: str, pattern: re.Pattern[str], what: str) -> str:
    """``value`` if it is a whole SID of ``pattern``, else AccountError naming ``what``."""
    if not pattern.fullmatch(value):
        prefix = pattern.pattern[:2]
        raise AccountError(
            f"{value[:40]!r} is not {what}: {prefix} followed by 32 lower-case hex digits"
        )
    return value


def validate_secret(secret: str) -> str:
    """The secret without its surrounding whitespace (a trailing newline of a file or a pipe),
    or AccountError; the message never shows it."""
    secret = secret.strip()
    if not secret:
        raise AccountError("the secret is empty")
    if len(secret) > MAX_SECRET:
        raise AccountError(f"the secret is {len(secret)} characters; at most {MAX_SECRET}")
    if any(c.isspace() or not c.isprintable() for c in secret):
        raise AccountError("the secret holds spaces or control characters")
    return secret


@dataclass(frozen=True)
class Credentials:
    """What authenticates one account's requests: HTTP Basic ``username``:``password``, where
    the username is the account SID (with its Auth Token) or an API key's SID (its secret)."""

    account_sid: str
    username: str
    password: str = field(repr=False)

    @property
    def kind(self) -> str:
        """``api key`` or ``auth token``, as shown to people."""
        return "api key" if self.username.startswith("SK") else "auth token"


@dataclass(frozen=True)
class Vault:
    """Seals and opens account secrets with Fernet; the first key seals, every key opens."""

    keys: tuple[str, ...] = field(repr=False)

    def __post_init__(self) -> None:
        if not self.keys:
            raise ConfigError(
                "OPTRACK_SECRET_KEY is not set: the secrets of accounts are stored encrypted "
                f"with it; {KEY_HINT}"
            )

    @property
    def _fernet(self) -> MultiFernet:
        return MultiFernet([Fernet(key.encode()) for key in self.keys])

    def seal(self, secret: str) -> str:
        """The secret encrypted (a Fernet token, text)."""
        return self._fernet.encrypt(secret.encode()).decode()

    def open(self, sealed: str) -> str:
        """The secret of a token sealed by any key; ConfigError if none of them opens it."""
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except (InvalidToken, ValueError):
            raise ConfigError(
                "an account's secret cannot be decrypted with any key of OPTRACK_SECRET_KEY: "
                "the key it was sealed with is missing (keep the old key after the new one "
                "until `optrack accounts rotate-key` ran)"
            ) from None

    def reseal(self, sealed: str) -> str:
        """The token sealed again with the first key (MultiFernet.rotate)."""
        try:
            return self._fernet.rotate(sealed.encode()).decode()
        except (InvalidToken, ValueError):
            self.open(sealed)  # raises the explanation
            raise


def parse_secret_keys(raw: str) -> tuple[str, ...]:
    """OPTRACK_SECRET_KEY: comma-separated Fernet keys, or ConfigError (never echoing one)."""
    keys = tuple(k.strip() for k in raw.split(",") if k.strip())
    for number, key in enumerate(keys, start=1):
        try:
            Fernet(key.encode())
        except (ValueError, TypeError):
            raise ConfigError(
                f"OPTRACK_SECRET_KEY: key {number} of {len(keys)} is not a Fernet key "
                f"(32 url-safe base64-encoded bytes); {KEY_HINT}"
            ) from None
    return keys


def api_username(account_sid: str, api_key_sid: str | None) -> str:
    """The Basic-auth user of an account: its API key's SID if it has one, else its SID."""
    return api_key_sid or account_sid
