"""The Kaldi fbank in torch operations against an independent Kaldi implementation
(kaldi-native-fbank, a C++ port of Kaldi's feature code)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from export.kaldi import LOG_FLOOR, FbankOptions, KaldiFbank, mel_banks, window
from tests.synth import machine_sound

HAVE_KNF = importlib.util.find_spec("kaldi_native_fbank") is not None
TOLERANCE = 1e-3  # absolute, on log energies


def _ours(opts: FbankOptions, waveform: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return KaldiFbank(opts)(torch.from_numpy(waveform)[None])[0].numpy()


def _knf(opts: FbankOptions, waveform: np.ndarray) -> np.ndarray:
    import kaldi_native_fbank as knf

    o = knf.FbankOptions()
    o.frame_opts.samp_freq = opts.sample_rate
    o.frame_opts.frame_length_ms = opts.frame_length_ms
    o.frame_opts.frame_shift_ms = opts.frame_shift_ms
    o.frame_opts.dither = 0.0  # kaldi-native-fbank's default is not 0
    o.frame_opts.window_type = opts.window_type
    o.frame_opts.preemph_coeff = opts.preemphasis
    o.frame_opts.remove_dc_offset = opts.remove_dc_offset
    o.frame_opts.snip_edges = opts.snip_edges
    o.mel_opts.num_bins = opts.num_mel_bins
    o.mel_opts.low_freq = opts.low_freq
    o.mel_opts.high_freq = opts.high_freq
    o.use_energy = False
    fbank = knf.OnlineFbank(o)
    fbank.accept_waveform(opts.sample_rate, waveform.tolist())
    fbank.input_finished()
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


CASES = [
    # window, bins, input scale (BEATs feeds int16-scaled audio, EAT [-1, 1]), snip_edges
    ("povey", 100, 2.0**15, True),
    ("hanning", 100, 1.0, True),
    ("hamming", 80, 1.0, False),
    ("blackman", 64, 2.0**15, False),
    ("rectangular", 40, 1.0, True),
]


@pytest.mark.skipif(not HAVE_KNF, reason="kaldi-native-fbank (test extra) not installed")
@pytest.mark.parametrize(("window_type", "bins", "scale", "snip"), CASES)
def test_fbank_matches_kaldi_native_fbank(window_type: str, bins: int, scale: float, snip: bool) -> None:
    opts = FbankOptions(num_mel_bins=bins, window_type=window_type, snip_edges=snip)
    x = machine_sound(11, 3.0) * np.float32(scale)
    ours, ref = _ours(opts, x), _knf(opts, x)
    assert ours.shape == ref.shape == (opts.num_frames(x.size), bins)
    assert np.max(np.abs(ours - ref)) < TOLERANCE  # measured 1e-5 .. 1.2e-4


@pytest.mark.skipif(not HAVE_KNF, reason="kaldi-native-fbank (test extra) not installed")
def test_fbank_options_and_mel_range_match_kaldi() -> None:
    opts = FbankOptions(num_mel_bins=60, window_type="hanning", preemphasis=0.0, remove_dc_offset=False,
                        low_freq=100.0, high_freq=-400.0, frame_length_ms=32.0, frame_shift_ms=16.0)
    x = machine_sound(12, 2.0) + np.float32(0.2)  # a DC offset: kept here, since removal is off
    assert np.max(np.abs(_ours(opts, x) - _knf(opts, x))) < TOLERANCE


def test_128_bins_keep_torchaudios_empty_filter() -> None:
    """At 128 bins, 16 kHz and a 512-point FFT one low filter covers no FFT bin. Kaldi refuses
    that configuration; torchaudio (what BEATs and EAT were trained on) computes it and the
    empty filter's log energy is the floor."""
    opts = FbankOptions(num_mel_bins=128, window_type="hanning")
    filters = mel_banks(opts)
    assert filters.shape == (257, 128)
    empty = np.flatnonzero(filters.sum(axis=0) == 0)
    assert empty.tolist() == [3]
    assert np.all(filters[-1] == 0)  # the Nyquist bin is in no filter
    out = _ours(opts, machine_sound(13, 1.0))
    np.testing.assert_allclose(out[:, 3], np.log(LOG_FLOOR), rtol=1e-6)
    assert np.all(out[:, [0, 1, 2, 4]] > np.log(LOG_FLOOR) + 1.0)


def test_windows_by_definition() -> None:
    n = FbankOptions().window_size
    i = np.arange(n)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * i / (n - 1))
    np.testing.assert_allclose(window(FbankOptions(window_type="hanning")), hann, atol=1e-7)
    np.testing.assert_allclose(window(FbankOptions(window_type="povey")), hann**0.85, atol=1e-7)
    with pytest.raises(ValueError, match="window_type"):
        window(FbankOptions(window_type="kaiser"))


@pytest.mark.parametrize("snip", [True, False])
def test_frame_count(snip: bool) -> None:
    opts = FbankOptions(snip_edges=snip)
    for samples in (400, 559, 560, 16000, 160000):
        out = _ours(opts, np.zeros(samples, dtype=np.float32) + np.float32(0.01))
        assert out.shape[0] == opts.num_frames(samples)
    assert FbankOptions().num_frames(160000) == 998  # BEATs' and EAT's 10 s window
