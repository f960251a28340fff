"""How worried to be about a machine, in three levels: ``ok``, ``warning``, ``alarm``.

* ``alarm``: an alert is open (:class:`~monitor.service.alerts.AlertTracker` raised it, by its own
  rule at ``alerts.threshold``; this module never raises or clears anything).
* ``warning``: no alert is open, but ``alerts.raise_count`` of the last ``alerts.raise_window``
  scored windows ranked above ``alerts.warning_threshold`` (the alert rule's N-of-M counting at a
  lower rank, 0.95 by default): a machine drifting towards a fault, or a fault building up.
* ``ok``: neither. Back to ``ok`` as soon as the count no longer holds.

Only scored windows move the level (idle and faulty windows are not judged, as for alerts). A
change of level is one retained state message and one event-log line, never an alert. Pure: no
I/O, no clock.
"""

from __future__ import annotations

from collections import deque

from monitor.config import AlertConfig
from monitor.outputs.messages import Severity


class SeverityLevel:
    """One machine's severity: feed every scored window to :meth:`update`."""

    def __init__(self) -> None:
        self.level: Severity = "ok"
        self._above: deque[bool] = deque()  # the last raise_window windows: above warning_rank?

    def update(self, rank: float, alerting: bool, config: AlertConfig) -> Severity | None:
        """Feed one scored window (``alerting``: an alert is open after it); the new level when
        it changed, else None. New settings (a reload) apply from this window."""
        if self._above.maxlen != config.raise_window:
            self._above = deque(self._above, maxlen=config.raise_window)
        warning = config.warning_rank
        self._above.append(warning is not None and rank > warning)
        if alerting:
            level: Severity = "alarm"
        elif warning is not None and sum(self._above) >= config.raise_count:
            level = "warning"
        else:
            level = "ok"
        if level == self.level:
            return None
        self.level = level
        return level
