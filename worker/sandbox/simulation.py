"""Pure, thread-safe state of the SenderPool Operations sandbox (time is injected).

Progress model of a `SimulatedOperation` (all derived from ``clock()``, nothing is stored):

* senders are processed one by one at a uniform rate, ``total`` of them in ``duration``
  seconds; the n-th one finishes at ``created_at + duration * n / total``;
* failures are deterministic: after n processed senders, ``floor(n * fail_ratio)`` have
  failed and the rest were created (fail_ratio 0.25 -> every 4th sender fails);
* outcome COMPLETED: status PROCESSING until ``created_at + duration``, then COMPLETED with
  ``queued == 0``;
* outcome CANCELED: at ``created_at + duration * cancel_at`` (default half-way) the operation
  becomes CANCELED with ``floor(total * cancel_at)`` senders processed and ``queued`` set to 0,
  so ``queued + created + failed < total`` once canceled;
* while PROCESSING, ``queued + created + failed == total``;
* ``updatedAt`` is the instant of the last change of stats or status (never "now");
* dates are rendered in whole UTC seconds, and list ordering and date filters use those
  rendered seconds so that what a client sees is consistent with how it was filtered;
* ``not_found_for`` seconds after ``created_at`` the operation is not replicated yet: a fetch
  answers 404 (20404) and List pages leave it out.

``total == 0`` or ``duration == 0`` means the operation is already final at ``created_at``.
"""

from __future__ import annotations

import bisect
import math
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal, cast

Clock = Callable[[], float]
Outcome = Literal["COMPLETED", "CANCELED"]
Status = Literal["PROCESSING", "COMPLETED", "CANCELED"]
FaultKind = Literal[
    "status", "slow", "drop", "malformed", "redirect", "future_updated_at", "stale", "trickle"
]
FAULT_KINDS: tuple[FaultKind, ...] = (
    *("status", "slow", "drop", "malformed", "redirect", "future_updated_at", "stale", "trickle"),
)

# Use fullmatch: with re.match, "$" would also accept a trailing newline.
OPERATION_ID_RE = re.compile(r"^comms_operation_[0-7][a-hjkmnpqrstv-z0-9]{25,34}$")
CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
STATUSES: tuple[Status, ...] = ("PROCESSING", "COMPLETED", "CANCELED")
OUTCOMES: tuple[Outcome, ...] = ("COMPLETED", "CANCELED")
FAULT_STATUSES = (400, 401, 403, 404, 409, 429, 500, 503)
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# Where a redirect fault points by default: the discard port, where nothing answers.
DEFAULT_LOCATION = "http://127.0.0.1:9"
MAX_SHIFT = 10 * 365 * 86400.0  # offsets of updatedAt and Date: up to ten years either way
MALFORMED_VARIANTS = (
    *("not_json", "wrong_content_type", "missing_field", "negative_count"),
    *("unknown_status", "bad_date", "wrong_id"),
)
RETRY_AFTER_FORMS = ("seconds", "date", "raw")
AUTO = "auto"  # Fault.retry_after default: "1" for 409/429/503, no header otherwise
MAX_TOTAL = 1_000_000
MAX_BULK = 100_000
MAX_MESSAGE = 100_000  # a fault's error message: long enough to exceed any cap of ours
SortKey = tuple[int, str]


class SimulationError(ValueError):
    """A rejected input; ``field`` names the offending field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


def format_instant(t: float) -> str:
    """Epoch seconds -> ``YYYY-MM-DDTHH:MM:SSZ`` (floored to the second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.floor(t)))


def parse_instant(text: str) -> float:
    """ISO 8601 date-time with ``Z`` or an offset -> epoch seconds; ValueError otherwise."""
    if "T" not in text.upper():
        raise ValueError("expected an ISO 8601 date-time such as 2024-04-05T06:20:00Z")
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError("the date-time needs a time zone (Z or +HH:MM)")
    return parsed.astimezone(UTC).timestamp()


