"""Alert state machine."""

from __future__ import annotations

from monitor.config import AlertConfig
from monitor.service.alerts import AlertTracker, event_id

CFG = AlertConfig(threshold=0.9, raise_count=2, raise_window=3, clear_threshold=0.5, clear_count=2, cooldown_seconds=100)


def feed(tracker: AlertTracker, ranks: list[float], t0: float = 0.0) -> list[tuple[int, str]]:
    out = []
    for i, r in enumerate(ranks):
        tr = tracker.update(t0 + 10 * i, t0 + 10 * i + 10, r)
        if tr:
            out.append((i, tr.type))
    return out


def test_one_odd_window_does_not_raise() -> None:
    assert feed(AlertTracker("m", CFG), [0.1, 0.95, 0.1, 0.1, 0.95, 0.1]) == []


def test_n_of_m_raises_then_hysteresis_clears() -> None:
    tracker = AlertTracker("m", CFG)
    events = feed(tracker, [0.1, 0.95, 0.2, 0.99, 0.7, 0.6, 0.4, 0.6, 0.3, 0.2])
    assert events == [(3, "raise"), (9, "clear")]  # 0.6 between 0.5 and 0.9 keeps it open


def test_raise_and_clear_share_a_stable_id() -> None:
    tracker = AlertTracker("fan", CFG)
    raised = [tracker.update(10 * i, 10 * i + 10, r) for i, r in enumerate([0.95, 0.95])][-1]
    assert raised.event_id == event_id("fan", 0) and raised.start == 0
    cleared = [tracker.update(100 + 10 * i, 110 + 10 * i, 0.1) for i in range(2)][-1]
    assert cleared.type == "clear" and cleared.event_id == raised.event_id and cleared.end == 120


def test_cooldown_holds_back_the_next_raise() -> None:
    tracker = AlertTracker("m", CFG)
    assert feed(tracker, [0.95, 0.95, 0.1, 0.1]) == [(1, "raise"), (3, "clear")]
    assert feed(tracker, [0.95, 0.95, 0.95], t0=50) == []  # cleared at 40, cooling until 140
    # A fault that persisted through the cooldown is raised as soon as it ends.
    assert feed(tracker, [0.95], t0=150) == [(0, "raise")]
    assert tracker.open_start == 60  # the oldest anomalous window still in the last raise_window


def test_reconfigure_resizes_the_raise_window() -> None:
    """A reload from 3 of 5 to 8 of 10 windows: the history must grow to 10, or no 8 anomalous
    windows can ever be in it and the machine never alarms again."""
    tracker = AlertTracker("m", AlertConfig(threshold=0.9, raise_count=3, raise_window=5))
    tracker.config = AlertConfig(threshold=0.9, raise_count=8, raise_window=10)
    raised = [i for i, kind in feed(tracker, [1.0] * 20) if kind == "raise"]
    assert raised == [7]  # the 8th anomalous window


def test_reconfigure_keeps_the_newest_windows_when_shrinking() -> None:
    tracker = AlertTracker("m", AlertConfig(threshold=0.9, raise_count=2, raise_window=10))
    feed(tracker, [1.0, 0.0, 0.0, 0.0])  # one anomalous window, then three normal ones
    tracker.config = AlertConfig(threshold=0.9, raise_count=2, raise_window=3)
    assert feed(tracker, [1.0], t0=40.0) == []  # the old anomalous window fell out of the last 3
