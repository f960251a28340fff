"""Tests for the index choice in monitor.scoring.knn: ``index`` = auto | flat | hnsw.

Live scores may come from an approximate (HNSW) index on large condition sub-banks; the
leave-one-out reference must stay exact whatever the index, so both are checked against the
brute-force references of tests/test_knn.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import monitor.scoring.knn as knn
from monitor.errors import KnnError
from monitor.scoring.knn import INDEX_TYPES, METRICS, KnnScorer
from tests.scoring.test_knn import (
    ATOL,
    RTOL,
    _random_bank,
    brute_force,
    brute_force_leave_one_out,
)


def _clustered(seed: int, n: int = 2000, dim: int = 32, clusters: int = 20, queries: int = 60):
    """Well-separated clusters: an HNSW graph finds the true neighbours of almost every query."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=5.0, size=(clusters, dim))
    labels = rng.integers(0, clusters, n + queries)
    points = (centres[labels] + rng.normal(size=(n + queries, dim))).astype(np.float32)
    return points[:n], points[n:]


def test_index_types_are_documented() -> None:
    assert INDEX_TYPES == ('auto', 'flat', 'hnsw')
    assert KnnScorer(np.eye(3, dtype=np.float32)).index == 'auto'
    with pytest.raises(KnnError, match="unknown index 'ivf'"):
        KnnScorer(np.eye(3, dtype=np.float32), index='ivf')


def test_auto_is_flat_for_banks_below_the_threshold() -> None:
    bank, conditions, _ = _random_bank(seed=1)
    scorer = KnnScorer(bank, conditions, metric='mahalanobis', k=2)
    assert set(scorer.index_types.values()) == {'flat'}
    assert knn.AUTO_HNSW_MIN_SIZE > len(bank)