def new_operation_id(rng: random.Random, created_at: float | None = None) -> str:
    """128 random bits as 26 Crockford chars; the top 3 bits give the leading 0-7. With
    ``created_at`` (epoch seconds), a ULID's: its first 10 chars are that time in ms."""
    bits = rng.getrandbits(128)
    if created_at is not None:
        bits = (math.floor(created_at * 1000) << 80) | (bits & ((1 << 80) - 1))
    chars = [CROCKFORD[(bits >> (5 * i)) & 31] for i in range(25, -1, -1)]
    return "comms_operation_" + "".join(chars)


@dataclass(frozen=True)
class OperationState:
    """What the API shows for an operation at one instant."""

    status: Status
    total: int
    queued: int
    created: int
    failed: int
    updated_at: float


_NUMBER = (int, float)
_OPERATION_TYPES: dict[str, type | tuple[type, ...]] = {
    **{"id": str, "created_at": _NUMBER, "total": int, "duration": _NUMBER},
    **{"fail_ratio": _NUMBER, "outcome": str, "cancel_at": _NUMBER, "not_found_for": _NUMBER},
}


@dataclass(frozen=True)
class SimulatedOperation:
    """One operation whose progress is a pure function of time."""

    id: str
    created_at: float
    total: int
    duration: float
    fail_ratio: float = 0.0
    outcome: Outcome = "COMPLETED"
    cancel_at: float = 0.5
    # Seconds after creation during which the API does not know it yet (a lagging replica).
    not_found_for: float = 0.0

    def __post_init__(self) -> None:
        _check_types(self, _OPERATION_TYPES)
        _check(
            bool(OPERATION_ID_RE.fullmatch(self.id)), "id", "id must match the operation pattern"
        )
        _check(math.isfinite(self.created_at) and self.created_at >= 0, "created_at", "bad time")
        _check(0 <= self.total <= MAX_TOTAL, "total", f"total must be 0..{MAX_TOTAL}")
        _check(math.isfinite(self.duration) and self.duration >= 0, "duration", "must be >= 0")
        _check(0.0 <= self.fail_ratio <= 1.0, "fail_ratio", "fail_ratio must be 0..1")
        _check(self.outcome in OUTCOMES, "outcome", "outcome must be COMPLETED or CANCELED")
        _check(0.0 <= self.cancel_at <= 1.0, "cancel_at", "cancel_at must be 0..1")
        ok = math.isfinite(self.not_found_for) and 0 <= self.not_found_for <= 86400
        _check(ok, "not_found_for", "not_found_for must be 0..86400 seconds")

    def visible_at(self, now: float) -> bool:
        """False while the API answers 404 for it (``not_found_for`` after creation)."""
        return self.not_found_for == 0 or now >= self.created_at + self.not_found_for

    @property
    def created_second(self) -> int:
        return math.floor(self.created_at)

    @property
    def sort_key(self) -> SortKey:
        return (self.created_second, self.id)

    @property
    def ends_at(self) -> float:
        """Instant at which the operation reaches its final status."""
        if self.total == 0:
            return self.created_at
        fraction = self.cancel_at if self.outcome == "CANCELED" else 1.0
        return self.created_at + self.duration * fraction

    def state_at(self, now: float) -> OperationState:
        """Stats and status at ``now``."""
        if now >= self.ends_at or self.total == 0:
            canceled = self.outcome == "CANCELED"
            done = math.floor(self.total * self.cancel_at) if canceled else self.total
            failed = _failed(done, self.fail_ratio)
            return OperationState(self.outcome, self.total, 0, done - failed, failed, self.ends_at)
        elapsed = max(0.0, now - self.created_at)
        # Before the end at most total - 1 are done, so PROCESSING never shows queued == 0.
        raw = math.floor(self.total * elapsed / self.duration) if self.duration > 0 else 0
        processed = max(0, min(self.total - 1, raw))
        changed = self.created_at + self.duration * processed / max(1, self.total)
        failed = _failed(processed, self.fail_ratio)
        return OperationState(
            "PROCESSING",
            self.total,
            self.total - processed,
            processed - failed,
            failed,
            max(self.created_at, min(changed, now)),
        )

    def to_api(self, now: float) -> dict[str, Any]:
        """The operation as the API renders it at ``now``."""
        s = self.state_at(now)
        return {
            "id": self.id,
            "status": s.status,
            "stats": {
                "total": s.total,
                "queued": s.queued,
                "created": s.created,
                "failed": s.failed,
            },
            "createdAt": format_instant(self.created_at),
            "updatedAt": format_instant(s.updated_at),
        }


