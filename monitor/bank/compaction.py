"""Compacting a bank: each large operating condition replaced by k-means centroids.

A machine that runs for months in one condition piles up windows in its sub-bank while a new
condition has a handful; the per-condition minimum already lets the handful count as much,
so compaction is about size: memory and the leave-one-out reference, which costs O(n^2).
It is measured to cost detection quality (``benchmarks/conditions.py``: 0.010-0.042 of the
official score on uav-noisy at 64-16 centroids per condition, none on fan-noisy), because a
centroid is an average of normal windows, not a window, and the rare-but-normal ones at the
edge of a condition are averaged away. So it is an explicit step (``asd-monitor bank compact``) that
writes a new version, never the default, and rollback undoes it.

Windows of all backbones are clustered together (each backbone's embedding standardised, then
concatenated), so that centroid i of every backbone describes the same windows.
"""

from __future__ import annotations

import faiss
import numpy as np

from monitor.bank.model import Bank, BankItem
from monitor.errors import BankError

KMEANS_ITERATIONS = 25


def compact(bank: Bank, max_windows: int, seed: int = 0) -> Bank:
    """A new bank in which each condition holding more than ``max_windows`` windows is
    replaced by ``max_windows`` centroids; smaller conditions are kept window for window."""
    if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 2:
        raise BankError(f"compact: max_windows must be an integer >= 2, got {max_windows!r}")
    conditions = np.asarray(bank.condition_labels(), dtype=object)
    features = _clustering_features(bank)
    items: list[BankItem] = []
    rows: list[np.ndarray] = []  # per output window: the bank rows it stands for
    for condition in bank.conditions:
        members = np.flatnonzero(conditions == condition)
        if members.size <= max_windows:
            items += [bank.items[i] for i in members]
            rows += [np.array([i]) for i in members]
            continue
        labels = _kmeans(features[members], max_windows, seed)
        for cluster in range(max_windows):
            group = members[labels == cluster]
            if group.size:
                items.append(_centroid_item([bank.items[i] for i in group], condition))
                rows.append(group)
    embeddings = {name: np.stack([arr[group].mean(axis=0) for group in rows]).astype(np.float32)
                  for name, arr in bank.embeddings.items()}
    return Bank().add(items, embeddings, bank.model_ids)


def _clustering_features(bank: Bank) -> np.ndarray:
    parts = []
    for name in bank.backbones:
        arr = bank.embeddings[name].astype(np.float64)
        std = arr.std(axis=0)
        parts.append((arr - arr.mean(axis=0)) / np.where(std > 0, std, 1.0) / np.sqrt(arr.shape[1]))
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def _kmeans(features: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """Cluster label per row (k-means, faiss, seeded: the same bank compacts the same way)."""
    kmeans = faiss.Kmeans(features.shape[1], clusters, niter=KMEANS_ITERATIONS, seed=seed, verbose=False,
                          min_points_per_centroid=1)  # few points per centroid is the point here: no warning
    kmeans.train(features)
    _, labels = kmeans.index.search(features, 1)
    return labels[:, 0]


def _centroid_item(members: list[BankItem], condition: str) -> BankItem:
    levels = [m.level_dbfs for m in members if m.level_dbfs is not None]
    rates = {m.sample_rate for m in members if m.sample_rate is not None}
    return BankItem(
        source=f"centroid of {len(members)} windows",
        offset_s=0.0,
        condition=condition,
        enrolled_at=max(m.enrolled_at for m in members),
        level_dbfs=float(np.median(levels)) if levels else None,
        sample_rate=min(rates) if rates else None,
    )
