"""Detection figures computed exactly as the official DCASE Task 2 evaluator computes them.

The evaluator calls ``sklearn.metrics.roc_auc_score`` (with ``max_fpr`` for the pAUC); the
same arithmetic is reproduced here with numpy alone so that the daemon does not need
scikit-learn at run time, while the tests check equality against scikit-learn.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike

log = logging.getLogger(__name__)

DOMAINS = ("source", "target")
DEFAULT_MAX_FPR = 0.1


def _check(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (bool labels, float scores); both classes must be present."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=float)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be 1-D and of equal length")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be booleans or 0/1 (1 = anomaly)")
        y = y.astype(bool)
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN or infinite values")
    if y.all() or not y.any():
        raise ValueError(f"labels hold only one class ({y.size} clips): AUC is undefined")
    return y, s


def roc_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """ROC points (fpr, tpr), from (0, 0) to (1, 1), one per distinct score (higher = more anomalous).

    Tied scores form a single step, so a tie between a normal and an anomaly becomes a
    diagonal segment and counts half, as in scikit-learn.
    """
    y, s = _check(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    # Last index of each run of equal scores: the ROC only moves once per distinct threshold.
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y)[ends]
    fps = ends + 1 - tps
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return fpr, tpr


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC as the Mann-Whitney statistic: P(anomaly scores higher than normal), ties count half."""
    y, s = _check(labels, scores)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # Average (mid) rank of each distinct value, 1-based.
    mid_rank = np.cumsum(counts) - (counts - 1) / 2.0
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    u = mid_rank[inverse][y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def pauc(labels: ArrayLike, scores: ArrayLike, max_fpr: float = DEFAULT_MAX_FPR) -> float:
    """Partial AUC over FPR <= ``max_fpr``, McClish-standardised so that chance is 0.5 and perfect is 1.

    Numerically the same as ``sklearn.metrics.roc_auc_score(labels, scores, max_fpr=max_fpr)``,
    which is what the official evaluator reports as pAUC.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    if max_fpr == 1.0:
        return auc(labels, scores)
    fpr, tpr = roc_curve(labels, scores)
    stop = int(np.searchsorted(fpr, max_fpr, side="right"))
    tpr_at_max = np.interp(max_fpr, fpr[stop - 1 : stop + 1], tpr[stop - 1 : stop + 1])
    x = np.r_[fpr[:stop], max_fpr]
    y = np.r_[tpr[:stop], tpr_at_max]
    partial = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))
    min_area = 0.5 * max_fpr**2
    max_area = max_fpr
    return 0.5 * (1.0 + (partial - min_area) / (max_area - min_area))


def hmean(values: Iterable[float]) -> float:
    """Harmonic mean, 0 when any value is 0 (the limit), as DCASE ranks systems by it.

    NaN values propagate; callers that want to skip undefined figures filter them first.
    """
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        raise ValueError("harmonic mean of no values is undefined")
    if (v < 0).any():
        raise ValueError(f"harmonic mean needs non-negative values, got {v[v < 0][0]}")
    if (v == 0).any():
        return 0.0
    return float(v.size / np.sum(1.0 / v))


def _defined(values: Iterable[float]) -> list[float]:
    """The values that are not NaN (figures of a domain without normal test clips are NaN)."""
    return [v for v in values if not math.isnan(v)]


@dataclass(frozen=True)
class Figures:
    """The official per-machine figures and the clip counts behind them.

    An AUC is NaN when its domain has no normal test clip; ``official`` then averages the
    figures that are defined, so that a machine without target normals is still ranked
    on what can be measured rather than dropped or scored zero.
    """

    auc_source: float
    auc_target: float
    pauc: float
    n_source_normal: int
    n_target_normal: int
    n_anomaly: int

    @property
    def values(self) -> tuple[float, float, float]:
        """The three figures that enter the official score."""
        return (self.auc_source, self.auc_target, self.pauc)

    @property
    def official(self) -> float:
        """Harmonic mean of AUC(source), AUC(target) and pAUC, skipping NaN figures."""
        return hmean(_defined(self.values))

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict of the fields plus ``official``, for JSON reports and tables."""
        return {**asdict(self), "official": self.official}


def machine_figures(
    domains: Sequence[str | None],
    labels: Sequence[bool],
    scores: Sequence[float],
    max_fpr: float = DEFAULT_MAX_FPR,
) -> Figures:
    """Official figures of one machine's test clips.

    As in the official evaluator: AUC(source) over source-domain normals plus *all*
    anomalies, AUC(target) over target-domain normals plus *all* anomalies, and pAUC over
    every test clip (normals without a domain count only there). Raises ``ValueError``
    when there is no anomaly or no normal clip at all.
    """
    d = np.array([dom if dom is not None else "" for dom in domains], dtype=object)
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    if not (d.shape == y.shape == s.shape):
        raise ValueError(f"domains ({d.size}), labels ({y.size}) and scores ({s.size}) differ in length")
    unknown = set(d.tolist()) - {*DOMAINS, ""}
    if unknown:
        raise ValueError(f"unknown domain {sorted(unknown)[0]!r}: expected 'source', 'target' or None")

    per_domain: dict[str, float] = {}
    counts: dict[str, int] = {}
    for domain in DOMAINS:
        normals = (d == domain) & ~y
        counts[domain] = int(normals.sum())
        if counts[domain] == 0:
            log.debug("no %s-domain normal clip: AUC(%s) is NaN", domain, domain)
            per_domain[domain] = math.nan
        else:
            subset = normals | y
            per_domain[domain] = auc(y[subset], s[subset])
    return Figures(
        auc_source=per_domain["source"],
        auc_target=per_domain["target"],
        pauc=pauc(y, s, max_fpr),
        n_source_normal=counts["source"],
        n_target_normal=counts["target"],
        n_anomaly=int(y.sum()),
    )


def official_score(figures: Iterable[Figures]) -> float:
    """Harmonic mean of all 3 x M figures of M machines (NaN figures skipped), the DCASE ranking score."""
    values = [v for f in figures for v in f.values]
    if not values:
        raise ValueError("official score of no machines is undefined")
    return hmean(_defined(values))
