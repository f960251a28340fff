"""One monitored machine: its audio channel, its bank, its scorer, its alert tracker and state.

The state is what the plant sees on the retained state topic. One rule lives here: while an
alert is open the machine reads ``alert`` whatever else happens (idle, enrolling, a new bank),
so an alert is only ever ended by its own clear (or by a sensor fault, which is worse news).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from monitor.audio.sources import AudioSource
from monitor.bank.store import BankStore
from monitor.config import MachineConfig
from monitor.enrollment.live import Session
from monitor.outputs.messages import MachineState
from monitor.scoring.live import LiveScorer
from monitor.service.alerts import AlertTracker

# Called with (machine name, state, detail, event id) when the state really changes.
StateListener = Callable[[str, MachineState, str, "str | None"], None]


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
        self.state = state
        self.on_state(self.name, state, detail, event_id)
