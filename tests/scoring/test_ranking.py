"""Rank fusion: ranks within a reference, and combining backbones whose scales differ."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata

from monitor.errors import RankingError
from monitor.scoring.ranking import RankReference, fuse, rank_ratio, self_rank


def test_rank_ratio_counts_ties_half() -> None:
    ref = np.array([1.0, 2.0, 2.0, 3.0])
    np.testing.assert_allclose(rank_ratio(ref, [0.0, 1.0, 2.0, 2.5, 3.0, 9.0]), [0, 0.125, 0.5, 0.75, 0.875, 1.0])


def test_self_rank_is_scipy_average_rank() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 10, 50).astype(float)
    np.testing.assert_allclose(self_rank(x), (rankdata(x) - 0.5) / x.size)


def test_rank_ratio_ignores_non_finite_reference_and_rejects_empty() -> None:
    assert rank_ratio([np.nan, 1.0], [2.0])[0] == 1.0
    with pytest.raises(RankingError, match="empty"):
        rank_ratio([np.nan], [1.0])


def test_fusion_is_scale_free() -> None:
    """Multiplying one backbone's raw scores by 1000 must not change the fused result."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=30), rng.normal(size=30)
    fused = fuse({"a": self_rank(a), "b": self_rank(b)})
    np.testing.assert_allclose(fused, fuse({"a": self_rank(a * 1000), "b": self_rank(b)}))


def test_weighted_mean_and_max() -> None:
    ranks = {"a": np.array([0.2, 0.9]), "b": np.array([0.6, 0.1])}
    np.testing.assert_allclose(fuse(ranks, {"a": 3, "b": 1}), [(0.6 + 0.6) / 4, (2.7 + 0.1) / 4])
    np.testing.assert_allclose(fuse(ranks, rule="max"), [0.6, 0.9])
    np.testing.assert_allclose(fuse(ranks, {"a": 1, "b": 0}), [0.2, 0.9])  # weight 0 = ignored


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"rule": "sum"}, "rule"), ({"weights": {"c": 1}}, "without scores"), ({"weights": {"a": -1}}, ">= 0"),
     ({"weights": {"a": 0, "b": 0}}, "all zero")],
)
def test_fusion_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(RankingError, match=message):
        fuse({"a": np.zeros(2), "b": np.zeros(2)}, **kwargs)


def test_rolling_reference_ranks_like_rank_ratio() -> None:
    rng = np.random.default_rng(0)
    anchored, rolling = rng.normal(size=40), rng.normal(size=10)
    ref = RankReference(anchored, rolling_size=10)
    for value in rolling:
        ref.add(value)
    for q in (-3.0, 0.0, float(rolling[3]), 3.0):
        assert ref.rank(q) == pytest.approx(float(rank_ratio(np.concatenate([anchored, rolling]), [q])[0]))


def test_rolling_part_is_bounded_and_the_anchor_is_never_evicted() -> None:
    ref = RankReference(np.arange(10.0), rolling_size=5)
    for _ in range(100):
        ref.add(100.0)
    assert len(ref) == 15 and ref.rolling_count == 5
    assert ref.rank(-1.0) == 0.0 and ref.rank(50.0) == pytest.approx(10 / 15)


def test_reference_needs_finite_scores() -> None:
    with pytest.raises(RankingError):
        RankReference(np.array([np.nan]), 5)
