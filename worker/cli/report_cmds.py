"""`optrack report`, `history`, `watch`: the reports of worker.reports for people and machines."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import click
from rich.console import Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from worker import reports
from worker.cli.common import (
    FiniteRange,
    account_option,
    checked_account,
    ensure_schema,
    get_runtime,
    refuse_others,
    usage_error,
)
from worker.cli.render import console, styled_status
from worker.errors import InvalidOperationId, NotTracked, OptrackError
from worker.operation import validate_operation_id
from worker.reports.formats import (
    HISTORY_CSV_FIELDS,
    SUMMARY_CSV_FIELDS,
    eta_text,
    history_record,
    history_row_record,
    number_text,
    percent_text,
    period_text,
    rate_text,
    span_text,
    summary_record,
    summary_row,
    time_text,
    to_csv,
    to_json,
)
from worker.runtime import Runtime
from worker.tracking import ACTIVE_STATES, ALL_STATES

DEFAULT_WATCH_INTERVAL = 2.0
DEFAULT_LIST_LIMIT = 20
# Bounds that no real use meets, so a typo is a usage error instead of an overflow in SQL.
MAX_LIST_LIMIT = 100_000_000
MAX_CHARTS = 100
# `watch` draws this many bars at most; the rest share one summary row.
MAX_BARS = 50


def _one_format(as_json: bool, as_csv: bool) -> None:
    if as_json and as_csv:
        raise usage_error("choose one of --json and --csv")


def _checked_id(operation_id: str) -> str:
    try:
        return validate_operation_id(operation_id)
    except InvalidOperationId as exc:
        raise usage_error(str(exc)) from None


def _write(path: Path, data: str | bytes) -> None:
    try:
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
    except OSError as exc:
        raise OptrackError(f"cannot write {path}: {exc.strerror or exc}") from None
    click.echo(f"wrote {path}", err=True)


# --- report -------------------------------------------------------------------------------


def summary_view(summary: reports.Summary) -> RenderableType:
    """The report for people: the figures, then the operations that need a look."""
    s, ttf, tp = summary.senders, summary.time_to_finish, summary.throughput
    heading = Text(f"optrack report: {period_text(summary)}, at {time_text(summary.now)} UTC")
    figures = Table(show_header=False)
    figures.add_column("figure")
    figures.add_column("value", justify="right")
    figures.add_column("note", style="dim")
    figures.add_row("operations", number_text(summary.operations), "")
    for name, count in summary.by_status.items():
        figures.add_row(f"  {styled_status(name)}", number_text(count), "")
    figures.add_section()
    figures.add_row("senders", number_text(s.total), "requested")
    figures.add_row("  created", number_text(s.created), "")
    figures.add_row("  failed", number_text(s.failed), "")
    figures.add_row("  still queued", number_text(s.queued), "")
    figures.add_row("failure rate", percent_text(s.failure_rate), "failed / (created + failed)")
    figures.add_section()
    figures.add_row(
        "time to finish p50", span_text(ttf.p50), f"createdAt → end, {ttf.count} finished"
    )
    figures.add_row("  p95", span_text(ttf.p95), "")
    figures.add_row("  max", span_text(ttf.max), "")
    window = f"{time_text(tp.start)} → {time_text(tp.end)}" if tp.start else ""
    figures.add_row("created per minute", rate_text(tp.per_minute), window)
    figures.add_section()
    stuck_after = span_text(summary.stuck_after.total_seconds())
    figures.add_row(
        "stuck", number_text(summary.stuck.count), f"PROCESSING, unchanged > {stuck_after}"
    )
    figures.add_row("ended NOT_FOUND", number_text(summary.not_found.count), "")
    figures.add_row("in error", number_text(summary.in_error.count), "consecutive_errors > 0")
    parts: list[RenderableType] = [heading, figures]
    for title, items in (
        (f"stuck (no change for over {stuck_after})", summary.stuck),
        ("ended NOT_FOUND", summary.not_found),
        ("in error", summary.in_error),
    ):
        if items.items:
            parts.append(_flagged_table(title, items))
    return Group(*parts)


def _flagged_table(title: str, flags: reports.Flags) -> Table:
    shown = flags.items
    more = f" (the first {len(shown)}; more with --limit)" if flags.count > len(shown) else ""
    table = Table(title=f"{title}: {flags.count:,}{more}", title_justify="left")
    table.add_column("operation", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("created/failed/queued/total", justify="right", no_wrap=True)
    table.add_column("last change (UTC)", no_wrap=True)
    table.add_column("unchanged", justify="right", no_wrap=True)
    table.add_column("errors", justify="right")
    table.add_column("last error", overflow="fold", max_width=50)
    for item in shown:
        op = item.operation
        table.add_row(
            op.id,
            styled_status(op.status),
            "/".join(number_text(v) for v in (op.created, op.failed, op.queued, op.total)),
            time_text(item.last_change_at),
            span_text(item.unchanged_seconds),
            str(op.consecutive_errors),
            op.last_error or "",
        )
    return table


def _charted(
    summary: reports.Summary, recent: Sequence[reports.OperationState], n: int
) -> list[str]:
    """Operations that get their own chart: stuck, then in error, then the most recent."""
    flagged = (*summary.stuck.items, *summary.in_error.items)
    ids = [f.operation.id for f in flagged] + [op.id for op in recent]
    return list(dict.fromkeys(ids))[:n]


@click.command()
@click.option(
    "--since",
    metavar="WHEN",
    help="Tracked at or after: 2026-01-31, an ISO datetime, or 7d/12h ago.",
)
@click.option("--until", metavar="WHEN", help="Tracked before (same forms as --since).")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(ALL_STATES, case_sensitive=False),
    help="Only operations in this status (repeatable).",
)
@click.option(
    "--stuck-after",
    default="30m",
    show_default=True,
    metavar="SPAN",
    help="PROCESSING with no change for longer than this is stuck.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (fields in docs/reports.md).")
@click.option("--csv", "as_csv", is_flag=True, help="Print one CSV row with a header.")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a self-contained HTML page here.",
)
@click.option(
    "--limit",
    type=click.IntRange(0, MAX_LIST_LIMIT),
    help=f"Operations per list (stuck, NOT_FOUND, in error); text and HTML default to "
    f"{DEFAULT_LIST_LIMIT}, JSON to all. Counts are always complete.",
)
@click.option(
    "--charts",
    "chart_count",
    default=6,
    show_default=True,
    type=click.IntRange(0, MAX_CHARTS),
    help="Operations charted one by one in the HTML.",
)
@account_option("Only this account's operations (default: every account's).")
def report(
    since: str | None,
    until: str | None,
    statuses: tuple[str, ...],
    stuck_after: str,
    as_json: bool,
    as_csv: bool,
    html_path: Path | None,
    limit: int | None,
    chart_count: int,
    account: str | None,
) -> None:
    """Summarize the operations tracked in a period: senders, failures, timings, what is stuck."""
    _one_format(as_json, as_csv)
    rt = get_runtime(click.get_current_context())
    now = rt.clock.now()
    try:
        period = reports.Period.parse(since, until, now)
        stuck_span = reports.parse_span(stuck_after)
    except reports.BadPeriod as exc:
        raise usage_error(str(exc)) from None
    wanted = tuple(dict.fromkeys(s.upper() for s in statuses))
    ensure_schema(rt)
    account = checked_account(rt, account)
    if limit is None:
        limit = None if as_json else DEFAULT_LIST_LIMIT
    with rt.sessions() as session:
        reports.one_snapshot(session)
        summary = reports.summarize(session, period, stuck_span, now, wanted, limit, account)
        if html_path is not None:
            recent = reports.operations(session, period, wanted, limit=30, account=account)
            histories = [
                reports.operation_history(session, op_id, now)
                for op_id in _charted(summary, recent, chart_count)
            ]
    if html_path is not None:
        from worker.reports.html import report_html

        command = "optrack " + " ".join(sys.argv[1:]) if sys.argv[1:] else "optrack report"
        shown = DEFAULT_LIST_LIMIT if limit is None else limit
        _write(html_path, report_html(summary, recent, histories, command=command, limit=shown))
    if as_json:
        click.echo(to_json(summary_record(summary)))
    elif as_csv:
        click.echo(to_csv([summary_row(summary)], SUMMARY_CSV_FIELDS), nl=False)
    else:
        console().print(summary_view(summary))


# --- history ------------------------------------------------------------------------------


def _with_delta(value: int, delta: int) -> str:
    if delta == 0:
        return str(value)
    return f"{value} [dim]{'+' if delta > 0 else ''}{delta}[/]"


def history_view(report: reports.HistoryReport) -> RenderableType:
    """One line per recorded change with its deltas and rate, then the estimate."""
    op = report.operation
    table = Table(title=f"history of {op.id}: {styled_status(op.status)}", title_justify="left")
    table.add_column("observed (UTC)", no_wrap=True)
    table.add_column("API updated (UTC)", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for name in ("created", "failed", "queued"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("total", justify="right")
    table.add_column("after", justify="right", no_wrap=True)
    table.add_column("per min", justify="right", no_wrap=True)
    for row in report.rows:
        table.add_row(
            time_text(row.observed_at),
            time_text(row.remote_updated_at),
            styled_status(row.status),
            _with_delta(row.created, row.created_delta),
            _with_delta(row.failed, row.failed_delta),
            _with_delta(row.queued, row.queued_delta),
            str(row.total),
            span_text(row.elapsed_seconds),
            rate_text(row.rate_per_minute),
        )
    est = report.estimate
    if est.eta is not None:
        line = (
            f"estimated finish: {eta_text(est, report.now)}; {est.remaining} left at "
            f"{rate_text(est.rate_per_minute)} per minute, {est.note}"
        )
    else:
        line = f"estimated finish: none ({est.note})"
    took = "" if op.took_seconds is None else f"; took {span_text(op.took_seconds)}"
    facts = (
        f"created at {time_text(op.remote_created_at)} UTC, tracked at "
        f"{time_text(op.tracked_at)} UTC{took}"
    )
    if op.last_error:
        facts += f"\nlast error ({op.consecutive_errors} in a row): {op.last_error}"
    return Group(table, Text(line), Text(facts, style="dim"))


@click.command()
@click.argument("operation_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV with a header row.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw created/failed/queued over time to this PNG.",
)
@account_option("Refuse (exit 2) unless the operation is this account's.")
def history(
    operation_id: str, as_json: bool, as_csv: bool, plot_path: Path | None, account: str | None
) -> None:
    """Show every recorded change of one operation, its rate and its estimated finish."""
    _one_format(as_json, as_csv)
    op_id = _checked_id(operation_id)
    rt = get_runtime(click.get_current_context())
    ensure_schema(rt)
    account = checked_account(rt, account)
    now = rt.clock.now()
    try:
        with rt.sessions() as session:
            report = reports.operation_history(session, op_id, now)
    except NotTracked:
        raise usage_error(f"{op_id} is not tracked; see `optrack status` for tracked IDs") from None
    if account is not None and report.operation.account != account:
        raise usage_error(
            f"{op_id} is tracked under account {report.operation.account!r}, not {account!r}"
        )
    if plot_path is not None:
        from worker.reports import charts

        _write(plot_path, charts.png_bytes(charts.history_figure(report)))
    if as_json:
        click.echo(to_json(history_record(report)))
    elif as_csv:
        records = [history_row_record(r) for r in report.rows]
        click.echo(to_csv(records, HISTORY_CSV_FIELDS), nl=False)
    else:
        console().print(history_view(report))


# --- watch --------------------------------------------------------------------------------


def _progress_fields(item: reports.Progress, now: datetime) -> dict[str, object]:
    op = item.operation
    if item.ended:
        eta = f"ended {time_text(op.ended_at)}" if op.ended_at else "ended"
    elif item.estimate.eta is not None:
        eta = "ETA " + eta_text(item.estimate, now)
    else:
        eta = f"ETA unknown ({item.estimate.note})"
    fields: dict[str, object] = {
        "completed": op.done,
        "status": styled_status(op.status),
        "eta": eta,
    }
    if op.total:  # unknown until the first poll: the bar pulses meanwhile
        fields["total"] = op.total
    return fields


def follow(
    rt: Runtime,
    operation_ids: Sequence[str],
    interval: float,
    *,
    once: bool = False,
    account: str | None = None,
) -> None:
    """Show a progress bar per operation, re-read every ``interval`` s, until all have ended
    (``once``: one frame, then return). No IDs: every active one (of ``account``).

    At most MAX_BARS bars; the operations past them share one summary row (how many ended),
    counted in the database whatever their number.
    """
    with rt.sessions() as session:
        ids = list(operation_ids) or list(reports.active_ids(session, account))
        shown, rest = ids[:MAX_BARS], ids[MAX_BARS:]
        items = reports.progress(session, shown)
        others = reports.status_counts(session, rest)
    out = console()
    if not ids:
        whose = "" if account is None else f" of account {account}"
        out.print(f"nothing to watch: no operation{whose} is PENDING or PROCESSING")
        return
    wide = out.width >= 140
    bar = Progress(
        TextColumn("{task.description}"),
        TextColumn("{task.fields[status]}", style="bold"),
        BarColumn(bar_width=30, complete_style="cyan", finished_style="green"),
        MofNCompleteColumn(),
        TextColumn("{task.fields[eta]}"),
        console=out,
        auto_refresh=False,
    )
    try:
        with bar:
            tasks = {
                item.operation.id: bar.add_task(
                    item.operation.id if wide else "…" + item.operation.id[-12:],
                    total=None,
                    status="",
                    eta="",
                )
                for item in items
            }
            more = bar.add_task(f"+{len(rest)} more", total=len(rest), status="", eta="")
            if not rest:
                bar.update(more, visible=False)
            while True:
                now = rt.clock.now()
                for item in items:
                    bar.update(tasks[item.operation.id], **_progress_fields(item, now))  # type: ignore[arg-type]
                active = sum(others.get(s, 0) for s in ACTIVE_STATES)
                bar.update(
                    more, completed=len(rest) - active, status="ended", eta=f"{active} active"
                )
                bar.refresh()
                if once or (all(item.ended for item in items) and not active):
                    break
                rt.clock.sleep(interval)
                with rt.sessions() as session:
                    items = reports.progress(session, shown)
                    others = reports.status_counts(session, rest)
    except KeyboardInterrupt:
        click.echo("stopped watching; the worker goes on tracking", err=True)
        raise SystemExit(130) from None
    if not once:
        out.print(f"all {len(ids)} operation(s) ended")


@click.command()
@click.argument("operation_ids", nargs=-1, metavar="[ID]...")
@click.option(
    "--interval",
    default=DEFAULT_WATCH_INTERVAL,
    show_default=True,
    type=FiniteRange(0.2, 3600.0),
    help="Seconds between reads of the database.",
)
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts).")
@account_option("Only this account's operations; IDs of another account are refused (exit 2).")
def watch(operation_ids: tuple[str, ...], interval: float, once: bool, account: str | None) -> None:
    """Progress bars of operations (default: all still active) until they end or Ctrl-C."""
    ids = [_checked_id(op_id) for op_id in dict.fromkeys(operation_ids)]
    rt = get_runtime(click.get_current_context())
    ensure_schema(rt)
    account = checked_account(rt, account)
    if account is not None and ids:
        refuse_others(rt, ids, account)
    try:
        follow(rt, ids, interval, once=once, account=account)
    except NotTracked as exc:
        raise usage_error(
            f"{exc.operation_id} is not tracked; see `optrack status` for tracked IDs"
        ) from None


COMMANDS = (report, history, watch)
