"""Benchmark: decoding and checking one List page of 1,000 operations (a script).

Times ``operation.decode_page`` (msgspec decodes and checks the page in one pass) against
``json.loads`` + ``operation.parse_page`` (the strict parser it falls back to, which names
the field a bad answer breaks), on the same body, best of several rounds.

    .venv/bin/python -m bench.decode
    .venv/bin/python -m bench.decode --operations 1000 --rounds 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from worker.operation import decode_page, format_datetime, parse_page

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def page_body(operations: int) -> bytes:
    """A List page as the API sends it: ``operations`` PROCESSING operations and a next link."""
    start = datetime(2026, 12, 1, tzinfo=UTC)
    items = []
    for i in range(operations):
        suffix = "".join(ALPHABET[(i >> (5 * k)) % 32] for k in range(25))
        created = start + timedelta(seconds=i)
        items.append(
            {
                "id": f"comms_operation_0{suffix}",
                "status": "PROCESSING",
                "stats": {"total": 10, "queued": 4, "created": 5, "failed": 1},
                "createdAt": format_datetime(created),
                "updatedAt": format_datetime(created + timedelta(seconds=30)),
            }
        )
    page = {
        "operations": items,
        "pagination": {"next": "https://comms.twilio.com/v1/SenderPools/Operations?pageToken=x"},
    }
    return json.dumps(page).encode()


def timed(work: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Best and median milliseconds of ``rounds`` runs of ``work``."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operations", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    body = page_body(args.operations)
    fast = decode_page(body)
    strict = parse_page(json.loads(body))
    assert fast.operations == strict.operations and len(fast.operations) == args.operations
    print(f"a page of {args.operations:,} operations, {len(body):,} bytes, {args.rounds} rounds")
    for name, work in (
        ("decode_page (msgspec)", lambda: decode_page(body)),
        ("json.loads + parse_page", lambda: parse_page(json.loads(body))),
    ):
        best, median = timed(work, args.rounds)
        print(f"  {name:<26} best {best:6.2f} ms   median {median:6.2f} ms")


if __name__ == "__main__":
    main()