def _failed(processed: int, ratio: float) -> int:
    # The epsilon absorbs float error such as 0.29 * 100 == 28.999999999999996.
    return min(processed, math.floor(processed * ratio + 1e-9))


def _check_types(obj: object, spec: dict[str, type | tuple[type, ...]]) -> None:
    for name, types in spec.items():
        value = getattr(obj, name)
        _check(isinstance(value, types) and not isinstance(value, bool), name, "wrong type")


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise SimulationError(field_name, message)


_FAULT_TYPES: dict[str, type | tuple[type, ...]] = {
    **{"kind": str, "status": int, "retry_after": (str, type(None)), "retry_after_form": str},
    **{"count": int, "match": (str, type(None)), "delay": _NUMBER, "variant": str},
    **{"location": (str, type(None)), "offset": _NUMBER, "date_offset": _NUMBER},
    **{"lag": _NUMBER, "interval": _NUMBER, "message": (str, type(None))},
}


@dataclass
class Fault:
    """A queued misbehaviour, consumed by API requests whose path contains ``match``.

    Kinds: ``status`` (an error answer), ``slow`` (answer after ``delay``), ``drop`` (close
    without answering), ``malformed`` (a 200 that breaks the schema), ``redirect`` (a 3xx to
    ``location`` + the request's path and query), ``future_updated_at`` (updatedAt shifted by
    ``offset`` seconds), ``stale`` (the state of ``lag`` seconds ago with today's updatedAt),
    ``trickle`` (the body one byte every ``interval`` seconds). ``date_offset`` shifts the
    answer's ``Date`` header, whatever the kind. ``message`` replaces the documented message of
    a ``status`` error body: any text, NUL and lone surrogates included (JSON escapes them).
    """

    kind: FaultKind
    status: int = 0  # 0: the kind's default, 503 for ``status`` and 302 for ``redirect``
    retry_after: str | None = AUTO
    retry_after_form: str = "seconds"
    count: int = 1
    match: str | None = None
    delay: float = 0.0
    variant: str = "not_json"
    location: str | None = None
    offset: float = 0.0
    date_offset: float = 0.0
    lag: float = 0.0
    interval: float = 0.5
    message: str | None = None

    def __post_init__(self) -> None:
        _check_types(self, _FAULT_TYPES)
        _check(self.kind in FAULT_KINDS, "kind", f"kind must be one of {FAULT_KINDS}")
        if self.status == 0:
            self.status = 302 if self.kind == "redirect" else 503
        statuses = REDIRECT_STATUSES if self.kind == "redirect" else FAULT_STATUSES
        _check(self.status in statuses, "status", f"status must be one of {statuses}")
        _check(self.retry_after_form in RETRY_AFTER_FORMS, "retry_after_form", "unknown form")
        _check(1 <= self.count <= MAX_BULK, "count", "count must be >= 1")
        _check(math.isfinite(self.delay) and 0 <= self.delay <= 3600, "delay", "delay 0..3600")
        _check(self.variant in MALFORMED_VARIANTS, "variant", "unknown malformed variant")
        for name in ("offset", "date_offset"):
            value = getattr(self, name)
            ok = math.isfinite(value) and abs(value) <= MAX_SHIFT
            _check(ok, name, f"{name} must be within {MAX_SHIFT:g} seconds")
        _check(math.isfinite(self.lag) and 0 <= self.lag <= MAX_SHIFT, "lag", "lag must be >= 0")
        ok = math.isfinite(self.interval) and 0 < self.interval <= 60
        _check(ok, "interval", "interval must be 0..60 seconds")
        ok = self.message is None or len(self.message) <= MAX_MESSAGE
        _check(ok, "message", f"message must be at most {MAX_MESSAGE} characters")
        if self.location is not None:
            _check(
                re.fullmatch(r"https?://[!-~]+", self.location) is not None,
                "location",
                "location must be an http(s) URL without spaces",
            )
        if self.retry_after is None or self.retry_after == AUTO:
            return
        # A header value must stay one printable latin-1 line, even for "raw" garbage.
        printable = all(" " <= c <= "\xff" and c != "\x7f" for c in self.retry_after)
        _check(printable, "retry_after", "retry_after must be printable, on one line")
        if self.retry_after_form != "raw":
            try:
                seconds = float(self.retry_after)
            except ValueError:
                raise SimulationError("retry_after", "retry_after must be a number") from None
            _check(abs(seconds) <= 1e9, "retry_after", "retry_after must be within 1e9 s")

    def effective_location(self, path: str, query: str) -> str:
        """The Location header of a redirect fault for a request of ``path``/``query``."""
        base = (self.location or DEFAULT_LOCATION).rstrip("/")
        return f"{base}{path}" + (f"?{query}" if query else "")

    def effective_retry_after(self) -> str | None:
        """The retry_after value once the AUTO default is resolved."""
        if self.retry_after == AUTO:
            return "1" if self.status in (409, 429, 503) else None
        return self.retry_after

    @classmethod
    def from_json(cls, data: Any) -> Fault:
        """Build from a control-endpoint body; SimulationError on bad input."""
        _check(isinstance(data, dict), "body", "body must be a JSON object")
        body = dict(cast(dict[str, Any], data))
        unknown = sorted(set(body) - set(_FAULT_TYPES))
        _check(not unknown, unknown[0] if unknown else "", f"unknown fields: {unknown}")
        _check("kind" in body, "kind", "kind is required")
        retry_after = body.get("retry_after")
        if isinstance(retry_after, int | float) and not isinstance(retry_after, bool):
            body["retry_after"] = str(retry_after)
        return cls(**body)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Simulation:
    """All sandbox state: operations, the fault queue and the API request log."""

    def __init__(
        self, seed: int = 0, duration: float = 20.0, clock: Clock = time.time, name: str = ""
    ) -> None:
        """Create ``seed`` random operations; ids come from an RNG seeded with ``seed`` (and
        ``name``: each account of a sandbox its own, so no two share an id)."""
        _check(seed >= 0, "seed", "seed must be >= 0")
        _check(math.isfinite(duration) and duration >= 0, "duration", "must be >= 0")
        self.clock = clock
        self.duration = duration
        self._rng = random.Random(f"optrack-sandbox-{seed}" + (f"-{name}" if name else ""))
        self._lock = threading.Lock()
        self._by_id: dict[str, SimulatedOperation] = {}
        self._keys: list[SortKey] = []  # sorted, parallel to _ordered
        self._ordered: list[SimulatedOperation] = []
        self._faults: list[Fault] = []
        self._log: deque[dict[str, Any]] = deque(maxlen=100_000)
        # Log the operation IDs each answer carried: which operations a request covered, for
        # the stream benchmark's gaps between two looks (off by default: lists are big).
        self.log_ids = False
        # Mint IDs that carry their createdAt as ULIDs do (off by default: random IDs, as
        # nothing in the reference promises the time).
        self.ulid_ids = False
        now = clock()
        seeded = [
            SimulatedOperation(
                id=self._fresh_id(),
                created_at=now - self._rng.random() * 2 * duration,
                total=self._rng.randint(5, 50),
                duration=duration,
                fail_ratio=self._rng.choice((0.0, 0.0, 0.1, 0.25)),
                outcome="CANCELED" if self._rng.random() < 0.25 else "COMPLETED",
            )
            for _ in range(seed)
        ]
        self._insert(seeded)

    def _fresh_id(self, created_at: float | None = None) -> str:
        while True:
            op_id = new_operation_id(self._rng, created_at if self.ulid_ids else None)
            if op_id not in self._by_id:
                return op_id

    def _insert(self, ops: list[SimulatedOperation]) -> None:
        for op in ops:
            self._by_id[op.id] = op
        if len(ops) > len(self._ordered):  # a big batch: one sort of everything
            self._ordered.extend(ops)
            self._ordered.sort(key=lambda o: o.sort_key)
            self._keys = [o.sort_key for o in self._ordered]
            return
        # A small batch into a big list: insert each in place (re-sorting all would cost
        # a key per operation already there, for every batch).
        for op in ops:
            pos = bisect.bisect_left(self._keys, op.sort_key)
            self._keys.insert(pos, op.sort_key)
            self._ordered.insert(pos, op)

    def add_operations(
        self,
        count: int,
        *,
        total: int = 10,
        duration: float | None = None,
        fail_ratio: float = 0.0,
        outcome: Outcome = "COMPLETED",
        cancel_at: float = 0.5,
        op_id: str | None = None,
        created_at: float | None = None,
        not_found_for: float = 0.0,
    ) -> list[SimulatedOperation]:
        """Add ``count`` operations sharing these settings (``op_id`` only when count is 1)."""
        _check(1 <= count <= MAX_BULK, "count", f"count must be 1..{MAX_BULK}")
        _check(op_id is None or count == 1, "id", "id is only allowed for a single operation")
        with self._lock:
            at = self.clock() if created_at is None else created_at
            dur = self.duration if duration is None else duration
            if op_id is not None:
                _check(op_id not in self._by_id, "id", "an operation with this id exists")
            ops = [
                SimulatedOperation(
                    op_id or self._fresh_id(at),
                    at,
                    total,
                    dur,
                    fail_ratio,
                    outcome,
                    cancel_at,
                    not_found_for,
                )
                for _ in range(count)
            ]
            self._insert(ops)
            return ops

    def add_operation(self, **kwargs: Any) -> SimulatedOperation:
        """Add one operation; keywords as in ``add_operations``."""
        return self.add_operations(1, **kwargs)[0]

    def get(self, op_id: str) -> SimulatedOperation | None:
        with self._lock:
            return self._by_id.get(op_id)

    def operations(self) -> list[SimulatedOperation]:
        """All operations in API order (createdAt second, then id)."""
        with self._lock:
            return list(self._ordered)

    def list_page(
        self,
        *,
        now: float,
        page_size: int,
        start: float | None = None,
        end: float | None = None,
        status: str | None = None,
        after: SortKey | None = None,
    ) -> tuple[list[dict[str, Any]], SortKey | None]:
        """One page of API dicts after ``after``, and the key to continue from (None: last)."""
        with self._lock:
            pos = 0 if after is None else bisect.bisect_right(self._keys, after)
            if start is not None:
                # createdAt must be strictly after start: skip whole seconds <= start.
                first = (math.floor(start) + 1, "")
                pos = max(pos, bisect.bisect_left(self._keys, first))
            tail = self._ordered[pos:]
        page: list[dict[str, Any]] = []
        last: SortKey | None = None
        for op in tail:
            if end is not None and op.created_second >= end:
                break
            if not op.visible_at(now):
                continue
            item = op.to_api(now)
            if status is not None and item["status"] != status:
                continue
            if len(page) == page_size:
                return page, last
            page.append(item)
            last = op.sort_key
        return page, None

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(replace(fault))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def faults(self) -> list[Fault]:
        with self._lock:
            return [replace(f) for f in self._faults]

    def take_fault(self, path: str) -> Fault | None:
        """Consume one use of the first fault matching ``path``."""
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.match is None or fault.match in path:
                    fault.count -= 1
                    if fault.count <= 0:
                        del self._faults[i]
                    return replace(fault, count=1)
        return None

    def record_request(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._log.append(dict(entry))

    def requests_log(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self._log]

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()
