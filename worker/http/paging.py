"""The opaque cursor of ``GET /api/v1/operations``: the last ID of a page, base64url JSON."""

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
