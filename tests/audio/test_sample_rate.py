"""Audio at another sample rate than the bank was enrolled from is refused, with a reason,
by file enrollment, scoring and the daemon; nothing is changed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import soxr

from monitor.bank.model import check_audio_rate
from monitor.bank.store import BankStore
from monitor.cli import main
from monitor.errors import BankError
from monitor.service.daemon import Daemon
from tests.daemons import clips, daemon_config
from tests.synth import RATE, machine_sound, write_clip


def test_the_band_the_model_hears_decides() -> None:
    check_audio_rate(set(), 8000, 16000, "first")  # an empty bank takes any rate
    check_audio_rate({44100}, 48000, 16000, "x")  # both hold everything a 16 kHz model hears
    check_audio_rate({16000}, 16000, 44100, "x")
    with pytest.raises(BankError, match=r"x: audio recorded at 8000 Hz holds sound up to 4000 Hz, but the bank "
                                         r"was enrolled from audio at 16000 Hz \(up to 8000 Hz"):
        check_audio_rate({16000}, 8000, 16000, "x")
    with pytest.raises(BankError, match="48000 Hz"):
        check_audio_rate({16000}, 48000, 44100, "y")  # aisfx listens at 44.1 kHz: 8 vs 22 kHz of band


def _narrowband(path: Path, seed: int) -> Path:
    """The machine recorded by an 8 kHz device."""
    return write_clip(path, soxr.resample(machine_sound(seed), RATE, 8000).astype("float32"), 8000)


def test_enroll_and_score_refuse_another_band_and_change_nothing(tmp_path: Path, capsys) -> None:
    bank = tmp_path / "bank"
    assert main(["enroll", "--bank", str(bank), "--backbone", "logmel", *map(str, clips(tmp_path / "n", "nnn"))]) == 0
    store = BankStore(bank)
    assert store.load().recorded_rates == {RATE} and store.versions() == ["v000001"]
    narrow = _narrowband(tmp_path / "phone.wav", 9)
    capsys.readouterr()
    assert main(["enroll", "--bank", str(bank), "--backbone", "logmel", str(narrow)]) == 65
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{narrow}" in err and "8000 Hz" in err and "16000 Hz" in err
    assert store.versions() == ["v000001"]
    assert main(["score", "--bank", str(bank), "--backbone", "logmel", str(narrow)]) == 65
    assert "8000 Hz" in capsys.readouterr().err


def test_daemon_refuses_a_bank_enrolled_at_another_rate(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "n"))
    assert main(["enroll", "--bank", str(config.daemon.state_dir / "banks" / "motor"), "--backbone", "logmel",
                 *map(str, clips(tmp_path / "n", "nnn"))]) == 0
    config = replace(config, sources=[replace(config.sources[0], sample_rate=8000)])
    daemon = Daemon(config)
    with pytest.raises(BankError, match="motor: bank v000001 for source replay: audio recorded at 8000 Hz"):
        daemon.start()
    daemon.stop()