def test_auto_chooses_per_condition_sub_bank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn, 'AUTO_HNSW_MIN_SIZE', 40)
    bank, conditions, queries = _random_bank(seed=2)  # fast: 40, slow: 11, idle: 3
    scorer = KnnScorer(bank, conditions, metric='euclidean', k=3)
    assert scorer.index_types == {'fast': 'hnsw', 'idle': 'flat', 'slow': 'flat'}
    # Tiny graphs are searched exhaustively in practice: same scores as brute force.
    np.testing.assert_allclose(scorer.score(queries), brute_force(bank, conditions, queries, 'euclidean', 3),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('index', ['flat', 'hnsw'])
def test_forced_index_applies_to_every_condition(index: str) -> None:
    bank, conditions, _ = _random_bank(seed=3)
    assert set(KnnScorer(bank, conditions, index=index).index_types.values()) == {index}


@pytest.mark.parametrize('metric', METRICS)
def test_hnsw_scores_are_close_to_exact_and_never_below(metric: str) -> None:
    bank, queries = _clustered(seed=4)
    flat = KnnScorer(bank, metric=metric, k=3, index='flat').score(queries)
    hnsw = KnnScorer(bank, metric=metric, k=3, index='hnsw').score(queries)
    # An approximate search can only miss neighbours, so its mean distance is never smaller.
    assert np.all(hnsw >= flat - 1e-5 * np.abs(flat) - ATOL)
    assert np.mean(np.isclose(hnsw, flat, rtol=1e-4, atol=ATOL)) >= 0.95


@pytest.mark.parametrize('metric', METRICS)
@pytest.mark.parametrize('k', [1, 4])
def test_leave_one_out_stays_exact_with_hnsw(metric: str, k: int) -> None:
    bank, conditions, _ = _random_bank(seed=10 + k)
    scorer = KnnScorer(bank, conditions, metric=metric, k=k, index='hnsw')
    assert set(scorer.index_types.values()) == {'hnsw'}
    got = scorer.leave_one_out()
    np.testing.assert_allclose(got, brute_force_leave_one_out(bank, conditions, metric, k), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(got, KnnScorer(bank, conditions, metric=metric, k=k, index='flat').leave_one_out())


@pytest.mark.parametrize('metric', METRICS)
def test_leave_one_out_with_hnsw_on_a_larger_bank_equals_flat(metric: str) -> None:
    # Large enough that an HNSW search would not be exhaustive: the reference must not use it.
    bank, _ = _clustered(seed=5, n=1500, dim=16, clusters=5)
    flat = KnnScorer(bank, metric=metric, k=2, index='flat').leave_one_out()
    hnsw = KnnScorer(bank, metric=metric, k=2, index='hnsw').leave_one_out()
    np.testing.assert_array_equal(hnsw, flat)


def test_leave_one_out_with_duplicates_and_hnsw() -> None:
    rng = np.random.default_rng(11)
    base = rng.normal(size=(30, 8)).astype(np.float32) + 5.0
    bank = np.concatenate([base, base[:10]])
    conditions = ['a'] * 20 + ['b'] * 10 + ['a'] * 10
    got = KnnScorer(bank, conditions, metric='euclidean', k=1, index='hnsw').leave_one_out()
    np.testing.assert_allclose(got, brute_force_leave_one_out(bank, conditions, 'euclidean', 1), rtol=RTOL, atol=ATOL)


def test_hnsw_with_k_above_ef_search_and_above_a_condition_size() -> None:
    rng = np.random.default_rng(6)
    bank = rng.normal(size=(300, 8)).astype(np.float32)
    conditions = ['big'] * 290 + ['tiny'] * 10
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    k = knn.HNSW_EF_SEARCH + 20  # search must widen to k; 'tiny' clips k to 10
    got = KnnScorer(bank, conditions, metric='euclidean', k=k, index='hnsw').score(queries)
    np.testing.assert_allclose(got, brute_force(bank, conditions, queries, 'euclidean', k), rtol=1e-4, atol=ATOL)


def test_missing_graph_results_fall_back_to_exact_search() -> None:
    bank, queries = _clustered(seed=7, n=200, dim=8, clusters=4, queries=6)
    scorer = KnnScorer(bank, metric='euclidean', k=2, index='hnsw')
    expected = KnnScorer(bank, metric='euclidean', k=2, index='flat').score(queries)
    real = scorer._indexes[0]

    class Incomplete:
        """A graph search that finds nothing for every other query."""

        storage = real.storage

        def search(self, x, k):
            d, i = real.search(x, k)
            d[::2], i[::2] = np.finfo(np.float32).max, -1
            return d, i

    scorer._indexes[0] = Incomplete()
    original = knn._exact
    try:
        knn._exact = lambda index: original(real)
        np.testing.assert_allclose(scorer.score(queries), expected, rtol=RTOL, atol=ATOL)
    finally:
        knn._exact = original


@pytest.mark.parametrize('metric', METRICS)
@pytest.mark.parametrize('index', ['flat', 'hnsw'])
def test_leave_one_out_sample_is_exact_on_its_rows(metric: str, index: str) -> None:
    bank, conditions, _ = _random_bank(seed=20)  # 54 embeddings
    scorer = KnnScorer(bank, conditions, metric=metric, k=2, index=index)
    full = scorer.leave_one_out()
    sample = scorer.leave_one_out(max_rows=12)
    chosen = np.flatnonzero(np.isfinite(sample))
    assert chosen.size == 12 and chosen[0] == 0 and chosen[-1] == len(bank) - 1  # spread over the bank
    np.testing.assert_array_equal(sample[chosen], full[chosen])
    np.testing.assert_array_equal(scorer.leave_one_out(max_rows=len(bank)), full)
    np.testing.assert_array_equal(scorer.leave_one_out(max_rows=10 * len(bank)), full)


@pytest.mark.parametrize('bad', [0, -1, 2.5, True, '10'])
def test_leave_one_out_rejects_a_bad_sample_size(bad) -> None:
    with pytest.raises(KnnError, match='max_rows'):
        KnnScorer(np.random.default_rng(0).normal(size=(5, 3))).leave_one_out(max_rows=bad)


def test_a_sampled_reference_ranks_like_the_full_one() -> None:
    from monitor.scoring.ranking import rank_ratio

    bank, queries = _clustered(seed=8, n=3000, dim=16, clusters=10, queries=200)
    scorer = KnnScorer(bank, metric='mahalanobis', k=1)
    scores = scorer.score(queries)
    full = rank_ratio(scorer.leave_one_out(), scores)
    sampled = rank_ratio(scorer.leave_one_out(max_rows=1000), scores)  # nan rows are skipped
    assert np.max(np.abs(full - sampled)) < 0.05


def test_scoring_config_reaches_the_detector() -> None:
    """``scoring.index`` and ``scoring.reference_max_windows`` from the config are what the
    daemon's detector uses (logmel: the shipped ONNX model)."""
    from dataclasses import replace

    from monitor.bank.model import Bank, BankItem
    from monitor.config import BackboneConfig, Config
    from monitor.scoring.detector import Detector

    config = Config(backbones=[BackboneConfig("logmel")])
    config = replace(config, scoring=replace(config.scoring, index="hnsw", reference_max_windows=40))
    detector = Detector.from_config(config)
    (name,) = detector.model_ids
    rng = np.random.default_rng(3)
    n = 120
    items = [BankItem(source=f"clip{i}.wav", offset_s=0.0, condition="default", enrolled_at="2026-01-01T00:00:00+00:00")
             for i in range(n)]
    dim = detector.backbones[0].meta.embedding_dim
    bank = Bank().add(items, {name: rng.normal(size=(n, dim)).astype(np.float32)}, detector.model_ids)
    detector.fit(bank)
    backbone = detector.backbones[0].name
    assert detector._knn[backbone].index_types == {"default": "hnsw"}
    reference = detector.reference(backbone)
    assert np.isfinite(reference).sum() == 40  # only the sample's rows are computed
