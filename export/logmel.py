"""A DSP backbone with no learned weights: statistics of log-mel band energies.

It is the floor every learned backbone must beat, costs next to nothing, and captures what a
technician listens for first (a band getting louder, a tone appearing or wobbling): the mean
and standard deviation over time of each band's log energy.
"""

from __future__ import annotations

import torch
from torch import nn

from export.frontend import PowerMel

SAMPLE_RATE = 16000
N_FFT = 1024
HOP = 512
N_MELS = 128
F_MIN = 0.0
F_MAX = 8000.0
FLOOR = 1e-10
EMBEDDING_DIM = 2 * N_MELS
# Statistics over time need some frames to mean anything; 1 s gives 32.
MIN_SECONDS = 1.0
LICENCE = "logmel: no learned weights; part of this project"


class LogMelStats(nn.Module):
    """Waveform [B, T] at 16 kHz -> [B, 256]: per-band mean then per-band std of log10 mel power."""

    def __init__(self) -> None:
        super().__init__()
        self.mel = PowerMel(SAMPLE_RATE, N_FFT, HOP, N_MELS, F_MIN, F_MAX, unit_sum=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        logmel = torch.log10(self.mel(waveform) + FLOOR)
        mean = logmel.mean(dim=1)
        std = (logmel - mean.unsqueeze(1)).square().mean(dim=1).sqrt()
        return torch.cat([mean, std], dim=1)
