"""Detection figures computed exactly as the official DCASE Task 2 evaluator computes them.

The evaluator calls ``sklearn.metrics.roc_auc_score`` (with ``max_fpr`` for the pAUC); the
same arithmetic is reproduced here with numpy alone so that the daemon does not need
scikit-learn at run time, while the tests check equality against scikit-learn.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
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


# --------------------------------------------------------------------------- bootstrap intervals

# Resamples per interval. The Monte-Carlo error of a 2.5 % percentile from B resamples is about
# sqrt(0.025 * 0.975 / B) in probability (0.5 % at B = 1000), small against the width the
# intervals have on test sets of tens of clips; more resamples cost time for little.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95
FIGURE_NAMES = ("auc_source", "auc_target", "pauc", "official")


def bootstrap_weights(
    domains: Sequence[str | None],
    labels: Sequence[bool],
    n_resamples: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """How often each clip is drawn in each resample: integers of shape (n_resamples, n_clips).

    Clips are resampled with replacement *within strata* -- source normals, target normals,
    normals without a domain, anomalies -- each keeping its size. An unstratified resample of
    fan-noisy's 8 target normals would now and then draw none (AUC target undefined) or
    change the class balance the figures are defined on; stratified, every resample has the
    same counts per class and domain as the test set, so each figure stays defined and the
    interval measures only which clips happened to be recorded. A weight matrix rather than
    index lists lets every system be scored on the same resamples (a paired bootstrap) and
    the figures be computed for all resamples at once.
    """
    d = np.array([dom if dom is not None else "" for dom in domains], dtype=object)
    y = np.asarray(labels, dtype=bool)
    if d.shape != y.shape or y.ndim != 1:
        raise ValueError(f"domains ({d.size}) and labels ({y.size}) differ in length")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    weights = np.zeros((n_resamples, y.size), dtype=np.int64)
    rows = np.arange(n_resamples)[:, None]
    strata = [y] + [~y & (d == dom) for dom in (*DOMAINS, "")]
    for members in (np.flatnonzero(m) for m in strata):
        if members.size:
            drawn = members[rng.integers(0, members.size, size=(n_resamples, members.size))]
            np.add.at(weights, (np.broadcast_to(rows, drawn.shape), drawn), 1)
    return weights


def _weighted_auc(pos: np.ndarray, neg: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC per resample, from the clips' multiplicities (ties count half).

    A resample is the original clips with multiplicities, so its AUC is a weighted sum over the
    original (anomaly, normal) pairs: one pair matrix serves every resample.
    """
    pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return np.einsum("rp,pn,rn->r", w_pos, pairs, w_neg) / (w_pos.sum(1) * w_neg.sum(1))


def _weighted_pauc(scores: np.ndarray, y: np.ndarray, weights: np.ndarray, max_fpr: float) -> np.ndarray:
    """McClish-standardised pAUC per resample, as ``pauc`` computes it for one set of clips.

    The ROC of a resample steps once per distinct score of the original clips, by the
    resampled counts of normals and anomalies at that score; the area is the trapezoids up
    to ``max_fpr``, the last one cut by linear interpolation (what ``pauc`` and scikit-learn do).
    """
    if max_fpr == 1.0:
        return _weighted_auc(scores[y], scores[~y], weights[:, y], weights[:, ~y])
    distinct, inverse = np.unique(scores, return_inverse=True)
    onehot = np.zeros((scores.size, distinct.size))
    onehot[np.arange(scores.size), inverse] = 1.0
    # Counts per distinct score, highest score first, accumulated: the ROC's vertices.
    tps = np.cumsum((weights[:, y] @ onehot[y])[:, ::-1], axis=1)
    fps = np.cumsum((weights[:, ~y] @ onehot[~y])[:, ::-1], axis=1)
    zero = np.zeros((weights.shape[0], 1))
    tpr = np.hstack([zero, tps / tps[:, -1:]])
    fpr = np.hstack([zero, fps / fps[:, -1:]])
    x0, x1, y0, y1 = fpr[:, :-1], fpr[:, 1:], tpr[:, :-1], tpr[:, 1:]
    end = np.minimum(x1, max_fpr)
    with np.errstate(divide="ignore", invalid="ignore"):
        y_end = np.where(x1 > x0, y0 + (y1 - y0) * (end - x0) / (x1 - x0), y1)
    partial = np.sum(np.where(x0 < max_fpr, (end - x0) * (y0 + y_end) / 2.0, 0.0), axis=1)
    min_area = 0.5 * max_fpr**2
    return 0.5 * (1.0 + (partial - min_area) / (max_fpr - min_area))


