"""Alert state machine."""

from __future__ import annotations

import json
import math
import typing

import numpy as np
import pytest

from monitor.config import AlertConfig
from monitor.outputs.messages import ALERT_RULES, AlertEvent, iso_time
from monitor.service.alerts import (
    DAY_SECONDS,
    AlertTracker,
    cusum_arl,
    cusum_threshold,
    event_id,
    rank_evidence,
)

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


# ------------------------------------------------------------------------------ CUSUM

def cusum(**kw) -> AlertConfig:
    return AlertConfig(**{"rule": "cusum", "clear_threshold": 0.5, "clear_count": 2, "cooldown_seconds": 0.0, **kw})


def run_lengths(config: AlertConfig, rng: np.random.Generator, runs: int, reference_size: int) -> np.ndarray:
    """Windows until the first raise, per fresh tracker, under i.i.d. uniform (normal) ranks."""
    out = []
    for _ in range(runs):
        tracker, n = AlertTracker("m", config), 0
        while True:
            n += 1
            if tracker.update(10.0 * n, 10.0 * n + 10, rng.random(), reference_size=reference_size):
                break
        out.append(n)
    return np.array(out)


def test_cusum_mean_run_length_on_normal_ranks_matches_the_configured_rate() -> None:
    """ARL 400 windows (at a 10 s hop): the empirical mean of 300 seeded runs (standard error
    about 6 %) lands within 15 % of it. Against a 210-score reference the capped ranks only
    lengthen the runs: the configured rate is an upper bound on false alarms."""
    config = cusum(cusum_arl_days=400 * 10.0 / DAY_SECONDS)
    rng = np.random.default_rng(7)
    assert abs(run_lengths(config, rng, 300, 10**9).mean() / 400 - 1) < 0.15
    assert run_lengths(config, rng, 300, 210).mean() > 0.85 * 400


def test_cusum_arl_agrees_with_monte_carlo_and_threshold_inverts_it() -> None:
    h = cusum_threshold(1000.0, 2.0)
    assert abs(cusum_arl(h, 2.0) - 1000.0) < 1.0
    assert abs(cusum_arl(3.0, 2.0) - 107.6) < 0.5  # 4 000 seeded Monte-Carlo runs: 106.0 +- 1.7


def test_rank_of_one_is_capped_by_the_reference_size() -> None:
    assert rank_evidence(1.0, 210) == pytest.approx(math.log(420))
    assert rank_evidence(0.95, 210) == pytest.approx(-math.log(0.05))


def test_persistent_rank_095_raises_by_cusum_but_not_by_n_of_m_at_099() -> None:
    ranks = [0.3] * 10 + [0.95] * 60
    n_of_m = AlertTracker("m", AlertConfig())
    assert [kind for _, kind in feed(n_of_m, ranks)] == []
    tracker = AlertTracker("m", AlertConfig(rule="cusum"))  # the defaults: 30 days, drift 2
    raised = feed(tracker, ranks)
    h = cusum_threshold(30 * DAY_SECONDS / 10.0, 2.0)
    # each window at 0.95 adds -log(0.05) - 2 = 1.0: raised once S passes h (12.7)
    assert raised == [(10 + math.floor(h / (-math.log(0.05) - 2.0)), "raise")]
    assert tracker.open_start == 100.0  # the change point: the first window at 0.95, stable on replay
    assert tracker.open_event == event_id("m", 100.0)


def test_cusum_ignores_a_few_odd_windows_and_clears_with_hysteresis() -> None:
    tracker = AlertTracker("m", cusum())
    assert feed(tracker, [0.2, 0.999, 0.3, 0.2, 0.999, 0.1] * 5) == []  # S drains between them
    events = feed(tracker, [0.999] * 5 + [0.6, 0.4, 0.3], t0=1000.0)
    assert [kind for _, kind in events] == ["raise", "clear"] and events[-1][0] == 7
    assert tracker.rule.statistic == 0.0  # reset on clear


def test_transition_and_payload_say_which_rule_raised() -> None:
    tracker = AlertTracker("m", cusum())
    raised = [t for t in (tracker.update(10 * i, 10 * i + 10, 0.9999) for i in range(5)) if t][0]
    cleared = [t for t in (tracker.update(100 + 10 * i, 110 + 10 * i, 0.1) for i in range(2)) if t][0]
    assert (raised.rule, cleared.rule) == ("cusum", "cusum")
    assert AlertTracker("m", CFG).update(0, 10, 0.1) is None
    event = AlertEvent("m-0", "raise", "site", "m", iso_time(0), iso_time(10), 0.9999, 0.99, {}, None, None,
                       rule=raised.rule)
    payload = json.loads(event.to_json())
    assert payload["rule"] == "cusum" and payload["schema"] == "asd.alert/1"
    assert ALERT_RULES == typing.get_args(typing.get_type_hints(AlertConfig)["rule"])


def test_reload_switching_rules_starts_the_new_rule_fresh() -> None:
    tracker = AlertTracker("m", AlertConfig(threshold=0.9, raise_count=3, raise_window=5))
    feed(tracker, [0.95, 0.95])  # two of three hits already
    tracker.config = cusum()
    assert tracker.rule.name == "cusum" and tracker.rule.statistic == 0.0
    feed(tracker, [0.95] * 3, t0=100.0)
    s = tracker.rule.statistic
    tracker.config = cusum(cusum_arl_days=60.0)  # same rule: S is kept
    assert tracker.rule.statistic == s
    tracker.config = AlertConfig(threshold=0.9, raise_count=3, raise_window=5)
    assert feed(tracker, [0.95, 0.95], t0=200.0) == []  # the old N-of-M hits are gone
    assert feed(tracker, [0.95], t0=300.0) == [(0, "raise")]
    assert tracker.open_rule == "n_of_m"
