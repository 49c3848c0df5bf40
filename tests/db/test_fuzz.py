"""Bad input, fuzzed with hypothesis: operation IDs, Retry-After, the response parser.

No input crashes them: each returns a good value or raises the documented OptrackError subclass
with a one-line message that says what was wrong. Nothing invalid reaches a URL (the sandbox's
request log stays empty) or the database (``optrack track`` leaves every table as it was).
Examples are derandomized under CI=true (the "ci" profile in tests/conftest.py).
"""

from __future__ import annotations

import http.server
import json
import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sqlalchemy import MetaData, select

from tests.support.processes import base_env
from tests.support.services import SID, TOKEN
from worker.client import ApiClient, Timeouts
from worker.db import make_engine
from worker.errors import (
    ConfigError,
    InvalidOperationId,
    OperationNotFound,
    OptrackError,
    RetryLater,
    SchemaError,
    ServerError,
)
from worker.http_date import parse_http_date
from worker.operation import (
    ID_PATTERN,
    Operation,
    Page,
    Status,
    decode_operation,
    decode_page,
    parse_operation,
    parse_page,
    validate_operation_id,
)
from worker.retry_after import TOO_LARGE, RetryPolicy, parse_retry_after
from worker.sandbox import SandboxServer
from worker.settings import check_base_url, mask_url

GOOD_ID = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
# Pieces an attacker or a broken upstream would slip into an ID.
NASTY = [
    *("/", "..", "../", "/../../x", "?", "?x=1", "#", "&", "=", ";", "@", ":", "\\"),
    *("%2f", "%2e%2e", "%00", "\n", "\r\n", "\t", " ", "\x00", "\x7f"),
    # Unicode look-alikes: full-width and mathematical digits, Cyrillic and Greek letters,
    # the Kelvin sign (lower-cases to k), dotless i, zero-width and no-break spaces.
    *("\uff10", "\U0001d7ce", "\u0665", "\u043e", "\u03bf", "\u0430", "\u212a", "\u0131"),
    *("\u200b", "\u00a0", "\u2215", "\uff0f", "\u0301", "\ud800"),
]
BAD_IDS = [
    GOOD_ID + "/../../x",
    "comms_operation_01h9krwprkeee8fzqspvwy6nq8/../../x",
    "../../etc/passwd",
    GOOD_ID + "?status=COMPLETED",
    GOOD_ID + "#frag",
    GOOD_ID + "%2F..%2F",
    GOOD_ID + "\n",
    "\n" + GOOD_ID,
    GOOD_ID[:-1] + "\uff18",  # full-width 8
    GOOD_ID.replace("o", "\u043e", 1),  # Cyrillic o in "comms_operation"
    GOOD_ID[:-2] + "\u212a" + GOOD_ID[-1],  # Kelvin sign, lower-cases to "k"
    GOOD_ID + "\u200b",
    GOOD_ID.upper(),
]
SCHEMA_FIELDS = {
    *("operation", "id", "status", "stats", "createdAt", "updatedAt"),
    *("stats.total", "stats.queued", "stats.created", "stats.failed"),
    *("page", "operations", "pagination", "pagination.next"),
}
NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


def assert_one_clear_line(exc: Exception) -> str:
    """A rejection's message: one line, not empty, not a dump of the input."""
    text = str(exc)
    assert text.strip(), f"{type(exc).__name__} without a message"
    assert "\n" not in text and "\r" not in text, f"multi-line message: {text!r}"
    assert len(text) <= 300, f"message of {len(text)} characters"
    return text


# --- operation IDs -----------------------------------------------------------------------

valid_ids = st.from_regex(ID_PATTERN, fullmatch=True)


@st.composite
def mutated_ids(draw: st.DrawFn) -> str:
    """A valid ID with a nasty piece inserted, substituted or appended somewhere."""
    base = draw(valid_ids)
    piece = draw(st.sampled_from(NASTY) | st.text(min_size=1, max_size=3))
    at = draw(st.integers(0, len(base)))
    how = draw(st.sampled_from(["insert", "replace", "append", "prepend"]))
    if how == "insert":
        return base[:at] + piece + base[at:]
    if how == "replace":
        return base[:at] + piece + base[at + len(piece) :]
    return base + piece if how == "append" else piece + base


id_candidates = st.one_of(valid_ids, mutated_ids(), st.text(max_size=80), st.sampled_from(BAD_IDS))


