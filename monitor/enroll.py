"""Enrollment: turning recordings of a healthy machine into a new bank version."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from monitor.audio import Audio, load_audio
from monitor.bank import Bank, BankItem, BankNotFound, BankStore
from monitor.detector import Detector, Embedded
from monitor.sensor import level_dbfs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Enrolled:
    version: str
    bank: Bank
    new_windows: int


def window_levels(audio: Audio, embedded: Embedded, window_seconds: float) -> list[float]:
    """RMS level (dBFS) of each embedded window, measured on the original audio."""
    rate = audio.sample_rate
    span = int(round(window_seconds * rate))
    return [level_dbfs(audio.samples[int(round(s * rate)) : int(round(s * rate)) + span]) for s in embedded.starts]


def items_for(detector: Detector, audio: Audio, embedded: Embedded, source: str, condition: str) -> list[BankItem]:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    levels = window_levels(audio, embedded, detector.window_seconds)
    return [BankItem(source, start, condition, now, level) for start, level in zip(embedded.starts, levels)]


def enroll_files(
    detector: Detector,
    store: BankStore,
    paths: Sequence[Path],
    condition: str,
    replace: bool = False,
    note: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> Enrolled:
    """Embed every window of ``paths`` and save bank + new windows as a new version.

    Adds to the current version unless ``replace``; a bank of other models is refused (by
    ``Bank.add``) before anything is written.
    """
    try:
        bank = Bank() if replace else store.load()
    except BankNotFound:
        bank = Bank()
    items: list[BankItem] = []
    parts: dict[str, list[np.ndarray]] = {name: [] for name in detector.model_ids}
    for path in paths:
        audio = load_audio(path)
        embedded = detector.embed(audio)
        items += items_for(detector, audio, embedded, str(Path(path).resolve()), condition)
        for name, emb in embedded.embeddings.items():
            parts[name].append(emb)
        if progress:
            progress(1)
    new_bank = bank.add(items, {n: np.concatenate(v) for n, v in parts.items()}, detector.model_ids)
    version = store.save(new_bank, note=note or f"enrolled {len(paths)} file(s), condition {condition}")
    log.info("bank %s: version %s with %d windows (%d new)", store.path, version, len(new_bank), len(items))
    return Enrolled(version, new_bank, len(items))


def enrolled_level(bank: Bank) -> float | None:
    """Median level of the enrolled windows (None for banks from before levels were kept)."""
    levels = [item.level_dbfs for item in bank.items if item.level_dbfs is not None]
    return float(np.median(levels)) if levels else None
