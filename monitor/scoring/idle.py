"""Telling "the machine is not running" from "the machine runs", with noise-only recordings.

A microphone next to a machine keeps listening when the machine is stopped: it then hears the
site (other machines, fans, forklifts). Scored against a bank of the machine's normal sound,
such windows are far from everything enrolled and would be reported as anomalies: a false
alarm for every downtime. DCASE 2025 supplies noise-only recordings of the site for this
reason; here they are enrolled into the machine's bank under the reserved condition
``site-noise`` (``asd-monitor enroll --noise``, or live enrollment with that condition while
the machine is stopped).

A window is ``idle`` (the machine is not running: reported, never scored, no alert decision)
when its distance to the nearest enrolled site-noise windows is at most ``margin`` times its
distance to the nearest windows of the running machine. ``margin`` below 1 keeps the safe
side: a fault the machine never made before is far from both, at similar distances, and is
scored (and alarmed) as the running machine rather than called idle; only a window clearly
nearer to the site noise is. The distance is the cosine one on the lead backbone's embedding
whatever ``scoring.metric`` says: a two-class comparison needs no covariance, and estimating
one from a few minutes of noise beside the machine's bank would let the difference between
the two classes, the very direction that separates them, dominate it.

Measured on site noise taken from real machine recordings (``benchmarks/supplementary.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from monitor.scoring.knn import KnnScorer

NOISE_CONDITION = "site-noise"
DEFAULT_MARGIN = 0.5
METRIC = "cosine"


def noise_rows(conditions: Sequence[str]) -> np.ndarray:
    """Row numbers of the site-noise windows of a bank."""
    return np.flatnonzero(np.asarray(conditions, dtype=object) == NOISE_CONDITION)


class IdleDetector:
    """Compares a window's distance to the site noise with its distance to the running machine."""

    def __init__(self, running: np.ndarray, noise: np.ndarray, k: int = 1, margin: float = DEFAULT_MARGIN) -> None:
        if not 0.0 < margin <= 1.0:
            raise ValueError(f"idle margin must be in (0, 1], got {margin!r}")
        self._running = KnnScorer(running, metric=METRIC, k=k)
        self._noise = KnnScorer(noise, metric=METRIC, k=k)
        self.margin = margin

    def distance_ratio(self, queries: np.ndarray) -> np.ndarray:
        """Distance to the site noise over distance to the running machine, per query."""
        to_noise, to_running = self._noise.score(queries), self._running.score(queries)
        return to_noise / np.maximum(to_running, np.finfo(np.float64).tiny)

    def is_idle(self, queries: np.ndarray) -> np.ndarray:
        """Per query: True when it sounds like the site without the machine."""
        return self.distance_ratio(queries) <= self.margin
