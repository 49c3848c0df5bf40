"""HTTP sandbox of the SenderPool Operations API on stdlib ``http.server``.

API requests are every path outside ``/_sandbox``; only they are logged, and only the
authenticated ones consume faults (auth is checked first, then faults, then validation).
Page tokens are urlsafe base64 (no padding) of JSON holding the filters and the sort key
(createdAt second, id) of the last operation served: keyset pagination, so pages stay
stable while operations progress. Connections are kept alive (HTTP/1.1). The ``Date``
header follows the simulation's clock (shifted by a fault's ``date_offset``), as a real
API's Date agrees with the updatedAt it serves.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from worker.sandbox.simulation import (
    OPERATION_ID_RE,
    STATUSES,
    Clock,
    Fault,
    SimulatedOperation,
    Simulation,
    SimulationError,
    SortKey,
    format_instant,
    parse_instant,
)

DEFAULT_ACCOUNT_SID = "AC" + "a" * 32
DEFAULT_AUTH_TOKEN = "sandbox-token"
LIST_PATH = "/v1/SenderPools/Operations"
FETCH_RE = re.compile(r"^/v1/SenderPools/Operations/([^/]*)$")
CONTROL_PREFIX = "/_sandbox"
MAX_BODY = 1 << 20
EXAMPLE_ID = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
ERRORS: dict[int, tuple[int, str]] = {
    400: (21614, "Invalid parameter."),
    401: (20003, "Authenticate"),
    403: (20403, "Forbidden"),
    404: (20404, "The resource was not found."),
    405: (20004, "Method not allowed."),
    409: (77701, "Account not ready. Please retry according to the Retry-After response header."),
    429: (20429, "Too many requests. Please retry according to the Retry-After response header."),
    500: (20500, "Internal server error."),
    503: (20503, "Service unavailable."),
}
_NUMBER = (int, float)
Sleep = Callable[[float], None]
_OP_FIELDS: dict[str, type | tuple[type, ...]] = {
    **{"total": int, "count": int, "outcome": str, "id": str, "created_at": _NUMBER},
    **{"duration": _NUMBER, "fail_ratio": _NUMBER, "cancel_at": _NUMBER},
    "not_found_for": _NUMBER,
}


def error_body(status: int, message: str | None = None, context: str = "null") -> dict[str, Any]:
    """The documented error body for ``status``."""
    code, default = ERRORS.get(status, (20000 + status, "Error."))
    info = f"https://www.twilio.com/docs/errors/{code}"
    msg = message or default
    return {"errors": [{"code": code, "message": msg, "infoUrl": info, "context": context}]}


@dataclass
class _Reply:
    status: int
    payload: Any
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    trickle: float | None = None  # seconds between two bytes of the body

    def body(self) -> bytes:
        if isinstance(self.payload, bytes):
            return self.payload
        return json.dumps(self.payload, separators=(",", ":")).encode()


def _carried_ids(payload: Any) -> list[str]:
    """The operation IDs an API answer carried: a List page's, or the one fetched."""
    if "operations" in payload:
        return [op["id"] for op in payload["operations"]]
    return [payload["id"]]


