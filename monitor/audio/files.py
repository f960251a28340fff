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
* A clip shorter than the shortest a backbone accepts is refused (``shortest_seconds``): its
  ``min_seconds``, or ``MIN_REPEAT_SECONDS`` for a fixed-length backbone.

Files are read, resampled and cut a block at a time (``AudioFile``, ``Resampler``,
``WindowCutter``): a recording of an hour needs no more memory than one of a minute, and the
windows come out exactly as cutting the whole signal at once would cut them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from monitor.errors import AudioError

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac")


BLOCK_FRAMES = 1 << 16
"""Frames decoded, resampled and cut at a time: 4 s at 16 kHz, well under a window, and large
enough that the per-block work (a libsndfile call, a libsoxr call) is noise next to decoding."""

MIN_REPEAT_SECONDS = 1.0
"""The shortest clip a fixed-length backbone gets, repeated to fill its window. Repeating less
than a second of sound no longer gives the machine's sound: its slow modulations (a rotation at
a few Hz, a pump's stroke) are cut off, and the seams' clicks come so often that they are what the
backbone hears; a 1-sample clip repeated is a constant, which scored ANOMALY."""


def shortest_seconds(min_seconds: float) -> float:
    """The shortest clip a backbone with metadata ``min_seconds`` accepts (see the module docstring)."""
    return min_seconds if min_seconds > 0 else MIN_REPEAT_SECONDS


