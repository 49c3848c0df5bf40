"""Webhook signatures: ``X-Optrack-Signature: t=<unix>,v1=<hex>``, the scheme Stripe uses.

Deprecated: optrack 0.1's own scheme, still sent beside the Standard Webhooks headers
(``worker.webhook_signing``) for this release, then dropped. Each secret signs with its UTF-8
bytes as the key, whatever its form (a ``whsec_`` one too), exactly as before.

``v1`` is the hex HMAC-SHA256, keyed with the webhook secret, of the timestamp, a dot and the
raw body (``b"1764208146." + body``). The timestamp is inside what is signed, so a body captured
once cannot be sent again later with a fresh timestamp: ``verify`` rejects a signature that
does not match the header's own ``t`` and a ``t`` outside its tolerance.

A header may carry several ``v1`` values and ``verify`` may be given several secrets: either
side can hold the old and the new secret while one is rotated (docs/operations.md). Keys other
than ``t`` and ``v1`` are ignored, so a later scheme can be added beside ``v1``.

Pure functions on the standard library: a receiver may import this module, or copy it and
define ``WebhookSignatureError`` itself (its one import from optrack).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime

from worker.errors import WebhookSignatureError

SIGNATURE_HEADER = "X-Optrack-Signature"
SCHEME = "v1"
DEFAULT_TOLERANCE = 300.0  # seconds between the signed time and the receiver's clock
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")  # Unix seconds until the year 33658
_MAX_HEADER = 4096

__all__ = [
    "DEFAULT_TOLERANCE",
    "SIGNATURE_HEADER",
    "WebhookSignatureError",
    "sign",
    "signature",
    "verify",
]


def _secrets(secret: str | Sequence[str]) -> tuple[str, ...]:
    found = (secret,) if isinstance(secret, str) else tuple(secret)
    if not found or not all(isinstance(s, str) and s for s in found):
        raise ValueError("a webhook secret must be a non-empty string")
    return found


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``f"{timestamp}."`` followed by ``body``, keyed with ``secret``."""
    signed = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign(secret: str | Sequence[str], body: bytes, timestamp: int) -> str:
    """The header value ``t=<timestamp>,v1=<signature>``; one ``v1`` per secret given."""
    if timestamp < 0:
        raise ValueError(f"timestamp must be Unix seconds >= 0, got {timestamp}")
    parts = [f"t={timestamp}"]
    parts += [f"{SCHEME}={signature(s, timestamp, body)}" for s in _secrets(secret)]
    return ",".join(parts)


def _parse(header: str) -> tuple[int, list[str]]:
    if not header:
        raise WebhookSignatureError(f"no {SIGNATURE_HEADER} header")
    if len(header) > _MAX_HEADER:
        raise WebhookSignatureError(f"{SIGNATURE_HEADER} is longer than {_MAX_HEADER} characters")
    timestamps: list[str] = []
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise WebhookSignatureError(f"{SIGNATURE_HEADER} is not a list of key=value items")
        if key == "t":
            timestamps.append(value)
        elif key == SCHEME:
            signatures.append(value)
    if len(timestamps) != 1 or not _TIMESTAMP_RE.fullmatch(timestamps[0]):
        raise WebhookSignatureError(f"{SIGNATURE_HEADER} needs exactly one t=<Unix seconds>")
    if not signatures:
        raise WebhookSignatureError(f"{SIGNATURE_HEADER} has no {SCHEME} signature")
    return int(timestamps[0]), signatures


def verify(
    secret: str | Sequence[str],
    body: bytes,
    header: str | None,
    now: datetime,
    tolerance: float = DEFAULT_TOLERANCE,
) -> datetime:
    """Check a notice before parsing it; return its signed time, or raise WebhookSignatureError.

    ``body`` is the raw request body, ``header`` the ``X-Optrack-Signature`` value, ``now``
    the receiver's aware time. It passes when one ``v1`` matches the HMAC of ``t.body`` under
    one of the secrets (compared in constant time) and ``t`` is within ``tolerance`` seconds
    of ``now``, either way. Then drop a ``notice_id`` already seen: delivery is at least once.
    """
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime, e.g. datetime.now(UTC)")
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite number of seconds > 0, got {tolerance}")
    keys = _secrets(secret)
    timestamp, given = _parse(header or "")
    matched = False
    for key in keys:
        expected = signature(key, timestamp, body).encode()
        for candidate in given:
            # Every pair is compared, so the time taken says nothing about which one matched.
            matched |= hmac.compare_digest(expected, candidate.encode("utf-8", "replace"))
    if not matched:
        raise WebhookSignatureError("the signature does not match the body and its timestamp")
    age = now.timestamp() - timestamp
    if abs(age) > tolerance:
        when = "old" if age > 0 else "in the future"
        raise WebhookSignatureError(
            f"the signed timestamp is {abs(age):.0f} s {when}, beyond the {tolerance:g} s tolerance"
        )
    return datetime.fromtimestamp(timestamp, UTC)
