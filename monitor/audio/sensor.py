"""Sensor checks on every window, before it is scored.

A broken microphone does not sound like a healthy machine: it sounds like silence, a level drop,
clipping, a DC offset, or gaps. The anomaly detector would score such a window as anomalous (a
false machine alarm) or, worse, a dead channel's constant noise floor could end up enrolled as
"normal". So each window is checked first, and a window with a fault is reported as a sensor fault,
not scored as the machine. The checks are cheap, vectorised numpy on one channel, and pure (no
state), so the daemon decides what to do with a report.

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
FAULTS = ("nonfinite", "silence", "low_level", "clipping", "dc_offset", "dropout", "device")

# A saturating preamp or a clipping limiter flattens the tops at its own level, not only at full
# scale: samples then sit at the window's peak magnitude, several in a row. Sound rarely comes
# back to its exact peak (in the recordings checked, at most 2 samples per 10 s window reached
# it, never two adjacent), and a pure tone (a calibrator, a test signal) whose period divides
# the sample rate repeats its crest exactly, but one or two samples at a time (above 11 Hz at
# 16 kHz, 33 Hz at 48 kHz): a run of 3 samples at the peak is a flat top. Light clipping that
# leaves 1-2 sample tops, or analog saturation smoothed by the converter's filter, is not seen.
FLAT_TOP_TOLERANCE = 1e-5  # relative to the peak: under 1 LSB of 16-bit audio (a digital clip is exact)
FLAT_TOP_RUN = 3  # samples in a row

# Microphones are AC-coupled: in the recordings checked a window's mean stayed below 1 % of its
# AC level. A mean as large as the AC level is a biased or stuck input (an ADC or preamp fault),
# and its energy at 0 Hz would be scored as a change of the machine.
DC_TO_AC_MAX = 1.0
DC_MIN_SECONDS = 0.05  # a period of 20 Hz: over less, a low tone alone moves the mean


@dataclass(frozen=True)
class SensorReport:
    """What the checks found in one window. Level and peak are over its finite samples; the
    clipped fraction is a share of the whole window."""

    faults: tuple[str, ...]
    rms_dbfs: float
    peak: float
    clipped_fraction: float  # at or above clip_level, or on a flat top at the peak: the larger
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


def _run_lengths(mask: np.ndarray) -> np.ndarray:
    """Lengths of the runs of True in ``mask``, without a Python loop: run starts and ends are
    the +1/-1 edges of the padded mask."""
    edges = np.diff(np.concatenate(([False], mask, [False])).astype(np.int8))
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def longest_zero_run(samples: np.ndarray) -> int:
    """Length of the longest run of exact zeros (NaN is not zero)."""
    lengths = _run_lengths(np.asarray(samples) == 0)
    return int(lengths.max()) if lengths.size else 0


def flat_top_samples(magnitude: np.ndarray, peak: float) -> int:
    """Samples on a flat top: within ``FLAT_TOP_TOLERANCE`` of ``peak`` in runs of at least
    ``FLAT_TOP_RUN`` (see there for why a run, not a count)."""
    lengths = _run_lengths(magnitude >= peak * (1.0 - FLAT_TOP_TOLERANCE))
    return int(lengths[lengths >= FLAT_TOP_RUN].sum())


def check_window(
    samples: np.ndarray, sample_rate: int, config: SensorConfig, enrolled_level_dbfs: float | None
) -> SensorReport:
    """Check one window of one channel ([n] float32) against ``config``.

    ``nonfinite`` is reported on its own; the level faults are judged on the finite samples
    (a window of only NaN has no level to judge). ``dropout`` is suppressed when the whole
    window is ``silence``: a dead input is one fault, not two. ``silence`` and ``low_level``
    are independent tests, so a dead input below the enrolled level reports both.

    ``clipping`` is samples at ``clip_level`` or a flat top at the window's own peak, either
    over ``clip_fraction`` of the window. ``dc_offset`` is a mean at least as large as the rest
    of the signal; a constant window is that, not a flat top, unless it sits at ``clip_level``
    (clipping).
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
        x64 = x.astype(np.float64)
        mean = float(np.mean(x64))
        ac_rms = float(np.sqrt(np.mean(np.square(x64 - mean))))
        # A (nearly) constant window is flat everywhere: what is wrong is its offset, not a top.
        offset = abs(mean) >= DC_TO_AC_MAX * ac_rms
        if not silent and not offset:
            clipped = max(clipped, flat_top_samples(magnitude, peak) / samples.size)
        if clipped > config.clip_fraction:
            faults.append("clipping")
        elif offset and not silent and x.size >= DC_MIN_SECONDS * sample_rate:
            faults.append("dc_offset")
        if not silent and zero_run_ms > config.dropout_ms:
            faults.append("dropout")
    return SensorReport(tuple(faults), rms, peak, clipped, zero_run_ms)
