"""Enrollment: turning recordings of a healthy machine into a new bank version."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitor.audio.files import AudioFile, Recording, load_audio, slices
from monitor.audio.mixing import mix_at_snr
from monitor.audio.sensor import check_window
from monitor.bank.model import Bank, BankItem, check_audio_rate
from monitor.bank.store import BankStore
from monitor.errors import BankNotFound, NothingToEnroll
from monitor.scoring.detector import Detector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeftOut:
    """Windows of one recording that the sensor checks kept out of the bank, and why."""

    source: str
    windows: int  # the recording's windows, kept or not
    left_out: int
    faults: dict[str, int]  # fault name -> windows showing it (a window may show several)

    def __str__(self) -> str:
        why = ", ".join(f"{fault} {n}" for fault, n in self.faults.items())
        return f"{self.source}: {self.left_out} of {self.windows} window(s) left out by the sensor checks ({why})"


@dataclass(frozen=True)
class Enrolled:
    version: str
    bank: Bank
    new_windows: int
    left_out: tuple[LeftOut, ...] = ()  # per recording with faulty windows

    @property
    def left_out_windows(self) -> int:
        return sum(r.left_out for r in self.left_out)


@dataclass(frozen=True)
class Windows:
    """One recording's windows as bank rows: items and embeddings per backbone of the windows
    that passed the sensor checks, and what was left out (None when nothing was)."""

    items: list[BankItem]
    embeddings: dict[str, np.ndarray]
    left_out: LeftOut | None


def embed_windows(detector: Detector, recording: Recording, source: str, condition: str,
                  progress: Callable[[float], None] | None = None, features: bool = False) -> Windows:
    """Every window of ``recording`` as bank rows, read a block at a time. Enrollment and
    evaluation both use it; enrollment asks for ``features``, every single output of the
    models (``Detector.embed``), so that a bank serves any later ``output`` setting.

    Each window is also checked as the daemon checks it (``monitor.audio.sensor``, with the
    config's sensor settings, on the original audio at the recording's rate): digital silence,
    clipping or dropouts enrolled as normal would teach the bank that a broken microphone is the
    machine. Faulty windows are left out. A kept window's level (the item's enrolled level) is
    measured on the same original samples. The original is read a second time for these, window
    by window, so that the whole recording is never held.
    """
    embedded = detector.embed(recording, progress=progress, features=features)
    rate = recording.sample_rate
    span = int(round(detector.window_seconds * rate))
    offsets = [int(round(start * rate)) for start in embedded.starts]
    items, kept, faults = [], [], Counter()
    for i, (start, samples) in enumerate(zip(embedded.starts, slices(recording, offsets, span))):
        report = check_window(samples, rate, detector.config.sensor, None)
        if report.faults:
            faults.update(report.faults)
            continue
        kept.append(i)
        items.append(BankItem.enrolled_now(source, start, condition, report.rms_dbfs, rate))
    left = len(embedded.starts) - len(kept)
    return Windows(items, {name: emb[kept] for name, emb in embedded.embeddings.items()},
                   LeftOut(source, len(embedded.starts), left, dict(faults)) if left else None)


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


def _recordings(paths: Sequence[Path], mixing: NoiseMixing | None) -> Iterator[list[tuple[str, Recording]]]:
    """Per path, (source label, recording) as enrolled: as recorded, then its noise mixtures.

    Without mixing a file is read a block at a time; a mixture needs the whole recording in
    memory (its level sets the noise's), so with mixing each recording is loaded whole.
    """
    noise = [load_audio(p) for p in mixing.noise] if mixing else []
    rng = np.random.default_rng(mixing.seed if mixing else 0)
    for path in paths:
        source = str(Path(path).resolve())
        if not noise:
            yield [(source, AudioFile.open(path))]
            continue
        audio = load_audio(path)
        recordings: list[tuple[str, Recording]] = [(source, audio)]
        for _ in range(mixing.mixes):
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
    progress: Callable[[float], None] | None = None,
    mixing: NoiseMixing | None = None,
) -> Enrolled:
    """Embed every window of ``paths`` (and, with ``mixing``, of their mixtures with the site's
    noise) and save bank + new windows as a new version; ``progress`` hears the seconds of
    audio read (mixtures included). A new bank keeps every single output of the models
    (``Detector.feature_model_ids``); a bank adds rows for the backbones it holds (``Bank.add``).

    Windows that fail the sensor checks are left out, one warning per recording (and in the
    result); when none is left, nothing is saved (``NothingToEnroll``). Adds to the current
    version unless ``replace``; a bank of other models is refused (by ``Bank.add``) before
    anything is written.
    """
    try:
        bank = Bank() if replace else store.load()
    except BankNotFound:
        bank = Bank()
    items: list[BankItem] = []
    parts: dict[str, list[np.ndarray]] = {}
    left_out: list[LeftOut] = []
    recorded = bank.recorded_rates
    for recordings in _recordings(paths, mixing):
        for source, recording in recordings:
            check_audio_rate(recorded, recording.sample_rate, detector.model_rate, source)
            recorded.add(recording.sample_rate)
            windows = embed_windows(detector, recording, source, condition, progress, features=True)
            items += windows.items
            for name, emb in windows.embeddings.items():
                parts.setdefault(name, []).append(emb)
            if windows.left_out:
                log.warning("%s", windows.left_out)
                left_out.append(windows.left_out)
    if not items:
        faults = Counter()
        for recording in left_out:
            faults.update(recording.faults)
        raise NothingToEnroll(f"nothing to enroll: all {sum(r.windows for r in left_out)} window(s) of "
                              f"{len(paths)} file(s) failed the sensor checks "
                              f"({', '.join(f'{fault} {n}' for fault, n in faults.items())})")
    new_bank = bank.add(items, {n: np.concatenate(v) for n, v in parts.items()}, detector.feature_model_ids)
    mixed = f", each also mixed with site noise x{mixing.mixes}" if mixing else ""
    version = store.save(new_bank, note=note or f"enrolled {len(paths)} file(s){mixed}, condition {condition}")
    log.info("bank %s: version %s with %d windows (%d new)", store.path, version, len(new_bank), len(items))
    return Enrolled(version, new_bank, len(items), tuple(left_out))
