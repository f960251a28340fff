"""Synthetic machine sounds for tests: a motor hum with harmonics in broadband noise.

Normal clips vary a little in speed and level like a real machine; faulty clips add what
faults add (a rubbing tone at a non-harmonic frequency and periodic impacts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16000


def machine_sound(seed: int, seconds: float = 10.0, fault: bool = False, rate: int = RATE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120.0 * (1 + 0.01 * rng.standard_normal())
    x = sum((0.3 / k) * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) for k in range(1, 8))
    x = x + 0.05 * rng.standard_normal(t.size)
    if fault:
        x = x + 0.15 * np.sin(2 * np.pi * 1733.0 * t)
        impacts = (np.sin(2 * np.pi * 7.0 * t) > 0.995).astype(float)
        x = x + 0.3 * np.convolve(impacts * rng.standard_normal(t.size), np.exp(-np.arange(200) / 30.0), "same")
    x = x * (0.5 + 0.05 * rng.standard_normal())
    # Scaled, not clipped, below full scale: a flat top at any level is a clipping sensor fault,
    # and a faulty machine must sound like one, not like a faulty microphone (normal sound never
    # comes near 0.95 and is left as it is).
    return (x * min(1.0, 0.95 / np.max(np.abs(x)))).astype(np.float32)


def site_noise(seed: int, seconds: float = 10.0, rate: int = RATE) -> np.ndarray:
    """The site with the machine stopped: a distant compressor (a 50 Hz family of tones, slowly
    beating) in low-passed broadband noise, at a level like the machine's."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    hum = sum((0.2 / k) * np.sin(2 * np.pi * 50.0 * k * t + rng.uniform(0, 2 * np.pi)) for k in (1, 2, 3, 5))
    hum = hum * (1 + 0.3 * np.sin(2 * np.pi * 0.5 * t))
    rumble = np.convolve(rng.standard_normal(t.size), np.ones(16) / 16, "same")
    x = (hum + 0.4 * rumble) * (0.5 + 0.05 * rng.standard_normal())
    return np.clip(x, -0.95, 0.95).astype(np.float32)


def write_clip(path: Path, samples: np.ndarray, rate: int = RATE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, rate)
    return path


def dcase_dataset(root: Path, machine: str = "motor", n_train: int = 8, n_test: int = 4, seconds: float = 10.0) -> Path:
    """A data set in the DCASE development layout, with source and target domains."""
    seed = 0
    for i in range(n_train):
        domain = "target" if i == n_train - 1 else "source"
        write_clip(root / machine / "train" / f"section_00_{domain}_train_normal_{i:04d}.flac", machine_sound(seed, seconds))
        seed += 1
    for i in range(n_test):
        for domain in ("source", "target"):
            write_clip(root / machine / "test" / f"section_00_{domain}_test_normal_{i:04d}.flac", machine_sound(seed, seconds))
            write_clip(root / machine / "test" / f"section_00_{domain}_test_anomaly_{i:04d}.flac",
                       machine_sound(seed + 1000, seconds, fault=True))
            seed += 1
    return root
