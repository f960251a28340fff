"""Spectral frontends written in plain torch operations, so they export into the ONNX graph.

torchaudio does not load beside torch 2.13, and librosa is not a torch graph, so the mel
filterbanks are built here in numpy and applied as a constant matrix inside the graph: on the
HTK mel scale (aisfx, logmel, Dasheng, MuQ) or on the Slaney scale (M2D, through nnAudio).
Each backbone keeps its own settings (rate, n_fft, hop, band edges) in its module.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def hz_to_mel_htk(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz_htk(mel: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


# The Slaney scale (Auditory Toolbox; librosa's default): linear below 1 kHz, logarithmic above.
_SLANEY_HZ_PER_MEL = 200.0 / 3
_SLANEY_LOG_HZ = 1000.0
_SLANEY_LOG_MEL = _SLANEY_LOG_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = np.log(6.4) / 27.0


def hz_to_mel_slaney(hz: np.ndarray | float) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    return np.where(
        hz >= _SLANEY_LOG_HZ,
        _SLANEY_LOG_MEL + np.log(np.maximum(hz, _SLANEY_LOG_HZ) / _SLANEY_LOG_HZ) / _SLANEY_LOG_STEP,
        hz / _SLANEY_HZ_PER_MEL,
    )


def mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    return np.where(
        mel >= _SLANEY_LOG_MEL,
        _SLANEY_LOG_HZ * np.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_LOG_MEL)),
        _SLANEY_HZ_PER_MEL * mel,
    )


def _triangles(sample_rate: int, n_fft: int, edges: np.ndarray) -> np.ndarray:
    """Unnormalised triangular filters [len(edges) - 2, n_fft // 2 + 1] on band edges in Hz.

    Filter i rises from ``edges[i]`` to 1 at ``edges[i + 1]`` and falls to 0 at ``edges[i + 2]``;
    the triangles are defined on continuous frequency and sampled at the FFT bin centres (the
    librosa construction, whatever the mel scale that placed the edges).
    """
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    return np.maximum(0.0, np.minimum(lower, upper))


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float, unit_sum: bool
) -> np.ndarray:
    """Triangular HTK-mel filters, shape [n_fft // 2 + 1, n_mels].

    Sampled as librosa does, so the weights match what aisfx was trained with. ``unit_sum``
    divides each filter by its sum (librosa ``norm=1``), which keeps band energies comparable
    across the very different band widths of 96 bands up to 22 kHz.
    """
    edges = mel_to_hz_htk(np.linspace(hz_to_mel_htk(f_min), hz_to_mel_htk(f_max), n_mels + 2))
    weights = _triangles(sample_rate, n_fft, edges)
    if unit_sum:
        sums = weights.sum(axis=1, keepdims=True)
        weights = np.divide(weights, sums, out=np.zeros_like(weights), where=sums > 0)
    return weights.T.astype(np.float32)


def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Triangular filters on the Slaney mel scale with area normalisation (each filter times 2 /
    its bandwidth in Hz): librosa's default, which nnAudio's mel spectrogram uses.
    Shape [n_fft // 2 + 1, n_mels]."""
    edges = mel_to_hz_slaney(np.linspace(hz_to_mel_slaney(f_min), hz_to_mel_slaney(f_max), n_mels + 2))
    weights = _triangles(sample_rate, n_fft, edges) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
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

    def centre(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T + n_fft], zeros on both sides."""
        pad = self.n_fft // 2
        return nn.functional.pad(waveform, (pad, pad))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        frames = self.centre(waveform).unfold(-1, self.n_fft, self.hop_length)  # [B, frames, n_fft]
        spectrum = torch.fft.rfft(frames * self.window, dim=-1)
        power = spectrum.real.square() + spectrum.imag.square()
        return power @ self.filters


class ReflectPowerMel(PowerMel):
    """``PowerMel`` with the centring torchaudio and nnAudio use by default (Dasheng, MuQ, M2D):
    reflect padding of ``n_fft // 2`` on both sides instead of zeros. Needs more than
    ``n_fft // 2`` samples."""

    def centre(self, waveform: torch.Tensor) -> torch.Tensor:
        pad = self.n_fft // 2
        return nn.functional.pad(waveform.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
