"""Tests for monitor.scoring.knn: every metric against a brute-force numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.errors import KnnError
from monitor.scoring.knn import LOO_FOLDS, METRICS, WHITENED, KnnScorer

RTOL = 1e-5
ATOL = 1e-6


SHRINKAGE = 0.5


def _floored_std(stats: np.ndarray) -> np.ndarray:
    std = stats.std(axis=0)
    top = std.max()
    return np.maximum(std, top * 1e-8) if top > 0 else np.ones_like(std)


def _distances(bank: np.ndarray, q: np.ndarray, metric: str, stats: np.ndarray) -> np.ndarray:
    """[M, N] distances; whitened metrics take their statistics from ``stats``."""
    bank = bank.astype(np.float64)
    q = q.astype(np.float64)
    if metric == 'cosine':
        b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
        return 1.0 - (q / np.linalg.norm(q, axis=1, keepdims=True)) @ b.T
    diff = q[:, None, :] - bank[None, :, :]
    if metric == 'euclidean':
        return np.sqrt((diff**2).sum(axis=2))
    std = _floored_std(stats.astype(np.float64))
    if metric == 'std-euclidean':
        return np.sqrt(((diff / std) ** 2).sum(axis=2))
    # Mahalanobis by the textbook quadratic form with an explicit inverse.
    centred = stats.astype(np.float64) - stats.mean(axis=0)
    cov = (1 - SHRINKAGE) * np.cov(centred.T, bias=True) + SHRINKAGE * np.diag(std**2)
    inverse = np.linalg.inv(cov)
    return np.sqrt(np.maximum(np.einsum('mnd,de,mne->mn', diff, inverse, diff), 0.0))


def brute_force(bank: np.ndarray, conditions: list[str], queries: np.ndarray, metric: str, k: int,
                stats: np.ndarray | None = None) -> np.ndarray:
    """Per-condition mean of the k nearest distances, minimum over conditions."""
    dist = _distances(bank, queries, metric, bank if stats is None else stats)
    labels = np.array(conditions)
    per_condition = []
    for name in sorted(set(conditions)):
        sub = np.sort(dist[:, labels == name], axis=1)
        per_condition.append(sub[:, :min(k, sub.shape[1])].mean(axis=1))
    return np.min(per_condition, axis=0)


def brute_force_leave_one_out(bank: np.ndarray, conditions: list[str], metric: str, k: int) -> np.ndarray:
    """Neighbours: the bank without the item; whitening statistics: the bank without the item's fold."""
    n = len(bank)
    folds = np.arange(n) % min(n, LOO_FOLDS)
    out = []
    for i in range(n):
        keep = np.arange(n) != i
        stats = bank[folds != folds[i]] if metric in WHITENED else None
        out.append(brute_force(bank[keep], [c for c, kp in zip(conditions, keep) if kp], bank[i:i + 1], metric, k,
                               stats=stats)[0])
    return np.array(out)


