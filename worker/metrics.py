"""Prometheus metrics: counters counted where things happen, gauges read from the database.

Counters (API answers, pauses, polls, history rows, notices) live in a ``Metrics`` object, one
per process, injected where they are counted (the API client takes it as its observer). With
several worker processes, prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``)
keeps each process's counts in a file of that folder and the scrape adds them up. Gauges
(operations by status, polling lag, pending notices, beat's last tick) are read from the
database at scrape time, so every process and every machine reports the same truth.
The worker's main process serves both on ``OPTRACK_METRICS_HOST:OPTRACK_METRICS_PORT``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy.orm import Session, sessionmaker

from worker import health
from worker.clock import Clock, SystemClock
from worker.credentials import DEFAULT_ACCOUNT
from worker.db import DatabaseError, make_engine, make_sessionmaker
from worker.settings import Settings
from worker.tracking import ALL_STATES, Outcome, PollCounts

log = logging.getLogger(__name__)
PAUSE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class Metrics:
    """The counters of one process; also the ``ApiObserver`` of its API client."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.api_responses = Counter(
            "optrack_api_responses",
            "API requests by account, endpoint (fetch, list) and HTTP status code (none: no "
            "answer)",
            ["account", "endpoint", "code"],
            registry=r,
        )
        self.pauses = Counter(
            "optrack_account_pauses",
            "Account pauses after a 409/429/503, by account and status code",
            ["account", "code"],
            registry=r,
        )
        self.pause_seconds = Histogram(
            "optrack_account_pause_seconds",
            "Length of each account pause (Retry-After, or backoff without one)",
            buckets=PAUSE_BUCKETS,
            registry=r,
        )
        self.polls = Counter(
            "optrack_polls", "Polls of one operation, by outcome", ["outcome"], registry=r
        )
        self.history_rows = Counter(
            "optrack_history_rows_written", "Operation history rows written", registry=r
        )
        self.discovered = Counter(
            "optrack_discovered_operations",
            "Operations that discovery started tracking",
            registry=r,
        )
        self.notices = Counter(
            "optrack_notice_deliveries",
            "Completion notice delivery attempts, by result (delivered, failed)",
            ["result"],
            registry=r,
        )
        self.pruned = Counter(
            "optrack_history_rows_pruned", "History rows deleted by retention", registry=r
        )
        for outcome in Outcome:  # every outcome shows up, at 0 until it happens
            self.polls.labels(outcome.value)

    def answered(self, endpoint: str, status: int | None, account: str = DEFAULT_ACCOUNT) -> None:
        """Count one API request and its status (the client's observer hook)."""
        code = "none" if status is None else str(status)
        self.api_responses.labels(account, endpoint, code).inc()

    def paused(self, seconds: float, status: int, account: str = DEFAULT_ACCOUNT) -> None:
        """Count one account pause and its length (the client's observer hook)."""
        self.pauses.labels(account, str(status)).inc()
        self.pause_seconds.observe(seconds)

    def for_account(self, account: str) -> AccountObserver:
        """The observer of ``account``'s client: its counts carry ``account``."""
        return AccountObserver(self, account)

    def observe_polls(self, counts: PollCounts) -> None:
        """Count what one poll message did to its operations, and the history it wrote."""
        for outcome, count in counts.outcomes.items():
            if count:
                self.polls.labels(outcome.value).inc(count)
        self.history_rows.inc(counts.history_rows)


@dataclass(frozen=True)
class AccountObserver:
    """An ``ApiObserver`` counting into ``metrics`` under one account's label."""

    metrics: Metrics
    account: str

    def answered(self, endpoint: str, status: int | None) -> None:
        """One request of this account ended."""
        self.metrics.answered(endpoint, status, self.account)

    def paused(self, seconds: float, status: int) -> None:
        """A 409/429/503 paused this account."""
        self.metrics.paused(seconds, status, self.account)


