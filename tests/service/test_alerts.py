"""Alert state machine and rolling reference."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.service.alerts import AlertTracker, event_id
from monitor.config import AlertConfig
from monitor.scoring.ranking import FusionError, rank_ratio
from monitor.scoring.reference import RollingReference

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


def test_rolling_reference_ranks_like_rank_ratio() -> None:
    rng = np.random.default_rng(0)
    anchored, rolling = rng.normal(size=40), rng.normal(size=10)
    ref = RollingReference(anchored, rolling_size=10)
    for value in rolling:
        ref.add(value)
    for q in (-3.0, 0.0, float(rolling[3]), 3.0):
        assert ref.rank(q) == pytest.approx(float(rank_ratio(np.concatenate([anchored, rolling]), [q])[0]))


def test_rolling_part_is_bounded_and_the_anchor_is_never_evicted() -> None:
    ref = RollingReference(np.arange(10.0), rolling_size=5)
    for _ in range(100):
        ref.add(100.0)
    assert len(ref) == 15 and ref.rolling_count == 5
    assert ref.rank(-1.0) == 0.0 and ref.rank(50.0) == pytest.approx(10 / 15)


def test_reference_needs_finite_scores() -> None:
    with pytest.raises(FusionError):
        RollingReference(np.array([np.nan]), 5)
