"""Turning per-window decisions into alerts a plant can act on.

One anomalous window is not a fault (a door slams, a forklift passes): an alert is raised when
``raise_count`` of the last ``raise_window`` scored windows were anomalous, and cleared after
``clear_count`` consecutive windows below ``clear_threshold`` (hysteresis, so a machine at the
threshold does not flap). After a clear, a cooldown holds back the next raise. Windows with a
sensor fault or an idle machine are not scored and do not move this state machine.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from monitor.config import AlertConfig
from monitor.outputs.messages import AlertType


@dataclass(frozen=True)
class Transition:
    type: AlertType
    event_id: str
    start: float  # epoch seconds: first anomalous window of the episode
    end: float  # epoch seconds: end of the window that caused the transition


def event_id(machine: str, start: float) -> str:
    """Stable id of an episode: the same audio replayed gives the same id (de-duplication)."""
    return f"{machine}-{int(round(start * 1000))}"


class AlertTracker:
    """One machine's alert state machine (see the module docstring)."""

    def __init__(self, machine: str, config: AlertConfig) -> None:
        self.machine = machine
        self._recent: deque[tuple[bool, float]] = deque()
        self.config = config
        self._calm = 0
        self._cleared_at: float | None = None
        self.open_event: str | None = None
        self.open_start: float | None = None

    @property
    def config(self) -> AlertConfig:
        return self._config

    @config.setter
    def config(self, config: AlertConfig) -> None:
        """New settings (a reload) apply from the next window; the history of recent windows
        is resized to ``raise_window``, keeping the newest."""
        self._config = config
        self._recent = deque(self._recent, maxlen=config.raise_window)

    @property
    def alerting(self) -> bool:
        return self.open_event is not None

    def is_anomalous(self, fused_rank: float) -> bool:
        return fused_rank > self.config.threshold

    def update(self, start: float, end: float, fused_rank: float) -> Transition | None:
        """Feed one scored window (times in epoch seconds); returns a raise or clear, if any."""
        cfg = self.config
        if self.alerting:
            self._calm = self._calm + 1 if fused_rank < cfg.clear_threshold else 0
            if self._calm < cfg.clear_count:
                return None
            transition = Transition("clear", self.open_event, self.open_start, end)
            self.open_event = self.open_start = None
            self._cleared_at = end
            self._recent.clear()
            return transition
        self._recent.append((self.is_anomalous(fused_rank), start))
        hits = [t for anomalous, t in self._recent if anomalous]
        cooling = self._cleared_at is not None and start < self._cleared_at + cfg.cooldown_seconds
        if len(hits) < cfg.raise_count or cooling:
            return None
        self.open_start = hits[0]
        self.open_event = event_id(self.machine, self.open_start)
        self._calm = 0
        return Transition("raise", self.open_event, self.open_start, end)
