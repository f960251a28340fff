"""Reading audio files, resampling, and cutting audio into the fixed windows backbones take.

Clip length policy (one rule for enrollment, scoring and evaluation):

* A clip shorter than the window is embedded **as it is** when the backbone takes variable
  lengths (its metadata ``min_seconds`` > 0) and the clip is at least that long: the backbone
  averages over whatever it has, so nothing is invented. Otherwise it is **repeated** until it
  fills the window. Zero padding would add digital silence, which changes exactly the level and
  spectral statistics the detector compares, and looks like a dropout to the sensor checks;
  machine sound is close to stationary, so repeating keeps its statistics, but the seams add
  clicks a CNN can see (measured: on 5 s fan clips, aisfx's official score drops from 0.920 as
  is to 0.908 repeated), hence the preference for variable length.
* A longer clip is cut into windows every ``hop``; when the last window does not reach the end,
  one more window is aligned to the end, so no audio is ignored and none is padded (a 12 s clip
  with 10 s windows gives windows at 0 s and 2 s).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from monitor.errors import AudioError

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac")


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # float32 mono, [-1, 1] full scale
    sample_rate: int
    source: str

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def load_audio(path: Path) -> Audio:
    """Read WAV/FLAC (anything libsndfile reads) as float32 mono; channels are averaged."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"{path}: cannot read audio ({exc})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: no audio samples")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"{path}: audio contains NaN or Inf samples")
    return Audio(np.ascontiguousarray(mono, dtype=np.float32), int(rate), str(path))


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling with libsoxr (high quality preset); a no-op when rates match."""
    if rate_in == rate_out:
        return samples.astype(np.float32, copy=False)
    return soxr.resample(samples, rate_in, rate_out, quality="HQ").astype(np.float32, copy=False)


def window_starts(length: int, window: int, hop: int) -> list[int]:
    """Start offsets of the windows covering ``length`` samples (see the module docstring)."""
    if window <= 0 or hop <= 0:
        raise ValueError(f"window and hop must be > 0, got {window} and {hop}")
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, hop))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def fit_windows(
    samples: np.ndarray, window: int, hop: int, min_samples: int | None = None
) -> tuple[np.ndarray, list[int]]:
    """Cut ``samples`` into [n, window] float32 windows; returns them and their start offsets.

    With ``min_samples`` (a variable-length backbone), a signal shorter than the window but at
    least ``min_samples`` long comes back as one window of its own length.
    """
    if len(samples) == 0:
        raise ValueError("cannot window an empty signal")
    if min_samples is not None and min_samples <= len(samples) < window:
        return samples[None, :].astype(np.float32), [0]
    if len(samples) < window:
        repeats = -(-window // len(samples))
        return np.tile(samples, repeats)[:window][None, :].astype(np.float32), [0]
    starts = window_starts(len(samples), window, hop)
    return np.stack([samples[s : s + window] for s in starts]).astype(np.float32), starts


def is_audio(path: Path) -> bool:
    """Whether ``path`` has one of the audio suffixes (case-insensitive)."""
    return path.suffix.lower() in AUDIO_SUFFIXES


def is_hidden(path: Path, below: Path) -> bool:
    """Whether any part of ``path`` under ``below`` is hidden.

    Folder walks skip hidden entries because archives copied from macOS carry
    ``._name.wav`` resource forks that look like audio but cannot be decoded.
    """
    return any(part.startswith(".") for part in path.relative_to(below).parts)


def find_audio(paths: Iterable[Path]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted, duplicate-free list of audio files:
    the one finder for enrollment, scoring and replayed sources.

    A named file that is not audio is an error rather than silently dropped, because the
    caller asked for it explicitly; inside folders, non-audio and hidden files are skipped.
    """
    given = [Path(p) for p in paths]
    found: set[Path] = set()
    for path in given:
        if not path.exists():
            raise AudioError(f"{path} does not exist")
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and is_audio(p) and not is_hidden(p, path))
        elif is_audio(path):
            found.add(path)
        else:
            raise AudioError(f"{path} is not an audio file (expected one of {', '.join(AUDIO_SUFFIXES)})")
    if not found:
        raise AudioError(f"no audio files found in {', '.join(map(str, given)) or 'an empty path list'}")
    return sorted(found)
