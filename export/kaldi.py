"""Kaldi's ``compute-fbank-feats`` written in plain torch operations, so it exports into ONNX.

BEATs and EAT were trained on ``torchaudio.compliance.kaldi.fbank``, which cannot be loaded
beside torch 2.13 and is not exportable (it loops over Python scalars and builds its mel
matrix at call time). This module follows the Kaldi definition step by step:

1. framing: ``frame_length`` ms windows every ``frame_shift`` ms; with ``snip_edges`` only
   whole frames (``1 + (T - L) // S`` of them), otherwise ``(T + S/2) // S`` frames over a
   signal extended by reflection at both ends;
2. DC removal (each frame minus its mean);
3. pre-emphasis ``x[n] - k * x[n-1]`` inside the frame, the first sample using itself as
   its predecessor;
4. window (povey = hann^0.85, hanning, hamming, blackman, rectangular; all symmetric);
5. zero padding to the next power of two, power spectrum ``|rfft|^2``;
6. triangular filters on the Kaldi mel scale ``1127 ln(1 + f/700)``, sampled at the FFT bin
   frequencies, from ``low_freq`` to ``high_freq`` (<= 0 means offset from Nyquist);
7. ``log(max(energy, float32 eps))``.

Dither is not supported (both backbones use 0 at inference) and neither are the energy
column, VTLN and mean subtraction, which neither backbone uses. The filter matrix is built in
numpy once and stored as a constant of the graph.

Kaldi (and kaldi-native-fbank) refuse filterbanks whose lowest filters cover no FFT bin
(128 bins at 16 kHz with a 512-point FFT); torchaudio computes them anyway, giving such a
filter an all-zero row whose log is the floor. BEATs and EAT use 128 bins and were trained on
torchaudio's output, so this module follows torchaudio there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

WINDOWS = ("povey", "hanning", "hamming", "blackman", "rectangular")
# torchaudio's and Kaldi's log floor: the float32 machine epsilon.
LOG_FLOOR = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class FbankOptions:
    """The subset of Kaldi's fbank options this module implements (Kaldi's defaults)."""

    sample_rate: int = 16000
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    num_mel_bins: int = 23
    window_type: str = "povey"
    preemphasis: float = 0.97
    remove_dc_offset: bool = True
    low_freq: float = 20.0
    high_freq: float = 0.0
    snip_edges: bool = True
    round_to_power_of_two: bool = True
    blackman_coeff: float = 0.42

    @property
    def window_size(self) -> int:
        return int(self.sample_rate * self.frame_length_ms * 0.001)

    @property
    def window_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms * 0.001)

    @property
    def padded_window_size(self) -> int:
        n = self.window_size
        return 1 << (n - 1).bit_length() if self.round_to_power_of_two else n

    def num_frames(self, num_samples: int) -> int:
        size, shift = self.window_size, self.window_shift
        if self.snip_edges:
            return 0 if num_samples < size else 1 + (num_samples - size) // shift
        return (num_samples + shift // 2) // shift

    def describe(self) -> str:
        return (
            f"Kaldi fbank {self.num_mel_bins} bins {self.low_freq:g}-"
            f"{self.high_freq if self.high_freq > 0 else self.sample_rate / 2 + self.high_freq:g} Hz, "
            f"{self.frame_length_ms:g}/{self.frame_shift_ms:g} ms {self.window_type} window, "
            f"preemphasis {self.preemphasis:g}, {'' if self.remove_dc_offset else 'no '}DC removal, "
            f"{'snip edges' if self.snip_edges else 'reflected edges'}, log power"
        )


def mel_scale(hz: np.ndarray | float) -> np.ndarray:
    """Kaldi's mel scale (natural log, 1127)."""
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def mel_banks(opts: FbankOptions) -> np.ndarray:
    """Triangular filters, shape [padded_window_size // 2 + 1, num_mel_bins] (float32).

    The Nyquist bin gets weight 0, as in Kaldi (its filters span bins 0 .. n_fft/2 - 1).
    """
    n_fft = opts.padded_window_size
    nyquist = 0.5 * opts.sample_rate
    high = opts.high_freq if opts.high_freq > 0 else nyquist + opts.high_freq
    if not 0.0 <= opts.low_freq < nyquist or not opts.low_freq < high <= nyquist:
        raise ValueError(f"bad mel range {opts.low_freq}-{high} Hz for {opts.sample_rate} Hz audio")
    mel_low, mel_high = mel_scale(opts.low_freq), mel_scale(high)
    delta = (mel_high - mel_low) / (opts.num_mel_bins + 1)
    edges = mel_low + delta * np.arange(opts.num_mel_bins + 2, dtype=np.float64)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bin_mel = mel_scale(np.arange(n_fft // 2, dtype=np.float64) * opts.sample_rate / n_fft)[None, :]
    rising = (bin_mel - left) / (centre - left)
    falling = (right - bin_mel) / (right - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))  # [bins, n_fft // 2]
    weights = np.concatenate([weights, np.zeros((opts.num_mel_bins, 1))], axis=1)
    return weights.T.astype(np.float32)


def window(opts: FbankOptions) -> np.ndarray:
    """The analysis window (symmetric, as Kaldi defines them), float32."""
    n = opts.window_size
    if opts.window_type not in WINDOWS:
        raise ValueError(f"window_type must be one of {WINDOWS}, got {opts.window_type!r}")
    if opts.window_type == "rectangular":
        return np.ones(n, dtype=np.float32)
    a = 2.0 * math.pi / (n - 1)
    i = np.arange(n, dtype=np.float64)
    if opts.window_type == "hanning":
        w = 0.5 - 0.5 * np.cos(a * i)
    elif opts.window_type == "povey":
        w = (0.5 - 0.5 * np.cos(a * i)) ** 0.85
    elif opts.window_type == "hamming":
        w = 0.54 - 0.46 * np.cos(a * i)
    else:  # blackman
        c = opts.blackman_coeff
        w = c - 0.5 * np.cos(a * i) + (0.5 - c) * np.cos(2 * a * i)
    return w.astype(np.float32)


class KaldiFbank(nn.Module):
    """Waveform [B, T] -> log mel filterbank [B, frames, num_mel_bins].

    The waveform is used at the scale it is given (BEATs multiplies by 2**15 first, EAT does
    not): Kaldi's log floor makes the features depend on the absolute level.
    """

    def __init__(self, opts: FbankOptions) -> None:
        super().__init__()
        self.opts = opts
        self.register_buffer("window", torch.from_numpy(window(opts)), persistent=False)
        self.register_buffer("filters", torch.from_numpy(mel_banks(opts)), persistent=False)

    def frames(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, frames, window_size], following Kaldi's edge rules."""
        size, shift = self.opts.window_size, self.opts.window_shift
        if self.opts.snip_edges:
            return waveform.unfold(-1, size, shift)
        num_samples = waveform.shape[-1]
        count = (num_samples + shift // 2) // shift
        pad = size // 2 - shift // 2
        # Kaldi reflects around the edges without repeating the edge sample's neighbour order:
        # sample -1 is x[0], -2 is x[1] ... and T is x[T-1], T+1 is x[T-2] ...
        flipped = waveform.flip(-1)
        if pad > 0:
            extended = torch.cat([flipped[:, num_samples - pad:], waveform, flipped], dim=-1)
        else:
            extended = torch.cat([waveform[:, -pad:], flipped], dim=-1)
        return extended.unfold(-1, size, shift)[:, :count]

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = self.frames(waveform)
        if self.opts.remove_dc_offset:
            x = x - x.mean(dim=-1, keepdim=True)
        k = self.opts.preemphasis
        if k != 0.0:
            previous = torch.cat([x[..., :1], x[..., :-1]], dim=-1)
            x = x - k * previous
        x = x * self.window
        pad = self.opts.padded_window_size - self.opts.window_size
        if pad:
            x = nn.functional.pad(x, (0, pad))
        spectrum = torch.fft.rfft(x, dim=-1)
        power = spectrum.real.square() + spectrum.imag.square()
        energies = power @ self.filters
        return torch.log(torch.clamp(energies, min=LOG_FLOOR))
