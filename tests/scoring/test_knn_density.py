"""Density-normalised KNN (scoring.normalisation: density) on synthetic clusters."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.errors import KnnError
from monitor.scoring.knn import METRICS, WHITENED, KnnScorer
from monitor.scoring.ranking import RankReference
from tests.scoring.test_knn import _random_bank, brute_force, brute_force_leave_one_out

DIM = 6


def two_densities(seed: int = 0, n: int = 200) -> tuple[np.ndarray, list[str], dict[str, tuple[np.ndarray, float]]]:
    """A dense condition (spread 0.02) and a sparse one (spread 0.2) on two orthogonal unit axes; the
    spread lies in dimensions 2..5, so every metric (cosine too: angles) sees it."""
    rng = np.random.default_rng(seed)
    clusters = {"dense": (np.eye(DIM)[0], 0.02), "sparse": (np.eye(DIM)[1], 0.2)}
    rows, labels = [], []
    for name, (centre, spread) in clusters.items():
        noise = np.zeros((n, DIM))
        noise[:, 2:] = rng.normal(scale=spread, size=(n, DIM - 2))
        rows.append(centre + noise)
        labels += [name] * n
    return np.concatenate(rows).astype(np.float32), labels, clusters


@pytest.mark.parametrize("metric", METRICS)
def test_equally_far_in_local_spread_scores_alike_only_when_normalised(metric: str) -> None:
    bank, labels, clusters = two_densities()
    queries = np.stack([centre + 4 * spread * np.eye(DIM)[2] for centre, spread in clusters.values()]).astype(np.float32)
    raw = KnnScorer(bank, labels, metric, k=5).score(queries)
    density, nearest = KnnScorer(bank, labels, metric, k=5, normalisation="density").score_with_conditions(queries)
    assert nearest == ["dense", "sparse"]
    assert raw[1] / raw[0] > 5  # 10x the spread: 10x the distance (100x for cosine's 1 - cos)
    assert 0.75 < density[1] / density[0] < 1.33
    assert (density > 2).all()  # both well beyond their condition's own spread


@pytest.mark.parametrize("metric", METRICS)
def test_density_reference_keeps_ranks_calibrated(metric: str) -> None:
    bank, labels, _ = two_densities(seed=1)
    fresh, fresh_labels, _ = two_densities(seed=2, n=100)
    scorer = KnnScorer(bank, labels, metric, k=3, normalisation="density")
    ranks = RankReference(scorer.leave_one_out()).rank(scorer.score(fresh))
    assert 0.4 < ranks.mean() < 0.6  # normal audio ranks about uniformly against the bank's own
    assert (ranks > 0.99).mean() < 0.05


@pytest.mark.parametrize("metric", [m for m in METRICS if m not in WHITENED])
@pytest.mark.parametrize("k", [1, 3])
def test_density_leave_one_out_is_the_score_had_it_not_been_enrolled(metric: str, k: int) -> None:
    """Also the neighbours' own-distances are recomputed without the left-out window."""
    bank, labels, _ = two_densities(seed=3, n=12)
    got = KnnScorer(bank, labels, metric, k=k, normalisation="density").leave_one_out()
    for i in range(len(bank)):
        keep = np.arange(len(bank)) != i
        without = KnnScorer(bank[keep], [c for c, kp in zip(labels, keep) if kp], metric, k=k, normalisation="density")
        np.testing.assert_allclose(got[i], without.score(bank[i:i + 1])[0], rtol=1e-5)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 4])
def test_none_reproduces_the_unnormalised_scores_exactly(metric: str, k: int) -> None:
    bank, conditions, queries = _random_bank(seed=4)
    scorer = KnnScorer(bank, conditions, metric=metric, k=k, normalisation="none")
    default = KnnScorer(bank, conditions, metric=metric, k=k)
    np.testing.assert_array_equal(scorer.score(queries), default.score(queries))
    np.testing.assert_array_equal(scorer.leave_one_out(), default.leave_one_out())
    np.testing.assert_allclose(scorer.score(queries), brute_force(bank, conditions, queries, metric, k), rtol=1e-5, atol=1e-6)
    if metric not in WHITENED:
        np.testing.assert_allclose(scorer.leave_one_out(), brute_force_leave_one_out(bank, conditions, metric, k),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_duplicates_and_singletons_stay_finite(metric: str) -> None:
    rng = np.random.default_rng(5)
    base = rng.normal(size=(6, 4)).astype(np.float32)
    queries = np.concatenate([base, rng.normal(size=(3, 4)).astype(np.float32)])
    for distinct in (0, 6):  # only duplicates; duplicates among distinct windows
        more = rng.normal(size=(distinct, 4)).astype(np.float32)
        bank = np.concatenate([base, base, more, base[:1] + 3])  # six windows twice, one alone
        labels = ["a"] * (12 + distinct) + ["alone"]
        scorer = KnnScorer(bank, labels, metric, k=1, normalisation="density")
        assert np.isfinite(scorer.leave_one_out()).all()
        got = scorer.score(queries)
        assert np.isfinite(got).all()
        if distinct:  # enrolled: distance ~0 over a floored denominator (with only duplicates a
            # cosine bank's own-distances are float32 noise, ~1e-7, and so is the distance)
            assert (got[:6] < 1e-3).all()


def test_unknown_normalisation_is_refused() -> None:
    with pytest.raises(KnnError, match="normalisation"):
        KnnScorer(np.eye(3, dtype=np.float32), normalisation="local")
