"""The paired, stratified bootstrap of the DCASE figures (monitor.offline.dcase), on synthetic scores."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.offline.dcase import (
    bootstrap_intervals,
    bootstrap_weights,
    machine_figures,
    official_score,
    resampled_figures,
)


def _machine(rng: np.random.Generator, n_source: int, n_target: int, n_anomaly: int, shift: float = 1.5):
    """(domains, labels, scores): normals ~ N(0, 1), anomalies ~ N(shift, 1), anomalies split over domains."""
    domains = ["source"] * n_source + ["target"] * n_target + ["source", "target"] * (n_anomaly // 2)
    labels = [False] * (n_source + n_target) + [True] * (n_anomaly // 2 * 2)
    scores = rng.normal(size=len(labels)) + shift * np.array(labels)
    return domains, labels, scores


def _set(seed: int):
    """Two machines the size of fan-noisy's test set and a smaller one; one system ``a``."""
    rng = np.random.default_rng(seed)
    machines = {"fan": _machine(rng, 12, 8, 36), "pump": _machine(rng, 10, 6, 20)}
    clips = {m: (d, y) for m, (d, y, _) in machines.items()}
    return machines, clips, {"a": {m: s for m, (_, _, s) in machines.items()}}


def _width(pair: list[float]) -> float:
    return pair[1] - pair[0]


def test_unit_weights_give_the_point_figures() -> None:
    """Every clip drawn once is the test set itself: the vectorised figures equal machine_figures,
    ties and a pAUC limit other than the official one included."""
    rng = np.random.default_rng(3)
    for max_fpr in (0.1, 0.25, 1.0):
        domains, labels, scores = _machine(rng, 9, 5, 14)
        scores = np.round(scores, 1)  # ties between normals and anomalies
        point = machine_figures(domains, labels, scores, max_fpr)
        resampled = resampled_figures(domains, labels, scores, np.ones((2, len(labels)), dtype=int), max_fpr)
        for name in ("auc_source", "auc_target", "pauc", "official"):
            assert resampled[name] == pytest.approx([getattr(point, name)] * 2, abs=1e-12)


def test_interval_contains_the_point_estimate() -> None:
    machines, clips, scores = _set(0)
    boot = bootstrap_intervals(clips, scores)
    point = official_score(machine_figures(d, y, s) for d, y, s in machines.values())
    low, high = boot["systems"]["a"]["official"]
    assert low < point < high
    for m, (d, y, s) in machines.items():
        fig = machine_figures(d, y, s)
        for name in ("auc_source", "auc_target", "pauc", "official"):
            low, high = boot["machines"][m]["a"][name]
            assert low <= getattr(fig, name) <= high


def test_interval_is_narrower_with_more_clips() -> None:
    """The same clips recorded four times over: same point estimate, an interval about half as
    wide (1/sqrt(n)); tiling rather than fresh draws keeps the test free of sampling luck."""
    _, clips, scores = _set(1)
    clips4 = {m: (list(d) * 4, list(y) * 4) for m, (d, y) in clips.items()}
    scores4 = {"a": {m: np.tile(s, 4) for m, s in scores["a"].items()}}
    ratio = (_width(bootstrap_intervals(clips4, scores4)["systems"]["a"]["official"])
             / _width(bootstrap_intervals(clips, scores)["systems"]["a"]["official"]))
    assert 0.35 < ratio < 0.65


def test_seeded_and_deterministic() -> None:
    _, clips, scores = _set(2)
    first = bootstrap_intervals(clips, scores, n_resamples=200, seed=7)
    assert bootstrap_intervals(clips, scores, n_resamples=200, seed=7) == first
    assert bootstrap_intervals(clips, scores, n_resamples=200, seed=8)["systems"] != first["systems"]
    assert first["resamples"] == 200 and first["seed"] == 7 and first["level"] == 0.95


def test_difference_is_paired() -> None:
    """The same resamples score every system: a system minus itself (or a copy) is exactly 0, and
    a slightly noisier copy differs by far less than the width of either interval."""
    _, clips, scores = _set(4)
    rng = np.random.default_rng(5)
    systems = {"a": scores["a"], "copy": dict(scores["a"]),
               "noisier": {m: s + 0.2 * rng.normal(size=s.size) for m, s in scores["a"].items()}}
    boot = bootstrap_intervals(clips, systems, reference="a")
    assert boot["differences"]["a"]["official"] == [0.0, 0.0]
    assert boot["differences"]["copy"]["official"] == [0.0, 0.0]
    assert _width(boot["differences"]["noisier"]["official"]) < 0.6 * _width(boot["systems"]["noisier"]["official"])
    assert "differences" not in bootstrap_intervals(clips, systems)
    with pytest.raises(ValueError, match="reference"):
        bootstrap_intervals(clips, systems, reference="missing")
    with pytest.raises(ValueError, match="machines"):
        bootstrap_intervals(clips, {"a": {"fan": scores["a"]["fan"]}})


def test_stratification_keeps_every_class_in_every_domain() -> None:
    """With 1 target normal among 40 clips an unstratified resample would often lose it; each
    stratum keeps its size, so every resample has source and target normals and anomalies."""
    domains = ["source"] * 10 + ["target"] + [None] * 2 + ["source"] * 20 + ["target"] * 7
    labels = [False] * 13 + [True] * 27
    weights = bootstrap_weights(domains, labels, 500, np.random.default_rng(0))
    assert weights.shape == (500, 40) and weights.dtype.kind == "i"
    d = np.array([x or "" for x in domains])
    y = np.array(labels)
    for members in (y, ~y & (d == "source"), ~y & (d == "target"), ~y & (d == "")):
        assert (weights[:, members].sum(axis=1) == members.sum()).all()
    assert (weights[:, d == "target"][:, 0] == 1).all()  # the lone target normal is always drawn
    assert weights[:, y].any(axis=1).all() and weights[:, ~y & (d == "source")].any(axis=1).all()
    figures = resampled_figures(domains, labels, np.arange(40.0), weights)
    assert np.isfinite(figures["auc_target"]).all() and np.isfinite(figures["official"]).all()


def test_a_domain_without_normals_stays_undefined() -> None:
    """As in machine_figures: no target normal, AUC target NaN in every resample, official over the rest."""
    domains, labels = ["source"] * 6 + ["source"] * 6, [False] * 6 + [True] * 6
    boot = bootstrap_intervals({"m": (domains, labels)}, {"a": {"m": np.r_[np.zeros(6), np.ones(6)]}}, n_resamples=50)
    fig = boot["machines"]["m"]["a"]
    assert np.isnan(fig["auc_target"]).all() and fig["auc_source"] == [1.0, 1.0] and fig["official"] == [1.0, 1.0]
