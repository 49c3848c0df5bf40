"""`optrack report --html`: one self-contained page (inline CSS and SVG charts, no network)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from worker.reports import charts
from worker.reports.formats import (
    STATUS_COLORS,
    eta_text,
    number_text,
    percent_text,
    period_text,
    rate_text,
    span_text,
    time_text,
)
from worker.reports.model import Flags, HistoryReport, OperationState, Summary
from worker.tracking import PROCESSING

_CSS = """
:root { --ink:#212121; --muted:#616161; --line:#e0e0e0; --bg:#fafafa; --card:#fff;
        --ok:#2e7d32; --bad:#c62828; --warn:#ef6c00; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: var(--bg); }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 34px 0 12px; padding-bottom: 6px;
     border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; font-family: ui-monospace, Menlo, Consolas, monospace; }
.sub { color: var(--muted); margin: 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 12px;
         margin-top: 22px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
        padding: 12px 14px; }
.card .label { color: var(--muted); font-size: 13px; }
.card .value { font-size: 24px; font-weight: 600; margin-top: 2px;
               font-variant-numeric: tabular-nums; }
.card .note { color: var(--muted); font-size: 12px; margin-top: 2px; }
.card.bad .value { color: var(--bad); } .card.warn .value { color: var(--warn); }
.card.ok .value { color: var(--ok); }
.row { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
table { border-collapse: collapse; background: var(--card); font-variant-numeric: tabular-nums; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: left;
         vertical-align: top; }
th { font-weight: 600; font-size: 13px; color: var(--muted); background: #f5f5f5; }
td.num, th.num { text-align: right; }
td.id { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }
.chart { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 8px; }
.chart svg { display: block; max-width: 100%; height: auto; }
.ops { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 16px; }
.op { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px; }
.op h3 { margin-top: 0; }
.op p { margin: 4px 0 8px; color: var(--muted); font-size: 13px; }
.op svg { display: block; width: 100%; height: auto; }
.empty { color: var(--muted); font-style: italic; }
.st { font: 600 11px system-ui, sans-serif; padding: 2px 6px; border-radius: 4px; color: #fff;
      background: #607d8b; vertical-align: 2px; margin-left: 6px; }
.more { color: var(--muted); font-size: 13px; margin: 6px 0 0; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; }
"""

_STATUS_CSS = "".join(
    f".st-{name} {{ background: {color}; }}\n" for name, color in STATUS_COLORS.items()
)


def _figure(field: str, text: str) -> str:
    """A shown figure, tagged with its CSV/JSON field name so machines can read the page too."""
    return f'<span data-field="{field}">{escape(text)}</span>'


def _card(label: str, field: str, value: str, note: str = "", tone: str = "") -> str:
    """A card; ``note`` is HTML (it may hold more tagged figures)."""
    note_html = f'<div class="note">{note}</div>' if note else ""
    return (
        f'<div class="card {tone}"><div class="label">{escape(label)}</div>'
        f'<div class="value">{_figure(field, value)}</div>{note_html}</div>'
    )


def _cards(summary: Summary) -> str:
    s, ttf, tp = summary.senders, summary.time_to_finish, summary.throughput
    stuck_after = escape(span_text(summary.stuck_after.total_seconds()))
    cards = [
        _card("Operations", "operations", number_text(summary.operations), "tracked in the period"),
        _card("Senders", "senders_total", number_text(s.total), "total requested"),
        _card("Created", "senders_created", number_text(s.created), tone="ok"),
        _card(
            "Failed",
            "senders_failed",
            number_text(s.failed),
            "failure rate " + _figure("failure_rate", percent_text(s.failure_rate)),
            "bad" if s.failed else "",
        ),
        _card("Still queued", "senders_queued", number_text(s.queued)),
        _card(
            "Time to finish p50",
            "finish_p50_seconds",
            span_text(ttf.p50),
            f"p95 {_figure('finish_p95_seconds', span_text(ttf.p95))} · "
            f"max {_figure('finish_max_seconds', span_text(ttf.max))} · "
            f"{_figure('finished', number_text(ttf.count))} finished",
        ),
        _card(
            "Throughput",
            "created_per_minute",
            rate_text(tp.per_minute),
            "senders created per minute",
        ),
        _card(
            "Stuck",
            "stuck",
            number_text(summary.stuck.count),
            f"PROCESSING, unchanged &gt; {stuck_after}",
            "warn" if summary.stuck.count else "",
        ),
        _card(
            "Ended NOT_FOUND",
            "not_found",
            number_text(summary.not_found.count),
            tone="bad" if summary.not_found.count else "",
        ),
        _card(
            "In error",
            "in_error",
            number_text(summary.in_error.count),
            "last poll(s) failed",
            "bad" if summary.in_error.count else "",
        ),
    ]
    return '<section class="cards">' + "".join(cards) + "</section>"


def _status_table(summary: Summary) -> str:
    rows = "".join(
        f'<tr><td>{escape(name)}</td><td class="num">'
        f"{_figure('status_' + name.lower(), number_text(count))}</td></tr>"
        for name, count in summary.by_status.items()
    )
    return (
        '<table><thead><tr><th>status</th><th class="num">operations</th></tr></thead>'
        f'<tbody>{rows}<tr><th>all</th><th class="num">{summary.operations:,}</th></tr>'
        "</tbody></table>"
    )


def _counts(op: OperationState) -> str:
    return " / ".join(number_text(v) for v in (op.created, op.failed, op.queued, op.total))


def _flagged_table(title: str, flags: Flags, limit: int, empty: str) -> str:
    head = f"<h3>{escape(title)} ({flags.count:,})</h3>"
    items = flags.items[:limit]
    if not items:
        return head + f'<p class="empty">{escape(empty)}</p>'
    body = "".join(
        "<tr>"
        f'<td class="id">{escape(f.operation.id)}</td>'
        f"<td>{escape(f.operation.status)}</td>"
        f'<td class="num">{escape(_counts(f.operation))}</td>'
        f"<td>{escape(time_text(f.last_change_at))}</td>"
        f'<td class="num">{escape(span_text(f.unchanged_seconds))}</td>'
        f'<td class="num">{f.operation.consecutive_errors}</td>'
        f"<td>{escape(f.operation.last_error or '')}</td>"
        "</tr>"
        for f in items
    )
    more = (
        f'<p class="more">and {flags.count - len(items):,} more: see <code>--json</code></p>'
        if flags.count > len(items)
        else ""
    )
    return (
        head + "<table><thead><tr><th>operation</th><th>status</th>"
        '<th class="num">created / failed / queued / total</th><th>last change (UTC)</th>'
        '<th class="num">unchanged for</th><th class="num">errors in a row</th>'
        f"<th>last error</th></tr></thead><tbody>{body}</tbody></table>{more}"
    )


def _needs_a_look(summary: Summary, limit: int) -> str:
    if not (summary.stuck.count or summary.not_found.count or summary.in_error.count):
        return '<p class="empty">Nothing is stuck, ended NOT_FOUND or in error.</p>'
    stuck_after = span_text(summary.stuck_after.total_seconds())
    return "".join(
        [
            _flagged_table(
                f"Stuck: PROCESSING, no change for over {stuck_after}",
                summary.stuck,
                limit,
                "none stuck",
            ),
            _flagged_table("Ended NOT_FOUND", summary.not_found, limit, "none"),
            _flagged_table("In error: the last poll(s) failed", summary.in_error, limit, "none"),
        ]
    )


def _operation_card(report: HistoryReport) -> str:
    op = report.operation
    if op.total is None:
        facts = "not fetched yet"
    else:
        facts = (
            f"created {op.created:,} · failed {op.failed or 0:,} · queued {op.queued or 0:,}"
            f" of {op.total:,} · {len(report.rows)} change(s)"
        )
    if op.status == PROCESSING:
        facts += f" · estimated finish {eta_text(report.estimate, report.now)}"
    elif op.ended_at is not None:
        facts += f" · ended {time_text(op.ended_at)} UTC"
        if op.took_seconds is not None:
            facts += f" after {span_text(op.took_seconds)}"
    svg = charts.svg_text(charts.history_figure(report, compact=True))
    return (
        f'<div class="op"><h3>{escape(op.id)} <span class="st st-{escape(op.status)}">'
        f"{escape(op.status)}</span></h3><p>{escape(facts)}</p>{svg}</div>"
    )


def report_html(
    summary: Summary,
    overview: Sequence[OperationState],
    histories: Sequence[HistoryReport],
    *,
    command: str = "optrack report --html",
    limit: int = 20,
) -> str:
    """The whole page: figures, status and per-operation charts, the lists that need a look."""
    overview_html = (
        f'<div class="chart">{charts.svg_text(charts.overview_figure(overview))}</div>'
        if overview
        else '<p class="empty">no operation in the period</p>'
    )
    more_ops = (
        f'<p class="more">the {len(overview)} most recently tracked of '
        f"{summary.operations:,} operations</p>"
        if summary.operations > len(overview)
        else ""
    )
    op_cards = "".join(_operation_card(h) for h in histories)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>optrack report · {escape(time_text(summary.now))} UTC</title>
<style>{_CSS}{_STATUS_CSS}</style>
</head>
<body>
<main>
<h1>optrack report</h1>
<p class="sub">{escape(period_text(summary))} · at {escape(time_text(summary.now))} UTC</p>
{_cards(summary)}
<h2>Operations by status</h2>
<div class="row">{_status_table(summary)}
<div class="chart">{charts.svg_text(charts.status_figure(summary.by_status))}</div></div>
<h2>Needs a look</h2>
{_needs_a_look(summary, limit)}
<h2>Senders per operation</h2>
{overview_html}{more_ops}
<h2>Operations over time</h2>
<div class="ops">{op_cards or '<p class="empty">nothing to chart</p>'}</div>
<footer>Made by <code>{escape(command)}</code>. Figures are defined in docs/reports.md:
time to finish runs from the API's createdAt to the end (COMPLETED and CANCELED only);
throughput is senders created per minute from the earliest createdAt to the latest update.
</footer>
</main>
</body>
</html>
"""