def _bad(context: str, message: str) -> _Reply:
    return _Reply(400, error_body(400, message, context))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 makes bursts of clients wait for SYN retries

    def __init__(
        self,
        address: tuple[str, int],
        sim: Simulation,
        logins: dict[str, tuple[str | None, Simulation]],
        log: bool,
        sleep: Sleep | None = None,
    ) -> None:
        # ``sim``: the first account's (unauthenticated requests are logged there); ``logins``:
        # Basic-auth user (an account SID or an API key SID) → (password, its account's state).
        self.sim, self.logins, self.log_requests = sim, logins, log
        self.sleep = sleep
        self.stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Cut idle keep-alive connections so that a stopped sandbox really stops answering."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def hold(self, seconds: float) -> bool:
        """Wait out a slow answer; True if the sandbox is stopping meanwhile."""
        if self.sleep is None:
            return self.stopping.wait(seconds)
        self.sleep(seconds)
        return self.stopping.is_set()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # clients hanging up are routine
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "optrack-sandbox/1"
    sys_version = ""
    timeout = 300  # idle keep-alive connections end eventually
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stalls
    server: _Server
    date_offset = 0.0  # of the request being answered (a fault's ``date_offset``)
    sim: Simulation  # the state of the account the request authenticated as

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header: the simulation's clock, not the machine's."""
        when = self.server.sim.clock() if timestamp is None else timestamp
        return formatdate(when + self.date_offset, usegmt=True)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one compact line is written by _handle instead

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log_requests:
            sys.stderr.write("sandbox: " + (format % args) + "\n")

    def _handle(self, method: str) -> None:
        sim = self.server.sim
        arrived = sim.clock()
        account = None
        self.date_offset = 0.0
        parts = urlsplit(self.path)
        path, query = parts.path, parts.query
        is_api = not path.startswith(CONTROL_PREFIX)
        reply: _Reply | None
        user = ""
        try:
            body = self._read_body()
            user, account, named = self._authorized()
            sim = named or sim
            if body is None:
                reply = _bad("body", "Bad Content-Length.")
            elif account is None:
                reply = _Reply(401, error_body(401), {"WWW-Authenticate": 'Basic realm="Twilio"'})
            elif is_api:
                # Each account its own operations, faults and request log, as in Twilio.
                self.sim = sim = account
                reply = self._api(method, path, query)
            else:
                self.sim = sim = account
                reply = self._control(method, path, body)
        except Exception:
            traceback.print_exc()
            reply = _Reply(500, error_body(500))
        if is_api:  # logged before answering, so a client that got its answer sees the entry
            status = 0 if reply is None else reply.status
            entry = {"t": arrived, "method": method, "path": path, "query": query, "user": user}
            entry["status"] = status
            if sim.log_ids and reply is not None and reply.status == 200:
                entry["ids"] = _carried_ids(reply.payload)
            sim.record_request(entry)
        if self.server.log_requests:
            sys.stderr.write(f"sandbox: {method} {path} -> {reply.status if reply else 'drop'}\n")
        if reply is None:
            self.close_connection = True  # "drop": close without any answer
        else:
            self._send(reply)

    def _read_body(self) -> bytes | None:
        raw = self.headers.get("Content-Length", "0")
        if not raw.strip().isdigit() or int(raw) > MAX_BODY:
            self.close_connection = True
            return None
        return self.rfile.read(int(raw)) if int(raw) else b""

    def _authorized(self) -> tuple[str, Simulation | None, Simulation | None]:
        """(the Basic-auth user, the state its credentials open or None, the account the user
        names, whose log a refused request goes to: a revoked key's 401s are its account's)."""
        scheme, _, value = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return "", None, None
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return "", None, None
        user, sep, password = decoded.partition(":")
        login = self.server.logins.get(user)
        if login is None:
            return "", None, None
        secret, sim = login
        good = bool(sep) and secret is not None
        ok = good and hmac.compare_digest(password.encode(), str(secret).encode())
        return user, sim if ok else None, sim

    def _send(self, reply: _Reply) -> None:
        data = reply.body()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if reply.trickle is None:
            self.wfile.write(data)
            return
        self.wfile.flush()
        for i in range(len(data)):  # a client that hangs up ends it (BrokenPipeError)
            if self.server.stopping.wait(reply.trickle if i else 0):
                self.close_connection = True
                return
            self.wfile.write(data[i : i + 1])
            self.wfile.flush()

    # --- the documented API -------------------------------------------------------------

    def _api(self, method: str, path: str, query: str) -> _Reply | None:
        sim = self.sim
        # A fault may match the query too (one List window by its startDate, say).
        fault = sim.take_fault(f"{path}?{query}" if query else path)
        now = sim.clock()
        if fault is None:
            return self._route(method, path, query, now)
        self.date_offset = fault.date_offset
        if fault.kind == "drop":
            return None
        if fault.kind == "slow" and self.server.hold(fault.delay):
            return None
        if fault.kind == "status":
            return self._fault_reply(fault)
        if fault.kind == "redirect":
            location = {"Location": fault.effective_location(path, query)}
            return _Reply(fault.status, {"moved": location["Location"]}, location)
        if fault.kind == "stale":
            # A lagging replica: the state of ``lag`` seconds ago, with today's updatedAt.
            reply = self._route(method, path, query, now - fault.lag)
            current = self._route(method, path, query, now)
            updated = {op["id"]: op["updatedAt"] for op in _items(current, path)}
            for op in _items(reply, path):
                op["updatedAt"] = updated.get(op["id"], op["updatedAt"])
            return reply
        reply = self._route(method, path, query, now)
        if fault.kind == "malformed":
            reply = _malformed(fault.variant, reply, path, now)
        elif fault.kind == "future_updated_at":
            for op in _items(reply, path):
                shifted = parse_instant(op["updatedAt"].replace("Z", "+00:00")) + fault.offset
                op["updatedAt"] = format_instant(max(0.0, shifted))
        elif fault.kind == "trickle":
            reply.trickle = fault.interval
        return reply

    def _fault_reply(self, fault: Fault) -> _Reply:
        headers: dict[str, str] = {}
        retry_after = fault.effective_retry_after()
        if retry_after is not None and fault.retry_after_form == "date":
            when = datetime.fromtimestamp(self.sim.clock() + float(retry_after), UTC)
            headers["Retry-After"] = format_datetime(when, usegmt=True)
        elif retry_after is not None:
            headers["Retry-After"] = retry_after
        if fault.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="Twilio"'
        return _Reply(fault.status, error_body(fault.status, fault.message), headers)

    def _route(self, method: str, path: str, query: str, now: float) -> _Reply:
        """The API's answer to a request, as the operations stand at ``now``."""
        match = FETCH_RE.match(path)
        if path != LIST_PATH and match is None:
            return _Reply(404, error_body(404))
        if method != "GET":
            return _Reply(405, error_body(405), {"Allow": "GET"})
        if match is None:
            return self._list(query, now)
        op_id = unquote(match.group(1))
        if not OPERATION_ID_RE.fullmatch(op_id):
            return _bad("operationId", "Invalid operationId: it must match the operation pattern.")
        op = self.sim.get(op_id)
        if op is None or not op.visible_at(now):
            return _Reply(404, error_body(404))
        return _Reply(200, op.to_api(now))

    def _list(self, query: str, now: float) -> _Reply:
        params = parse_qs(query, keep_blank_values=True)
        raw = {name: values[-1] for name, values in params.items()}
        filters: dict[str, Any] = {}
        for name in ("startDate", "endDate"):
            if name in raw:
                try:
                    filters[name] = parse_instant(raw[name])
                except ValueError:
                    return _bad(name, f"Invalid {name}: expected an ISO 8601 date-time.")
        if "status" in raw:
            if raw["status"] not in STATUSES:
                return _bad("status", "Invalid status: expected PROCESSING, COMPLETED or CANCELED.")
            filters["status"] = raw["status"]
        size_raw = raw.get("pageSize", "50")
        if not re.fullmatch(r"[0-9]{1,4}", size_raw) or not 1 <= int(size_raw) <= 1000:
            return _bad("pageSize", "Invalid pageSize: expected an integer from 1 to 1000.")
        after: SortKey | None = None
        if "pageToken" in raw:
            after = _decode_token(raw["pageToken"], filters)
            if after is None:
                return _bad("pageToken", "Invalid pageToken for these filters.")
        ops, next_key = self.sim.list_page(
            now=now,
            page_size=int(size_raw),
            start=filters.get("startDate"),
            end=filters.get("endDate"),
            status=filters.get("status"),
            after=after,
        )
        names = ("startDate", "endDate", "status")
        base: list[tuple[str, str]] = [(n, raw[n]) for n in names if n in raw]
        base.append(("pageSize", size_raw))
        current = base + ([("pageToken", raw["pageToken"])] if "pageToken" in raw else [])
        nxt = None
        if next_key is not None:
            nxt = f"{LIST_PATH}?{urlencode([*base, ('pageToken', _token(next_key, filters))])}"
        pagination = {"next": nxt, "self": f"{LIST_PATH}?{urlencode(current)}"}
        return _Reply(200, {"operations": ops, "pagination": pagination})

    # --- sandbox control -----------------------------------------------------------------

    def _control(self, method: str, path: str, body: bytes) -> _Reply:
        sim = self.sim
        routes = {
            "/_sandbox/operations": ("POST",),
            "/_sandbox/operations/bulk": ("POST",),
            "/_sandbox/faults": ("GET", "POST", "DELETE"),
            "/_sandbox/requests": ("GET", "DELETE"),
        }
        if path not in routes:
            return _Reply(404, error_body(404))
        if method not in routes[path]:
            return _Reply(405, error_body(405), {"Allow": ", ".join(routes[path])})
        if method == "DELETE":
            (sim.clear_faults if path.endswith("faults") else sim.clear_requests)()
            return _Reply(200, {path.rsplit("/", 1)[1]: []})
        if path == "/_sandbox/requests":
            return _Reply(200, {"requests": sim.requests_log()})
        if method == "GET":
            return _Reply(200, {"faults": [f.to_json() for f in sim.faults()]})
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return _bad("body", "The body must be JSON.")
        try:
            if path == "/_sandbox/faults":
                fault = Fault.from_json(data)
                sim.add_fault(fault)
                return _Reply(201, fault.to_json())
            count, kwargs = _operation_kwargs(data, bulk=path.endswith("bulk"))
            ops = sim.add_operations(count, **kwargs)
        except SimulationError as exc:
            return _bad(exc.field, exc.message)
        if path.endswith("bulk"):
            return _Reply(201, {"ids": [op.id for op in ops]})
        return _Reply(201, ops[0].to_api(sim.clock()))


