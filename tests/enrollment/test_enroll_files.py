"""Enrollment from files: every window passes the daemon's sensor checks before it is enrolled."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from monitor.audio.sensor import level_dbfs
from monitor.bank.store import BankStore
from monitor.cli import main
from monitor.config import BackboneConfig, Config
from monitor.enrollment.files import enroll_files
from monitor.errors import EXIT_DATA, NothingToEnroll
from monitor.offline.dataset import Clip
from monitor.offline.evaluate import build_bank
from monitor.scoring.detector import Detector
from tests.synth import RATE, machine_sound, site_noise, write_clip

LOGMEL = Config(backbones=[BackboneConfig("logmel")])


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector.from_config(LOGMEL)


def with_faults(seed: int) -> np.ndarray:
    """40 s of machine sound: a window of digital silence at 10 s, a clipped one at 30 s."""
    x = machine_sound(seed, 40.0)
    x[10 * RATE:20 * RATE] = 0.0
    x[30 * RATE:40 * RATE] = np.clip(x[30 * RATE:40 * RATE] * 20.0, -1.0, 1.0)
    return x


def test_faulty_windows_are_left_out_and_reported(tmp_path: Path, detector: Detector, caplog) -> None:
    path = write_clip(tmp_path / "faulty.wav", with_faults(1))
    with caplog.at_level(logging.WARNING, logger="monitor.enrollment.files"):
        result = enroll_files(detector, BankStore(tmp_path / "bank"), [path], "default")
    assert result.new_windows == 2 and len(result.bank) == 2
    assert [item.offset_s for item in result.bank.items] == [0.0, 20.0]
    (left,) = result.left_out
    assert (left.windows, left.left_out, left.faults) == (4, 2, {"silence": 1, "clipping": 1})
    assert result.left_out_windows == 2
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == f"{path.resolve()}: 2 of 4 window(s) left out by the sensor checks (silence 1, clipping 1)"


def test_kept_windows_carry_their_level_on_the_original_audio(tmp_path: Path, detector: Detector) -> None:
    x = machine_sound(2, 25.0, rate=22050)
    result = enroll_files(detector, BankStore(tmp_path / "bank"), [write_clip(tmp_path / "a.wav", x, 22050)], "default")
    assert [item.offset_s for item in result.bank.items] == [0.0, 10.0, 15.0]
    for item in result.bank.items:  # measured at 22.05 kHz, not at logmel's 16 kHz
        start = int(round(item.offset_s * 22050))
        assert item.level_dbfs == pytest.approx(level_dbfs(x[start:start + 220500]), abs=0.01)  # 16-bit WAV
        assert item.sample_rate == 22050


def test_digital_silence_is_refused_and_nothing_is_written(tmp_path: Path, capsys) -> None:
    silent = write_clip(tmp_path / "silent.wav", np.zeros(20 * RATE, np.float32))
    bank = tmp_path / "bank"
    for extra in ([], ["--noise"]):  # site noise is checked as the machine is
        assert main(["enroll", "--bank", str(bank), "--backbone", "logmel", *extra, str(silent)]) == EXIT_DATA
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == ("asd-monitor: error: nothing to enroll: all 2 window(s) of 1 file(s) failed the "
                           "sensor checks (silence 2)")
        assert not bank.exists()


def test_the_cli_says_how_many_windows_were_left_out(tmp_path: Path, capsys, caplog) -> None:
    good = write_clip(tmp_path / "good.wav", machine_sound(3, 20.0))
    faulty = write_clip(tmp_path / "faulty.wav", with_faults(4))
    assert main(["enroll", "--bank", str(tmp_path / "bank"), "--backbone", "logmel", str(good), str(faulty)]) == 0
    assert "(4 new, condition default, 2 left out by the sensor checks)" in capsys.readouterr().out
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"{faulty.resolve()}: 2 of 4 window(s) left out by the sensor checks (silence 1, clipping 1)"]
    noise = write_clip(tmp_path / "noise.wav", site_noise(5, 20.0))
    assert main(["enroll", "--bank", str(tmp_path / "bank"), "--backbone", "logmel", "--noise", str(noise)]) == 0
    assert "left out" not in capsys.readouterr().out


def test_the_evaluation_bank_is_checked_as_enrollment_is(tmp_path: Path, detector: Detector) -> None:
    clips = [Clip(write_clip(tmp_path / "a.wav", with_faults(6)), "m", "train", "normal", "source", "00", ""),
             Clip(write_clip(tmp_path / "b.wav", machine_sound(7, 10.0)), "m", "train", "normal", "target", "00", "")]
    bank = build_bank(detector, clips)
    assert [(item.offset_s, item.condition) for item in bank.items] == [(0.0, "source"), (20.0, "source"), (0.0, "target")]


def test_nothing_to_enroll_is_a_data_error(tmp_path: Path, detector: Detector) -> None:
    silent = write_clip(tmp_path / "silent.wav", np.zeros(15 * RATE, np.float32))
    with pytest.raises(NothingToEnroll, match="all 2 window"):
        enroll_files(detector, BankStore(tmp_path / "bank"), [silent], "default")
    assert NothingToEnroll("x").exit_code == EXIT_DATA
