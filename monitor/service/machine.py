"""One monitored machine: its audio channel, its bank, its scorer, its alert tracker and state.

The state is what the plant sees on the retained state topic. One rule lives here: while an
alert is open the machine reads ``alert`` whatever else happens (idle, enrolling, a new bank),
so an alert is only ever ended by its own clear (or by a sensor fault, which is worse news).

Beside the state, a machine carries its severity level (``monitor.service.severity``) and its
health trend (``monitor.service.health``); both go out in the same retained state message, so
the machine remembers what it last announced (state, detail, event id, since) to re-send it
with a new severity or new health figures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from monitor.audio.sources import AudioSource
from monitor.bank.store import BankStore
from monitor.config import MachineConfig
from monitor.enrollment.live import Session
from monitor.outputs.messages import MachineState, Severity
from monitor.scoring.live import LiveScorer
from monitor.service.alerts import AlertTracker
from monitor.service.health import HealthTrend
from monitor.service.severity import SeverityLevel

# Called with (machine name, state, detail, event id) when the state really changes, and with
# the keywords severity, health (a dict), since (epoch seconds the state began) and change
# ("state", "severity" or "health": why the retained state message goes out again).
StateListener = Callable[..., None]


@dataclass
class Machine:
    """Everything the daemon keeps per monitored machine."""

    config: MachineConfig
    source: AudioSource
    store: BankStore
    tracker: AlertTracker
    on_state: StateListener
    # None until a bank is enrolled. The worker reads it once per window; a bank switch
    # replaces it whole (no lock that could starve the switch).
    scorer: LiveScorer | None = None
    state: MachineState = "starting"
    session: Session | None = None  # a live enrollment in progress
    # Guards ``session`` between the worker and command threads (short sections only).
    session_lock: threading.Lock = field(default_factory=threading.Lock)
    severity: SeverityLevel = field(default_factory=SeverityLevel)
    health: HealthTrend = field(default_factory=HealthTrend)
    # What the last state message said (re-sent with a new severity or health figures).
    detail: str = ""
    event_id: str | None = None
    since: float | None = None  # epoch seconds the state began

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def bank_version(self) -> str | None:
        return self.scorer.bank_version if self.scorer else None

    @property
    def at_rest(self) -> MachineState:
        """The state without an alert or an enrollment: scored, or idle for lack of a bank."""
        return "normal" if self.scorer else "idle"

    def set_state(self, state: MachineState, detail: str = "", event_id: str | None = None) -> None:
        """Enter ``state`` (an open alert keeps the machine in ``alert``, see the module
        docstring) and tell the listener when it changed."""
        if self.tracker.alerting and state not in ("alert", "sensor_fault"):
            state, event_id = "alert", self.tracker.open_event
        if state == self.state:
            return
        self.state, self.detail, self.event_id, self.since = state, detail, event_id, time.time()
        self.announce("state")

    def set_severity(self, level: Severity | None) -> None:
        """A new severity level (None: unchanged) re-sends the state message with it."""
        if level is not None:
            self.announce("severity")

    def health_moved(self, now: float) -> None:
        """Re-send the state message when the health figures moved enough (and not too soon);
        ``now``: the window's end time (epoch seconds)."""
        if self.health.republish_due(now):
            self.announce("health")

    def announce(self, change: str) -> None:
        """Send the current state message (``change``: why) with severity and health."""
        self.health.published()
        self.on_state(self.name, self.state, self.detail, self.event_id, severity=self.severity.level,
                      health=self.health.figures().as_dict(), since=self.since, change=change)
