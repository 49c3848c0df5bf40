"""The parts one process needs, built once from Settings: engine, sessions, gate, client."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from worker import logs, notices
from worker.account import DbBudget, DbGate
from worker.accounts import Accounts, credentials_of
from worker.client import ApiClient, Timeouts
from worker.clock import Clock, SystemClock
from worker.credentials import DEFAULT_ACCOUNT, Credentials
from worker.db import ensure_sqlite_dirs, make_engine, make_sessionmaker
from worker.metrics import Metrics
from worker.poller import Poller
from worker.recorder import Recorder
from worker.retry_after import RetryPolicy
from worker.settings import Settings
from worker.shutdown import Stop
from worker.tracking import PollPolicy


@dataclass(frozen=True)
class _Built:
    """A client built for one account, and what it was built from (rebuilt when that moves)."""

    credentials: Credentials
    rate: float | None
    client: ApiClient


@dataclass
class Runtime:
    """Lazily built, process-wide parts; call ``close`` when done."""

    settings: Settings
    clock: Clock = field(default_factory=SystemClock)
    # Asked by a signal (a stopping worker's pool process); a poll in flight ends at once.
    stop: Stop = field(default_factory=Stop)
    _clients: dict[str, _Built] = field(default_factory=dict, repr=False)
    _gates: dict[str, DbGate] = field(default_factory=dict, repr=False)

    @cached_property
    def engine(self) -> Engine:
        ensure_sqlite_dirs(self.settings)
        return make_engine(self.settings.database_url)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return make_sessionmaker(self.engine)

    @property
    def gate(self) -> DbGate:
        """The default account's pause (the environment's SID)."""
        return self.gate_for(self.settings.account_sid)

    def gate_for(self, account_sid: str) -> DbGate:
        """The pause of the account with this SID, one per process (it keeps what it saw)."""
        if account_sid not in self._gates:
            self._gates[account_sid] = DbGate(self.engine, account_sid, self.clock)
        return self._gates[account_sid]

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
            intake_lookback=timedelta(seconds=s.intake_lookback),
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

    def paused_accounts(self, now: datetime) -> dict[str, tuple[datetime, str]]:
        """The accounts paused at ``now``, by name: (until, reason). The default account's
        pause is also asked of its gate, which holds it while the database cannot."""
        with self.sessions() as session:
            paused = Accounts(session).paused(now, self.settings.account_sid)
        own = self.gate.paused_until(now)
        if own is not None and DEFAULT_ACCOUNT not in paused:
            paused[DEFAULT_ACCOUNT] = own
        return paused

    @property
    def client(self) -> ApiClient:
        """The default account's client (the environment's credentials)."""
        return self.client_for(DEFAULT_ACCOUNT)

    def client_for(self, account: str) -> ApiClient:
        """The client with ``account``'s credentials, its pause and its request budget.

        The default account's are the environment's. Another's row is read each time (one
        primary-key read per poll): a secret rotated
        by `optrack accounts set-secret`, or a budget changed, is used from the next poll on.
        UnknownAccount if it was removed; ConfigError if no key of OPTRACK_SECRET_KEY opens
        its secret.
        """
        rate = self.settings.max_requests_per_second
        if account == DEFAULT_ACCOUNT:  # all from the environment: no database needed
            credentials = self.settings.default_credentials
        else:
            with self.sessions() as session:
                row = Accounts(session).get(account)
                credentials = credentials_of(row, self.settings)
                rate = row.max_requests_per_second or rate
        built = self._clients.get(account)
        if built is not None and (built.credentials, built.rate) == (credentials, rate):
            return built.client
        if built is not None:
            built.client.close()
        if account != DEFAULT_ACCOUNT:  # the environment's are redacted from the start
            logs.redact_everywhere(logs.basic_variants(credentials.username, credentials.password))
        sid = credentials.account_sid
        client = ApiClient(
            self.settings.api_base_url,
            credentials.username,
            credentials.password,
            timeouts=Timeouts(
                self.settings.connect_timeout,
                self.settings.read_timeout,
                self.settings.request_deadline,
            ),
            policy=self.retry_policy,
            gate=self.gate_for(sid),
            clock=self.clock,
            observer=self.metrics.for_account(account),
            budget=None if rate is None else DbBudget(self.engine, sid, rate),
            credentials_hint=(
                "check TWILIO_*"
                if account == DEFAULT_ACCOUNT
                else f"account {account}: check `optrack accounts set-secret {account}`"
            ),
        )
        self._clients[account] = _Built(credentials, rate, client)
        return client

    @property
    def budget(self) -> DbBudget | None:
        """The default account's request budget, if it has one."""
        budget = self.client.budget
        return budget if isinstance(budget, DbBudget) else None

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
            self.sessions,
            self.client,
            self.poll_policy,
            self.clock,
            self.recorder,
            self.stop,
            clients=self.client_for,
        )

    def close(self) -> None:
        """Release pooled connections."""
        cache: dict[str, Any] = self.__dict__
        for built in self._clients.values():
            built.client.close()
        self._clients.clear()
        if "engine" in cache:
            self.engine.dispose()