@given(id_candidates)
def test_an_id_is_accepted_whole_or_rejected_with_a_reason(value: str) -> None:
    try:
        accepted = validate_operation_id(value)
    except InvalidOperationId as exc:
        text = assert_one_clear_line(exc)
        assert "is not an operation ID: " in text and exc.reason
        return
    assert accepted == value
    assert ID_PATTERN.fullmatch(accepted) and accepted.isascii()
    # Nothing in it needs escaping, so it cannot change the shape of a URL.
    assert quote(accepted, safe="") == accepted


@given(valid_ids)
def test_every_id_of_the_documented_pattern_is_accepted(value: str) -> None:
    assert validate_operation_id(value) == value


@given(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.binary(max_size=60),
        st.lists(st.text(max_size=5), max_size=3),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    )
)
def test_a_non_string_is_rejected(value: object) -> None:
    with pytest.raises(InvalidOperationId, match="expected a string") as info:
        validate_operation_id(value)
    assert_one_clear_line(info.value)


def test_a_rejected_id_never_reaches_the_api(sandbox: SandboxServer, make_client) -> None:  # type: ignore[no-untyped-def]
    client = make_client()
    rejected: list[str] = []

    @settings(max_examples=200)
    @given(id_candidates)
    def fetch(value: str) -> None:
        try:
            client.fetch(value)
        except InvalidOperationId:
            rejected.append(value)
        except OperationNotFound:
            pass  # a valid ID: the request went out, and the sandbox does not know it

    fetch()
    for value in BAD_IDS:
        with pytest.raises(InvalidOperationId):
            client.fetch(value)
    assert rejected, "the strategy produced no invalid ID"
    for entry in sandbox.requests_log():
        prefix, _, op_id = str(entry["path"]).rpartition("/")
        assert prefix == "/v1/SenderPools/Operations" and entry["query"] == ""
        assert ID_PATTERN.fullmatch(op_id), f"an invalid ID reached the API: {entry}"
        assert op_id not in rejected