def _random_bank(seed: int, dim: int = 16) -> tuple[np.ndarray, list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = {'fast': 40, 'slow': 11, 'idle': 3}
    # Conditions differ in location so that the minimum over conditions matters.
    parts = [rng.normal(loc=3.0 * i, scale=1.0 + i, size=(n, dim)) for i, n in enumerate(sizes.values())]
    bank = np.concatenate(parts).astype(np.float32)
    bank[:, 0] *= 50.0  # unequal scales, so std-euclidean differs from euclidean
    conditions = [name for name, n in sizes.items() for _ in range(n)]
    order = rng.permutation(len(bank))  # interleave conditions
    queries = (rng.normal(size=(25, dim)) * 3.0 + 2.0).astype(np.float32)
    queries[:, 0] *= 50.0
    return bank[order], [conditions[i] for i in order], queries


@pytest.mark.parametrize('metric', METRICS)
@pytest.mark.parametrize('k', [1, 2, 5, 50])
def test_score_matches_brute_force(metric: str, k: int) -> None:
    bank, conditions, queries = _random_bank(seed=k)
    scorer = KnnScorer(bank, conditions, metric=metric, k=k)
    got = scorer.score(queries)
    assert got.dtype == np.float64 and got.shape == (len(queries),)
    np.testing.assert_allclose(got, brute_force(bank, conditions, queries, metric, k), rtol=RTOL, atol=ATOL)
    # One query at a time (the daemon's pattern) gives the same scores as a batch.
    single = np.array([scorer.score(q[None, :])[0] for q in queries])
    np.testing.assert_allclose(single, got, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('metric', METRICS)
def test_score_without_conditions_is_one_pooled_bank(metric: str) -> None:
    bank, _, queries = _random_bank(seed=7)
    got = KnnScorer(bank, metric=metric, k=3).score(queries)
    np.testing.assert_allclose(got, brute_force(bank, ['all'] * len(bank), queries, metric, 3), rtol=RTOL, atol=ATOL)


def test_minimum_over_conditions_lets_a_small_condition_count() -> None:
    big = np.array([[10.0, 0.0], [11.0, 0.0], [12.0, 0.0]], dtype=np.float32)
    small = np.array([[0.0, 0.0]], dtype=np.float32)
    bank = np.concatenate([big, small])
    query = np.array([[0.0, 1.0]], dtype=np.float32)

    per_condition = KnnScorer(bank, ['big'] * 3 + ['small'], metric='euclidean', k=2)
    # k is clipped to the one clip of 'small': distance 1, below big's mean distance.
    assert per_condition.score(query)[0] == pytest.approx(1.0)

    pooled = KnnScorer(bank, metric='euclidean', k=2)
    assert pooled.score(query)[0] == pytest.approx((1.0 + np.sqrt(101.0)) / 2.0)
    assert per_condition.conditions == ('big', 'small')


@pytest.mark.parametrize('metric', METRICS)
@pytest.mark.parametrize('k', [1, 3, 12])
def test_leave_one_out_matches_brute_force(metric: str, k: int) -> None:
    bank, conditions, _ = _random_bank(seed=100 + k)
    scorer = KnnScorer(bank, conditions, metric=metric, k=k)
    got = scorer.leave_one_out()
    assert got.dtype == np.float64 and got.shape == (len(bank),)
    np.testing.assert_allclose(got, brute_force_leave_one_out(bank, conditions, metric, k), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('metric', [m for m in METRICS if m not in WHITENED])
def test_leave_one_out_is_the_score_had_it_not_been_enrolled(metric: str) -> None:
    bank, conditions, _ = _random_bank(seed=3)
    got = KnnScorer(bank, conditions, metric=metric, k=4).leave_one_out()
    for i in range(len(bank)):
        keep = np.arange(len(bank)) != i
        without = KnnScorer(bank[keep], [c for c, kp in zip(conditions, keep) if kp], metric=metric, k=4)
        assert got[i] == pytest.approx(without.score(bank[i:i + 1])[0], rel=RTOL, abs=ATOL)


def test_leave_one_out_whitening_excludes_the_item() -> None:
    # Dimension 1 is non-constant only because of item 0: statistics that
    # included item 0 would make it look close; without its fold that
    # dimension is constant and gets the floored std, so item 0 is far away.
    rng = np.random.default_rng(5)
    bank = rng.normal(size=(20, 4)).astype(np.float32)
    bank[:, 1] = 0.0
    bank[0, 1] = 1000.0
    bank[:, 3] = 7.0  # constant in the whole bank
    for metric in WHITENED:
        got = KnnScorer(bank, metric=metric, k=2).leave_one_out()
        expected = brute_force_leave_one_out(bank, ['x'] * 20, metric, 2)
        # Item 0's distance lives on a floored (near-singular) scale, where only its size is meaningful.
        np.testing.assert_allclose(got[1:], expected[1:], rtol=RTOL)
        assert got[0] > 1e6 and expected[0] > 1e6
        assert np.all(got[1:] < 10)


def test_mahalanobis_with_full_shrinkage_is_std_euclidean() -> None:
    bank, conditions, queries = _random_bank(seed=9)
    maha = KnnScorer(bank, conditions, metric='mahalanobis', k=2, shrinkage=1.0)
    std = KnnScorer(bank, conditions, metric='std-euclidean', k=2)
    np.testing.assert_allclose(maha.score(queries), std.score(queries), rtol=RTOL)


@pytest.mark.parametrize('metric', METRICS)
def test_leave_one_out_with_duplicates(metric: str) -> None:
    rng = np.random.default_rng(11)
    base = rng.normal(size=(30, 8)).astype(np.float32) + 5.0
    bank = np.concatenate([base, base[:10]])  # ten exact twins
    conditions = ['a'] * 20 + ['b'] * 10 + ['a'] * 10
    got = KnnScorer(bank, conditions, metric=metric, k=1).leave_one_out()
    np.testing.assert_allclose(got, brute_force_leave_one_out(bank, conditions, metric, 1), rtol=RTOL, atol=ATOL)
    assert np.all(got[:10] < 1e-3) and np.all(got[30:] < 1e-3)


@pytest.mark.parametrize('metric', METRICS)
def test_leave_one_out_singleton_condition_falls_back_to_the_others(metric: str) -> None:
    bank = np.array([[1.0, 0.0], [2.0, 0.5], [3.0, 1.0], [0.5, 4.0]], dtype=np.float32)
    conditions = ['a', 'a', 'a', 'lonely']
    got = KnnScorer(bank, conditions, metric=metric, k=2).leave_one_out()
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, brute_force_leave_one_out(bank, conditions, metric, 2), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('metric', METRICS)
def test_leave_one_out_of_a_single_embedding_is_nan(metric: str) -> None:
    got = KnnScorer(np.ones((1, 3), dtype=np.float32), metric=metric).leave_one_out()
    assert got.shape == (1,) and np.isnan(got[0])


def test_constant_dimension_does_not_explode_std_euclidean() -> None:
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(30, 5)).astype(np.float32)
    bank[:, 2] = 4.0
    scorer = KnnScorer(bank, metric='std-euclidean', k=3)
    same = bank[:5].copy()
    assert np.all(np.isfinite(scorer.score(same)))
    expected = brute_force(bank, ['x'] * 30, same, 'std-euclidean', 3)
    np.testing.assert_allclose(scorer.score(same), expected, rtol=RTOL, atol=ATOL)
    off = same.copy()
    off[:, 2] = 4.5  # a change in a dimension that never varied is very anomalous
    assert np.all(scorer.score(off) > 1e6)


def test_zero_vector_has_cosine_distance_one() -> None:
    bank = np.eye(3, dtype=np.float32)
    assert KnnScorer(bank).score(np.zeros((1, 3), dtype=np.float32))[0] == pytest.approx(1.0)


def test_empty_query_batch() -> None:
    got = KnnScorer(np.eye(3, dtype=np.float32)).score(np.zeros((0, 3), dtype=np.float32))
    assert got.shape == (0,) and got.dtype == np.float64


@pytest.mark.parametrize(('kwargs', 'message'), [
    ({'embeddings': np.zeros((0, 4), dtype=np.float32)}, 'empty bank'),
    ({'embeddings': np.zeros(4, dtype=np.float32)}, '2-D'),
    ({'embeddings': np.zeros((3, 0), dtype=np.float32)}, 'dimension 0'),
    ({'embeddings': np.array([[1.0, np.nan]], dtype=np.float32)}, 'NaN or Inf'),
    ({'embeddings': np.array([[1.0, 2.0], [np.inf, 0.0]])}, 'row 1'),
    ({'embeddings': np.array([['a', 'b']])}, 'numeric'),
    ({'k': 0}, 'k must be'),
    ({'k': 1.5}, 'k must be'),
    ({'k': True}, 'k must be'),
    ({'metric': 'manhattan'}, 'unknown metric'),
    ({'conditions': ['a', 'b']}, '2 labels for 3'),
    ({'conditions': ['a', 'b', 3]}, 'label 2'),
])
def test_invalid_construction(kwargs: dict, message: str) -> None:
    args = {'embeddings': np.ones((3, 2), dtype=np.float32)} | kwargs
    with pytest.raises(KnnError, match=message) as info:
        KnnScorer(**args)
    assert '\n' not in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(('queries', 'message'), [
    (np.ones((2, 5), dtype=np.float32), 'dimension 5 does not match'),
    (np.ones(4, dtype=np.float32), '2-D'),
    (np.array([[1.0, 2.0, np.nan, 0.0]], dtype=np.float32), 'NaN or Inf'),
    (np.array([[1.0, 2.0, 1e300, 0.0]]), 'overflows float32'),
])
def test_invalid_queries(queries: np.ndarray, message: str) -> None:
    scorer = KnnScorer(np.ones((3, 4), dtype=np.float32))
    with pytest.raises(KnnError, match=message):
        scorer.score(queries)
