"""One machine's live scoring: its bank's fitted detector and its rolling rank references.

The daemon scores one window at a time through the detector's one ``score`` (the path ``score``
and ``evaluate`` use), ranking against references that also learn recent clearly normal
windows. Which windows are clearly normal is the daemon's decision (``learn``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from monitor.bank.model import Bank, check_audio_rate, enrolled_level
from monitor.scoring.detector import Detector


@dataclass(frozen=True)
class WindowScore:
    """One window's scores: raw KNN distance and rank per backbone, fused rank, the nearest
    enrolled condition, and whether the machine sounded stopped."""

    raw: dict[str, float]
    ranks: dict[str, float]
    fused: float
    condition: str
    idle: bool


class LiveScorer:
    """Scores a machine's windows against one bank version. Replaced whole on a bank switch, so
    a window is never scored half with the old bank and half with the new."""

    def __init__(self, detector: Detector, bank: Bank, rolling_size: int) -> None:
        self.detector = detector
        self.bank_version = bank.version
        self.level_dbfs = enrolled_level(bank)  # the sensor's level-drop reference
        self.references = detector.rolling_references(rolling_size)

    @classmethod
    def fit(cls, models: Detector, bank: Bank, rolling_size: int, source_rate: int, what: str) -> LiveScorer:
        """Fit a detector on ``models``' loaded backbones for ``bank``; refuses what ``check``
        refuses (the rate here, the rest in ``Detector.fit``, which checks before fitting)."""
        check_audio_rate(bank.recorded_rates, source_rate, models.model_rate, what)
        detector = models.unfitted()
        detector.fit(bank)
        return cls(detector, bank, rolling_size)

    @staticmethod
    def check(models: Detector, bank: Bank, source_rate: int, what: str) -> None:
        """What ``fit`` refuses, without the cost of fitting: a bank of other models or too
        few windows (``Detector.check``), or enrolled from audio of another bandwidth than the
        source's (``what`` names them in the error)."""
        check_audio_rate(bank.recorded_rates, source_rate, models.model_rate, what)
        models.check(bank)

    def score(self, embeddings: dict[str, np.ndarray]) -> WindowScore:
        """Score one window's embeddings (one row per backbone)."""
        scores = self.detector.score(embeddings, self.references)
        return WindowScore({n: float(v[0]) for n, v in scores.raw.items()},
                           {n: float(v[0]) for n, v in scores.ranks.items()},
                           float(scores.fused[0]), scores.conditions[0], bool(scores.idle[0]))

    def learn(self, score: WindowScore) -> None:
        """Let a clearly normal window's distances into the rolling references."""
        for name, value in score.raw.items():
            self.references[name].add(value)
