"""KNN anomaly scores of embeddings against an enrolled bank of normal embeddings.

Only normal sounds are enrolled, so the anomaly score of a window is how far its
embedding lies from the nearest normal ones.  The bank is split by operating
condition (machine speed, load, ...) because conditions are enrolled in very
unequal amounts: scoring each sub-bank separately and taking the minimum lets a
condition with a handful of clips count as much as one with thousands, instead
of its few neighbours being drowned out.

Index choice (``index``: ``auto`` | ``flat`` | ``hnsw``), per condition sub-bank.
Measured with ``benchmarks/knn.py`` (d = 512, faiss-cpu 1.15, a shared 2-core
machine at load 4-8; results in ``benchmarks/results/knn.json``), one query as the
daemon searches, one thread:

=========  =====================  ===============================  ==================
sub-bank   flat (exact)           HNSW32, ef_search 256            HNSW build (2 thr.)
=========  =====================  ===============================  ==================
1e3        0.03-0.04 ms           0.12-0.13 ms                     0.4-0.7 s
1e4        0.5-0.7 ms             0.6-0.8 ms                       2.7-4 s
1e5        13-15 ms               0.3-3.4 ms; recall@1 0.995       31-59 s
                                  clustered / 0.84 random
1e6        102-119 ms             1.2 ms; recall@1 0.92 clustered  437 s
=========  =====================  ===============================  ==================

``auto`` is flat below ``AUTO_HNSW_MIN_SIZE`` = 100 000 embeddings in a condition
(11.6 days of 10 s windows) and HNSW from there. Below it an exact search costs
at most ~15 ms, under 5 % of what embedding the same window with aisfx costs
(~300 ms here), so an approximate index would buy nothing and cost a build at
every bank load (tens of seconds) and approximate scores. Above it the flat cost
grows linearly (~0.1 s at 1e6, a third of the embedding) and HNSW stays near
1 ms. What approximation does to a score: a graph search can only miss
neighbours, so a score is never below the exact one; measured at ef_search 256
the nearest distance was on average 0.09 % (random 1e5) / 0.7 % (clustered 1e6)
too large, at the 99th percentile 1.3 % / 18 % (some clusters of a 1e6 graph
built with ef_construction 40 were unreachable). Scores slightly too high mean
slightly more windows above the threshold: banks this large should rather be
compacted (fewer, representative windows) than searched approximately; HNSW is
the safety net that keeps such a bank within real time. IVF was measured too
(exact on clustered data at nprobe 8, 0.9 ms at 1e6, but recall@1 0.09-0.33 on
random data at 1e5-1e6, and it needs training): not offered.

The leave-one-out reference is always exact, whatever the index: it is the
reference every live score is ranked against, and approximate neighbours there
would inflate the reference (too few alarms) by an amount unrelated to the
(different) inflation of live scores. It searches the flat storage inside an
HNSW index (same vectors, same ids; no second copy), and the per-fold indexes of
the whitened metrics are always flat. Its cost is quadratic in the bank size
(1e4: 20-30 s here, 1e5: ~40 min extrapolated): ``leave_one_out(max_rows=...)``
computes it, still exactly, for an evenly spread sample of rows only.

Threads: faiss's thread count is left to the caller (``faiss.omp_set_num_threads``
is not called here), since only the application knows how many cores it may
take. Measured: on a busy 2-core machine one flat query with 2 OpenMP threads
took 5-48x longer than with 1 from 1e4 embeddings up (1e4: 16 vs 0.7 ms; 1e5: 77
vs 15 ms); a daemon searching one query per window should run faiss with one
thread. numpy matmul
was slower than faiss flat for single queries (1e5: 28 vs 15 ms) and for batches
of 1000 at 1e5 (131 vs 206 queries/s), faster for batches of 200 at 1e6 (15 vs
7 queries/s): faiss is used throughout.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import get_args

import faiss
import numpy as np

from monitor.config import IndexType, Metric, Normalisation
from monitor.errors import KnnError

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = get_args(Metric)
WHITENED = ('std-euclidean', 'mahalanobis')

# A dimension's std is floored at this fraction of the largest std, so that a
# (nearly) constant dimension does not turn tiny noise into huge distances.
_STD_FLOOR = 1e-8

# Whitened metrics estimate their statistics without the scored embedding's
# fold in the leave-one-out reference (see KnnScorer.leave_one_out).
LOO_FOLDS = 10

# Index choice per condition sub-bank (see the module docstring for the measurements).
INDEX_TYPES: tuple[str, ...] = get_args(IndexType)
AUTO_HNSW_MIN_SIZE = 100_000  # auto: HNSW from this many embeddings in a condition, flat below
HNSW_M = 32  # graph degree
HNSW_EF_CONSTRUCTION = 40  # faiss's default
HNSW_EF_SEARCH = 256  # candidates kept while searching (raised to k when k is larger)

NORMALISATIONS: tuple[str, ...] = get_args(Normalisation)
# Density normalisation divides by a mean own-distance floored at DENSITY_FLOOR times the
# FLOOR_QUANTILE quantile of the bank's own-distances (relative, so it means the same in every
# metric's units). Exact duplicate windows have own-distance 0 (or float32 rounding noise, 1e-7,
# for cosine); without the floor a query near them would score inf, 0/0 or noise/noise. A high
# quantile rather than the median, so that a bank mostly of duplicates still has a real scale;
# 1e-3 of it is far below any real spread, so the floor only acts on (near-)duplicates. A bank
# whose own-distances are (almost) all 0 is left unnormalised (denominator 1).
DENSITY_FLOOR = 1e-3
FLOOR_QUANTILE = 0.9


class KnnScorer:
    """Scores queries by their mean distance to the k nearest enrolled embeddings.

    The score is computed per operating condition (k clipped to each sub-bank's
    size) and the minimum over conditions is returned.

    Metrics: ``cosine``; ``euclidean``; ``std-euclidean`` (every dimension
    divided by its std over the whole bank); ``mahalanobis``: whitened by the
    bank's covariance shrunk towards its diagonal, ``(1 - s) C + s diag(C)``.
    Embedding dimensions of a CNN are strongly correlated, and a fault often
    moves an embedding along a direction in which normal audio barely varies;
    the full covariance sees that, the diagonal does not, and with few enrolled
    windows the raw covariance is singular, which the shrinkage fixes
    (``shrinkage=1`` is exactly ``std-euclidean``). Statistics are those of the
    WHOLE bank, not per condition, so every condition is measured in the same
    units and the minimum over conditions is fair.

    ``normalisation='density'`` (arXiv 2509.10951): a condition whose normal
    sound varies a lot (a loose cluster) gives larger distances to normal
    queries than a tight one, so a raw distance threshold is too strict for the
    one and too lax for the other, and the minimum over conditions favours the
    loose one. Each bank window's own k-NN distance within its condition's
    sub-bank (itself left out) is stored at fit time; a query's score in a
    condition is its k-NN distance there divided by the mean own-distance of
    those k neighbours, i.e. a distance in units of the local spread. The
    minimum over conditions then compares these ratios. The denominator is
    floored (``DENSITY_FLOOR``); an embedding alone in its condition has no
    own-distance and gets the bank's median one. Own-distances are measured in
    the live metric space with the live index (exact below the HNSW threshold)
    and cost one search of the bank against itself at fit time.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        conditions: Sequence[str] | None = None,
        metric: str = 'cosine',
        k: int = 1,
        shrinkage: float = 0.5,
        index: str = 'auto',
        normalisation: str = 'none',
    ) -> None:
        if normalisation not in NORMALISATIONS:
            raise KnnError(f"unknown normalisation {normalisation!r} (expected one of {', '.join(NORMALISATIONS)})")
        if metric not in METRICS:
            raise KnnError(f"unknown metric {metric!r} (expected one of {', '.join(METRICS)})")
        if index not in INDEX_TYPES:
            raise KnnError(f"unknown index {index!r} (expected one of {', '.join(INDEX_TYPES)})")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise KnnError(f"k must be an integer >= 1, got {k!r}")
        if not 0.0 < shrinkage <= 1.0:
            raise KnnError(f"shrinkage must be in (0, 1], got {shrinkage!r}")
        bank = _as_matrix(embeddings, 'bank embeddings')
        if bank.shape[0] == 0:
            raise KnnError("bank embeddings: empty bank (no embeddings enrolled)")
        labels = _condition_labels(conditions, bank.shape[0])

        self._metric = metric
        self._index = index
        self._k = int(k)
        self._shrinkage = float(shrinkage)
        self._bank = bank
        self._transform = self._fit_transform(bank)
        self._groups = [np.flatnonzero(labels == name) for name in sorted(set(labels.tolist()))]
        self._names = tuple(sorted(set(labels.tolist())))
        self._group_of = np.empty(bank.shape[0], dtype=np.int64)
        for g, members in enumerate(self._groups):
            self._group_of[members] = g
        self._kinds = tuple(self._index_kind(members.size) for members in self._groups)
        self._indexes = self._build_indexes(self._prepare(bank, self._transform), self._kinds)
        self._normalisation = normalisation
        if normalisation == 'density':
            self._fit_density(self._prepare(bank, self._transform))
        log.debug(
            "KNN bank: %d embeddings, dim %d, metric %s, k %d, conditions %s",
            bank.shape[0], bank.shape[1], metric, self._k,
            {name: (members.size, kind) for name, members, kind in zip(self._names, self._groups, self._kinds)},
        )

    @property
    def metric(self) -> str:
        return self._metric

    @property
    def k(self) -> int:
        return self._k

    @property
    def dim(self) -> int:
        return self._bank.shape[1]

    @property
    def conditions(self) -> tuple[str, ...]:
        """Sorted unique operating conditions ('' alone when none were given)."""
        return self._names

    @property
    def normalisation(self) -> str:
        return self._normalisation

    @property
    def index(self) -> str:
        """The index setting asked for: ``auto``, ``flat`` or ``hnsw``."""
        return self._index

    @property
    def index_types(self) -> dict[str, str]:
        """The index actually used for each condition's live search: ``flat`` or ``hnsw``."""
        return dict(zip(self._names, self._kinds))

    def _index_kind(self, size: int) -> str:
        if self._index == 'auto':
            return 'hnsw' if size >= AUTO_HNSW_MIN_SIZE else 'flat'
        return self._index

    def __len__(self) -> int:
        return self._bank.shape[0]

    def score(self, queries: np.ndarray) -> np.ndarray:
        """Anomaly scores [M] (float64) of queries [M, D]; higher is more anomalous."""
        return self.score_with_conditions(queries)[0]

    def score_with_conditions(self, queries: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Scores and, per query, the operating condition that gave the minimum (the enrolled
        condition the audio sounds closest to, which an alert reports)."""
        raw = _as_matrix(queries, 'queries', dim=self.dim)
        per_condition = np.full((len(self._groups), raw.shape[0]), np.inf)
        if raw.shape[0]:
            prepared = self._prepare(raw, self._transform)
            for g, (members, index) in enumerate(zip(self._groups, self._indexes)):
                kk = min(self._k, members.size)
                found, ids = index.search(prepared, kk)
                missing = (ids < 0).any(axis=1)
                if missing.any():
                    # An approximate graph search that came back with fewer than k results
                    # (not seen in practice with ef_search >= k): those queries go exact.
                    found[missing], ids[missing] = _exact(index).search(np.ascontiguousarray(prepared[missing]), kk)
                per_condition[g] = self._to_distance(found).mean(axis=1)
                if self._normalisation == 'density':
                    per_condition[g] /= self._density(members[ids])
        nearest = per_condition.argmin(axis=0)
        return per_condition.min(axis=0, initial=np.inf), [self._names[g] for g in nearest]

    def leave_one_out(self, max_rows: int | None = None) -> np.ndarray:
        """Score [N] of every bank embedding against the bank without itself.

        This is the anchored reference of normal scores that new scores are
        ranked against, so each value should be what ``score`` would return had
        that embedding not been enrolled: its neighbours are the other
        embeddings (an embedding alone in its condition is scored against the
        other conditions only). For the whitened metrics the statistics must
        not include the embedding either, or its own direction looks more
        normal than it is and the reference comes out too low (too many
        alarms); refitting them per embedding costs a D x D decomposition each,
        so they are fitted once per fold of ``LOO_FOLDS`` folds, leaving that
        fold out. A bank of one embedding has no reference and gives nan.

        Neighbours are always searched exactly (flat), also when live scores use
        an HNSW index (see the module docstring). The cost is quadratic in the
        bank size; ``max_rows`` bounds it: only that many rows, evenly spread
        over the bank, are scored (exactly, against all the others) and the
        rest are nan, which ``ranking.rank_ratio`` and ``RankReference`` skip.
        """
        n = len(self)
        if n == 1:
            return np.full(1, np.nan)
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, (int, np.integer)) or max_rows < 1):
            raise KnnError(f"max_rows must be an integer >= 1 or None, got {max_rows!r}")
        chosen = np.arange(n) if max_rows is None or max_rows >= n else np.unique(np.linspace(0, n - 1, int(max_rows)).round().astype(np.int64))
        if self._metric not in WHITENED:
            exact = [_exact(index) for index in self._indexes]
            best = np.full(n, np.nan)
            best[chosen] = self._loo_rows(self._prepare(self._bank, self._transform), exact, chosen)
            return best
        best = np.full(n, np.nan)
        folds = np.arange(n) % min(n, LOO_FOLDS)
        flat = ('flat',) * len(self._groups)
        for fold in np.unique(folds):
            rows = chosen[folds[chosen] == fold]
            if rows.size == 0:
                continue
            transform = self._fit_transform(self._bank[folds != fold])
            prepared = self._prepare(self._bank, transform)
            best[rows] = self._loo_rows(prepared, self._build_indexes(prepared, flat), rows)
        return best

    def _loo_rows(self, prepared: np.ndarray, indexes: list[faiss.Index], rows: np.ndarray) -> np.ndarray:
        """Leave-one-out scores of bank ``rows`` against indexes built on all of ``prepared``."""
        best = np.full(rows.size, np.inf)
        for g, (members, index) in enumerate(zip(self._groups, indexes)):
            size = members.size
            inside = self._group_of[rows] == g
            outsiders = rows[~inside]
            if outsiders.size:
                found, ids = index.search(np.ascontiguousarray(prepared[outsiders]), min(self._k, size))
                score = self._to_distance(found).mean(axis=1)
                if self._normalisation == 'density':
                    score /= self._density(members[ids])
                best[~inside] = np.minimum(best[~inside], score)
            if size == 1 or not inside.any():
                continue
            # Members search one extra neighbour and drop themselves. With exact
            # duplicates faiss may rank a twin before the member itself; the two
            # are at the same distance, so dropping the last neighbour instead
            # gives the same result.
            own = rows[inside]
            kk = min(self._k, size - 1)
            found, ids = index.search(np.ascontiguousarray(prepared[own]), kk + 1)
            position = np.searchsorted(members, own)
            is_self = ids == position[:, None]
            is_self[~is_self.any(axis=1), -1] = True
            others = found[~is_self].reshape(own.size, kk)
            score = self._to_distance(others).mean(axis=1)
            if self._normalisation == 'density':
                neighbours = members[ids[~is_self].reshape(own.size, kk)]
                score /= self._density(neighbours, left_out=own, size=size - 1)
            best[inside] = np.minimum(best[inside], score)
        return best

    def _fit_density(self, prepared: np.ndarray) -> None:
        """Store each bank window's nearest own-condition neighbours (itself left out).

        Up to k + 1 of them are kept (bank rows and distances, nearest first): the first k give
        the window's own-distance; the spare one lets the leave-one-out reference recompute a
        neighbour's own-distance without the left-out window (else a pair of mutual nearest
        neighbours would divide a distance by itself, and the reference would come out too high).
        """
        n = len(self)
        keep = self._k + 1
        self._own_rows = np.full((n, keep), -1, dtype=np.int64)
        self._own_dist = np.full((n, keep), np.nan)
        for members, index in zip(self._groups, self._indexes):
            size = members.size
            if size == 1:
                continue
            kk = min(keep, size - 1)
            found, ids = index.search(np.ascontiguousarray(prepared[members]), kk + 1)
            missing = (ids < 0).any(axis=1)
            if missing.any():
                found[missing], ids[missing] = _exact(index).search(np.ascontiguousarray(prepared[members[missing]]), kk + 1)
            # Drop the window itself (or, with exact duplicates ranked before it, the last
            # neighbour: same distance), as in _loo_rows.
            is_self = ids == np.arange(size)[:, None]
            is_self[~is_self.any(axis=1), -1] = True
            self._own_rows[members, :kk] = members[ids[~is_self].reshape(size, kk)]
            self._own_dist[members, :kk] = self._to_distance(found[~is_self].reshape(size, kk))
        counts = np.array([min(self._k, members.size - 1) for members in self._groups])[self._group_of]
        own = np.full(n, np.nan)
        has = counts > 0
        own[has] = _mean_first(self._own_dist[has], np.ones_like(self._own_rows[has], dtype=bool), counts[has])
        known = own[np.isfinite(own)]
        self._own_fallback = float(np.median(known)) if known.size else 1.0
        top = float(np.quantile(known, FLOOR_QUANTILE)) if known.size else 0.0
        # No spread at all (every window enrolled at least twice): no local spread to measure in,
        # so distances are left as they are (denominator 1).
        self._own_floor = DENSITY_FLOOR * top if top > 0 else 1.0
        self._own = np.where(np.isfinite(own), own, self._own_fallback)

    def _density(self, neighbours: np.ndarray, left_out: np.ndarray | None = None, size: int | None = None) -> np.ndarray:
        """Mean own-distance of each row of ``neighbours`` (bank rows [M, k']), floored.

        With ``left_out`` (one bank row per query, in a sub-bank that has ``size`` members once
        it is left out) each neighbour's own-distance is recomputed without that row.
        """
        if left_out is None:
            own = self._own[neighbours]
        else:
            count = min(self._k, size - 1)
            if count == 0:  # the neighbour is alone without the left-out window
                own = np.full(neighbours.shape, self._own_fallback)
            else:
                rows = self._own_rows[neighbours]  # [M, k', k + 1]
                valid = (rows >= 0) & (rows != left_out[:, None, None])
                own = _mean_first(self._own_dist[neighbours], valid, np.full(neighbours.shape, count))
        return np.maximum(own.mean(axis=1), self._own_floor)

    def _build_indexes(self, prepared: np.ndarray, kinds: Sequence[str]) -> list[faiss.Index]:
        """One index per condition, of the given kinds (``flat`` or ``hnsw``)."""
        indexes = []
        measure = faiss.METRIC_INNER_PRODUCT if self._metric == 'cosine' else faiss.METRIC_L2
        for members, kind in zip(self._groups, kinds):
            if kind == 'hnsw':
                index = faiss.IndexHNSWFlat(prepared.shape[1], HNSW_M, measure)
                index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
                index.hnsw.efSearch = max(HNSW_EF_SEARCH, self._k)
            else:
                index = faiss.IndexFlat(prepared.shape[1], measure)
            index.add(np.ascontiguousarray(prepared[members]))
            indexes.append(index)
        return indexes

    def _fit_transform(self, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(mean, W) such that ``(x - mean) @ W`` (or ``* W`` for a vector W) is the metric's space."""
        if self._metric == 'cosine':
            return None
        x = bank.astype(np.float64)
        mean = x.mean(axis=0)
        if self._metric == 'euclidean':
            # Distances do not change under translation, but faiss computes
            # squared L2 as |x|^2 + |y|^2 - 2xy in float32, which loses small
            # distances to cancellation when embeddings share a large offset.
            return mean, np.ones(x.shape[1])
        centred = x - mean
        std = _floored_scale(centred.std(axis=0))
        if self._metric == 'std-euclidean' or self._shrinkage == 1.0:
            return mean, 1.0 / std
        cov = (1.0 - self._shrinkage) * (centred.T @ centred) / x.shape[0]
        cov[np.diag_indices_from(cov)] += self._shrinkage * std**2
        values, vectors = np.linalg.eigh(cov)
        values = np.maximum(values, values.max() * _STD_FLOOR**2)
        return mean, vectors / np.sqrt(values)

    @staticmethod
    def _prepare(x: np.ndarray, transform: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        """Map float32 rows into the space where faiss's flat index measures the metric."""
        x64 = x.astype(np.float64)
        if transform is None:
            # Cosine: a zero vector stays zero (similarity 0, distance 1) instead of nan.
            norms = np.linalg.norm(x64, axis=1, keepdims=True)
            out = x64 / np.maximum(norms, np.finfo(np.float64).tiny)
        else:
            mean, w = transform
            out = (x64 - mean) * w if w.ndim == 1 else (x64 - mean) @ w
        return np.ascontiguousarray(out, dtype=np.float32)

    def _to_distance(self, found: np.ndarray) -> np.ndarray:
        """Turn faiss results (similarities or squared L2) into distances."""
        found = found.astype(np.float64)
        if self._metric == 'cosine':
            # float32 rounding can push a similarity just past +-1.
            return np.clip(1.0 - found, 0.0, 2.0)
        return np.sqrt(np.maximum(found, 0.0))


def _mean_first(values: np.ndarray, valid: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean of the first ``counts`` valid entries along the last axis (nan where fewer)."""
    taken = valid & (np.cumsum(valid, axis=-1) <= counts[..., None])
    total = np.where(taken, np.nan_to_num(values), 0.0).sum(axis=-1)
    got = taken.sum(axis=-1)
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(got == counts, total / np.maximum(got, 1), np.nan)


def _exact(index: faiss.Index) -> faiss.Index:
    """An exact (flat) index over the same vectors, with the same ids.

    An ``IndexHNSWFlat`` keeps its vectors in a flat ``storage`` index, searched here by brute
    force: the leave-one-out reference gets exact neighbours without a second copy of the bank.
    """
    if isinstance(index, faiss.IndexHNSW):
        return faiss.downcast_index(index.storage)
    return index


def _as_matrix(x: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    """Validate a [rows, D] array of finite numbers and return it as float32."""
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise KnnError(f"{what}: not an array ({exc})") from None
    if arr.dtype.kind not in 'fiu':
        raise KnnError(f"{what}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise KnnError(f"{what}: expected a 2-D array [rows, dim], got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise KnnError(f"{what}: embeddings have dimension 0")
    if dim is not None and arr.shape[1] != dim:
        raise KnnError(f"{what}: dimension {arr.shape[1]} does not match the bank's {dim}")
    with np.errstate(over='ignore'):  # overflow is reported below as a KnnError
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise KnnError(f"{what}: row {bad} contains NaN or Inf (or overflows float32)")
    return arr


def _condition_labels(conditions: Sequence[str] | None, n: int) -> np.ndarray:
    """Validate per-embedding condition names; no conditions means one condition."""
    if conditions is None:
        return np.full(n, '', dtype=object)
    labels = list(conditions)
    if len(labels) != n:
        raise KnnError(f"conditions: {len(labels)} labels for {n} bank embeddings")
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise KnnError(f"conditions: label {i} is {label!r}, expected a string")
    return np.array(labels, dtype=object)


def _floored_scale(std: np.ndarray) -> np.ndarray:
    """Floor stds [.., D] at _STD_FLOOR times the row's largest std.

    If every dimension is constant there is no scale to be relative to, and
    standardisation reduces to centring (scale 1).
    """
    top = std.max(axis=-1, keepdims=True)
    return np.where(top > 0, np.maximum(std, top * _STD_FLOOR), 1.0)
