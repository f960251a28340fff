"""The 24 h score trend of one machine, laid out for an inline SVG drawn by the page template.

A day at a 10 s hop is 8 640 windows, more than a plot has pixels: windows are gathered into one
bin per horizontal pixel step and each bin shows its highest fused rank (a single alarming
window must stay visible, which a mean would hide). A bin without a scored window breaks the
line, so a stopped machine or a sensor fault shows as a gap rather than a straight segment
across it; sensor-fault and idle bins get their own marks under the plot.

Pure geometry: no I/O, no clock, no markup (the template escapes and draws).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from monitor.outputs.history import DAY_SECONDS, WindowHistory

WIDTH = 720
HEIGHT = 150
LEFT, RIGHT, TOP, BOTTOM = 34, 8, 8, 30  # margins: rank labels left, hour labels and marks below
BINS = 360  # one per 2 px: 4 minutes of a day
TICK_HOURS = 6


@dataclass(frozen=True)
class TrendPlot:
    """Coordinates in SVG user units (``WIDTH`` x ``HEIGHT``); y grows downwards."""

    width: int
    height: int
    left: float
    right: float  # x of the plot's right edge
    top: float
    bottom: float  # y of rank 0
    lines: tuple[str, ...]  # polyline ``points`` of the highest rank per bin, one per unbroken run
    alarms: tuple[tuple[float, float], ...]  # (x, y) of bins holding an anomalous window
    faults: tuple[float, ...]  # x of bins holding a sensor-fault window
    idle: tuple[float, ...]  # x of bins holding only idle windows
    threshold_y: float | None
    warning_y: float | None
    x_ticks: tuple[tuple[float, str], ...]  # (x, "HH:MM" UTC)
    y_ticks: tuple[tuple[float, str], ...]  # (y, rank)
    windows: int  # windows in the span
    scored: int  # of which scored
    anomalous: int


def trend_plot(history: WindowHistory, until: float | None = None, threshold: float | None = None,
               warning: float | None = None, span: float = DAY_SECONDS) -> TrendPlot:
    """Lay out ``history``'s windows that end in ``(until - span, until]`` (``until``: now, or the
    newest window when that is later: a replay runs ahead of the clock)."""
    newest = float(history.end.max()) if len(history) else 0.0
    until = max(time.time() if until is None else until, newest)
    since = until - span
    left, right, top, bottom = float(LEFT), float(WIDTH - RIGHT), float(TOP), float(HEIGHT - BOTTOM)

    def x_of(t: np.ndarray | float) -> np.ndarray | float:
        return left + (np.asarray(t) - since) / span * (right - left)

    def y_of(rank: float) -> float:
        return round(bottom - min(max(rank, 0.0), 1.0) * (bottom - top), 1)

    keep = (history.end > since) & (history.end <= until)
    end, status = history.end[keep], history.status[keep]
    fused, anomalous = history.fused[keep], history.anomalous[keep]
    column = np.minimum(((end - since) / span * BINS).astype(int), BINS - 1)
    scored = (status == "ok") & ~np.isnan(fused)
    peak = np.full(BINS, np.nan)
    if scored.any():
        np.fmax.at(peak, column[scored], fused[scored])
    centre = x_of(since + (np.arange(BINS) + 0.5) * span / BINS)
    lines, run = [], []
    for i in range(BINS):
        if np.isnan(peak[i]):
            if run:
                lines.append(run)
            run = []
        else:
            run.append(f"{centre[i]:.1f},{y_of(float(peak[i])):.1f}")
    if run:
        lines.append(run)
    # A lone bin is a point: repeat it so the polyline draws (a dot, with round caps).
    points = tuple(" ".join(r if len(r) > 1 else r * 2) for r in lines)
    alarm_bins = np.unique(column[anomalous])
    fault_bins = np.unique(column[status == "sensor_fault"])
    idle_bins = np.setdiff1d(np.unique(column[status == "idle"]), np.unique(column[scored]))
    first_tick = np.ceil(since / (TICK_HOURS * 3600)) * TICK_HOURS * 3600
    x_ticks = tuple((round(float(x_of(t)), 1), time.strftime("%H:%M", time.gmtime(t)))
                    for t in np.arange(first_tick, until + 1, TICK_HOURS * 3600))
    return TrendPlot(
        WIDTH, HEIGHT, left, right, top, bottom, points,
        tuple((round(float(centre[b]), 1), y_of(float(peak[b]))) for b in alarm_bins if not np.isnan(peak[b])),
        tuple(round(float(centre[b]), 1) for b in fault_bins), tuple(round(float(centre[b]), 1) for b in idle_bins),
        None if threshold is None else y_of(threshold), None if warning is None else y_of(warning),
        x_ticks, tuple((y_of(r), f"{r:g}") for r in (0.0, 0.5, 1.0)),
        len(end), int(scored.sum()), int(anomalous.sum()))
