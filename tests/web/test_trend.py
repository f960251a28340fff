"""The trend plot's layout: one bin per 4 minutes holding its highest rank, gaps where nothing
was scored, anomalous bins marked, sensor faults and idle windows under the axis."""

from __future__ import annotations

import numpy as np

from monitor.outputs.history import WindowHistory
from monitor.web.trend import BINS, DAY_SECONDS, trend_plot

NOW = 1_796_000_000.0
BIN = DAY_SECONDS / BINS


def history(rows: list[tuple[float, str, float, bool]]) -> WindowHistory:
    end, status, fused, anomalous = zip(*rows) if rows else ((), (), (), ())
    return WindowHistory(np.asarray(end, dtype=np.float64), np.asarray(status, dtype=object),
                         np.asarray(fused, dtype=np.float64), np.asarray(anomalous, dtype=bool))


def test_bins_keep_the_highest_rank_and_break_at_gaps() -> None:
    start = NOW - DAY_SECONDS
    rows = [(start + 10 * BIN + 5, "ok", 0.2, False), (start + 10 * BIN + 15, "ok", 0.95, True),  # one bin
            (start + 11 * BIN + 5, "ok", 0.3, False),
            (start + 12 * BIN + 5, "sensor_fault", np.nan, False),  # a gap in the line
            (start + 13 * BIN + 5, "idle", np.nan, False),
            (start + 14 * BIN + 5, "ok", 0.4, False),
            (start - 100, "ok", 1.0, True)]  # older than the day: left out
    plot = trend_plot(history(rows), until=NOW, threshold=0.9, warning=0.8)
    assert (plot.windows, plot.scored, plot.anomalous) == (6, 4, 1)
    assert len(plot.lines) == 2
    first = [tuple(map(float, p.split(","))) for p in plot.lines[0].split()]
    assert len(first) == 2 and first[0][1] < first[1][1]  # bin 10 at 0.95 is higher up than bin 11 at 0.3
    assert first[0][1] == plot.alarms[0][1] and len(plot.alarms) == 1
    assert len(plot.lines[1].split()) == 2  # a lone bin drawn as a dot
    assert len(plot.faults) == 1 and len(plot.idle) == 1 and plot.faults[0] < plot.idle[0]
    assert plot.top < plot.threshold_y < plot.warning_y < plot.bottom
    assert [label for _x, label in plot.x_ticks] == ["06:00", "12:00", "18:00", "00:00"]  # NOW is 00:53 UTC
    assert all(plot.left < x < plot.right for x, _label in plot.x_ticks)


def test_an_empty_history_and_a_replay_ahead_of_the_clock() -> None:
    empty = trend_plot(history([]), until=NOW, threshold=0.99)
    assert empty.lines == () and empty.windows == 0 and empty.warning_y is None
    ahead = trend_plot(history([(NOW + 600, "ok", 0.5, False)]), until=NOW)
    assert ahead.windows == 1  # the span ends at the newest window, not before it
    x, _y = map(float, ahead.lines[0].split()[0].split(","))
    assert ahead.right - 2 * (ahead.right - ahead.left) / BINS <= x <= ahead.right
