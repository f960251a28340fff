"""monitor.audio.mixing: clean machine audio mixed with the site's noise at a chosen SNR."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.audio.files import Audio
from monitor.audio.mixing import mix_at_snr
from monitor.errors import AudioError
from tests.synth import RATE, machine_sound, site_noise


def _snr_db(clean: np.ndarray, mixture: np.ndarray) -> float:
    noise = mixture.astype(np.float64) - clean
    return 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise ** 2))


@pytest.mark.parametrize("snr", [-6.0, 0.0, 10.0])
def test_the_mixture_has_the_asked_snr(snr: float) -> None:
    clean = Audio(0.3 * machine_sound(1), RATE, "clean")
    mixed = mix_at_snr(clean, Audio(site_noise(2, seconds=3.0), RATE, "noise"), snr)  # noise looped
    assert mixed.sample_rate == RATE and mixed.samples.size == clean.samples.size
    assert _snr_db(clean.samples, mixed.samples) == pytest.approx(snr, abs=0.01)


def test_other_rates_are_resampled_and_clipping_is_avoided_without_changing_the_snr() -> None:
    clean = Audio(0.9 * machine_sound(1) / np.abs(machine_sound(1)).max(), RATE, "clean")
    noise = Audio(site_noise(2, rate=44100), 44100, "noise")
    mixed = mix_at_snr(clean, noise, -6.0)
    assert np.abs(mixed.samples).max() <= 1.0
    scale = np.dot(mixed.samples, clean.samples) / np.dot(clean.samples, clean.samples)  # the common gain
    residual = mixed.samples / scale - clean.samples
    assert 10 * np.log10(np.mean(clean.samples.astype(np.float64) ** 2) / np.mean(residual ** 2.0)) == pytest.approx(-6.0, abs=0.3)


def test_silent_inputs_are_refused() -> None:
    with pytest.raises(AudioError, match="silent"):
        mix_at_snr(Audio(np.zeros(RATE, np.float32), RATE, "a"), Audio(site_noise(1), RATE, "n"), 0.0)


def test_enroll_clean_recordings_mixed_with_site_noise(tmp_path, capsys) -> None:
    """``asd-monitor enroll --mix-noise``: each clean recording as recorded and ``--mixes``
    mixtures, labelled with the noise file and SNR; the same files give the same bank."""
    from monitor.bank.store import BankStore
    from monitor.cli import main
    from tests.synth import write_clip

    clean = [write_clip(tmp_path / "clean" / f"{i}.flac", machine_sound(i)) for i in range(2)]
    noise = [write_clip(tmp_path / "noise" / f"{i}.flac", site_noise(i)) for i in range(2)]
    banks = []
    for name in ("a", "b"):
        bank_dir = tmp_path / name
        assert main(["enroll", "--bank", str(bank_dir), "--backbone", "logmel", "--mix-noise", str(tmp_path / "noise"),
                     "--mixes", "2", "--snr-db=-3:3", *map(str, clean)]) == 0
        banks.append(BankStore(bank_dir).load())
    bank = banks[0]
    assert len(bank) == 2 * (1 + 2)
    mixed = [item.source for item in bank.items if "+" in item.source]
    assert len(mixed) == 4 and all(any(f"+{n.name}@" in s for n in noise) for s in mixed)
    assert all(-3.0 <= float(s.rsplit("@", 1)[1][:-2]) <= 3.0 for s in mixed)
    (name,) = bank.backbones
    np.testing.assert_array_equal(bank.embeddings[name], banks[1].embeddings[name])
    capsys.readouterr()
    assert main(["enroll", "--bank", str(tmp_path / "c"), "--noise", "--mix-noise", str(noise[0]), str(clean[0])]) == 2
    assert "cannot go with --noise" in capsys.readouterr().err
