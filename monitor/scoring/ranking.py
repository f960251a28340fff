"""Rank fusion: combining backbones whose raw distances live on unrelated scales.

A cosine distance of 0.02 from one backbone and a Euclidean distance of 40 from another cannot
be added. Each score is first turned into its rank within a reference set of scores of the same
backbone (a number in [0, 1]: the share of the reference below it), and ranks are combined.
Offline, the reference is the test set itself (the method's transductive rank fusion); live, it
is the enrolled bank's leave-one-out scores plus recent non-alarming windows.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

RULES = ("mean", "max")


class FusionError(ValueError):
    """Fusion asked for with unknown rules, weights or backbones."""


def rank_ratio(reference: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Share of ``reference`` below each score, ties counted half (mid-rank), in [0, 1].

    Counting ties half keeps a score equal to every reference value at 0.5, not at 0 or 1.
    """
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    ref = ref[np.isfinite(ref)]
    if ref.size == 0:
        raise FusionError("rank reference is empty")
    values = np.asarray(scores, dtype=np.float64)
    below = np.searchsorted(ref, values, side="left")
    at_or_below = np.searchsorted(ref, values, side="right")
    return (below + at_or_below) / (2.0 * ref.size)


def self_rank(scores: np.ndarray) -> np.ndarray:
    """Rank of each score within the set itself (the offline, transductive reference)."""
    return rank_ratio(scores, scores)


def fuse(ranks: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None, rule: str = "mean") -> np.ndarray:
    """Combine per-backbone ranks into one score in [0, 1].

    ``mean`` is the weighted mean of ranks (weights need not sum to one); ``max`` takes the
    largest weighted rank, so one backbone that is sure can raise the alarm alone. Backbones
    with weight 0 are ignored.
    """
    if rule not in RULES:
        raise FusionError(f"fusion rule {rule!r} is not one of {', '.join(RULES)}")
    if not ranks:
        raise FusionError("nothing to fuse: no backbone ranks")
    weights = dict(weights) if weights else {name: 1.0 for name in ranks}
    unknown = sorted(set(weights) - set(ranks))
    if unknown:
        raise FusionError(f"fusion weights name backbones without scores: {', '.join(unknown)}")
    if any(not np.isfinite(w) or w < 0 for w in weights.values()):
        raise FusionError(f"fusion weights must be finite and >= 0, got {weights}")
    active = {name: w for name, w in weights.items() if w > 0}
    if not active:
        raise FusionError("fusion weights are all zero")
    stacked = np.stack([np.asarray(ranks[name], dtype=np.float64) for name in active])
    w = np.array(list(active.values()))[:, None]
    if rule == "mean":
        return (stacked * w).sum(axis=0) / w.sum()
    return (stacked * (w / w.max())).max(axis=0)
