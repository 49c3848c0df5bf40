"""Standard Webhooks signatures (https://www.standardwebhooks.com/): the headers every notice
carries, and the secrets they are made with.

Three headers: ``webhook-id`` (the notice's id, the same on every retry: a receiver drops a
repeat by it), ``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature``,
``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, one such value per secret held,
separated by spaces. A receiver verifies them with any Standard Webhooks library
(``standardwebhooks`` on PyPI and npm, and others in many languages).

Secrets take the ``whsec_<base64>`` form, the key being the decoded bytes (24 to 64 of them,
as the specification recommends). A secret not in that form, as optrack 0.1 took it, keeps
working: its UTF-8 bytes are the key (a library takes them as bytes:
``Webhook(secret.encode())``). ``OPTRACK_WEBHOOK_SECRET`` holding a ``whsec_`` secret is a
comma-separated list (base64 has no comma), every secret signing each notice, so the receiver
may hold either one during a rotation; one with none is a single legacy secret, whole, commas
and all, as before.

Pure functions on the standard library. No message here ever holds a secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence

PREFIX = "whsec_"
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
VERSION = "v1"
# The key lengths the specification recommends (192 to 512 bits).
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64
MAKE_ONE = (
    "python -c 'import base64, secrets; "
    'print("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())\''
)


class BadSecret(ValueError):
    """Raised when a webhook secret cannot be used; the message never holds the secret."""


def is_standard(secret: str) -> bool:
    """True for a ``whsec_<base64>`` secret, False for a legacy one."""
    return secret.startswith(PREFIX)


def key_of(secret: str) -> bytes:
    """The HMAC key of ``secret``: whsec_'s base64 decoded, else its UTF-8 bytes."""
    if not secret:
        raise BadSecret("a webhook secret is empty")
    if not is_standard(secret):
        try:
            return secret.encode("utf-8")
        except UnicodeEncodeError:
            raise BadSecret("a webhook secret is not valid UTF-8") from None
    encoded = secret[len(PREFIX) :].rstrip("=")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadSecret(
            f"a {PREFIX} secret is not base64 (A-Z, a-z, 0-9, + and /) after {PREFIX}"
        ) from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise BadSecret(
            f"a {PREFIX} secret's key is {len(key)} bytes; use {MIN_KEY_BYTES} to "
            f"{MAX_KEY_BYTES} (make one with: {MAKE_ONE})"
        )
    return key


def split_secrets(raw: str) -> tuple[str, ...]:
    """The secrets of ``OPTRACK_WEBHOOK_SECRET``: a comma-separated list when it holds a
    whsec_ secret (items stripped, empty ones dropped), else the whole value (a legacy secret,
    kept as it was). Each is checked by ``key_of``; an empty value gives ()."""
    if not raw:
        return ()
    items = [item.strip() for item in raw.split(",")]
    if not any(is_standard(item) for item in items):
        key_of(raw)
        return (raw,)
    found = tuple(item for item in items if item)
    for index, item in enumerate(found, 1):
        try:
            key_of(item)
        except BadSecret as exc:
            raise BadSecret(f"secret {index} of {len(found)}: {exc}") from None
    return found


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256>`` of ``f"{msg_id}.{timestamp}."`` followed by ``body``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return f"{VERSION},{base64.b64encode(digest).decode('ascii')}"


def headers(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> Mapping[str, str]:
    """The three Standard Webhooks headers of one attempt, signed with each key."""
    if not keys:
        raise BadSecret("no webhook secret to sign with")
    if timestamp < 0:
        raise ValueError(f"timestamp must be Unix seconds >= 0, got {timestamp}")
    if not msg_id or any(c in msg_id for c in ". \r\n"):
        raise ValueError(f"a webhook-id has no dot, space or line break: {msg_id!r}")
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: " ".join(signature(key, msg_id, timestamp, body) for key in keys),
    }
