"""Logging: one line per event, the Celery task ID and operation ID bound, secrets redacted.

``OPTRACK_LOG_FORMAT=json`` writes one JSON object per line for machines; the default is text.
Celery's ``setup_logging`` signal hands the configuration to ``configure`` (so Celery installs
no handler of its own); ``task_prerun``/``task_postrun`` bind the running task's ID into a
context variable that every line of that task carries. ``bound_operation`` (or
``extra={"operation_id": ...}``) binds an operation ID the same way.
"""

from __future__ import annotations

import base64
import contextvars
import json
import logging
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any

from celery.signals import setup_logging, task_postrun, task_prerun

from worker.settings import Settings

REDACTED = "***"
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(context)s%(message)s"

_task_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("task_id", default=None)
_task_name: contextvars.ContextVar[str | None] = contextvars.ContextVar("task_name", default=None)
_operation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "operation_id", default=None
)


@contextmanager
def bound_operation(operation_id: str) -> Iterator[None]:
    """Within the block, every log line carries ``operation_id``."""
    token = _operation_id.set(operation_id)
    try:
        yield
    finally:
        _operation_id.reset(token)


def bind_task(task_id: str | None, task_name: str | None) -> None:
    """Bind (or with None, clear) the running Celery task for the lines that follow."""
    _task_id.set(task_id)
    _task_name.set(task_name)


class ContextFilter(logging.Filter):
    """Adds ``task_id``, ``task_name``, ``operation_id`` and a text ``context`` to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in (
            ("task_id", _task_id),
            ("task_name", _task_name),
            ("operation_id", _operation_id),
        ):
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        parts = [
            f"{key}={getattr(record, attr)} " for key, attr in _CONTEXT if getattr(record, attr)
        ]
        record.context = "".join(parts)
        return True


_CONTEXT = (("task", "task_id"), ("op", "operation_id"))


def secret_variants(settings: Settings) -> tuple[str, ...]:
    """The configured secrets, and the Basic auth header value that embeds the token."""
    variants = list(settings.secrets)
    if settings.auth_token:
        pair = f"{settings.account_sid}:{settings.auth_token}".encode()
        variants.append(base64.b64encode(pair).decode())
    if settings.api_key_secret:
        pair = f"{settings.api_key_sid}:{settings.api_key_secret}".encode()
        variants.append(base64.b64encode(pair).decode())
    return tuple(variants)


def basic_variants(username: str, password: str) -> tuple[str, ...]:
    """A secret and the Basic auth header value that embeds it."""
    pair = base64.b64encode(f"{username}:{password}".encode()).decode()
    return (password, pair) if password else ()


_FILTERS: weakref.WeakSet[RedactFilter] = weakref.WeakSet()


def redact_everywhere(secrets: Iterable[str]) -> None:
    """Add ``secrets`` (a stored account's, opened at run time) to every redacting filter of
    this process, present and future: they never reach a log line either."""
    values = {s for s in secrets if s}
    _LATER.update(values)
    for found in list(_FILTERS):
        found.secrets = sorted({*found.secrets, *values}, key=len, reverse=True)


_LATER: set[str] = set()


class RedactFilter(logging.Filter):
    """Replaces every configured secret in a record's message and traceback by ``***``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is replaced whole.
        self.secrets = sorted({*(s for s in secrets if s), *_LATER}, key=len, reverse=True)
        _FILTERS.add(self)

    def _clean(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        cleaned = self._clean(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._clean(record.exc_text)
        if record.stack_info:
            record.stack_info = self._clean(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, task and operation, error."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        for name in ("task_id", "task_name", "operation_id"):
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["error"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str)


def redact_logger(name: str, secrets: Iterable[str]) -> None:
    """Redact ``secrets`` from every record logger ``name`` makes, whatever handler gets it
    (ours, or an embedding application's): one filter per logger, its secrets added to."""
    logger = logging.getLogger(name)
    for existing in logger.filters:
        if isinstance(existing, RedactFilter):
            merged = {*existing.secrets, *(s for s in secrets if s)}
            existing.secrets = sorted(merged, key=len, reverse=True)
            return
    logger.addFilter(RedactFilter(secrets))


def make_handler(settings: Settings, stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler with our filters and the configured format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactFilter(secret_variants(settings)))
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    return handler


def configure(
    settings: Settings, level: int | str = logging.INFO, stream: IO[str] | None = None
) -> logging.Handler:
    """Make the root logger write through one handler of ours (replacing any others)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = make_handler(settings, stream)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def _on_task_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    bind_task(task_id, getattr(task, "name", None))


def _on_task_postrun(**_: Any) -> None:
    bind_task(None, None)


def connect_celery_signals(settings: Callable[[], Settings]) -> None:
    """Route Celery's logging setup and task start/end through this module; ``settings``
    gives the process's settings (read once, by the app)."""

    def _on_setup_logging(
        loglevel: int | str | None = None, logfile: str | None = None, **_: Any
    ) -> None:
        stream: IO[str] | None = None
        if logfile:
            stream = open(logfile, "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the process)
        configure(settings(), loglevel or logging.INFO, stream)

    setup_logging.connect(_on_setup_logging, weak=False)
    task_prerun.connect(_on_task_prerun, weak=False)
    task_postrun.connect(_on_task_postrun, weak=False)
