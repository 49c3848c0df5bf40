"""What keeps other web sites out: the Host header checked, JSON required to change state.

A page on another site can make a browser send a "simple" cross-site request (a POST with a
``text/plain`` or form body) without asking first, and can point a name of its own at
127.0.0.1 (DNS rebinding) to read the answers: with `--no-auth` either would reach the API.
So every request must name an address this server serves in its Host header (400 otherwise),
and every request that changes state must say ``Content-Type: application/json``, which no
page can send to another origin without a CORS preflight (415 otherwise), token or not.
"""

from __future__ import annotations

import ipaddress
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from worker.settings import is_loopback

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def split_host(header: str) -> tuple[str, int | None] | None:
    """``Host`` as (lower-case name, port or None); None if it is not a host[:port]."""
    text = header.strip().lower()
    if text.startswith("["):  # [v6]:port
        name, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, sep, port_text = text.rpartition(":") if ":" in text else (text, "", None)
        if sep and ":" in name:
            return None  # an IPv6 address must be in brackets
    if port_text is not None and not (port_text.isascii() and port_text.isdigit()):
        return None
    name = name.rstrip(".")
    if not name:
        return None
    return name, None if port_text is None else int(port_text)


def _same_address(name: str, address: str) -> bool:
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(address)
    except ValueError:
        return name == address.lower()


def host_allowed(
    header: str | None, server: tuple[str, int] | None, allowed: frozenset[str]
) -> bool:
    """True if ``header`` names this server: a name in ``allowed`` (any port), or the address
    the connection came to (``server``, from the socket) with its port, or a loopback name when
    that address is loopback."""
    parsed = None if header is None else split_host(header)
    if parsed is None:
        return False
    name, port = parsed
    if name in allowed:
        return True
    if server is None:
        return False
    address, served_port = server[0], server[1]
    if (80 if port is None else port) != served_port:
        return False
    if _same_address(name, address):
        return True
    return is_loopback(address) and name in LOOPBACK_NAMES


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


async def _refuse(send: Send, status: int, reason: str) -> None:
    body = json.dumps({"errors": [{"reason": reason}]}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class SameSiteGuard:
    """Answer 400 to a foreign Host and 415 to a state-changing request that is not JSON."""

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...] = ()) -> None:
        self.app = app
        self.allowed = frozenset(h.lower().strip("[]").rstrip(".") for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        raw_host = headers.get(b"host")
        host = None if raw_host is None else raw_host.decode("latin-1")
        server = scope.get("server")
        if not host_allowed(host, tuple(server) if server else None, self.allowed):
            shown = "no Host header" if host is None else f"Host {host[:100]!r}"
            await _refuse(
                send,
                400,
                f"{shown} names no address this server answers for; call it by the address "
                "it listens on, or add the name to OPTRACK_HTTP_ALLOWED_HOSTS",
            )
            return
        if scope["method"] not in SAFE_METHODS:
            given = headers.get(b"content-type", b"").decode("latin-1")
            if _media_type(given) != "application/json":
                await _refuse(
                    send,
                    415,
                    "send Content-Type: application/json (got "
                    + (repr(given[:100]) if given else "none")
                    + "): a request that changes state must be JSON",
                )
                return
        await self.app(scope, receive, send)