class DatabaseCollector:
    """Gauges read from the database at scrape time."""

    def __init__(
        self, sessions: sessionmaker[Session], clock: Clock, account_sid: str = ""
    ) -> None:
        self.sessions = sessions
        self.clock = clock
        self.account_sid = account_sid

    def collect(self) -> Iterator[Metric]:
        """Yield the gauges; only ``optrack_database_up 0`` if the database does not answer."""
        up = GaugeMetricFamily("optrack_database_up", "1 if the database answered this scrape")
        now = self.clock.now()
        try:
            with self.sessions() as session:
                read = health.gauges(session, self.account_sid, now)
        except DatabaseError as exc:
            log.warning("metrics: the database did not answer: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        operations = GaugeMetricFamily(
            "optrack_operations", "Tracked operations by status", labels=["status"]
        )
        for status in ALL_STATES:
            operations.add_metric([status], read.counts.get(status, 0))
        yield operations
        yield GaugeMetricFamily(
            "optrack_poll_lag_seconds",
            "How late the most overdue poll of an active operation is (0: none overdue)",
            value=read.poll_lag,
        )
        yield GaugeMetricFamily(
            "optrack_notices_pending",
            "Completion notices not delivered yet",
            value=read.notices_pending,
        )
        yield GaugeMetricFamily(
            "optrack_processing_unchanged_seconds",
            "How long the least recently changed PROCESSING operation has not changed (API "
            "updatedAt; 0: none)",
            value=read.processing_unchanged,
        )
        paused = GaugeMetricFamily(
            "optrack_account_paused",
            "1 while the account is paused (409/429/503 Retry-After, or 401/403)",
            labels=["account"],
        )
        rejected = GaugeMetricFamily(
            "optrack_credentials_rejected",
            "1 while the account's credentials stand rejected (a 401/403 until a 200)",
            labels=["account"],
        )
        active = GaugeMetricFamily(
            "optrack_account_active_operations",
            "The account's operations still PENDING or PROCESSING",
            labels=["account"],
        )
        for account in read.accounts:
            paused.add_metric([account.name], 1 if account.paused else 0)
            rejected.add_metric([account.name], 1 if account.credentials_rejected else 0)
            active.add_metric([account.name], account.active)
        yield paused
        yield rejected
        yield active
        yield GaugeMetricFamily(
            "optrack_dead_letters",
            "Task messages given up on and not replayed yet (optrack dead-letters)",
            value=read.dead_letters,
        )
        if read.beat_at is not None:
            yield GaugeMetricFamily(
                "optrack_beat_last_tick_timestamp_seconds",
                "When beat's tick last ran (Unix time)",
                value=read.beat_at.timestamp(),
            )
        up.add_metric([], 1)
        yield up


def build_registry(
    sessions: sessionmaker[Session],
    clock: Clock,
    *,
    multiproc_dir: str | None,
    local: Metrics | None = None,
    account_sid: str = "",
) -> CollectorRegistry:
    """What a scrape shows: every process's counters (or ``local``'s), and the DB gauges."""
    registry = CollectorRegistry()
    if multiproc_dir is not None:
        # prometheus_client leaves this constructor unannotated.
        MultiProcessCollector(registry, path=multiproc_dir)  # type: ignore[no-untyped-call]
    elif local is not None:
        registry.register(local.registry)
    registry.register(DatabaseCollector(sessions, clock, account_sid))
    return registry


@dataclass
class MetricsServer:
    """The HTTP server of ``/metrics``, on a daemon thread."""

    httpd: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The bound port (useful when 0 was asked)."""
        return int(self.httpd.server_address[1])

    def close(self) -> None:
        """Stop serving and release the port."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def serve(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve ``registry`` on ``host:port`` (0 picks a free port)."""
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(httpd, thread)


def prepare_multiproc_dir(folder: str) -> None:
    """Create the folder and drop the previous run's files (prometheus_client's rule)."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)


def start_worker_server(settings: Settings, clock: Clock | None = None) -> MetricsServer | None:
    """Serve the metrics from a worker's main process, before it forks; None if turned off."""
    if settings.metrics_port is None:
        return None
    if settings.metrics_dir is not None:
        prepare_multiproc_dir(settings.metrics_dir)
    # No pooled connection: forked children must not inherit a socket this thread uses.
    engine = make_engine(settings.database_url, pooled=False)
    registry = build_registry(
        make_sessionmaker(engine),
        clock or SystemClock(),
        multiproc_dir=settings.metrics_dir,
        account_sid=settings.account_sid,
    )
    server = serve(registry, settings.metrics_host, settings.metrics_port)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, server.port)
    return server
