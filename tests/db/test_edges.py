"""Every CLI option and every HTTP parameter, given edge values: never a crash.

Huge durations, dates at 0001 and 9999 with offsets, nan and inf, huge and negative numbers,
empty strings, non-ASCII. The options come from click's command tree and the parameters from
the app's OpenAPI document, so a new one is fuzzed without a line here. The CLI runs in-process
(``worker.cli.exit_code``, what ``optrack`` runs) on SQLite; the API is served by uvicorn on a
real socket, on SQLite and PostgreSQL. Each answer is 2xx or 4xx (422 for a bad value) in the
API's error shape; each command exits 0, 1 or 2, saying why when it is not 0, and no traceback.
Few examples per parameter: CI stays fast (derandomized there, tests/conftest.py).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
import pytest
import requests
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import update

from tests.support.processes import base_env
from tests.support.services import SID, TOKEN
from worker.cli import cli, exit_code
from worker.db import TrackedOperation
from worker.http import create_app
from worker.http.server import running
from worker.migrate import upgrade
from worker.runtime import Runtime
from worker.sandbox import SandboxServer
from worker.settings import load_settings

GOOD = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
EDGES = [
    *("", " ", "0", "-0", "-1", "1", "0.1", "1.5", "-2.5", "1e3", "1e400", "-1e400"),
    *("nan", "NaN", "-nan", "inf", "-inf", "Infinity"),
    *(str(2**31), str(2**63), str(2**64), "9" * 30, "-" + "9" * 25, "99999999999999999999999"),
    *("9999999d", "99999999d", "999999999w", "36600d", "36601d", "1e9s", "9" * 20 + "w"),
    *("0s", "0.0000001", "1h30m", "7d", "now", "NOW"),
    *("0001-01-01", "0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00-23:59", "0001-01-01T00:00Z"),
    *("9999-12-31", "9999-12-31T23:59:59-01:00", "9999-12-31T23:59:59+14:00", "9999-12-31T23:59Z"),
    *("0000-00-00", "2026-02-30", "2026-01-31T25:00Z", "2026-01-31T08:00:00+99:00", "10000-01-01"),
    *("é", "日本語", "\u0665", "\uff11", "\u200b", "\U0001f600", "ä" * 300, "a" * 5000),
    *(GOOD, GOOD.upper(), GOOD + "/../x", "PENDING", "processing", "-", "--", "-h", "'\";--"),
]
# RFC 9110's field-value: visible characters (and obs-text), inner spaces and tabs.
FIELD_VALUE = re.compile(r"(?:[\x21-\x7e\x80-\U0010ffff](?:[ \t]*[\x21-\x7e\x80-\U0010ffff])*)?")
# A value from argv is never NUL (execve cannot pass one); anything else may come.
TEXT = st.text(st.characters(blacklist_characters="\x00"), max_size=40)
VALUES = st.one_of(
    st.sampled_from(EDGES),
    st.integers(-(10**30), 10**30).map(str),
    st.floats().map(repr),
    TEXT,
)
EXAMPLES = 8


# --- the command line ------------------------------------------------------------------------


def command_tree(group: click.Group = cli, path: tuple[str, ...] = ()) -> Iterator[Any]:
    """Every command under ``group``, by its path of names."""
    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from command_tree(command, (*path, name))


def takes_a_value(param: click.Parameter) -> bool:
    if isinstance(param, click.Argument):
        return True
    return isinstance(param, click.Option) and not param.is_flag and not param.count


CLI_PARAMS = [
    (path, param)
    for path, command in command_tree()
    for param in command.params
    if takes_a_value(param)
]
# What each command is given beside the value under test, so that value is what is judged.
BASE: dict[tuple[str, ...], dict[str, list[str]]] = {
    ("db", "prune"): {"older_than": ["--older-than", "90d"]},
    ("history",): {"operation_id": [GOOD]},
    ("track",): {"operation_ids": [GOOD]},
    ("watch",): {"once": ["--once"]},
    ("wait",): {"operation_ids": [GOOD], "timeout": ["--timeout", "0"]},
}
# These serve until stopped when their input is good: only their options' parsing is run.
LONG_RUNNING = {("run",), ("serve",), ("sandbox",), ("demo",)}
# A good --timeout makes `wait` wait that long for GOOD (never polled here): parsed only.
LONG_RUNNING_PARAMS = {(("wait",), "timeout")}
# `wait` says "the timeout came first" as timeout(1) does.
OWN_CODES = {("wait",): {124}}


@dataclass
class Cli:
    env: dict[str, str]
    folder: Path

    def __call__(self, *args: str) -> tuple[int, str, str]:
        """Run ``optrack args`` as ``optrack`` does; the exit code, stdout and stderr."""
        with CliRunner().isolation(input="", env=self.env) as (out, err, _):
            try:
                code = exit_code(args)
            except SystemExit as exc:  # a command's own sys.exit (health, discover)
                code = exc.code if isinstance(exc.code, int) else 1
            return (
                code,
                out.getvalue().decode("utf-8", "replace"),
                err.getvalue().decode("utf-8", "replace"),
            )


@pytest.fixture(scope="module")
def optrack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    folder = tmp_path_factory.mktemp("edges-cli")
    url = f"sqlite:///{folder / 'optrack.sqlite'}"
    upgrade(url)
    with SandboxServer(account_sid=SID, auth_token=TOKEN, seed=0) as sandbox:
        env = base_env(folder, OPTRACK_DATABASE_URL=url, OPTRACK_API_BASE_URL=sandbox.base_url)
        run = Cli({k: v for k, v in env.items() if k.startswith(("OPTRACK_", "TWILIO_"))}, folder)
        assert run("track", GOOD)[0] == 0
        before = Path.cwd()
        os.chdir(folder)  # --html and --plot write where they are told: here
        try:
            yield run
        finally:
            os.chdir(before)


def cli_args(path: tuple[str, ...], param: click.Parameter, value: str) -> list[str]:
    base = {name: tokens for name, tokens in BASE.get(path, {}).items() if name != param.name}
    args = [token for tokens in base.values() for token in tokens]
    if isinstance(param, click.Argument):
        return [*args, "--", value]  # after --, even "-x" is the argument's value
    return [param.opts[0], value, *args]


@pytest.mark.parametrize(
    ("path", "param"),
    CLI_PARAMS,
    ids=[f"{' '.join(path)} {param.name}" for path, param in CLI_PARAMS],
)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=VALUES)
def test_every_cli_option_takes_any_value_without_a_traceback(
    optrack: Cli, path: tuple[str, ...], param: click.Parameter, value: str
) -> None:
    args = cli_args(path, param, value)
    if path in LONG_RUNNING or (path, param.name) in LONG_RUNNING_PARAMS:
        command = cli
        for name in path:
            assert isinstance(command, click.Group)
            command = command.commands[name]
        try:
            ctx = command.make_context(path[-1], list(args))
        except click.ClickException as exc:
            assert exc.exit_code == 2 and exc.format_message()
            return
        for got in ctx.params.values():  # what it would run with is a usable number
            if isinstance(got, float):
                assert math.isfinite(got), (args, got)
            if isinstance(got, int):
                assert -(2**63) <= got < 2**63, (args, got)
        return
    code, out, err = optrack(*path, *args)
    assert code in {0, 1, 2} | OWN_CODES.get(path, set()), (args, code, out, err)
    assert "Traceback" not in out + err, (args, out, err)
    if code:
        assert err.strip(), (args, code, out)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "--since", "9999999d"], "longer than any duration optrack takes"),
        (["report", "--since", "0001-01-01T00:00:00+01:00"], "outside the calendar"),
        (["report", "--until", "9999-12-31T23:59:59-01:00"], "outside the calendar"),
        (["report", "--stuck-after", "9999999d"], "at most 36600d"),
        (["report", "--limit", "9" * 30], "--limit"),
        (["db", "prune", "--older-than", "9999999d"], "at most 36600d"),
        (["discover", "--window", "9999999d"], "at most 36600d"),
        (["health", "--max-lag", "99999999d"], "at most 36600d"),
        (["wait", GOOD, "--timeout", "99999999d"], "at most 36600d"),
        (["wait", GOOD, "--max-failed", "-1"], "--max-failed"),
        (["wait", GOOD, "--for", "done"], "'done' is not one of"),
        (["dead-letters", "replay", "99999999999999999999999"], "is not in the range"),
        (["watch", "--once", "--interval", "nan"], "'nan' is not a finite number"),
        (["sandbox", "--port", "70000"], "70000 is not in the range 0<=x<=65535"),
        (["sandbox", "--duration", "nan"], "'nan' is not a finite number"),
        (["sandbox", "--seed", str(10**12)], "--seed"),
        (
            ["sandbox", "--account", "AC" + "1" * 32 + ":a", "--account", "AC" + "1" * 32 + ":b"],
            "given twice",
        ),
        (["sandbox", "--account", "AC1"], "SID:TOKEN"),
        (["demo", "--timeout", "inf"], "--timeout"),
        (["run", "--concurrency", "0"], "--concurrency"),
        (["serve", "--loglevel", "loud"], "'loud' is not one of"),
    ],
)
def test_each_reported_bad_option_exits_2_saying_what_was_wrong(
    optrack: Cli, args: list[str], message: str
) -> None:
    code, out, err = optrack(*args)
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err


# --- the HTTP API ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    method: str
    path: str
    name: str
    where: str  # "query" or "path"


@dataclass
class Served:
    url: str
    rt: Runtime
    http: requests.Session


def openapi_params(rt: Runtime) -> list[Param]:
    """Every parameter of every route the app documents (the API and /healthz)."""
    doc = create_app(rt, token=None).openapi()
    return [
        Param(method.upper(), path, p["name"], p["in"])
        for path, methods in doc["paths"].items()
        for method, op in methods.items()
        for p in op.get("parameters", [])
    ]


OPENAPI_PARAMS = openapi_params(Runtime(load_settings({"OPTRACK_HOME": "/nonexistent"})))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.conftest import _new_pg_database, drop_pg_database

    folder = tmp_path_factory.mktemp("edges-http")
    name = None
    if request.param == "sqlite":
        url = f"sqlite:///{folder / 'optrack.sqlite'}"
        upgrade(url)
    else:
        name, url = _new_pg_database(request.getfixturevalue("pg_template"))
    rt = Runtime(load_settings({"OPTRACK_DATABASE_URL": url, "OPTRACK_HOME": str(folder)}))
    http = requests.Session()
    with running(create_app(rt, token=None)) as server:
        served = Served(server.url, rt, http)
        assert post(served, {"ids": [GOOD]}).status_code == 200
        with rt.sessions.begin() as session:  # ended: ?wait=… answers at once, whatever it is
            session.execute(
                update(TrackedOperation)
                .where(TrackedOperation.id == GOOD)
                .values(status="CANCELED")
            )
        yield served
    http.close()
    rt.close()
    if name is not None:
        drop_pg_database(name)


def post(served: Served, body: Any) -> requests.Response:
    return served.http.post(served.url + "/api/v1/operations", json=body, timeout=30)


def request(served: Served, param: Param, value: str) -> requests.Response:
    path = param.path.replace("{operation_id}", GOOD)
    params: dict[str, str] = {}
    headers: dict[str, str] = {}
    if param.where == "path":
        path = param.path.replace("{" + param.name + "}", quote(value, safe=""))
    elif param.where == "header":
        headers[param.name] = value.encode("utf-8", "replace").decode("latin-1")
    else:
        params[param.name] = value
    # Streamed: /events answers 200 and goes on for ever; its headers are what is judged.
    return served.http.request(
        param.method, served.url + path, params=params, headers=headers, timeout=30, stream=True
    )


def judged(answer: requests.Response) -> None:
    """2xx, or a 4xx in the one error shape; never a 5xx (a 503 only from /healthz)."""
    where = f"{answer.request.method} {answer.request.url}"
    if answer.url.split("?")[0].endswith("/healthz") and answer.status_code == 503:
        return
    assert answer.status_code < 500, (where, answer.status_code, answer.text[:300])
    if answer.status_code >= 400:
        errors = answer.json()["errors"]
        assert errors and all(e["reason"] for e in errors), (where, answer.text[:300])


@pytest.mark.parametrize(
    "param",
    OPENAPI_PARAMS,
    ids=[f"{p.method} {p.path} {p.name}" for p in OPENAPI_PARAMS],
)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.one_of(VALUES, st.text(max_size=40)))
def test_every_http_parameter_takes_any_value_without_a_500(
    served: Served, param: Param, value: str
) -> None:
    # A header value HTTP forbids (a control character, edge whitespace) never reaches the app:
    # requests refuses to send it or uvicorn's parser answers its own plain-text 400.
    assume(param.where != "header" or FIELD_VALUE.fullmatch(value) is not None)
    with request(served, param, value) as answer:
        judged(answer)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)


@settings(max_examples=3 * EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(JSON, st.fixed_dictionaries({"ids": st.lists(VALUES, max_size=3)})))
def test_any_json_body_is_answered_without_a_500(served: Served, body: Any) -> None:
    judged(post(served, body))


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/api/v1/report?since=9999999d", "at most 36600d"),
        ("/api/v1/report?since=0001-01-01T00:00:00%2B01:00", "outside the calendar"),
        ("/api/v1/report?stuck_after=9999999d", "at most 36600d"),
        ("/api/v1/progress?recent=99999999d", "at most 36600d"),
        ("/api/v1/operations/" + GOOD + "?wait=61s", "at most 60s"),
        ("/api/v1/report.csv?until=9999-12-31T23:59:59-01:00", "outside the calendar"),
        ("/healthz?max_lag=99999999d", "at most 36600d"),
    ],
)
def test_each_reported_bad_parameter_is_422_saying_what_was_wrong(
    served: Served, path: str, message: str
) -> None:
    answer = served.http.get(served.url + path, timeout=30)
    assert answer.status_code == 422, answer.text
    assert message in answer.json()["errors"][0]["reason"]


def cursor(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 3000,  # nested deeper than the parser recurses
        json.dumps({"v": 1, "after": "\ud800"}).encode(),  # a lone surrogate
        json.dumps({"v": 1, "after": "\x00"}).encode(),  # NUL: PostgreSQL refuses it
        json.dumps({"v": 1, "after": GOOD + "'"}).encode(),
        json.dumps({"v": 1, "after": ["x"]}).encode(),
    ],
)
def test_a_tampered_cursor_is_422(served: Served, raw: bytes) -> None:
    answer = served.http.get(served.url + "/api/v1/operations", params={"cursor": cursor(raw)})
    assert answer.status_code == 422, answer.text
    assert "cursor is not one this API gave out" in answer.json()["errors"][0]["reason"]


def test_a_deeply_nested_body_is_422(served: Served) -> None:
    body = b'{"ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answer = served.http.post(
        served.url + "/api/v1/operations",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 422, answer.text
    assert "nested too deep" in answer.json()["errors"][0]["reason"]
