"""Tests for monitor.audio.sensor: each fault from a signal built to have it, none from clean audio."""

from __future__ import annotations

import numpy as np
import pytest

from monitor import demo
from monitor.audio.files import load_audio
from monitor.audio.sensor import (
    FAULTS,
    MIN_DBFS,
    SensorReport,
    check_window,
    level_dbfs,
    longest_zero_run,
)
from monitor.config import SensorConfig
from tests.synth import machine_sound, site_noise

RATE = 16000
CONFIG = SensorConfig()  # silence -90 dBFS, drop 30 dB, clip 0.999 x 0.1 %, dropout 50 ms


def noise(seconds: float = 1.0, dbfs: float = -30.0, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(int(seconds * RATE))
    return (x / np.sqrt(np.mean(x**2)) * 10 ** (dbfs / 20)).astype(np.float32)


def tone(seconds: float = 1.0, amplitude: float = 0.5, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def check(x: np.ndarray, enrolled: float | None = None) -> SensorReport:
    return check_window(x, RATE, CONFIG, enrolled)


@pytest.mark.parametrize("signal", [noise(), noise(dbfs=-80), tone(), tone(amplitude=0.99)], ids=["noise", "quiet-noise", "tone", "loud-tone"])
def test_clean_signals_have_no_fault(signal: np.ndarray) -> None:
    report = check(signal, enrolled=level_dbfs(signal) - 3)
    assert report.ok and report.faults == ()
    assert report.longest_zero_run_ms < CONFIG.dropout_ms


def test_levels() -> None:
    assert level_dbfs(noise(dbfs=-30)) == pytest.approx(-30, abs=1e-3)
    assert level_dbfs(tone(amplitude=1.0)) == pytest.approx(-3.0103, abs=1e-3)  # full-scale sine
    report = check(tone(amplitude=0.5))
    assert report.rms_dbfs == pytest.approx(-9.0309, abs=1e-3)
    assert report.peak == pytest.approx(0.5, abs=1e-3)


def test_nonfinite() -> None:
    for bad in (np.nan, np.inf, -np.inf):
        x = noise()
        x[100] = bad
        report = check(x)
        assert report.faults == ("nonfinite",)
        assert np.isfinite(report.rms_dbfs) and np.isfinite(report.peak)
        assert report.rms_dbfs == pytest.approx(-30, abs=0.01)  # judged on the finite samples


def test_only_nonfinite_samples() -> None:
    report = check(np.full(RATE, np.nan, dtype=np.float32))
    assert report.faults == ("nonfinite",)
    assert report.rms_dbfs == MIN_DBFS and report.peak == 0.0 and report.longest_zero_run_ms == 0.0


def test_silence_digital_zero_and_below_threshold() -> None:
    zeros = check(np.zeros(RATE, np.float32))
    assert zeros.faults == ("silence",)  # a dead input is silence, not also a dropout
    assert zeros.rms_dbfs == MIN_DBFS and zeros.longest_zero_run_ms == 1000.0
    assert check(noise(dbfs=-100)).faults == ("silence",)
    assert check(noise(dbfs=-89)).ok


def test_silence_is_also_low_level_against_an_enrolled_level() -> None:
    assert check(np.zeros(RATE, np.float32), enrolled=-30.0).faults == ("silence", "low_level")


def test_low_level() -> None:
    x = noise(dbfs=-65)
    assert check(x, enrolled=-30.0).faults == ("low_level",)  # 35 dB below
    assert check(x, enrolled=-40.0).ok  # 25 dB below
    assert check(x, enrolled=None).ok


def test_clipping() -> None:
    x = tone(amplitude=0.5)
    x[:: RATE // 20] = 1.0  # 20 of 16000 samples at full scale: 0.125 %
    report = check(x)
    assert report.faults == ("clipping",)
    assert report.clipped_fraction == pytest.approx(20 / RATE)
    x[:: RATE // 10] = 0.5  # back to 10 clipped, 0.0625 %: under the 0.1 % limit
    assert check(x).ok
    assert check(np.clip(tone(amplitude=2.0), -1, 1)).faults == ("clipping",)  # a hard-clipped sine
    assert check(-np.ones(RATE, np.float32)).faults == ("clipping",)  # negative full scale too


def pcm16(x: np.ndarray) -> np.ndarray:
    """As read back from a 16-bit file."""
    return (np.round(x * 32767) / 32767).astype(np.float32)


@pytest.mark.parametrize("rail", [0.95, 0.5, 0.1])
def test_clipping_at_the_windows_own_flat_top(rail: float) -> None:
    """A saturating preamp or a limiter flattens the tops below full scale."""
    machine = machine_sound(3) / np.abs(machine_sound(3)).max()
    rumble = np.convolve(noise(dbfs=-6), np.ones(8) / 8, "same").astype(np.float32)  # band-limited, like real sound
    for clipped in (np.clip(tone(amplitude=2 * rail), -rail, rail), pcm16(np.clip(1.5 * rail * machine, -rail, rail)),
                    np.clip(2.5 * rail * rumble, -rail, rail)):
        report = check(clipped)
        assert report.faults == ("clipping",) and report.peak == pytest.approx(rail, rel=1e-4)
        assert report.clipped_fraction > CONFIG.clip_fraction
    x = noise(dbfs=-20)
    x[1000:1003] = x[5000:5003] = x[9000:9003] = 0.5  # 9 samples on a flat top: under 0.1 %
    assert check(x).ok


@pytest.mark.parametrize("hz", [1000.0, 1600.0, 440.0, 50.0])
def test_tones_repeating_their_exact_crest_are_not_clipping(hz: float) -> None:
    """A period dividing the sample rate puts the same samples at every crest (1 kHz: one
    sample in 8), but one or two at a time (1600 Hz: two straddle each crest)."""
    for x in (tone(amplitude=0.9, hz=hz), pcm16(tone(amplitude=0.3, hz=hz))):
        assert check(x).ok


def test_machine_sound_and_the_demo_recordings_have_no_sensor_fault() -> None:
    for seed in range(20):
        for x in (machine_sound(seed), machine_sound(seed, fault=True), site_noise(seed)):
            assert check(x).ok
    for path in demo.enroll_clips() + demo.replay_clips():
        audio = load_audio(path)
        assert check_window(audio.samples, audio.sample_rate, CONFIG, None).ok, path


def test_dc_offset() -> None:
    assert check(np.full(RATE, 0.3, np.float32)).faults == ("dc_offset",)  # a stuck input
    assert check(np.full(RATE, -1e-3, np.float32)).faults == ("dc_offset",)
    assert check(noise(dbfs=-40) + np.float32(0.05)).faults == ("dc_offset",)  # biased: mean 5x the AC level
    assert check(noise(dbfs=-40) + np.float32(0.005)).ok  # half the AC level
    assert check(tone(amplitude=0.5) + np.float32(0.01)).ok
    assert check(np.full(RATE, 1.0, np.float32)).faults == ("clipping",)  # stuck at full scale
    assert check(np.full(RATE, 1e-6, np.float32)).faults == ("silence",)  # under the silence level
    assert check(np.full(int(0.01 * RATE), 0.3, np.float32)).ok  # 10 ms: a low tone could do that


def test_dropout() -> None:
    x = noise()
    x[5000 : 5000 + int(0.060 * RATE)] = 0.0  # 60 ms of exact zeros inside live audio
    report = check(x)
    assert report.faults == ("dropout",)
    assert report.longest_zero_run_ms == pytest.approx(60.0)
    y = noise()
    y[5000 : 5000 + int(0.040 * RATE)] = 0.0  # 40 ms: under the limit
    assert check(y).ok


def test_dropout_at_the_edges_of_the_window() -> None:
    x = noise()
    x[-int(0.1 * RATE) :] = 0.0
    assert check(x).faults == ("dropout",)
    x = noise()
    x[: int(0.1 * RATE)] = -0.0  # negative zero is zero
    assert check(x).longest_zero_run_ms == pytest.approx(100.0)


def test_several_faults_at_once() -> None:
    x = noise(dbfs=-10)
    x[:100] = 1.0
    x[200 : 200 + RATE // 10] = 0.0
    x[-1] = np.nan
    assert check(x).faults == ("nonfinite", "clipping", "dropout")
    assert set(check(x).faults) <= set(FAULTS)


def test_longest_zero_run() -> None:
    assert longest_zero_run(np.array([1, 0, 0, 1, 0, 0, 0], np.float32)) == 3
    assert longest_zero_run(np.array([0, 0, 1, 0], np.float32)) == 2
    assert longest_zero_run(np.array([1, np.nan, 1], np.float32)) == 0
    assert longest_zero_run(np.array([0], np.float32)) == 1


def test_float_edge_cases() -> None:
    tiny = np.full(RATE, 1e-30, np.float32)  # its square underflows float32: -600 dBFS, floored
    assert level_dbfs(tiny) == MIN_DBFS
    assert level_dbfs(np.full(10, 1e-7, np.float32)) == pytest.approx(-140.0, abs=1e-3)
    assert check(tiny).faults == ("silence",)
    huge = np.full(RATE, 3e38, np.float32)  # squares overflow float32 but not float64
    report = check(huge)
    assert np.isfinite(report.rms_dbfs) and report.rms_dbfs == pytest.approx(20 * np.log10(3e38), abs=0.01)
    assert report.faults == ("clipping",)
    assert check(np.array([0.5], np.float32)).ok  # a one-sample window


def test_invalid_input() -> None:
    with pytest.raises(ValueError):
        check(np.zeros((10, 2), np.float32))
    with pytest.raises(ValueError):
        check(np.zeros(0, np.float32))
    with pytest.raises(ValueError):
        check_window(noise(), 0, CONFIG, None)
