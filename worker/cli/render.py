"""Turning tracked operations and history rows into tables, JSON and CSV."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime

from rich.console import Console
from rich.table import Table

from worker.db import AccountPause
from worker.errors import CONFIG_ERROR_STATUS
from worker.reports.formats import STATUS_COLORS
from worker.reports.model import OperationState


def _short(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def status_table(
    rows: Sequence[OperationState], *, total: int | None = None, header: bool = True
) -> Table:
    """One line per tracked operation; a page of ``total`` (the first page has the header)."""
    title = f"{len(rows) if total is None else total} tracked operation(s)" if header else None
    table = Table(title=title, title_justify="left", show_header=header)
    table.add_column("operation", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for name in ("created", "failed", "queued", "total"):
        table.add_column(name, justify="right")
    table.add_column("polls", justify="right")
    table.add_column("confirmed (UTC)", no_wrap=True)
    table.add_column("next poll / ended (UTC)", no_wrap=True)
    table.add_column("last error", overflow="fold", max_width=40)
    for row in rows:
        errors = f" ({row.consecutive_errors} in a row)" if row.consecutive_errors else ""
        table.add_row(
            row.id,
            styled_status(row.status),
            _count(row.created),
            _count(row.failed),
            _count(row.queued),
            _count(row.total),
            str(row.polls),
            _short(row.last_polled_at),
            _short(row.ended_at) + " (ended)" if row.ended else _short(row.next_poll_at),
            (row.last_error or "") + errors,
        )
    return table


def styled_status(status: str) -> str:
    """The status in its palette colour, as rich markup."""
    color = STATUS_COLORS.get(status)
    return f"[{color}]{status}[/]" if color else status


def pause_line(pause: AccountPause | None, now: datetime) -> str | None:
    """A sentence about the account pause, if one is running or was an auth failure, and
    about rejected credentials while they stand, whatever pause runs."""
    if pause is None:
        return None
    lines = []
    if pause.paused_until > now:
        lines.append(f"Polling paused until {_short(pause.paused_until)} UTC: {pause.reason}")
    if pause.credentials_rejected_at is not None and not (
        lines and pause.reason == pause.credentials_error
    ):
        lines.append(
            f"Credentials rejected at {_short(pause.credentials_rejected_at)} UTC, no request "
            f"accepted since: {pause.credentials_error}"
        )
    elif not lines and pause.status_code == CONFIG_ERROR_STATUS:
        lines.append(f"Last configuration error at {_short(pause.updated_at)} UTC: {pause.reason}")
    return "\n".join(lines) or None


def console(*, stderr: bool = False) -> Console:
    """A console for tables; piped output gets a wide page so IDs are never cut."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 200
    return Console(file=stream, width=width, soft_wrap=False)
