"""Mixing clean machine recordings with noise-only recordings of the site at a chosen SNR.

A clean recording (the machine alone, e.g. measured in a quiet room or at the vendor) does not
sound like the machine at its site, where other machines are as loud as it is. Mixed with the
site's own noise-only recordings at the site's signal-to-noise ratios, it becomes the normal
sound the daemon will actually hear, and can enlarge a small bank (measured in
``benchmarks/supplementary.py``).
"""

from __future__ import annotations

import numpy as np

from monitor.audio.files import Audio, resample
from monitor.errors import AudioError


def _power(samples: np.ndarray) -> float:
    return float(np.mean(np.square(samples, dtype=np.float64)))


def mix_at_snr(clean: Audio, noise: Audio, snr_db: float, offset: int = 0) -> Audio:
    """``clean`` plus ``noise`` scaled so that their power ratio is ``snr_db``.

    The noise is resampled to the clean rate and looped from ``offset`` to the clean length;
    the mixture is scaled down only if it would clip, which keeps the SNR.
    """
    signal = clean.samples.astype(np.float64)
    background = resample(noise.samples, noise.sample_rate, clean.sample_rate).astype(np.float64)
    if _power(signal) == 0.0 or _power(background) == 0.0:
        raise AudioError(f"cannot mix {clean.source} with {noise.source}: one of them is silent")
    take = np.resize(np.roll(background, -offset), signal.size)
    mixture = signal + take * np.sqrt(_power(signal) / (_power(take) * 10.0 ** (snr_db / 10.0)))
    peak = float(np.max(np.abs(mixture)))
    if peak > 1.0:
        mixture /= peak
    return Audio(mixture.astype(np.float32), clean.sample_rate, f"{clean.source}+{noise.source}@{snr_db:.1f}dB")
