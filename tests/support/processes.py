"""Real processes for end-to-end tests: the sandbox, Celery workers and beat, as subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from tests.support.services import SID, TOKEN

CELERY = [sys.executable, "-m", "celery", "-A", "worker.celery_app"]


class Sandbox:
    """A sandbox API running as `optrack sandbox` in its own process, driven over HTTP."""

    def __init__(
        self, process: subprocess.Popen[str], base_url: str, auth: tuple[str, str] = (SID, TOKEN)
    ) -> None:
        self.process = process
        self.base_url = base_url
        self.root = base_url.removesuffix("/v1")
        self.http = requests.Session()
        self.http.auth = auth  # the account it acts on: its operations, faults and log

    def as_account(self, user: str, secret: str) -> Sandbox:
        """The same sandbox, acting on another of its accounts."""
        return Sandbox(self.process, self.base_url, (user, secret))

    def create(self, **fields: Any) -> str:
        """Create one operation; returns its ID."""
        response = self.http.post(f"{self.root}/_sandbox/operations", json=fields, timeout=5)
        response.raise_for_status()
        return str(response.json()["id"])

    def fault(self, **fields: Any) -> None:
        """Queue a fault (see the README's sandbox table)."""
        self.http.post(f"{self.root}/_sandbox/faults", json=fields, timeout=5).raise_for_status()

    def clear_faults(self) -> None:
        """Drop the faults not consumed yet."""
        self.http.delete(f"{self.root}/_sandbox/faults", timeout=5).raise_for_status()

    def pending_faults(self) -> list[dict[str, Any]]:
        """The faults not consumed yet."""
        response = self.http.get(f"{self.root}/_sandbox/faults", timeout=5)
        response.raise_for_status()
        return list(response.json()["faults"])

    def requests(self) -> list[dict[str, Any]]:
        """The API request log."""
        response = self.http.get(f"{self.root}/_sandbox/requests", timeout=5)
        response.raise_for_status()
        return list(response.json()["requests"])


def base_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of our processes: nothing inherited from OPTRACK_*/TWILIO_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(
        {
            "OPTRACK_HOME": str(tmp / "home"),
            "TWILIO_ACCOUNT_SID": SID,
            "TWILIO_AUTH_TOKEN": TOKEN,
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


@contextmanager
def sandbox_process(env: dict[str, str], log: Path, *args: str) -> Iterator[Sandbox]:
    """Start `optrack sandbox --port 0 ARGS` and wait for the line that gives its URL."""
    with log.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "sandbox", "--port", "0", "--seed", "0", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        process.wait(timeout=30)
        process.stdout.close()  # else its pipe is collected later, a warning in another test
        raise RuntimeError(f"sandbox did not start: {line!r}; see {log}")
    try:
        yield Sandbox(process, line.split("listening on", 1)[1].strip())
    finally:
        stop(process)
        process.stdout.close()


@contextmanager
def celery_process(
    args: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `celery -A worker.celery_app ARGS` with its output in ``log``; stopped at exit."""
    with log.open("ab") as out:
        process = subprocess.Popen([*CELERY, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        stop(process)


def worker_args(name: str, concurrency: int = 1, loglevel: str = "INFO") -> list[str]:
    """Arguments of a worker process named ``name``."""
    return [
        "worker",
        f"--hostname={name}@%h",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def beat_args(schedule: Path) -> list[str]:
    """Arguments of a beat process with its schedule file under the test's folder."""
    return ["beat", "--loglevel=INFO", f"--schedule={schedule}"]


def stop(process: subprocess.Popen[Any], timeout: float = 20) -> None:
    """SIGTERM (warm shutdown), then SIGKILL if it does not exit."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.25
) -> None:
    """Wait until ``condition()`` is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Served:
    """`optrack serve` running in its own process; ``lines`` are the first lines it printed."""

    def __init__(self, process: subprocess.Popen[str], lines: list[str]) -> None:
        self.process = process
        self.lines = lines
        self.url = lines[0].split("listening on", 1)[1].strip()


@contextmanager
def serve_process(env: dict[str, str], log: Path, *args: str) -> Iterator[Served]:
    """Start `optrack serve --port 0 ARGS`, read the lines that give its address; its log (the
    access log) goes to ``log``."""
    with log.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "serve", "--port", "0", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    assert process.stdout is not None
    lines = [process.stdout.readline() for _ in range(3)]
    if "listening on" not in lines[0]:
        process.kill()
        process.wait(timeout=30)
        process.stdout.close()
        raise RuntimeError(f"optrack serve did not start: {lines!r}; see {log}")
    try:
        yield Served(process, lines)
    finally:
        stop(process)
        process.stdout.close()
