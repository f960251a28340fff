"""Spectral frontends written in plain torch operations, so they export into the ONNX graph.

torchaudio does not load beside torch 2.13, and librosa is not a torch graph, so the mel
filterbank is built here in numpy (HTK mel scale, the convention both built-in backbones use)
and applied as a constant matrix inside the graph.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def hz_to_mel_htk(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz_htk(mel: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float, unit_sum: bool
) -> np.ndarray:
    """Triangular HTK-mel filters, shape [n_fft // 2 + 1, n_mels].

    The triangles are defined on continuous frequency and sampled at the FFT bin centres (the
    librosa construction), so the weights match what aisfx was trained with. ``unit_sum``
    divides each filter by its sum (librosa ``norm=1``), which keeps band energies comparable
    across the very different band widths of 96 bands up to 22 kHz.
    """
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges = mel_to_hz_htk(np.linspace(hz_to_mel_htk(f_min), hz_to_mel_htk(f_max), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    if unit_sum:
        sums = weights.sum(axis=1, keepdims=True)
        weights = np.divide(weights, sums, out=np.zeros_like(weights), where=sums > 0)
    return weights.T.astype(np.float32)


class PowerMel(nn.Module):
    """Waveform [B, T] -> mel power spectrogram [B, frames, n_mels].

    Centred framing with zero padding of ``n_fft // 2`` on both sides and a periodic Hann
    window: the framing librosa uses by default (``center=True``, ``pad_mode='constant'``).
    """

    def __init__(
        self,
        sample_rate: int,
        n_fft: int,
        hop_length: int,
        n_mels: int,
        f_min: float,
        f_max: float,
        unit_sum: bool,
    ) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)
        fb = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max, unit_sum)
        self.register_buffer("filters", torch.from_numpy(fb), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        pad = self.n_fft // 2
        padded = nn.functional.pad(waveform, (pad, pad))
        frames = padded.unfold(-1, self.n_fft, self.hop_length)  # [B, frames, n_fft]
        spectrum = torch.fft.rfft(frames * self.window, dim=-1)
        power = spectrum.real.square() + spectrum.imag.square()
        return power @ self.filters
