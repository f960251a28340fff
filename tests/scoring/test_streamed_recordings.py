"""Recordings are embedded a block at a time: the same embeddings as the whole file at once, in
memory that does not grow with the length, with progress, and too-short clips refused."""

from __future__ import annotations

import dataclasses
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from monitor.audio.files import Audio, AudioFile, fit_windows, load_audio, resample
from monitor.bank.store import BankStore
from monitor.cli import main
from monitor.config import BackboneConfig, Config
from monitor.enrollment.files import enroll_files
from monitor.errors import EXIT_DATA, ClipTooShort
from monitor.scoring.backbone import Backbone
from monitor.scoring.detector import Detector
from monitor.scoring.recording import score_recording
from tests.synth import RATE, dcase_dataset, machine_sound, write_clip

LOGMEL = Config(backbones=[BackboneConfig("logmel")])


def long_wav(path: Path, seconds: int, rate: int = RATE) -> Path:
    """Machine sound written 20 s at a time, so that the test itself stays small."""
    with sf.SoundFile(path, "w", rate, 1, subtype="PCM_16") as f:
        for i in range(seconds // 20):
            f.write(machine_sound(i, 20.0, rate=rate))
        if seconds % 20:
            f.write(machine_sound(99, seconds % 20, rate=rate))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Detector:
    tmp = tmp_path_factory.mktemp("bank")
    detector = Detector.from_config(LOGMEL)
    store = BankStore(tmp / "bank")
    enroll_files(detector, store, [write_clip(tmp / f"n{i}.wav", machine_sound(i, 10.0)) for i in range(3)], "default")
    detector.fit(store.load())
    return detector


def test_a_long_file_embeds_as_the_whole_file_at_once(tmp_path: Path) -> None:
    """95 s at 44.1 kHz: resampled to logmel's 16 kHz, ten windows (the last aligned to the end),
    two batches; the reference resamples and cuts the whole and embeds it in one call."""
    path = long_wav(tmp_path / "long.wav", 95, rate=44100)
    detector = Detector.from_config(LOGMEL)
    backbone = detector.backbones[0]
    embedded = detector.embed(AudioFile.open(path))
    audio = load_audio(path)
    windows, starts = fit_windows(resample(audio.samples, 44100, RATE), backbone.meta.window_samples,
                                  backbone.meta.window_samples)
    reference = backbone.embed(windows)
    assert embedded.starts == [s / RATE for s in starts] and len(starts) == 10
    assert np.abs(embedded.embeddings["logmel"] - reference).max() < 1e-6
    assert np.array_equal(detector.embed(audio).embeddings["logmel"], embedded.embeddings["logmel"])


def test_memory_does_not_grow_with_the_length_of_a_recording(tmp_path: Path, fitted: Detector) -> None:
    peaks = {}
    for seconds in (160, 480):
        path = long_wav(tmp_path / f"{seconds}.wav", seconds)
        tracemalloc.start()
        try:
            result = score_recording(fitted, path)
            peaks[seconds] = tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()
        assert len(result.starts) == seconds // 10
    # Holding the file (and its windows) would add 2 x 320 s x 16 kHz x 4 bytes = 39 MB.
    assert peaks[480] - peaks[160] < 2.0, peaks


def test_progress_hears_the_seconds_read_block_by_block(tmp_path: Path, fitted: Detector) -> None:
    heard: list[float] = []
    score_recording(fitted, long_wav(tmp_path / "long.wav", 45), heard.append)
    assert len(heard) > 1 and sum(heard) == pytest.approx(45.0)


def test_the_cli_bars_count_seconds_of_audio(tmp_path: Path, monkeypatch) -> None:
    import monitor.cli

    bars: list[tuple[str, float, list[float]]] = []

    def factory(description: str, unit: str = "clip"):
        def make(total: float):
            bars.append((description, total, updates := []))
            return updates.append
        assert unit == "s"
        return make

    monkeypatch.setattr(monitor.cli, "_progress_factory", factory)
    clip, other = long_wav(tmp_path / "long.wav", 25), long_wav(tmp_path / "other.wav", 25)
    bank = str(tmp_path / "bank")
    assert main(["enroll", "--bank", bank, "--backbone", "logmel", str(clip)]) == 0
    assert main(["score", "--bank", bank, "--backbone", "logmel", str(clip), str(other)]) == 0
    (enroll, enroll_total, enrolled), (score, score_total, scored) = bars
    assert (enroll, enroll_total, score, score_total) == ("enroll", 25.0, "score", 50.0)
    assert len(enrolled) > 1 and sum(enrolled) == pytest.approx(25.0) and sum(scored) == pytest.approx(50.0)


def _fixed_length(detector: Detector) -> Detector:
    """logmel as if it took only full windows (metadata min_seconds 0)."""
    backbone = detector.backbones[0]
    fixed = dataclasses.replace(backbone, meta=dataclasses.replace(backbone.meta, min_seconds=0.0))
    return Detector([fixed], detector.config)


def test_clips_shorter_than_a_backbone_accepts_are_refused(tmp_path: Path, fitted: Detector) -> None:
    with pytest.raises(ClipTooShort, match=r"one.wav: 6.25e-05 s of audio, shorter than the 1 s backbone logmel accepts"):
        score_recording(fitted, write_clip(tmp_path / "one.wav", np.full(1, 0.1, np.float32)))
    half = Audio(machine_sound(1, 0.5), RATE, "half")
    for detector in (fitted, _fixed_length(fitted)):  # variable length: its min_seconds; fixed: MIN_REPEAT_SECONDS
        with pytest.raises(ClipTooShort, match="half: 0.5 s of audio, shorter than the 1 s"):
            detector.embed(half)
    aisfx = Detector.from_config(Config(backbones=[BackboneConfig("aisfx"), BackboneConfig("logmel")]))
    with pytest.raises(ClipTooShort, match="2 s of audio, shorter than the 2.5 s backbone aisfx accepts"):
        aisfx.embed(Audio(machine_sound(1, 2.0), RATE, "x"))
    repeated = _fixed_length(fitted).embed(Audio(machine_sound(1, 1.5), RATE, "x"))  # still repeated to fill
    assert repeated.starts == [0.0] and repeated.embeddings["logmel"].shape == (1, 256)


def test_score_enroll_and_evaluate_refuse_a_one_sample_clip(tmp_path: Path, capsys) -> None:
    one = write_clip(tmp_path / "one.wav", np.full(1, 0.1, np.float32))
    bank = str(tmp_path / "bank")
    assert main(["enroll", "--bank", bank, "--backbone", "logmel", str(one)]) == EXIT_DATA
    assert not (tmp_path / "bank").exists()
    assert main(["enroll", "--bank", bank, "--backbone", "logmel",
                 str(write_clip(tmp_path / "n.wav", machine_sound(1, 20.0)))]) == 0
    capsys.readouterr()
    assert main(["score", "--bank", bank, "--backbone", "logmel", str(one)]) == EXIT_DATA
    err = capsys.readouterr().err.strip()
    assert err == f"asd-monitor: error: {one}: 6.25e-05 s of audio, shorter than the 1 s backbone logmel accepts"
    data = dcase_dataset(tmp_path / "data", n_train=3, n_test=1, seconds=10.0)
    short = next((data / "motor" / "test").glob("*anomaly*"))
    write_clip(short, machine_sound(5, 0.5))
    assert main(["evaluate", str(data), "--backbone", "logmel", "--out", str(tmp_path / "out")]) == EXIT_DATA
    assert f"{short}: 0.5 s of audio, shorter than the 1 s backbone logmel accepts" in capsys.readouterr().err


def test_a_backbone_cuts_files_and_audio_alike(tmp_path: Path) -> None:
    backbone = Backbone.load("logmel", "cpu")
    path = long_wav(tmp_path / "x.wav", 27)
    from_file = backbone.windows_of(AudioFile.open(path))
    from_memory = backbone.windows_of(load_audio(path))
    assert from_file[1] == from_memory[1] == [0.0, 10.0, 17.0]
    np.testing.assert_array_equal(from_file[0], from_memory[0])
