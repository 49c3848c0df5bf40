"""The opaque cursors of ``GET /api/v1/operations`` (the last ID of a page) and of
``GET /api/v1/notices`` (the id a page continues below): base64url JSON."""

from __future__ import annotations

import base64
import binascii
import json

from worker.errors import InvalidOperationId
from worker.operation import validate_operation_id

_VERSION = 1


class BadCursor(ValueError):
    """Raised when a cursor is not one this API gave out."""


def encode(after: str) -> str:
    """The cursor that continues after operation ID ``after``."""
    raw = json.dumps({"v": _VERSION, "after": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str) -> str:
    """The ID a cursor continues after; BadCursor if it was not made by ``encode``."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):  # RecursionError: "[[[[…" nested deep
        raise BadCursor("cursor is not one this API gave out; start again without it") from None
    if not isinstance(data, dict) or data.get("v") != _VERSION:
        raise BadCursor("cursor is not one this API gave out; start again without it")
    # Every cursor we give out ends a page on a tracked, hence valid, ID: anything else (a NUL,
    # a lone surrogate the database cannot encode) is tampering.
    try:
        return validate_operation_id(data.get("after"))
    except InvalidOperationId:
        raise BadCursor("cursor is not one this API gave out; start again without it") from None


# The notices' cursor: the id a page continues below (they come newest first). Its own key, so
# an operations cursor is not taken for one, nor the other way round.
def encode_before(before: int) -> str:
    """The cursor that continues with the notices below id ``before``."""
    raw = json.dumps({"v": _VERSION, "before": before}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_before(cursor: str, most: int) -> int:
    """The notice id a cursor continues below; BadCursor if ``encode_before`` did not make it
    (an id outside 1..``most`` included)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        raise BadCursor("cursor is not one this API gave out; start again without it") from None
    before = data.get("before") if isinstance(data, dict) and data.get("v") == _VERSION else None
    if type(before) is not int or not 1 <= before <= most:
        raise BadCursor("cursor is not one this API gave out; start again without it")
    return before
