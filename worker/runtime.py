"""The parts one process needs, built once from Settings: engine, sessions, gate, client."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from worker import notices
from worker.account import DbBudget, DbGate
from worker.client import ApiClient, Timeouts
from worker.clock import Clock, SystemClock
from worker.db import ensure_sqlite_dirs, make_engine, make_sessionmaker
from worker.metrics import Metrics
from worker.poller import Poller
from worker.recorder import Recorder
from worker.retry_after import RetryPolicy
from worker.settings import Settings
from worker.shutdown import Stop
from worker.tracking import PollPolicy


@dataclass
class Runtime:
    """Lazily built, process-wide parts; call ``close`` when done."""

    settings: Settings
    clock: Clock = field(default_factory=SystemClock)
    # Asked by a signal (a stopping worker's pool process); a poll in flight ends at once.
    stop: Stop = field(default_factory=Stop)

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
        s = self.settings
        return PollPolicy(
            interval=timedelta(seconds=s.poll_interval),
            max_interval=timedelta(seconds=s.poll_max_interval),
            retry=self.retry_policy,
            # A message stops calling in the lease's last quarter and writes what it has.
            lease=timedelta(seconds=s.claim_lease),
            resend_after=timedelta(seconds=s.resend_after),
            bad_request_first=timedelta(seconds=s.bad_request_backoff),
            bad_request_max=timedelta(seconds=s.bad_request_max_backoff),
            fetch_group=s.batch_size,
            strategy=s.poll_strategy,
            list_threshold=s.list_threshold,
            pending_lookback=timedelta(seconds=s.pending_lookback),
            clock_allowance=timedelta(seconds=s.clock_allowance),
            not_found_grace=timedelta(seconds=s.not_found_grace),
            request_time=timedelta(seconds=s.request_deadline + s.max_inplace_wait),
            claim_ahead=timedelta(seconds=s.tick_interval),
        )

    @cached_property
    def metrics(self) -> Metrics:
        if self.settings.metrics_dir is not None:  # multiprocess mode writes files there
            Path(self.settings.metrics_dir).mkdir(parents=True, exist_ok=True)
        return Metrics()

    @cached_property
    def client(self) -> ApiClient:
        return ApiClient(
            self.settings.api_base_url,
            self.settings.account_sid,
            self.settings.auth_token,
            timeouts=Timeouts(
                self.settings.connect_timeout,
                self.settings.read_timeout,
                self.settings.request_deadline,
            ),
            policy=self.retry_policy,
            gate=self.gate,
            clock=self.clock,
            observer=self.metrics,
            budget=self.budget,
        )

    @cached_property
    def budget(self) -> DbBudget | None:
        rate = self.settings.max_requests_per_second
        return None if rate is None else DbBudget(self.engine, self.settings.account_sid, rate)

    @cached_property
    def recorder(self) -> Recorder:
        # Completion notices go into the outbox in the transaction that ends the operation when
        # this process has a channel (OPTRACK_NOTIFY_TASK, OPTRACK_WEBHOOK_URL), or another
        # one that has was alive lately (notices.DELIVERY_REMEMBERED): never where none is.
        hook = notices.end_hook if self.settings.notices_enabled else notices.end_hook_if_delivered
        return Recorder(self.sessions, self.poll_policy, [hook])

    @cached_property
    def poller(self) -> Poller:
        return Poller(
            self.sessions, self.client, self.poll_policy, self.clock, self.recorder, self.stop
        )

    def close(self) -> None:
        """Release pooled connections."""
        cache: dict[str, Any] = self.__dict__
        if "client" in cache:
            self.client.close()
        if "engine" in cache:
            self.engine.dispose()
