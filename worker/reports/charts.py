"""Charts of the reports with matplotlib, drawn off-screen (Agg) as PNG bytes or inline SVG.

Figures are built with ``matplotlib.figure.Figure`` directly, never pyplot: no global figure
state, nothing to close, safe in a worker thread.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: reports are files

from matplotlib import dates as mdates
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from worker.reports.formats import STATUS_COLORS
from worker.reports.model import HistoryReport, OperationState
from worker.tracking import PROCESSING

CREATED = "#2e7d32"
FAILED = "#c62828"
QUEUED = "#9e9e9e"
TOTAL = "#37474f"
# Any: rc_context wants a dict keyed by a Literal of every rc name.
_STYLE: Any = {
    "font.size": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e0e0e0",
    "grid.linewidth": 0.8,
    "axes.axisbelow": True,
    "svg.fonttype": "none",  # text stays text in the SVG: crisp, searchable, small
}


_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.DOTALL)


def short_id(operation_id: str) -> str:
    """The distinguishing tail of an operation ID (they all share a long prefix)."""
    return "…" + operation_id[-8:]


def _series(report: HistoryReport) -> tuple[list[datetime], list[int], list[int], list[int]]:
    """Times and counts from the creation (nothing done, all queued) to the last known poll."""
    times, created, failed, queued = [], [], [], []
    op = report.operation
    if report.rows and op.remote_created_at is not None:
        times.append(op.remote_created_at)
        created.append(0)
        failed.append(0)
        queued.append(report.rows[0].total)
    for row in report.rows:
        times.append(row.remote_updated_at)
        created.append(row.created)
        failed.append(row.failed)
        queued.append(row.queued)
    # The last values still held when last polled: draw them up to then.
    held = op.last_polled_at if op.status == PROCESSING else None
    if report.rows and held is not None and held > times[-1]:
        times.append(held)
        created.append(created[-1])
        failed.append(failed[-1])
        queued.append(queued[-1])
    return times, created, failed, queued


def history_figure(report: HistoryReport, *, compact: bool = False) -> Figure:
    """Created, failed and queued over time, with the total and the estimated finish.

    ``compact`` is for a card that already names the operation: smaller, no title, the legend
    below the plot.
    """
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(5.6, 3.1) if compact else (9, 4.5), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        op = report.operation
        moments, created, failed, queued = _series(report)
        times = _date_numbers(moments)
        if moments:
            for values, color, label in (
                (created, CREATED, "created"),
                (failed, FAILED, "failed"),
                (queued, QUEUED, "queued"),
            ):
                ax.step(times, values, where="post", color=color, lw=2, label=label)
                if len(report.rows) <= 40:  # dots where a change was seen, while they stay apart
                    points = slice(1, 1 + len(report.rows))
                    ax.plot(times[points], values[points], "o", color=color, ms=3.5)
            if op.total is not None:
                ax.axhline(op.total, color=TOTAL, lw=1, ls=":", label=f"total {op.total}")
            eta = report.estimate.eta
            if eta is not None:
                last = report.rows[-1]
                ax.plot(
                    _date_numbers([last.remote_updated_at, eta]),
                    [last.queued, 0],
                    color=QUEUED,
                    lw=1.5,
                    ls="--",
                    label=f"queue empty ~{eta:%H:%M} (est.)",
                )
            _time_axis(ax)
            ax.set_ylim(bottom=0, top=max([*created, *queued, op.total or 0, 1]) * 1.08)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            if compact:
                ax.legend(
                    loc="upper center",
                    bbox_to_anchor=(0.5, -0.16),
                    ncols=5,
                    frameon=False,
                    fontsize=9,
                    handlelength=1.5,
                    columnspacing=1.2,
                )
                ax.set_xlabel("")
            else:
                ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        else:
            ax.text(0.5, 0.5, "no recorded change yet", ha="center", va="center", color=TOTAL)
            ax.set_axis_off()
        ax.set_ylabel("senders")
        if not compact:
            ax.set_title(f"{op.id}  ·  {op.status}", loc="left", fontsize=11)
        return fig


def overview_figure(ops: Sequence[OperationState]) -> Figure:
    """One stacked bar per operation: created, failed, still queued (latest known state)."""
    height = 1.2 + 0.32 * max(len(ops), 1)
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(9, height), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        shown = list(reversed(ops))  # the most recent on top
        labels = [f"{short_id(op.id)}  {op.status}" for op in shown]
        created = [op.created or 0 for op in shown]
        failed = [op.failed or 0 for op in shown]
        queued = [op.queued or 0 for op in shown]
        ax.barh(labels, created, color=CREATED, label="created")
        ax.barh(labels, failed, left=created, color=FAILED, label="failed")
        lefts = [c + f for c, f in zip(created, failed, strict=True)]
        ax.barh(labels, queued, left=lefts, color=QUEUED, label="queued")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("senders")
        ax.tick_params(axis="y", labelsize=9)
        for label in ax.get_yticklabels():
            label.set_fontfamily("monospace")
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, frameon=False)
        return fig


def status_figure(by_status: dict[str, int]) -> Figure:
    """Operations per status as horizontal bars with their counts."""
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(4.6, 2.6), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        names = list(reversed(by_status))
        counts = [by_status[name] for name in names]
        bars = ax.barh(names, counts, color=[STATUS_COLORS.get(n, TOTAL) for n in names])
        ax.bar_label(bars, padding=3)
        ax.grid(axis="y", visible=False)
        ax.set_xlim(0, max([*counts, 1]) * 1.18)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("operations")
        return fig


def _date_numbers(values: Sequence[datetime]) -> Any:
    """Datetimes as matplotlib day numbers (unannotated in its stubs); shown as UTC dates."""
    return mdates.date2num(values)  # type: ignore[no-untyped-call]


def _time_axis(ax: Any) -> None:
    # matplotlib's stubs leave these constructors unannotated.
    locator = mdates.AutoDateLocator(minticks=3, maxticks=8)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    ax.set_xlabel("time (UTC)")


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG."""
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    return out.getvalue()


def svg_text(fig: Figure) -> str:
    """The figure as an inline ``<svg>`` element (no XML prolog)."""
    out = io.StringIO()
    with matplotlib.rc_context(_STYLE):
        fig.savefig(out, format="svg")
    text = out.getvalue()
    # Drop the prolog and the RDF metadata block (a creation date: pages would never match).
    return _METADATA.sub("", text[text.index("<svg") :], count=1)