def _operation_kwargs(data: Any, bulk: bool) -> tuple[int, dict[str, Any]]:
    if not isinstance(data, dict):
        raise SimulationError("body", "The body must be a JSON object.")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        types = _OP_FIELDS.get(name) if name != ("id" if bulk else "count") else None
        if types is None:
            raise SimulationError(name, f"Unknown field {name!r}.")
        if name == "created_at" and isinstance(value, str):
            try:
                value = parse_instant(value)
            except ValueError:
                raise SimulationError(name, "created_at must be an ISO 8601 date-time.") from None
        elif isinstance(value, bool) or not isinstance(value, types):
            raise SimulationError(name, f"{name} has the wrong JSON type.")
        kwargs["op_id" if name == "id" else name] = value
    return kwargs.pop("count", 1), kwargs


def _token(key: SortKey, filters: dict[str, Any]) -> str:
    raw = json.dumps({"v": 1, "after": list(key), "filters": filters}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_token(token: str, filters: dict[str, Any]) -> SortKey | None:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except ValueError:  # binascii.Error, UnicodeDecodeError and JSONDecodeError included
        return None
    if not isinstance(data, dict) or data.get("v") != 1 or data.get("filters") != filters:
        return None
    after = data.get("after")
    if isinstance(after, list) and len(after) == 2:
        second, op_id = after
        if isinstance(second, int) and not isinstance(second, bool) and isinstance(op_id, str):
            return (second, op_id)
    return None


def _items(reply: _Reply, path: str) -> list[dict[str, Any]]:
    """The operations in a 200 answer (one for a fetch, a page's for List); none otherwise."""
    if reply.status != 200 or not isinstance(reply.payload, dict):
        return []
    if path == LIST_PATH:
        return list(reply.payload["operations"])
    return [reply.payload]


def _malformed(variant: str, reply: _Reply, path: str, now: float) -> _Reply:
    """Spoil a would-be answer; error answers are replaced by a sample so it always shows."""
    if variant == "not_json":
        return _Reply(200, b"<html><body>502 Bad Gateway</body></html>")
    payload = reply.payload if reply.status == 200 else None
    is_list = path == LIST_PATH
    if payload is None or (is_list and not payload["operations"]):
        match = FETCH_RE.match(path)
        op_id = unquote(match.group(1)) if match else EXAMPLE_ID
        op_id = op_id if OPERATION_ID_RE.fullmatch(op_id) else EXAMPLE_ID
        sample = SimulatedOperation(op_id, now, 1, 0.0).to_api(now)
        pagination = {"next": None, "self": path}
        payload = {"operations": [sample], "pagination": pagination} if is_list else sample
    ops: list[dict[str, Any]] = payload["operations"] if is_list else [payload]
    if variant == "wrong_content_type":
        return _Reply(200, payload, content_type="text/html; charset=utf-8")
    if variant == "missing_field":
        del payload["operations" if is_list else "status"]
    for op in ops:
        if variant == "negative_count":
            op["stats"]["queued"] = -1
        elif variant == "unknown_status":
            op["status"] = "PAUSED"
        elif variant == "bad_date":
            op["updatedAt"] = "not-a-date"
        elif variant == "wrong_id":
            other = "comms_operation_7" + "z" * 25
            op["id"] = "not-an-operation-id" if is_list else other
    return _Reply(200, payload)


class _AccountState:
    """What a test does with one account's state (``simulation``): its operations, faults and
    request log; the sandbox's first account and each ``SandboxAccount`` alike."""

    simulation: Simulation

    def add_operation(self, **kwargs: Any) -> SimulatedOperation:
        """Keywords of ``Simulation.add_operations`` (total, duration, fail_ratio, ...)."""
        return self.simulation.add_operation(**kwargs)

    def add_fault(self, fault: Fault) -> None:
        self.simulation.add_fault(fault)

    def clear_faults(self) -> None:
        self.simulation.clear_faults()

    def requests_log(self) -> list[dict[str, Any]]:
        return self.simulation.requests_log()

    def clear_requests(self) -> None:
        self.simulation.clear_requests()


class SandboxServer(_AccountState):
    """The sandbox served from a daemon thread; ``with SandboxServer() as sb: ...``."""

    def __init__(
        self,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        auth_token: str = DEFAULT_AUTH_TOKEN,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        duration: float = 20.0,
        clock: Clock = time.time,
        log_requests: bool = False,
        sleep: Sleep | None = None,
        log_ids: bool = False,
        ulid_ids: bool = False,
    ) -> None:
        """``log_ids``: each logged request carries the operation IDs its answer carried.
        ``ulid_ids``: new operations' IDs carry their createdAt (in ms) as ULIDs do.
        ``sleep``: how a ``slow`` fault waits (None: for real); with a fake ``clock``, its
        sleep makes slow answers take time on that clock without a test waiting.

        ``account_sid``/``auth_token`` is the first account; ``add_account`` adds more, each
        with its own operations, faults and request log (``SandboxAccount``), and
        ``add_api_key`` lets an API key (``SK…``) act for one."""
        self.account_sid, self._token = account_sid, auth_token
        self.host, self._port, self._log = host, port, log_requests
        self._sleep = sleep
        self._seed, self._duration, self._clock = seed, duration, clock
        self.simulation = Simulation(seed=seed, duration=duration, clock=clock)
        self._logins: dict[str, tuple[str | None, Simulation]] = {
            account_sid: (auth_token, self.simulation)
        }
        self.accounts: dict[str, SandboxAccount] = {
            account_sid: SandboxAccount(account_sid, self.simulation)
        }
        self._log_ids, self._ulid_ids = log_ids, ulid_ids
        self.simulation.log_ids, self.simulation.ulid_ids = log_ids, ulid_ids
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:  # never shows the token
        return f"SandboxServer(account_sid={self.account_sid!r}, host={self.host!r})"

    def add_account(self, account_sid: str, auth_token: str, *, seed: int = 0) -> SandboxAccount:
        """Serve one more account (another subaccount): its own operations (``seed`` at
        start), faults and request log, reached with its SID and Auth Token."""
        if account_sid in self.accounts:
            raise ValueError(f"account {account_sid} exists already")
        sim = Simulation(seed=seed, duration=self._duration, clock=self._clock, name=account_sid)
        sim.log_ids, sim.ulid_ids = self._log_ids, self._ulid_ids
        self._logins[account_sid] = (auth_token, sim)
        self.accounts[account_sid] = SandboxAccount(account_sid, sim)
        return self.accounts[account_sid]

    def add_api_key(self, account_sid: str, key_sid: str, secret: str) -> None:
        """Let the API key ``key_sid`` (with ``secret``) act for the account."""
        self._logins[key_sid] = (secret, self.accounts[account_sid].simulation)

    def revoke(self, user: str) -> None:
        """Revoke a login (an account SID's token or an API key): its requests are 401s,
        logged in its account's request log."""
        self._logins[user] = (None, self._logins[user][1])

    def restore(self, user: str, secret: str, account_sid: str) -> None:
        """Accept a login again (an account SID or an API key of ``account_sid``)."""
        self._logins[user] = (secret, self.accounts[account_sid].simulation)

    def start(self) -> SandboxServer:
        """Bind and serve in a daemon thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError("sandbox already started")
        httpd = _Server(
            (self.host, self._port), self.simulation, self._logins, self._log, self._sleep
        )
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut open connections (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("sandbox not started")
        return int(self._httpd.server_address[1])

    @property
    def root_url(self) -> str:
        """``http://HOST:PORT`` (control endpoints live under ``/_sandbox``)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"


@dataclass(frozen=True)
class SandboxAccount(_AccountState):
    """One account of a sandbox: its operations, faults and request log."""

    account_sid: str
    simulation: Simulation


def parse_account(text: str) -> tuple[str, str, tuple[str, str] | None]:
    """``SID:TOKEN`` or ``SID:TOKEN:KEYSID:KEYSECRET`` (`optrack sandbox --account`)."""
    parts = text.split(":")
    if len(parts) not in (2, 4) or not all(parts):
        raise ValueError("an account is SID:TOKEN or SID:TOKEN:KEY_SID:KEY_SECRET")
    key = (parts[2], parts[3]) if len(parts) == 4 else None
    return parts[0], parts[1], key


def serve_forever(
    host: str = "127.0.0.1",
    port: int = 0,
    account_sid: str = DEFAULT_ACCOUNT_SID,
    auth_token: str = DEFAULT_AUTH_TOKEN,
    seed: int = 0,
    duration: float = 20.0,
    *,
    log_requests: bool = False,
    log_ids: bool = False,
    ulid_ids: bool = False,
    accounts: tuple[tuple[str, str, tuple[str, str] | None], ...] = (),
) -> None:
    """Serve until SIGINT/SIGTERM, after printing ``sandbox listening on <base_url>``."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    sandbox = SandboxServer(
        account_sid,
        auth_token,
        host,
        port,
        seed,
        duration,
        log_requests=log_requests,
        log_ids=log_ids,
        ulid_ids=ulid_ids,
    )
    for sid, token, key in accounts:
        sandbox.add_account(sid, token, seed=seed)
        if key is not None:
            sandbox.add_api_key(sid, *key)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        sandbox.start()
        print(f"sandbox listening on {sandbox.base_url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        sandbox.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
