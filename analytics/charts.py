"""PNG charts for /stats and reports: cumulative accuracy over time per prompt version.

Pure in the sense that matters: plain numbers in, PNG bytes out (matplotlib's Agg backend, no
display, no global pyplot state shared between threads).
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num
from matplotlib.figure import Figure

from analytics.stats import wilson_interval


@dataclass(frozen=True)
class Period:
    """Votes on one version's verdicts made in one period starting at ``start`` (Unix s)."""

    version_id: str
    start: float
    votes: int
    correct: int


@dataclass(frozen=True)
class Event:
    """A decision to mark on the time axis (promotion, rollback, canary change)."""

    at: float
    label: str


def _num(ts: float) -> float:
    """Unix seconds as matplotlib's date number (``date2num`` lacks annotations)."""
    return float(date2num(datetime.fromtimestamp(ts, UTC)))  # type: ignore[no-untyped-call]


def accuracy_png(periods: Iterable[Period], events: Sequence[Event] = (), *,
                 title: str = "Accuracy over time (cumulative, 95% interval)",
                 width_px: int = 960, height_px: int = 540) -> bytes:
    """Cumulative accuracy of each version with a Wilson band; decisions as vertical lines."""
    fig = accuracy_figure(periods, events, title=title, width_px=width_px, height_px=height_px)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def accuracy_figure(periods: Iterable[Period], events: Sequence[Event] = (), *,
                    title: str = "Accuracy over time (cumulative, 95% interval)",
                    width_px: int = 960, height_px: int = 540) -> Figure:
    """The figure :func:`accuracy_png` renders."""
    by_version: dict[str, list[Period]] = defaultdict(list)
    for p in periods:
        by_version[p.version_id].append(p)
    dpi = 96
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    plotted: list[float] = []
    for version_id, rows in sorted(by_version.items()):
        rows.sort(key=lambda r: r.start)
        times: list[float] = []
        acc: list[float] = []
        low: list[float] = []
        high: list[float] = []
        votes = correct = 0
        for row in rows:
            votes += row.votes
            correct += row.correct
            if votes == 0:
                continue
            lo, hi = wilson_interval(correct, votes)
            times.append(_num(row.start))
            acc.append(correct / votes)
            low.append(lo)
            high.append(hi)
        if not times:
            continue
        plotted += times
        (line,) = ax.plot(times, acc, marker="o", markersize=3,
                          label=f"{version_id} ({correct}/{votes})")
        ax.fill_between(times, low, high, alpha=0.15, color=line.get_color())
    for event in events:
        when = _num(event.at)
        ax.axvline(when, color="grey", linestyle="--", linewidth=1)
        ax.annotate(event.label, (when, 1.0), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=8, color="dimgrey")
    if plotted and min(plotted) == max(plotted):
        # One period only: without a range matplotlib spreads the axis over years.
        ax.set_xlim(min(plotted) - 1 / 24, max(plotted) + 1 / 24)
    if not by_version:
        ax.text(0.5, 0.5, "no votes yet", ha="center", va="center", transform=ax.transAxes)
    else:
        # matplotlib.dates ships without annotations for these two.
        locator = AutoDateLocator()  # type: ignore[no-untyped-call]
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
        ax.legend(loc="lower left", fontsize=8)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig
