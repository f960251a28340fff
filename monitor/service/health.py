"""A machine's slowly moving health: what an operator looks at to see a machine wear over days,
where the per-window rank is too noisy and an alert comes too late.

Three figures, from scored windows only (idle and faulty windows say nothing about wear):

* ``anomalous_ratio_1h`` and ``anomalous_ratio_24h``: the share of windows whose fused rank
  exceeded ``alerts.threshold`` among those that ended within the last hour / day. Time-based,
  from window end times, counted in one-minute buckets: memory is at most 1 440 buckets per
  machine whatever the hop (a window in a minute already counted only raises that minute's
  counts), and a bucket leaves the day 24 h after its minute.
* ``rank_ewma``: an exponentially weighted mean of the fused rank with a time constant of one
  hour: a window ``dt`` seconds after the previous one weighs ``1 - exp(-dt / 3600)``, so gaps
  (a stopped machine) weigh as the time they span and the hop does not change the figure.

Pure: no I/O, no clock; times come with each window (epoch seconds, in order per machine).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

BUCKET_SECONDS = 60.0
HOUR_SECONDS = 3600.0
DAY_SECONDS = 86400.0
EWMA_TIME_CONSTANT_SECONDS = 3600.0
MAX_BUCKETS = int(DAY_SECONDS // BUCKET_SECONDS)  # 1 440
# The retained state message is re-published for a health figure at most this often: the state
# topic is what Home Assistant and every plant system keep, and a message per window there would
# be a per-window stream (and fill the outbox during a broker outage with superseded states).
# Five minutes is under the hour the figures move over, so nothing an operator needs is late.
HEALTH_REPUBLISH_SECONDS = 300.0
# ... and only when a figure moved at least this much (all three are in [0, 1]).
HEALTH_REPUBLISH_DELTA = 0.01


@dataclass(frozen=True)
class HealthFigures:
    anomalous_ratio_1h: float | None  # None: no scored window in the period
    anomalous_ratio_24h: float | None
    rank_ewma: float | None

    def as_dict(self) -> dict[str, float | None]:
        """For the state message (rounded to 4 decimals: the figures move slowly)."""
        return {k: None if v is None else round(v, 4) for k, v in vars(self).items()}


class HealthTrend:
    """One machine's health figures (see the module docstring)."""

    def __init__(self) -> None:
        self._buckets: deque[list[int]] = deque(maxlen=MAX_BUCKETS)  # [minute, anomalous, windows]
        self._ewma: float | None = None
        self._last_end: float | None = None
        # Computed on the worker thread after each window; other threads (a state change from a
        # command) read this one immutable object, never the buckets being changed.
        self._figures = HealthFigures(None, None, None)
        self._published: HealthFigures | None = None
        self._published_at: float | None = None

    def update(self, end: float, rank: float, anomalous: bool) -> HealthFigures:
        """Count one scored window ending at ``end``; the figures after it."""
        minute = int(end // BUCKET_SECONDS)
        if self._buckets and minute <= self._buckets[-1][0]:
            bucket = self._buckets[-1]  # same minute (or a clock step back: counted in the newest)
        else:
            bucket = [minute, 0, 0]
            self._buckets.append(bucket)
        day = int((end - DAY_SECONDS) // BUCKET_SECONDS) + 1
        while self._buckets and self._buckets[0][0] < day:  # expired: older than a day
            self._buckets.popleft()
        bucket[1] += int(anomalous)
        bucket[2] += 1
        if self._ewma is None or self._last_end is None:
            self._ewma = rank
        else:
            weight = -math.expm1(-max(0.0, end - self._last_end) / EWMA_TIME_CONSTANT_SECONDS)
            self._ewma += weight * (rank - self._ewma)
        self._last_end = max(end, self._last_end or end)
        self._figures = HealthFigures(self._ratio(self._last_end, HOUR_SECONDS),
                                      self._ratio(self._last_end, DAY_SECONDS), self._ewma)
        return self._figures

    def _ratio(self, now: float, period: float) -> float | None:
        first = int((now - period) // BUCKET_SECONDS) + 1  # whole minutes within the period
        anomalous = windows = 0
        for minute, hits, count in reversed(self._buckets):
            if minute < first:
                break
            anomalous, windows = anomalous + hits, windows + count
        return anomalous / windows if windows else None

    def figures(self) -> HealthFigures:
        """The figures after the last window (all None before the first)."""
        return self._figures

    @property
    def buckets(self) -> int:
        return len(self._buckets)

    def published(self) -> None:
        """The current figures went out in a state message. Time is the last window's end (audio
        time, as ``republish_due``'s ``now``: a replay faster than real time stays consistent)."""
        self._published, self._published_at = self.figures(), self._last_end

    def republish_due(self, now: float) -> bool:
        """Whether a figure moved at least HEALTH_REPUBLISH_DELTA since last published, and the
        last publication is HEALTH_REPUBLISH_SECONDS old (a first value is due at once)."""
        current = self.figures()
        if self._published is None or self._published_at is None:
            return current.rank_ewma is not None
        if now - self._published_at < HEALTH_REPUBLISH_SECONDS:
            return False
        for new, old in zip(vars(current).values(), vars(self._published).values()):
            if (new is None) != (old is None) or (new is not None and abs(new - old) >= HEALTH_REPUBLISH_DELTA):
                return True
        return False
