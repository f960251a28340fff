"""Tests of monitor.outputs.clips: FLAC round trip, retention, and failures that must never raise."""

from __future__ import annotations

import calendar
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from monitor.config import ClipsConfig
from monitor.outputs.clips import ClipStore, SavedClip

RATE = 16000
START = calendar.timegm((2025, 3, 14, 15, 9, 26)) + 0.5  # 2025-03-14T15:09:26.5Z
LSB = 1 / 32768


def _noise(seconds: float = 1.0, seed: int = 0, amplitude: float = 0.5) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-amplitude, amplitude, int(seconds * RATE)).astype(np.float32)


def _clips(directory: Path) -> list[Path]:
    return sorted(p.relative_to(directory) for p in directory.rglob("*") if p.is_file())


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, so a disk really fills up; skipped where mounting is not permitted."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_round_trip(tmp_path: Path) -> None:
    samples = _noise()
    saved = ClipStore(tmp_path, ClipsConfig()).save("press-1", START, samples, RATE)
    assert saved == SavedClip(tmp_path / "press-1" / "20250314T150926Z_press-1.flac", None)
    info = sf.info(str(saved.path))
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_16", RATE, 1)
    back, rate = sf.read(saved.path, dtype="float32")
    assert rate == RATE and back.shape == samples.shape
    np.testing.assert_allclose(back, samples, atol=LSB)
    assert _clips(tmp_path) == [Path("press-1/20250314T150926Z_press-1.flac")]  # no temporary file left


def test_stereo_and_int16(tmp_path: Path) -> None:
    store = ClipStore(tmp_path, ClipsConfig())
    stereo = np.stack([_noise(seed=1), _noise(seed=2)], axis=1)
    back, _ = sf.read(store.save("m", START, stereo, RATE).path, dtype="float32")
    np.testing.assert_allclose(back, stereo, atol=LSB)
    pcm = (np.arange(-1000, 1000) * 16).astype(np.int16)
    back, _ = sf.read(store.save("m", START + 10, pcm, RATE).path, dtype="int16")
    np.testing.assert_array_equal(back, pcm)


def test_out_of_range_floats_are_clipped(tmp_path: Path) -> None:
    samples = np.array([0.25, 1.5, -3.0, np.inf, -np.inf, np.nan, 1.0, -1.0], dtype=np.float64)
    saved = ClipStore(tmp_path, ClipsConfig()).save("m", START, samples, RATE)
    back, _ = sf.read(saved.path, dtype="float64")
    np.testing.assert_allclose(back, [0.25, 1.0, -1.0, 1.0, -1.0, 0.0, 1.0, -1.0], atol=LSB)


def test_same_second_does_not_overwrite(tmp_path: Path) -> None:
    store = ClipStore(tmp_path, ClipsConfig())
    first = store.save("m", START, _noise(seed=1), RATE).path
    second = store.save("m", START + 0.3, _noise(seed=2), RATE).path
    assert first is not None and second is not None and first != second
    assert second.name == "20250314T150926Z_m-2.flac"


def test_retention_by_count_over_all_machines(tmp_path: Path) -> None:
    store = ClipStore(tmp_path, ClipsConfig(max_files=3))
    for i in range(6):
        saved = store.save(("press-1", "pump-2")[i % 2], START + 60 * i, _noise(0.2, seed=i), RATE)
        assert saved.error is None
    assert _clips(tmp_path) == [
        Path("press-1/20250314T151326Z_press-1.flac"),
        Path("pump-2/20250314T151226Z_pump-2.flac"),
        Path("pump-2/20250314T151426Z_pump-2.flac"),
    ]


def test_retention_by_size(tmp_path: Path) -> None:
    probe = ClipStore(tmp_path / "probe", ClipsConfig()).save("m", START, _noise(seed=9), RATE).path
    size = probe.stat().st_size  # noise of one length compresses to about the same size
    store = ClipStore(tmp_path / "clips", ClipsConfig(max_megabytes=2.5 * size / 1e6))
    for i in range(5):
        store.save("m", START + 60 * i, _noise(seed=i), RATE)
    kept = _clips(tmp_path / "clips")
    assert kept == [Path("m/20250314T151226Z_m.flac"), Path("m/20250314T151326Z_m.flac")]
    assert sum((tmp_path / "clips" / p).stat().st_size for p in kept) <= 2.5 * size


def test_the_new_clip_survives_even_when_too_big(tmp_path: Path) -> None:
    store = ClipStore(tmp_path, ClipsConfig(max_megabytes=0.001))
    store.save("m", START, _noise(seed=1), RATE)
    saved = store.save("m", START + 60, _noise(seed=2), RATE)
    assert saved.error is None and _clips(tmp_path) == [saved.path.relative_to(tmp_path)]


def test_disabled(tmp_path: Path) -> None:
    saved = ClipStore(tmp_path, ClipsConfig(enabled=False)).save("m", START, _noise(), RATE)
    assert saved.path is None and "disabled" in saved.error
    assert _clips(tmp_path) == []


def test_half_written_clips_are_removed_at_start(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    partial = tmp_path / "m" / ".20250314T150926Z_m.flac.partial"
    partial.write_bytes(b"fLaC")
    ClipStore(tmp_path, ClipsConfig())
    assert not partial.exists()


def test_full_disk_is_reported_not_raised(tmpfs: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ClipStore(tmpfs, ClipsConfig())
    saved = store.save("m", START, _noise(10.0), RATE)  # ~300 kB of FLAC on a 64 KiB disk
    assert saved.path is None
    assert "No space left on device (ENOSPC)" in saved.error and "\n" not in saved.error
    assert _clips(tmpfs) == []  # the partial file was removed, the space is free again
    assert saved.error in caplog.text
    assert store.save("m", START + 10, _noise(0.1), RATE).error is None  # a small one still fits


def test_read_only_disk_is_reported_not_raised(tmpfs: Path) -> None:
    store = ClipStore(tmpfs, ClipsConfig())
    assert store.save("m", START, _noise(0.1), RATE).error is None
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    for machine in ("m", "new-machine"):  # existing folder, and a folder that cannot be created
        saved = store.save(machine, START + 10, _noise(0.1), RATE)
        assert saved.path is None and "Read-only file system (EROFS)" in saved.error


def test_encoder_failure_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sf, "write", full_disk)
    saved = ClipStore(tmp_path, ClipsConfig()).save("m", START, _noise(), RATE)
    assert saved.path is None and "ENOSPC" in saved.error


def test_failed_write_is_reported_and_cleaned_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The full-disk path without root: fsync is where a full disk shows up for buffered data."""
    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    store = ClipStore(tmp_path, ClipsConfig())
    monkeypatch.setattr(os, "fsync", full_disk)
    saved = store.save("m", START, _noise(), RATE)
    assert saved.path is None and "No space left on device (ENOSPC)" in saved.error
    assert _clips(tmp_path) == []


def test_bad_input_is_reported_not_raised(tmp_path: Path) -> None:
    store = ClipStore(tmp_path, ClipsConfig())
    assert "encode" in store.save("m", START, np.zeros(100, dtype=np.int64), RATE).error
    assert "encode" in store.save("m", START, _noise(), 0).error
    assert "machine name" in store.save("..", START, _noise(), RATE).error
    assert _clips(tmp_path) == []