def dump(db_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, for before/after comparisons."""
    engine = make_engine(db_url)
    meta = MetaData()
    meta.reflect(engine)
    with engine.connect() as conn:
        tables = {
            name: sorted(map(tuple, conn.execute(select(table))), key=repr)
            for name, table in meta.tables.items()
        }
    engine.dispose()
    return tables


def test_optrack_track_writes_nothing_for_bad_ids(db_url: str, tmp_path: Path) -> None:
    env = base_env(tmp_path, OPTRACK_DATABASE_URL=db_url)

    def track(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker", "track", *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert track(GOOD_ID).returncode == 0  # a database that is not empty
    before = dump(db_url)
    other = "comms_operation_7" + "a" * 25
    bad = [b for b in BAD_IDS if "\x00" not in b]  # NUL cannot be in an argv entry
    result = track(other, *bad)
    assert result.returncode == 2, result.stderr
    assert "nothing was tracked" in result.stderr and result.stdout == ""
    assert result.stderr.count("is not an operation ID") == len(bad)
    piped = track("-", stdin=f"{other}\n{GOOD_ID}/../../x\n")
    assert piped.returncode == 2 and "nothing was tracked" in piped.stderr
    assert dump(db_url) == before


def test_optrack_track_on_a_fresh_home(tmp_path: Path) -> None:
    env = base_env(tmp_path)  # OPTRACK_HOME=<tmp>/home, which does not exist yet
    result = subprocess.run(
        [sys.executable, "-m", "worker", "track", GOOD_ID],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-300:]
    assert "Traceback" not in result.stderr


# --- Retry-After ---------------------------------------------------------------------------

aware_datetimes = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(9000, 1, 1), timezones=st.just(UTC)
)
http_dates = aware_datetimes.map(lambda d: format_datetime(d.replace(microsecond=0), usegmt=True))
numbers = st.one_of(st.integers(-(10**12), 10**12), st.floats(allow_nan=True)).map(str)
signed = st.tuples(st.sampled_from(["", "+", "-", "+-", "--", " "]), numbers).map("".join)
retry_after_values = st.one_of(
    st.none(), st.text(max_size=80), numbers, signed, http_dates, st.sampled_from(NASTY)
)


@given(retry_after_values, aware_datetimes)
def test_retry_after_is_a_finite_wait_or_unusable(header: str | None, now: datetime) -> None:
    seconds = parse_retry_after(header, now)
    assert seconds is None or (math.isfinite(seconds) and seconds >= 0)


@given(st.integers(0, 10**9))
def test_retry_after_seconds(value: int) -> None:
    assert parse_retry_after(str(value), NOW) == value
    assert parse_retry_after(f"-{value}", NOW) == (0.0 if value == 0 else None)


@given(aware_datetimes, aware_datetimes)
def test_retry_after_http_date(when: datetime, now: datetime) -> None:
    when = when.replace(microsecond=0)
    expected = max(0.0, (when - now).total_seconds())
    assert parse_retry_after(format_datetime(when, usegmt=True), now) == expected


@given(
    retry_after_values,
    st.integers(-(10**6), 10**9),
    st.floats(0, 1e6),
    st.floats(0.001, 1e3),
    st.floats(0, 1e6),
)
def test_throttle_delay_is_always_between_zero_and_the_cap(
    header: str | None, attempt: int, cap: float, base: float, backoff_max: float
) -> None:
    policy = RetryPolicy(max_retry_after=cap, backoff_base=base, backoff_max=backoff_max)
    delay = policy.throttle_wait(header, NOW, attempt).seconds
    assert math.isfinite(delay) and 0 <= delay <= cap


@given(retry_after_values, st.integers(-(10**6), 10**9), st.floats(60, 1e6))
def test_a_throttle_never_means_call_at_once(
    header: str | None, throttles: int, cap: float
) -> None:
    policy = RetryPolicy(max_retry_after=cap)
    wait = policy.throttle_wait(header, NOW, throttles)
    assert policy.min_throttle_wait <= wait.seconds <= cap
    seconds = parse_retry_after(header, NOW)
    if wait.source == "header":  # honored as given, or the cap when it asked for more
        assert seconds is not None and wait.seconds == min(seconds, cap)
        assert wait.capped == (seconds > cap)


@given(st.integers(1, 40), st.floats(0.1, 10), st.floats(1, 1e4))
def test_the_minimum_wait_grows_with_consecutive_throttles_and_is_bounded(
    throttles: int, minimum: float, ceiling: float
) -> None:
    policy = RetryPolicy(min_throttle_wait=minimum, throttle_wait_max=ceiling)
    low, high = policy.minimum_wait(throttles), policy.minimum_wait(throttles + 1)
    floor = min(ceiling, minimum * 2.0 ** (throttles - 1))
    assert floor <= low <= 1.5 * floor
    assert high >= low / 1.5  # the next floor is never lower
    assert high <= 1.5 * ceiling


two_digit_years = st.datetimes(
    min_value=datetime(1977, 1, 2), max_value=datetime(2076, 12, 30), timezones=st.just(UTC)
)
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timedelta(minutes=m))


@given(two_digit_years, offsets)
def test_every_http_date_form_names_the_same_instant(when: datetime, offset: timedelta) -> None:
    when = when.replace(microsecond=0)
    imf = format_datetime(when, usegmt=True)
    rfc850 = when.strftime("%A, %d-%b-%y %H:%M:%S GMT")
    asctime = when.strftime("%a %b ") + f"{when.day:2d}" + when.strftime(" %H:%M:%S %Y")
    local = when + offset
    minutes = int(offset.total_seconds() // 60)
    zone = f"{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    numeric = local.strftime("%a, %d %b %Y %H:%M:%S ") + zone
    for text in (imf, rfc850, asctime, numeric):
        assert parse_http_date(text, NOW) == when, text


@given(st.integers(13, 5000))
def test_a_number_too_large_to_represent_is_the_cap(digits: int) -> None:
    assert parse_retry_after("9" * digits, NOW) == TOO_LARGE
    assert RetryPolicy(max_retry_after=600).throttle_wait("9" * digits, NOW, 1).capped


# --- the response parser --------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)
good_dates = st.sampled_from(
    ["2024-04-05T06:20:00Z", "2024-04-05T06:20:00+02:00", "2024-04-05T06:20:00.123456z"]
)
bad_dates = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            *("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2024-04-05"),
            *("2024-04-05T06:20:00", "2024-13-01T00:00:00Z", "2024-04-05T06:20:00+24:00"),
            *("Z", "", "2024-04-05T06:20:00Zjunk"),
        ]
    ),
)


@st.composite
def operations(draw: st.DrawFn) -> dict[str, Any]:
    """An operation object, usually valid, with some fields broken, removed or added."""
    count = st.integers(0, 10**6)
    data: dict[str, Any] = {
        "id": draw(valid_ids),
        "status": draw(st.sampled_from([s.value for s in Status])),
        "stats": {k: draw(count) for k in ("total", "queued", "created", "failed")},
        "createdAt": draw(good_dates),
        "updatedAt": draw(good_dates),
    }
    broken = {
        "id": id_candidates | json_values,
        "status": st.sampled_from(["PAUSED", "processing", "", " PROCESSING"]) | json_values,
        "createdAt": bad_dates | json_values,
        "updatedAt": bad_dates | json_values,
        "stats": json_values,
    }
    for name in draw(st.sets(st.sampled_from(sorted(broken)), max_size=2)):
        if draw(st.booleans()):
            data[name] = draw(broken[name])
        else:
            del data[name]
    if isinstance(data.get("stats"), dict) and draw(st.booleans()):
        stat = draw(st.sampled_from(["total", "queued", "created", "failed"]))
        if draw(st.booleans()):
            data["stats"][stat] = draw(
                st.integers(-(10**6), -1) | st.sampled_from([True, 1.0, "1", None]) | json_values
            )
        else:
            data["stats"].pop(stat, None)
    if draw(st.booleans()):
        data[draw(st.text(max_size=8))] = draw(json_values)  # an unknown extra field
    return data


def check_operation(result: Operation) -> None:
    """What a parsed operation guarantees to the code behind the parser."""
    assert ID_PATTERN.fullmatch(result.id)
    assert isinstance(result.status, Status)
    for value in (result.stats.total, result.stats.queued, result.stats.created):
        assert type(value) is int and value >= 0
    assert type(result.stats.failed) is int and result.stats.failed >= 0
    for when in (result.created_at, result.updated_at):
        assert when.tzinfo is not None and when.utcoffset() == timedelta(0)


def assert_schema_error_names_its_field(exc: SchemaError) -> None:
    text = assert_one_clear_line(exc)
    assert text.split(":", 1)[0] in SCHEMA_FIELDS, f"which field? {text!r}"


def edge(**fields: Any) -> dict[str, Any]:
    """A valid operation with ``fields`` changed (explicit examples the strategy may miss)."""
    data: dict[str, Any] = {
        "id": GOOD_ID,
        "status": "PROCESSING",
        "stats": {"total": 2, "queued": 1, "created": 1, "failed": 0},
        "createdAt": "2024-04-05T06:20:00Z",
        "updatedAt": "2024-04-05T06:20:00Z",
    }
    return {**data, **fields}


@settings(max_examples=250)
@example(edge(createdAt="0001-01-01T00:00:00+01:00"))  # before year 1 once in UTC
@example(edge(updatedAt="9999-12-31T23:59:59-01:00"))  # after year 9999 once in UTC
@example(edge(status=["PROCESSING"]))
@example(edge(stats={"total": True, "queued": 0, "created": 0, "failed": 0}))
@given(st.one_of(operations(), json_values))
def test_parse_operation_returns_a_valid_operation_or_a_schema_error(data: Any) -> None:
    try:
        result = parse_operation(data)
    except SchemaError as exc:
        assert_schema_error_names_its_field(exc)
        return
    check_operation(result)


@given(operations(), valid_ids)
def test_an_answer_about_another_operation_is_refused(data: dict[str, Any], asked: str) -> None:
    try:
        result = parse_operation(data, expected_id=asked)
    except SchemaError as exc:
        assert_schema_error_names_its_field(exc)
        return
    assert result.id == asked


next_links = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.sampled_from(
        [
            *("http://[", "https://[::1", "/v1/SenderPools/Operations?pageToken=abc&pageSize=5"),
            *("?pageToken=", "?pageToken=a&pageToken=b", "\ud800", "/x?pageToken=%ED%A0%80"),
        ]
    ),
    json_values,
)


@st.composite
def pages(draw: st.DrawFn) -> Any:
    """A List answer, usually valid, sometimes broken."""
    data: dict[str, Any] = {
        "operations": draw(st.lists(operations(), max_size=3)),
        "pagination": {"next": draw(next_links), "self": "/v1/SenderPools/Operations"},
    }
    if draw(st.booleans()):
        name = draw(st.sampled_from(["operations", "pagination"]))
        if draw(st.booleans()):
            del data[name]
        else:
            data[name] = draw(json_values)
    return data


@settings(max_examples=150)
@given(st.one_of(pages(), json_values))
def test_parse_page_returns_a_valid_page_or_a_schema_error(data: Any) -> None:
    try:
        page = parse_page(data)
    except SchemaError as exc:
        assert_schema_error_names_its_field(exc)
        return
    assert isinstance(page, Page)
    for op in page.operations:
        check_operation(op)
    if page.next_token is not None:
        page.next_token.encode()  # it will go into a URL: it must be real text


def _outcome(parse: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return parse(*args, **kwargs)
    except SchemaError as exc:
        return ("SchemaError", str(exc))


@settings(max_examples=300)
@example(edge(createdAt="9999-12-31T23:59:59-01:00"), None)
@example(edge(id=GOOD_ID + "\n"), None)
@example(edge(stats={"total": True, "queued": 0, "created": 0, "failed": 0}), None)
@example(edge(updatedAt="2024-04-05 06:20:00+00:00"), None)
@example(edge(), "comms_operation_7" + "z" * 25)
@given(st.one_of(operations(), json_values), st.one_of(st.none(), valid_ids))
def test_the_fast_decoder_agrees_with_the_parser_on_every_operation(
    data: Any, asked: str | None
) -> None:
    body = json.dumps(data).encode()
    assert _outcome(decode_operation, body, expected_id=asked) == _outcome(
        parse_operation, data, expected_id=asked
    )


@settings(max_examples=200)
@given(st.one_of(pages(), json_values))
def test_the_fast_decoder_agrees_with_the_parser_on_every_page(data: Any) -> None:
    assert _outcome(decode_page, json.dumps(data).encode()) == _outcome(parse_page, data)


@given(st.binary(max_size=200))
def test_the_fast_decoder_refuses_garbage_as_the_parser_does(body: bytes) -> None:
    outcome = _outcome(decode_page, body)
    assert isinstance(outcome, Page) or outcome[0] == "SchemaError"


# --- the parser behind a real socket ---------------------------------------------------------


class _Canned(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the status, content type and body set on the server."""

    server: _CannedServer

    def do_GET(self) -> None:
        status, content_type, body = self.server.answer
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Retry-After", self.server.retry_after)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _CannedServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    answer: tuple[int, str, bytes] = (200, "application/json", b"{}")
    retry_after = "1"


@pytest.fixture
def canned() -> Iterator[_CannedServer]:
    """A loopback HTTP server that answers whatever the test sets (a broken upstream)."""
    server = _CannedServer(("127.0.0.1", 0), _Canned)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("status", "body", "retry_after"),
    [
        (200, DEEP, "1"),  # nested deeper than the JSON parser goes
        (200, b'{"id": "\\ud800"}', "1"),
        (200, b"\xff\xfe not utf-8", "1"),
        (200, b"1" * 5000, "1"),  # an integer longer than Python converts
        (200, b"[]", "1"),
        (500, DEEP, "1"),  # the error list is parsed too
        (429, b'{"errors": 5}', "+-5"),  # and Retry-After
        (503, b'{"errors": [{"code": "x", "context": [1]}]}', "\u00b2"),
        (409, b"{}", "1" * 64),
    ],
)
def test_a_broken_upstream_gives_only_documented_errors(
    canned: _CannedServer, status: int, body: bytes, retry_after: str
) -> None:
    canned.answer = (status, "application/json", body)
    canned.retry_after = retry_after
    client = ApiClient(
        f"http://127.0.0.1:{canned.server_address[1]}/v1",
        SID,
        TOKEN,
        timeouts=Timeouts(connect=2, read=2),
        policy=RetryPolicy(max_retry_after=0.01, max_inplace_wait=0.01),
    )
    with client, pytest.raises(OptrackError) as info:
        client.fetch(GOOD_ID)
    assert_one_clear_line(info.value)
    expected = SchemaError if status == 200 else ServerError if status == 500 else RetryLater
    assert isinstance(info.value, expected)


# --- OPTRACK_API_BASE_URL -----------------------------------------------------------------

userinfo_text = st.text(
    st.characters(codec="ascii", exclude_characters="@/?#\\[]", exclude_categories=("Cc",)),
    min_size=6,
    max_size=30,
).filter(lambda t: t.strip() == t and " " not in t)


@given(userinfo_text, st.sampled_from(["", "user:", ":", "AC" + "0" * 32 + ":"]))
@example("s3cret", "")
def test_credentials_in_the_base_url_are_refused_and_never_shown(secret: str, before: str) -> None:
    url = f"https://{before}{secret}@comms.twilio.com/v1"
    with pytest.raises(ConfigError) as info:
        check_base_url(url, allow_insecure_http=False)
    assert secret not in str(info.value)
    assert secret not in mask_url(url)


@given(st.text(max_size=80))
def test_any_base_url_is_the_api_root_or_a_config_error(text: str) -> None:
    try:
        accepted = check_base_url(text, allow_insecure_http=True)
    except ConfigError as exc:
        assert_one_clear_line(exc)
        return
    assert accepted.startswith(("http://", "https://")) and accepted.endswith("/v1")
    assert "@" not in accepted.split("/")[2] and "?" not in accepted and "#" not in accepted
