"""Ranks: making backbones whose raw distances live on unrelated scales comparable, and fusing them.

A cosine distance of 0.02 from one backbone and a Euclidean distance of 40 from another cannot
be added. Each score is first turned into its rank within a reference set of scores of the same
backbone (a number in [0, 1]: the share of the reference below it), and ranks are combined.

The reference (``RankReference``) has two parts:

* anchored: the bank's leave-one-out distances (what enrolled normal audio scores against the
  rest of the bank). Never evicted, so a slow drift can never redefine "normal".
* rolling (live only): distances of recent clearly normal windows, bounded. It lets the
  reference follow the room (a neighbouring machine switched on) without learning faults; the
  daemon decides which windows are clearly normal (``monitor.service.pipeline``).

``zmin`` fusion (Z-MIN back-end, arXiv 2509.10951) fuses raw scores instead of ranks: each
backbone's score is z-normalised by the mean and std of its own bank's leave-one-out scores and
the minimum over backbones is taken (``ZMin``). It needs no labels and, unlike a rank, keeps how
far beyond the bank's spread a score lies.

Offline evaluation also ranks each backbone's clip scores within the test set itself
(``self_rank``: the method's transductive rank fusion).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import get_args

import numpy as np

from monitor.config import FusionRule
from monitor.errors import RankingError

RULES: tuple[str, ...] = get_args(FusionRule)


def _twice_below(sorted_reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per value: twice the count of reference values below it plus the count equal to it.

    Counting ties half (mid-rank) keeps a score equal to every reference value at 0.5, not at
    0 or 1. Integers, so counts from several sorted parts add up exactly.
    """
    return np.searchsorted(sorted_reference, values, "left") + np.searchsorted(sorted_reference, values, "right")


def _finite_sorted(values: np.ndarray) -> np.ndarray:
    values = np.sort(np.asarray(values, dtype=np.float64))
    return values[np.isfinite(values)]