def _hmean_rows(values: np.ndarray) -> np.ndarray:
    """``hmean`` of each row of (resamples, figures), skipping NaN columns as ``official`` does."""
    v = values[:, ~np.isnan(values[0])]
    if v.shape[1] == 0:
        raise ValueError("harmonic mean of no values is undefined")
    with np.errstate(divide="ignore"):
        h = v.shape[1] / np.sum(1.0 / v, axis=1)
    return np.where((v == 0).any(axis=1), 0.0, h)


def resampled_figures(
    domains: Sequence[str | None],
    labels: Sequence[bool],
    scores: ArrayLike,
    weights: np.ndarray,
    max_fpr: float = DEFAULT_MAX_FPR,
) -> dict[str, np.ndarray]:
    """One machine's figures (``FIGURE_NAMES``) in every resample of ``weights``: arrays of
    shape (n_resamples,). Subsets as in ``machine_figures``; an AUC of a domain without normal
    clips is NaN. With weights of all ones this gives ``machine_figures``' values."""
    d = np.array([dom if dom is not None else "" for dom in domains], dtype=object)
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    if not (d.shape == y.shape == s.shape) or weights.shape[1:] != s.shape:
        raise ValueError(f"domains ({d.size}), labels ({y.size}), scores ({s.size}) and weights "
                         f"{weights.shape} do not fit")
    _check(y, s)
    out: dict[str, np.ndarray] = {}
    for domain in DOMAINS:
        normals = (d == domain) & ~y
        if normals.any():
            out[f"auc_{domain}"] = _weighted_auc(s[y], s[normals], weights[:, y], weights[:, normals])
        else:
            out[f"auc_{domain}"] = np.full(weights.shape[0], math.nan)
    out["pauc"] = _weighted_pauc(s, y, weights, max_fpr)
    out["official"] = _hmean_rows(np.column_stack([out["auc_source"], out["auc_target"], out["pauc"]]))
    return out


def percentile_interval(values: ArrayLike, level: float = BOOTSTRAP_LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap values (NaN when undefined)."""
    v = np.asarray(values, dtype=float)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if v.size == 0 or np.isnan(v).all():
        return (math.nan, math.nan)
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(v[~np.isnan(v)], [tail, 100.0 - tail])
    return (float(low), float(high))


def bootstrap_intervals(
    clips: Mapping[str, tuple[Sequence[str | None], Sequence[bool]]],
    scores: Mapping[str, Mapping[str, ArrayLike]],
    reference: str | None = None,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = BOOTSTRAP_LEVEL,
    max_fpr: float = DEFAULT_MAX_FPR,
) -> dict:
    """Paired, stratified bootstrap intervals of several systems scored on the same test clips.

    ``clips``: per machine, the (domains, labels) of its test clips; ``scores``: per system,
    per machine, one score per clip in that order. Each machine's resamples are drawn once
    (``bootstrap_weights``, seeded) and every system is scored on them, so a difference
    between two systems is measured on the same clips in each resample: the clips that are
    hard for both cancel out, and its interval is narrower than the two intervals suggest.

    Returns plain values for a JSON report: ``systems`` (per system, the interval of the
    official score over all machines, the harmonic mean of all 3 x M figures per resample),
    ``machines`` (per machine and system, the interval of each of ``FIGURE_NAMES``) and, with
    a ``reference`` system, ``differences`` (per system, the interval of its official score
    minus the reference's), each interval a ``[low, high]`` pair.
    """
    if reference is not None and reference not in scores:
        raise ValueError(f"reference system {reference!r} is not among the systems")
    for system, per_machine in scores.items():
        if set(per_machine) != set(clips):
            raise ValueError(f"system {system!r} is scored on machines {sorted(per_machine)}, not {sorted(clips)}")
    if not clips:
        raise ValueError("bootstrap of no machines is undefined")
    rng = np.random.default_rng(seed)
    weights = {m: bootstrap_weights(d, y, n_resamples, rng) for m, (d, y) in clips.items()}
    official: dict[str, np.ndarray] = {}
    machines: dict[str, dict[str, dict[str, list[float]]]] = {m: {} for m in clips}
    for system, per_machine in scores.items():
        figures = {m: resampled_figures(d, y, per_machine[m], weights[m], max_fpr) for m, (d, y) in clips.items()}
        for m, fig in figures.items():
            machines[m][system] = {name: list(percentile_interval(fig[name], level)) for name in FIGURE_NAMES}
        official[system] = _hmean_rows(np.column_stack(
            [fig[name] for fig in figures.values() for name in ("auc_source", "auc_target", "pauc")]))
    result = {
        "resamples": n_resamples, "seed": seed, "level": level, "reference": reference,
        "systems": {s: {"official": list(percentile_interval(v, level))} for s, v in official.items()},
        "machines": machines,
    }
    if reference is not None:
        result["differences"] = {s: {"official": list(percentile_interval(v - official[reference], level))}
                                 for s, v in official.items()}
    return result
