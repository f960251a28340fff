"""Enrollment: turning recordings of a healthy machine into a new bank version."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitor.audio.files import Audio, load_audio
from monitor.audio.mixing import mix_at_snr
from monitor.audio.sensor import level_dbfs
from monitor.bank.model import Bank, BankItem, check_audio_rate
from monitor.bank.store import BankStore
from monitor.errors import BankNotFound
from monitor.scoring.detector import Detector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Enrolled:
    version: str
    bank: Bank
    new_windows: int


def embed_windows(detector: Detector, audio: Audio, source: str, condition: str) -> tuple[list[BankItem], dict[str, np.ndarray]]:
    """Every window of ``audio`` as bank rows: its items (with each window's level, measured on
    the original audio) and embeddings per backbone. Enrollment and evaluation both use it."""
    embedded = detector.embed(audio)
    rate = audio.sample_rate
    span = int(round(detector.window_seconds * rate))
    items = [BankItem.enrolled_now(source, start, condition,
                                   level_dbfs(audio.samples[int(round(start * rate)):int(round(start * rate)) + span]), rate)
             for start in embedded.starts]
    return items, embedded.embeddings


@dataclass(frozen=True)
class NoiseMixing:
    """Enroll each clean recording also mixed with the site's noise-only recordings.

    ``mixes`` mixtures per recording, each with a noise recording and an SNR drawn at random
    (seeded: the same files give the same bank) from ``snr_db``: the range of machine-to-site
    loudness the microphone will hear (see ``monitor/audio/mixing.py``).
    """

    noise: Sequence[Path]
    mixes: int = 3
    snr_db: tuple[float, float] = (-6.0, 0.0)
    seed: int = 0


def _recordings(paths: Sequence[Path], mixing: NoiseMixing | None) -> Iterator[list[tuple[str, Audio]]]:
    """Per path, (source label, audio) as enrolled: as recorded, then its noise mixtures."""
    noise = [load_audio(p) for p in mixing.noise] if mixing else []
    rng = np.random.default_rng(mixing.seed if mixing else 0)
    for path in paths:
        audio, source = load_audio(path), str(Path(path).resolve())
        recordings = [(source, audio)]
        for _ in range(mixing.mixes if noise else 0):
            other = noise[rng.integers(len(noise))]
            snr = float(rng.uniform(*mixing.snr_db))
            offset = int(rng.integers(other.samples.size))
            recordings.append((f"{source}+{Path(other.source).name}@{snr:.1f}dB", mix_at_snr(audio, other, snr, offset)))
        yield recordings


def enroll_files(
    detector: Detector,
    store: BankStore,
    paths: Sequence[Path],
    condition: str,
    replace: bool = False,
    note: str | None = None,
    progress: Callable[[int], None] | None = None,
    mixing: NoiseMixing | None = None,
) -> Enrolled:
    """Embed every window of ``paths`` (and, with ``mixing``, of their mixtures with the site's
    noise) and save bank + new windows as a new version.

    Adds to the current version unless ``replace``; a bank of other models is refused (by
    ``Bank.add``) before anything is written.
    """
    try:
        bank = Bank() if replace else store.load()
    except BankNotFound:
        bank = Bank()
    items: list[BankItem] = []
    parts: dict[str, list[np.ndarray]] = {name: [] for name in detector.model_ids}
    recorded = bank.recorded_rates
    for recordings in _recordings(paths, mixing):
        for source, audio in recordings:
            check_audio_rate(recorded, audio.sample_rate, detector.model_rate, source)
            recorded.add(audio.sample_rate)
            new_items, embeddings = embed_windows(detector, audio, source, condition)
            items += new_items
            for name, emb in embeddings.items():
                parts[name].append(emb)
        if progress:
            progress(1)
    new_bank = bank.add(items, {n: np.concatenate(v) for n, v in parts.items()}, detector.model_ids)
    mixed = f", each also mixed with site noise x{mixing.mixes}" if mixing else ""
    version = store.save(new_bank, note=note or f"enrolled {len(paths)} file(s){mixed}, condition {condition}")
    log.info("bank %s: version %s with %d windows (%d new)", store.path, version, len(new_bank), len(items))
    return Enrolled(version, new_bank, len(items))
