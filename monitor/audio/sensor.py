"""Sensor checks on every window, before it is scored.

A broken microphone does not sound like a healthy machine: it sounds like silence, a level drop,
clipping, or gaps. The anomaly detector would score such a window as anomalous (a false machine
alarm) or, worse, a dead channel's constant noise floor could end up enrolled as "normal". So each
window is checked first, and a window with a fault is reported as a sensor fault, not scored as the
machine. The checks are cheap, vectorised numpy on one channel, and pure (no state), so the daemon
decides what to do with a report.

Levels are in dBFS of the RMS, where a full-scale sine is -3 dBFS and digital silence is floored at
``MIN_DBFS`` so every figure stays a finite number for JSON and Prometheus.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from monitor.config import SensorConfig

log = logging.getLogger(__name__)

MIN_DBFS = -200.0  # far below any converter's noise floor (1 LSB of 24-bit audio is about -144 dBFS)

# What check_window reports, plus "device": the source itself reports its input down.
FAULTS = ("nonfinite", "silence", "low_level", "clipping", "dropout", "device")


@dataclass(frozen=True)
class SensorReport:
    """What the checks found in one window. Level and peak are over its finite samples; the
    clipped fraction is a share of the whole window."""

    faults: tuple[str, ...]
    rms_dbfs: float
    peak: float
    clipped_fraction: float
    longest_zero_run_ms: float

    @property
    def ok(self) -> bool:
        return not self.faults


def level_dbfs(samples: np.ndarray) -> float:
    """RMS level in dBFS, floored at ``MIN_DBFS``; computed in float64 so that neither loud
    values (squares overflowing float32) nor tiny ones (denormals) distort it. Non-finite
    samples are ignored."""
    x = np.asarray(samples, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return MIN_DBFS
    power = float(np.mean(np.square(x)))
    if power <= 0.0:
        return MIN_DBFS
    return max(MIN_DBFS, 10.0 * float(np.log10(power)))


def longest_zero_run(samples: np.ndarray) -> int:
    """Length of the longest run of exact zeros (NaN is not zero), without a Python loop:
    run starts and ends are the +1/-1 edges of the zero mask."""
    mask = np.concatenate(([False], np.asarray(samples) == 0, [False])).astype(np.int8)
    edges = np.diff(mask)
    starts = np.flatnonzero(edges == 1)
    if starts.size == 0:
        return 0
    ends = np.flatnonzero(edges == -1)
    return int(np.max(ends - starts))


def check_window(
    samples: np.ndarray, sample_rate: int, config: SensorConfig, enrolled_level_dbfs: float | None
) -> SensorReport:
    """Check one window of one channel ([n] float32) against ``config``.

    ``nonfinite`` is reported on its own; the level faults are judged on the finite samples
    (a window of only NaN has no level to judge). ``dropout`` is suppressed when the whole
    window is ``silence``: a dead input is one fault, not two. ``silence`` and ``low_level``
    are independent tests, so a dead input below the enrolled level reports both.
    """
    if samples.ndim != 1 or samples.size == 0:
        raise ValueError(f"expected a non-empty 1-D window, got shape {samples.shape}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
    finite = np.isfinite(samples)
    all_finite = bool(finite.all())
    x = samples if all_finite else samples[finite]
    faults: list[str] = [] if all_finite else ["nonfinite"]
    rms = level_dbfs(x)
    magnitude = np.abs(x)
    peak = float(magnitude.max()) if x.size else 0.0
    clipped = float(np.count_nonzero(magnitude >= config.clip_level)) / samples.size
    zero_run_ms = 1000.0 * longest_zero_run(samples) / sample_rate
    if x.size:
        silent = rms < config.silence_dbfs
        if silent:
            faults.append("silence")
        if enrolled_level_dbfs is not None and rms < enrolled_level_dbfs - config.level_drop_db:
            faults.append("low_level")
        if clipped > config.clip_fraction:
            faults.append("clipping")
        if not silent and zero_run_ms > config.dropout_ms:
            faults.append("dropout")
    return SensorReport(tuple(faults), rms, peak, clipped, zero_run_ms)
