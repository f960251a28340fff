"""Tests of monitor.offline.dcase: equality with scikit-learn (the official evaluator's arithmetic) and hand cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from monitor.offline.dcase import (
    Figures,
    auc,
    hmean,
    machine_figures,
    official_score,
    pauc,
    roc_curve,
)


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random labels with both classes; even seeds give integer scores, so ties abound."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 300))
    y = rng.random(n) < rng.uniform(0.1, 0.9)
    y[:2] = (True, False)
    rng.shuffle(y)
    if seed % 2 == 0:
        s = rng.integers(0, int(rng.integers(2, 12)), n).astype(float) + 2.0 * y * rng.random()
        s = np.round(s)
    else:
        s = rng.normal(size=n) + y * rng.uniform(0, 2)
    return y, s


@pytest.mark.parametrize("seed", range(50))
def test_auc_matches_sklearn(seed: int) -> None:
    y, s = _random_case(seed)
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", range(50))
@pytest.mark.parametrize("max_fpr", [0.1, 0.05, 0.3, 0.999])
def test_pauc_matches_sklearn(seed: int, max_fpr: float) -> None:
    y, s = _random_case(seed)
    assert pauc(y, s, max_fpr) == pytest.approx(roc_auc_score(y, s, max_fpr=max_fpr), abs=1e-12)


def test_pauc_default_is_official_max_fpr() -> None:
    y, s = _random_case(3)
    assert pauc(y, s) == pytest.approx(roc_auc_score(y, s, max_fpr=0.1), abs=1e-12)
    assert pauc(y, s, 1.0) == pytest.approx(auc(y, s), abs=1e-15)


@pytest.mark.parametrize("seed", range(10))
def test_roc_curve_matches_sklearn_points(seed: int) -> None:
    y, s = _random_case(seed)
    fpr, tpr = roc_curve(y, s)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_hand_computed_small_cases() -> None:
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    assert auc(y, s) == pytest.approx(0.75)
    # ROC: (0, .5) -> (.5, .5) -> (.5, 1); area up to FPR .5 is .25; McClish: (1 + (.25-.125)/(.5-.125))/2.
    assert pauc(y, s, max_fpr=0.5) == pytest.approx(2 / 3)
    assert auc([0, 1], [0.2, 0.9]) == 1.0 and pauc([0, 1], [0.2, 0.9]) == 1.0
    assert auc([0, 1], [0.9, 0.2]) == 0.0
    # Perfectly wrong: no area under FPR .1, so (1 - .005/.095)/2 = 9/19.
    assert pauc([0, 1], [0.9, 0.2]) == pytest.approx(9 / 19)
    # All tied: a diagonal ROC is chance for both figures.
    assert auc([0, 1, 0, 1], [3, 3, 3, 3]) == 0.5
    assert pauc([0, 1, 0, 1], [3, 3, 3, 3]) == pytest.approx(0.5)
    # One tie between classes counts half: pairs (a>n) = 1 + 0.5 out of 2.
    assert auc([False, True, False], [1.0, 2.0, 2.0]) == pytest.approx(0.75)


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="one class"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one class"):
        pauc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="equal length"):
        auc([0, 1], [0.1])
    with pytest.raises(ValueError, match="0/1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auc([0, 1], [0.1, math.nan])
    with pytest.raises(ValueError, match="max_fpr"):
        pauc([0, 1], [0.1, 0.2], max_fpr=0.0)


def test_hmean() -> None:
    assert hmean([1.0, 1.0]) == 1.0
    assert hmean([0.5, 1.0]) == pytest.approx(2 / 3)
    assert hmean([0.9, 0.0, 0.8]) == 0.0
    assert math.isnan(hmean([0.5, math.nan]))
    with pytest.raises(ValueError):
        hmean([])
    with pytest.raises(ValueError):
        hmean([0.5, -0.1])


# Source normals .1, .2; target normals .6, .7; a source anomaly at .15 and a target anomaly at .65.
DOMAINS = ["source", "source", "target", "target", "source", "target"]
LABELS = [False, False, False, False, True, True]
SCORES = [0.1, 0.2, 0.6, 0.7, 0.15, 0.65]


def test_machine_figures_domain_selection() -> None:
    f = machine_figures(DOMAINS, LABELS, SCORES)
    # Both anomalies enter each domain's AUC: source gets 3/4 (it would be 1/2 with its own anomaly only),
    # target gets 1/4 (it would be 1/2 with its own anomaly only).
    assert f.auc_source == pytest.approx(0.75)
    assert f.auc_target == pytest.approx(0.25)
    # Over all clips the top score is a normal, so no anomaly is caught below FPR .1: 9/19.
    assert f.pauc == pytest.approx(9 / 19)
    assert f.pauc == pytest.approx(roc_auc_score(LABELS, SCORES, max_fpr=0.1))
    assert (f.n_source_normal, f.n_target_normal, f.n_anomaly) == (2, 2, 2)
    assert f.official == pytest.approx(3 / (1 / 0.75 + 1 / 0.25 + 19 / 9))
    d = f.to_dict()
    assert d["official"] == f.official and d["auc_source"] == f.auc_source and d["n_anomaly"] == 2


def test_machine_figures_missing_domain_is_nan() -> None:
    domains = ["source", "source", None, "source"]
    labels = [False, False, False, True]
    scores = [0.1, 0.5, 0.9, 0.4]
    f = machine_figures(domains, labels, scores)
    assert math.isnan(f.auc_target) and f.n_target_normal == 0
    assert f.auc_source == pytest.approx(0.5)
    # The domain-less normal counts in the pAUC only.
    assert f.pauc == pytest.approx(roc_auc_score(labels, scores, max_fpr=0.1))
    assert f.official == pytest.approx(hmean([f.auc_source, f.pauc]))


def test_machine_figures_errors() -> None:
    with pytest.raises(ValueError, match="one class"):
        machine_figures(["source", "target"], [False, False], [0.1, 0.2])
    with pytest.raises(ValueError, match="'Source'"):
        machine_figures(["Source", "target"], [False, True], [0.1, 0.2])
    with pytest.raises(ValueError, match="length"):
        machine_figures(["source"], [False, True], [0.1, 0.2])


def test_official_score_over_machines() -> None:
    a = Figures(0.8, 0.6, 0.5, 10, 10, 10)
    b = Figures(0.9, math.nan, 0.7, 10, 0, 10)
    assert official_score([a, b]) == pytest.approx(hmean([0.8, 0.6, 0.5, 0.9, 0.7]))
    assert official_score([a]) == pytest.approx(a.official)
    with pytest.raises(ValueError):
        official_score([])
