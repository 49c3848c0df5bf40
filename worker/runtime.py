"""The parts one process needs, built once from Settings: engine, sessions, gate, client."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from worker.client import ApiClient, Timeouts
from worker.clock import Clock, SystemClock
from worker.db import make_engine, make_sessionmaker
from worker.repository import DbGate
from worker.retry_after import RetryPolicy
from worker.settings import Settings, ensure_sqlite_dirs
from worker.tracking import Poller, PollPolicy


@dataclass
class Runtime:
    """Lazily built, process-wide parts; call ``close`` when done."""

    settings: Settings
    clock: Clock = field(default_factory=SystemClock)

    @cached_property
    def engine(self) -> Engine:
        ensure_sqlite_dirs(self.settings)
        return make_engine(self.settings.database_url)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return make_sessionmaker(self.engine)

    @cached_property
    def gate(self) -> DbGate:
        return DbGate(self.engine, self.settings.account_sid, self.clock)

    @cached_property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_retry_after=self.settings.max_retry_after,
            max_inplace_wait=self.settings.max_inplace_wait,
        )

    @cached_property
    def poll_policy(self) -> PollPolicy:
        return PollPolicy(
            interval=timedelta(seconds=self.settings.poll_interval),
            retry=self.retry_policy,
            lease=timedelta(seconds=max(60.0, 4 * self.settings.read_timeout)),
        )

    @cached_property
    def client(self) -> ApiClient:
        return ApiClient(
            self.settings.api_base_url,
            self.settings.account_sid,
            self.settings.auth_token,
            timeouts=Timeouts(self.settings.connect_timeout, self.settings.read_timeout),
            policy=self.retry_policy,
            gate=self.gate,
            clock=self.clock,
        )

    @cached_property
    def poller(self) -> Poller:
        return Poller(self.sessions, self.client, self.poll_policy)

    def close(self) -> None:
        """Release pooled connections."""
        cache: dict[str, Any] = self.__dict__
        if "client" in cache:
            self.client.close()
        if "engine" in cache:
            self.engine.dispose()
