"""Running the app: uvicorn on a socket bound here, so port 0 reports the port it got."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6; 0 picks a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when the proto
    # says TCP; without it every answer waits ~40 ms for Nagle and delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket) -> str:
    """The http:// address a socket from ``bind`` serves."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def config(app: FastAPI, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for optrack: no server header, our logging, a bounded shutdown."""
    return uvicorn.Config(
        app,
        log_level=log_level.lower(),
        server_header=False,
        proxy_headers=False,  # no proxy is trusted unless one is put in front on purpose
        timeout_graceful_shutdown=5,
        log_config=None,  # logging is set up by worker.logs (secrets redacted)
    )


def run(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM."""
    uvicorn.Server(config(app, log_level)).run(sockets=[sock])


@dataclass
class Running:
    """An app served on a thread (tests, the demo)."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        """Ask uvicorn to stop, and wait for it."""
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[Running]:
    """Serve ``app`` on a daemon thread for the duration of the block."""
    sock = bind(host, port)
    server = uvicorn.Server(config(app, "warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started and thread.is_alive():
            thread.join(0.02)
        if not server.started:
            raise RuntimeError("the HTTP app did not start")
        yield Running(url(sock), server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