def rank_ratio(reference: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Share of ``reference`` below each score, ties counted half, in [0, 1]; non-finite
    reference values are skipped."""
    ref = _finite_sorted(reference)
    if ref.size == 0:
        raise RankingError("rank reference is empty")
    return _twice_below(ref, np.asarray(scores, dtype=np.float64)) / (2.0 * ref.size)


def self_rank(scores: np.ndarray) -> np.ndarray:
    """Rank of each score within the set itself (the offline, transductive reference)."""
    return rank_ratio(scores, scores)


class RankReference:
    """One backbone's reference: anchored leave-one-out distances plus, live, a bounded window
    of recent normal distances (``rolling_size`` 0: anchored only, as offline)."""

    def __init__(self, anchored: np.ndarray, rolling_size: int = 0) -> None:
        self._anchored = _finite_sorted(anchored)
        if self._anchored.size == 0:
            raise RankingError("rank reference: the bank gave no finite leave-one-out score")
        self._rolling: deque[float] = deque(maxlen=rolling_size)

    def __len__(self) -> int:
        return self._anchored.size + len(self._rolling)

    @property
    def anchored(self) -> np.ndarray:
        return self._anchored

    @property
    def rolling_count(self) -> int:
        return len(self._rolling)

    def rank(self, scores: np.ndarray | float) -> np.ndarray:
        """Share of the reference below each score, ties counted half (same shape as ``scores``)."""
        values = np.asarray(scores, dtype=np.float64)
        twice = _twice_below(self._anchored, values)
        if self._rolling:
            twice = twice + _twice_below(np.sort(np.fromiter(self._rolling, np.float64, len(self._rolling))), values)
        return twice / (2.0 * len(self))

    def add(self, score: float) -> None:
        """Remember a normal window's distance (the caller decides what is normal)."""
        if np.isfinite(score):
            self._rolling.append(float(score))


# A backbone whose leave-one-out scores are all equal has no spread to divide by: its std is
# floored at this share of |mean| (or at 1 when the mean is 0), so z stays finite.
_ZMIN_STD_FLOOR = 1e-12


class ZMin:
    """Z-MIN fusion fitted on the bank: per backbone the mean and std of its leave-one-out scores,
    and the reference of fused values the bank itself gets.

    Why the minimum: a window is only called anomalous when every backbone finds it far from
    normal in units of that backbone's own normal spread, which suppresses one backbone's false
    alarms (the study's finding for domain-shifted test data). With one backbone the z-score is
    an increasing function of the raw score, so the fused value orders windows as it does.

    The alert threshold needs a rank in [0, 1], not a z value, so ``rank`` places a z-min value
    within the z-min values of the bank's own leave-one-out scores (each bank window's per-backbone
    leave-one-out scores, z-normalised the same way, minimum over backbones): the same calibration
    mean/max get from ranking each backbone against its leave-one-out reference. This reference
    is anchored only: the daemon's rolling per-backbone references do not enter it.
    """

    def __init__(self, leave_one_out: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None) -> None:
        names = [n for n in leave_one_out if weights is None or weights.get(n, 1.0) > 0]
        if not names:
            raise RankingError("zmin: no backbone with a weight above 0")
        self.stats: dict[str, tuple[float, float]] = {}
        for name in names:
            values = np.asarray(leave_one_out[name], dtype=np.float64)
            finite = values[np.isfinite(values)]
            if finite.size == 0:
                raise RankingError(f"zmin: backbone {name} has no finite leave-one-out score")
            mean, std = float(finite.mean()), float(finite.std())
            self.stats[name] = (mean, max(std, _ZMIN_STD_FLOOR * abs(mean)) or 1.0)
        # Rows are the same bank windows for every backbone (nan where a row was not scored, so
        # such a row's minimum is nan and RankReference skips it).
        self.reference = RankReference(self.values(leave_one_out))

    def values(self, raw: Mapping[str, np.ndarray]) -> np.ndarray:
        """Minimum over the fitted backbones of the z-normalised raw scores (unbounded)."""
        z = [(np.asarray(raw[name], dtype=np.float64) - mean) / std for name, (mean, std) in self.stats.items()]
        with np.errstate(invalid='ignore'):
            return np.min(np.stack(z), axis=0)

    def rank(self, raw: Mapping[str, np.ndarray]) -> np.ndarray:
        """The fused value as a rank in [0, 1] within the bank's own z-min values."""
        return np.asarray(self.reference.rank(self.values(raw)))


def fuse(ranks: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None, rule: str = "mean") -> np.ndarray:
    """Combine per-backbone ranks into one score in [0, 1].

    ``mean`` is the weighted mean of ranks (weights need not sum to one); ``max`` takes the
    largest weighted rank, so one backbone that is sure can raise the alarm alone. Backbones
    with weight 0 are ignored. ``zmin`` fuses raw scores, not ranks: use ``ZMin``.
    """
    if rule == "zmin":
        raise RankingError("zmin fuses raw scores with the bank's statistics: use ranking.ZMin, not fuse")
    if rule not in RULES:
        raise RankingError(f"fusion rule {rule!r} is not one of {', '.join(RULES)}")
    if not ranks:
        raise RankingError("nothing to fuse: no backbone ranks")
    weights = dict(weights) if weights else {name: 1.0 for name in ranks}
    unknown = sorted(set(weights) - set(ranks))
    if unknown:
        raise RankingError(f"fusion weights name backbones without scores: {', '.join(unknown)}")
    if any(not np.isfinite(w) or w < 0 for w in weights.values()):
        raise RankingError(f"fusion weights must be finite and >= 0, got {weights}")
    active = {name: w for name, w in weights.items() if w > 0}
    if not active:
        raise RankingError("fusion weights are all zero")
    stacked = np.stack([np.asarray(ranks[name], dtype=np.float64) for name in active])
    w = np.array(list(active.values()))[:, None]
    if rule == "mean":
        return (stacked * w).sum(axis=0) / w.sum()
    return (stacked * (w / w.max())).max(axis=0)