def _mono(data: np.ndarray, source: str) -> np.ndarray:
    """[n, channels] float32 -> [n] float32, channels averaged; NaN or Inf is refused."""
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"{source}: audio contains NaN or Inf samples")
    return np.ascontiguousarray(mono, dtype=np.float32)


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # float32 mono, [-1, 1] full scale
    sample_rate: int
    source: str

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate

    @property
    def frames(self) -> int:
        return len(self.samples)

    def blocks(self, frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
        """The samples ``frames`` at a time, as ``AudioFile.blocks`` reads a file: audio in
        memory and on disk go through the same cutting code."""
        for start in range(0, len(self.samples), frames):
            yield self.samples[start:start + frames]


@dataclass(frozen=True)
class AudioFile:
    """A WAV/FLAC file (anything libsndfile reads), read a block at a time; ``open`` reads only
    its header, so rate, length and errors about an empty file come before any decoding."""

    path: Path
    sample_rate: int
    frames: int

    @classmethod
    def open(cls, path: Path | str) -> AudioFile:
        path = Path(path)
        try:
            info = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError, OSError) as exc:
            raise AudioError(f"{path}: cannot read audio ({exc})") from None
        if info.frames <= 0:
            raise AudioError(f"{path}: no audio samples")
        return cls(path, int(info.samplerate), int(info.frames))

    @property
    def source(self) -> str:
        return str(self.path)

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate

    def blocks(self, frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
        """Float32 mono blocks of at most ``frames`` samples (channels averaged), in order."""
        try:
            with sf.SoundFile(str(self.path)) as handle:
                while True:
                    data = handle.read(frames, dtype="float32", always_2d=True)
                    if not len(data):
                        return
                    yield _mono(data, self.source)
        except (sf.LibsndfileError, RuntimeError, OSError) as exc:
            raise AudioError(f"{self.path}: cannot read audio ({exc})") from None


Recording = Audio | AudioFile
"""Audio in memory or a file on disk: both give ``source``, ``sample_rate``, ``frames``,
``seconds`` and ``blocks``."""


def load_audio(path: Path) -> Audio:
    """Read WAV/FLAC (anything libsndfile reads) as float32 mono; channels are averaged.

    The whole file in memory: for mixing and replay. Enrollment, scoring and evaluation read
    files a block at a time (``AudioFile``) through the same decoding."""
    file = AudioFile.open(path)
    blocks = list(file.blocks())
    if not blocks:
        raise AudioError(f"{path}: no audio samples")
    return Audio(np.concatenate(blocks), file.sample_rate, file.source)


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling with libsoxr (high quality preset); a no-op when rates match."""
    if rate_in == rate_out:
        return samples.astype(np.float32, copy=False)
    return soxr.resample(samples, rate_in, rate_out, quality="HQ").astype(np.float32, copy=False)


class Resampler:
    """``resample`` for audio arriving in blocks: the same libsoxr filter run as a stream, whose
    output, blocks joined, equals one ``resample`` call on the whole signal bit for bit (libsoxr
    keeps the filter's state between calls; checked in tests/audio/test_streaming.py)."""

    def __init__(self, rate_in: int, rate_out: int) -> None:
        self._stream = (None if rate_in == rate_out
                        else soxr.ResampleStream(rate_in, rate_out, 1, dtype="float32", quality="HQ"))

    def push(self, block: np.ndarray) -> np.ndarray:
        block = np.ascontiguousarray(block, dtype=np.float32)
        return block if self._stream is None else self._stream.resample_chunk(block)

    def flush(self) -> np.ndarray:
        """The filter's tail, once the input has ended."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


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


class WindowCutter:
    """Cuts a signal arriving in blocks into the windows ``fit_windows`` cuts from the whole.

    Every window that lies within the samples seen so far comes out of ``push``, as
    ``window_starts`` places them; ``finish`` adds what only the length decides (the window
    aligned to the end, or a short clip's one window). It holds the last window's worth of
    samples and no more, the most the window aligned to the end can need.
    """

    def __init__(self, window: int, hop: int, min_samples: int | None = None) -> None:
        if window <= 0 or hop <= 0:
            raise ValueError(f"window and hop must be > 0, got {window} and {hop}")
        self.window, self.hop, self.min_samples = window, hop, min_samples
        self._held = np.zeros(0, dtype=np.float32)
        self._offset = 0  # the index of _held[0] in the signal
        self._length = 0  # samples seen
        self._cut = 0  # windows given out

    def push(self, block: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Add samples; returns the (start, window) pairs they complete, in order."""
        self._held = np.concatenate((self._held, block))
        self._length += len(block)
        out = []
        while (start := self._cut * self.hop) + self.window <= self._length:
            out.append((start, self._held[start - self._offset:start - self._offset + self.window]))
            self._cut += 1
        keep = max(self._offset, min(self._cut * self.hop, self._length - self.window))
        self._held, self._offset = self._held[keep - self._offset:], keep
        return out

    def finish(self) -> list[tuple[int, np.ndarray]]:
        """The signal has ended: the windows only its length decides."""
        if self._length == 0:
            raise ValueError("cannot window an empty signal")
        if self._length < self.window:  # everything is held
            if self.min_samples is not None and self._length >= self.min_samples:
                return [(0, self._held)]
            return [(0, np.tile(self._held, -(-self.window // self._length))[:self.window])]
        starts = window_starts(self._length, self.window, self.hop)[self._cut:]
        self._cut += len(starts)
        return [(s, self._held[s - self._offset:s - self._offset + self.window]) for s in starts]


def fit_windows(
    samples: np.ndarray, window: int, hop: int, min_samples: int | None = None
) -> tuple[np.ndarray, list[int]]:
    """Cut ``samples`` into [n, window] float32 windows; returns them and their start offsets.

    With ``min_samples`` (a variable-length backbone), a signal shorter than the window but at
    least ``min_samples`` long comes back as one window of its own length.
    """
    cutter = WindowCutter(window, hop, min_samples)
    cut = cutter.push(samples) + cutter.finish()
    return np.stack([w for _, w in cut]).astype(np.float32), [s for s, _ in cut]


def slices(recording: Recording, starts: Sequence[int], length: int) -> Iterator[np.ndarray]:
    """``recording``'s samples [s, s + length) for each of the ascending ``starts`` (cut short at
    its end), read a block at a time: holds one slice and one block, not the recording."""
    held, offset, i = np.zeros(0, dtype=np.float32), 0, 0
    for block in recording.blocks():
        held = np.concatenate((held, block))
        end = offset + len(held)
        while i < len(starts) and starts[i] + length <= end:
            yield held[starts[i] - offset:starts[i] - offset + length]
            i += 1
        keep = min(starts[i], end) if i < len(starts) else end
        held, offset = held[keep - offset:], keep
    for start in starts[i:]:
        yield held[start - offset:start - offset + length]


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
