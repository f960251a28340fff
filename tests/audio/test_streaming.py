"""Reading, resampling and cutting a block at a time gives what doing it on the whole signal gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from monitor.audio.files import (
    Audio,
    AudioFile,
    Resampler,
    WindowCutter,
    fit_windows,
    load_audio,
    resample,
    slices,
)
from tests.synth import machine_sound


def _blocks(x: np.ndarray, seed: int) -> list[np.ndarray]:
    """``x`` in blocks of random sizes, empty ones included."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, len(x) + 1, size=12))
    return np.split(x, cuts)


@pytest.mark.parametrize(("rate_in", "rate_out"), [(16000, 44100), (44100, 16000), (48000, 16000), (22050, 22050)])
def test_resampling_in_blocks_equals_resampling_the_whole(rate_in: int, rate_out: int) -> None:
    x = machine_sound(3, 2.3, rate=rate_in)
    resampler = Resampler(rate_in, rate_out)
    streamed = np.concatenate([resampler.push(b) for b in _blocks(x, 1)] + [resampler.flush()])
    assert np.array_equal(streamed, resample(x, rate_in, rate_out))  # bit for bit


@pytest.mark.parametrize(("length", "window", "hop", "min_samples"), [
    (1000, 100, 100, None), (1050, 100, 100, None), (1050, 100, 30, None), (1050, 100, 170, None),
    (100, 100, 100, None), (37, 100, 100, None), (37, 100, 100, 20), (7, 100, 100, 20), (1, 100, 50, None),
])
def test_cutting_in_blocks_equals_cutting_the_whole(length: int, window: int, hop: int, min_samples: int | None) -> None:
    x = np.random.default_rng(length).standard_normal(length).astype(np.float32)
    expected, expected_starts = fit_windows(x, window, hop, min_samples)
    for seed in range(3):
        cutter = WindowCutter(window, hop, min_samples)
        cut = [w for block in _blocks(x, seed) for w in cutter.push(block)] + cutter.finish()
        assert [s for s, _ in cut] == expected_starts
        np.testing.assert_array_equal(np.stack([w for _, w in cut]), expected)


def test_the_cutter_holds_a_window_and_a_block_not_the_signal() -> None:
    cutter = WindowCutter(1000, 1000)
    held, windows = [], 0
    for _ in range(500):
        windows += len(cutter.push(np.ones(300, np.float32)))
        held.append(len(cutter._held))
    assert max(held) <= 1000 + 300
    assert windows == 150 and cutter.finish() == []  # the last window ends at the end: none added


def test_slices_read_block_by_block_equal_slicing_the_whole(tmp_path: Path) -> None:
    x = machine_sound(4, 20.0)
    sf.write(tmp_path / "x.wav", x, 16000, subtype="FLOAT")
    starts, length = [0, 3, 70000, 70001, 250000, 310000], 50000
    for recording in (AudioFile.open(tmp_path / "x.wav"), Audio(x, 16000, "x")):
        got = list(slices(recording, starts, length))
        assert [len(g) for g in got] == [50000] * 5 + [10000]  # the last one cut short at the end
        for start, g in zip(starts, got):
            np.testing.assert_array_equal(g, x[start:start + length])


def test_a_file_read_in_blocks_is_the_file_read_whole(tmp_path: Path) -> None:
    stereo = np.stack([machine_sound(5, 9.0, rate=8000), machine_sound(6, 9.0, rate=8000)], axis=1)
    sf.write(tmp_path / "s.flac", stereo, 8000)
    file = AudioFile.open(tmp_path / "s.flac")
    assert (file.sample_rate, file.frames, file.seconds) == (8000, 72000, 9.0)
    blocks = list(file.blocks(10000))
    assert [len(b) for b in blocks] == [10000] * 7 + [2000]
    np.testing.assert_array_equal(np.concatenate(blocks), load_audio(tmp_path / "s.flac").samples)
    whole, _ = sf.read(tmp_path / "s.flac", dtype="float32")
    np.testing.assert_array_equal(np.concatenate(blocks), whole.mean(axis=1))
