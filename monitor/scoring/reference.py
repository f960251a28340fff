"""The live rank reference of one backbone on one machine.

A new window's KNN distance means nothing alone; its rank among distances of known-normal
audio does. The reference has two parts:

* anchored: the bank's leave-one-out distances (what enrolled normal audio scores against the
  rest of the bank). Never evicted, so a slow drift can never redefine "normal".
* rolling: distances of recent clearly normal windows (bounded). It lets the reference follow
  the room (a neighbouring machine switched on) without learning faults: windows that alarm,
  windows in the grey zone below the alarm threshold, and every window while an alert is open
  never enter it (the daemon decides; see ``Daemon._score``).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from monitor.scoring.ranking import FusionError


class RollingReference:
    def __init__(self, anchored: np.ndarray, rolling_size: int) -> None:
        anchored = np.sort(np.asarray(anchored, dtype=np.float64))
        anchored = anchored[np.isfinite(anchored)]
        if anchored.size == 0:
            raise FusionError("rank reference: the bank gave no finite leave-one-out score")
        self._anchored = anchored
        self._rolling: deque[float] = deque(maxlen=rolling_size)

    def __len__(self) -> int:
        return self._anchored.size + len(self._rolling)

    @property
    def rolling_count(self) -> int:
        return len(self._rolling)

    def rank(self, score: float) -> float:
        """Share of the reference below ``score``, ties counted half (as ``fusion.rank_ratio``)."""
        below = np.searchsorted(self._anchored, score, "left") + np.searchsorted(self._anchored, score, "right")
        if self._rolling:
            rolling = np.fromiter(self._rolling, dtype=np.float64, count=len(self._rolling))
            below += int(np.count_nonzero(rolling < score)) * 2 + int(np.count_nonzero(rolling == score))
        return float(below) / (2.0 * len(self))

    def add(self, score: float) -> None:
        """Remember a normal window's distance (the caller decides what is normal)."""
        if np.isfinite(score):
            self._rolling.append(float(score))
