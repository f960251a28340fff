"""Audio files, resampling and the clip-length policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from monitor.audio.files import fit_windows, load_audio, resample, window_starts
from monitor.errors import AudioError


def test_load_wav_and_flac_as_float_mono(tmp_path: Path) -> None:
    stereo = np.stack([np.linspace(-0.5, 0.5, 1000), np.zeros(1000)], axis=1)
    for name in ("a.wav", "a.flac"):
        sf.write(tmp_path / name, stereo, 8000)
        audio = load_audio(tmp_path / name)
        assert audio.sample_rate == 8000 and audio.samples.dtype == np.float32
        np.testing.assert_allclose(audio.samples, stereo.mean(axis=1), atol=1e-4)


def test_unreadable_and_empty_files_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....nonsense")
    with pytest.raises(AudioError, match="bad.wav: cannot read audio"):
        load_audio(bad)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0), 8000)
    with pytest.raises(AudioError, match="empty.wav: no audio samples"):
        load_audio(empty)


def test_resample_keeps_a_tone() -> None:
    t = np.arange(16000) / 16000
    y = resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), 16000, 44100)
    assert y.shape == (44100,)
    spectrum = np.abs(np.fft.rfft(y[2000:-2000]))
    assert abs(np.argmax(spectrum) * 44100 / (y.size - 4000) - 1000) < 2


@pytest.mark.parametrize(
    ("length", "window", "hop", "expected"),
    [(100, 100, 100, [0]), (120, 100, 100, [0, 20]), (250, 100, 50, [0, 50, 100, 150]), (50, 100, 100, [0])],
)
def test_window_starts_cover_the_whole_clip(length: int, window: int, hop: int, expected: list[int]) -> None:
    starts = window_starts(length, window, hop)
    assert starts == expected if length > window else starts == [0]
    if length >= window:
        assert starts[-1] + window == length or starts[-1] + window <= length


def test_last_window_is_aligned_to_the_end() -> None:
    x = np.arange(250, dtype=np.float32)
    windows, starts = fit_windows(x, 100, 100)
    assert starts == [0, 100, 150]
    np.testing.assert_array_equal(windows[-1], x[150:])


def test_short_clip_is_repeated_or_kept() -> None:
    x = np.arange(30, dtype=np.float32)
    windows, _ = fit_windows(x, 100, 100)
    np.testing.assert_array_equal(windows[0], np.tile(x, 4)[:100])
    kept, _ = fit_windows(x, 100, 100, min_samples=20)
    np.testing.assert_array_equal(kept[0], x)
