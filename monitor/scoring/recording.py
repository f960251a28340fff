"""Scoring a whole recording against a fitted detector: every window, and its verdict.

A recording's verdict is its worst window among those where the machine runs (windows that
sound like the enrolled site noise are idle: no verdict). ``asd-monitor score``, ``evaluate``
and the library API use this; the daemon scores the same way one window at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitor.audio.files import Audio, AudioFile, Recording
from monitor.bank.model import check_audio_rate
from monitor.scoring.detector import Detector, Scores


@dataclass(frozen=True)
class RecordingScore:
    source: str
    starts: list[float]  # seconds from the start of the recording, per window
    scores: Scores
    threshold: float  # fused rank above which a window is anomalous

    @property
    def worst(self) -> int | None:
        """Index of the running window with the highest fused rank; None when all are idle."""
        running = np.flatnonzero(~self.scores.idle)
        return int(running[self.scores.fused[running].argmax()]) if running.size else None

    @property
    def fused_rank(self) -> float | None:
        worst = self.worst
        return None if worst is None else float(self.scores.fused[worst])

    @property
    def anomalous(self) -> bool | None:
        """The verdict: None when the machine never ran (every window idle)."""
        rank = self.fused_rank
        return None if rank is None else rank > self.threshold


def score_recording(detector: Detector, recording: Path | str | Recording,
                    progress: Callable[[float], None] | None = None) -> RecordingScore:
    """Embed and score every window of a file (read a block at a time) or of audio in memory
    against the fitted bank; ``progress`` hears the seconds of audio read.

    Audio of another bandwidth than the bank's is refused (``BankError``), as in the daemon, and
    so is a clip shorter than the backbones accept (``ClipTooShort``).
    """
    if not isinstance(recording, (Audio, AudioFile)):
        recording = AudioFile.open(recording)
    if detector.bank is not None:
        check_audio_rate(detector.bank.recorded_rates, recording.sample_rate, detector.model_rate, recording.source)
    embedded = detector.embed(recording, progress=progress)
    return RecordingScore(recording.source, embedded.starts, detector.score(embedded.embeddings),
                          detector.config.alerts.threshold)
