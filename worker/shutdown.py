"""A process's request to stop, set by a signal and honoured by work that can end early.

A poll must not hold a worker's shutdown for the length of its claim: a request in flight,
or an in-place wait for Retry-After, is interrupted (``ShutdownRequested`` is raised in it);
anything else sees ``requested`` at its next check and ends what it does, writing what it has.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class ShutdownRequested(Exception):
    """Raised when the process was asked to stop: in an interruptible section, or at a check."""


class Stop:
    """One per process: ``request`` (from a signal handler) and the checks that honour it."""

    def __init__(self) -> None:
        self._requested = False
        self._interruptible = 0

    @property
    def requested(self) -> bool:
        """True once the process was asked to stop."""
        return self._requested

    def request(self) -> None:
        """Ask this process to stop; raises ShutdownRequested inside an interruptible section
        (a signal handler calls it, so the wait it interrupts ends at once)."""
        self._requested = True
        if self._interruptible:
            raise ShutdownRequested

    def check(self) -> None:
        """Raise ShutdownRequested if the process was asked to stop."""
        if self._requested:
            raise ShutdownRequested

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A section that a stop request ends at once (an API call and its waits)."""
        self.check()
        self._interruptible += 1
        try:
            yield
        finally:
            self._interruptible -= 1
