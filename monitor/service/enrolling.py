"""Live enrollment inside the daemon: commands start and end a machine's session, the pipeline
feeds it every window, and a finished session becomes a new bank version the machine switches
to (see ``monitor.enrollment.live`` for the session and command rules)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from monitor.bank.model import Bank, BankItem
from monitor.config import Config
from monitor.enrollment.live import Command, Session
from monitor.errors import BankError, BankNotFound, CommandError
from monitor.outputs.fanout import Outputs
from monitor.outputs.messages import iso_time
from monitor.scoring.idle import NOISE_CONDITION
from monitor.service.machine import Machine

log = logging.getLogger(__name__)


class LiveEnrollment:
    """Sessions of every machine. ``switch_bank(machine)`` is called once a session's windows
    are saved, to score against the new version."""

    def __init__(self, config: Config, model_ids: dict[str, str], outputs: Outputs,
                 switch_bank: Callable[[Machine], None]) -> None:
        self.config = config
        self.model_ids = model_ids
        self.outputs = outputs
        self.switch_bank = switch_bank

    def apply(self, machine: Machine, cmd: Command) -> dict[str, Any]:
        """Start, stop, cancel or report a session; raises ``CommandError`` when it cannot."""
        with machine.session_lock:
            session = machine.session
            if cmd.action == "start":
                if session is not None:
                    raise CommandError(f"an enrollment is already running on {machine.name} ({session.condition})")
                session = Session(cmd.condition, cmd.duration_s, iso_time(time.time()))
                machine.session = session
            elif session is None:
                raise CommandError(f"no enrollment is running on {machine.name}")
            elif cmd.action == "cancel":
                machine.session = None
        if cmd.action == "stop":
            return self.finish(machine) | {"action": "stop", "request_id": cmd.request_id}
        if cmd.action == "start":
            machine.set_state("enrolling", f"condition {cmd.condition}, {cmd.duration_s:g} s")
        elif cmd.action == "cancel":
            self.outputs.telemetry.enrollment(machine.name, 0.0)
            machine.set_state(machine.at_rest, "enrollment cancelled")
        return {"ok": True, "machine": machine.name, "action": cmd.action, "request_id": cmd.request_id,
                "session": session.summary()}

    @staticmethod
    def enrolling_noise(machine: Machine) -> bool:
        """The site's noise is being enrolled: the machine is stopped and must not be judged."""
        session = machine.session
        return session is not None and session.condition == NOISE_CONDITION

    def window(self, machine: Machine, start: float, embeddings: dict[str, np.ndarray] | None,
               fused: float | None, level: float, excluded: str | None = None) -> None:
        """Offer one window to the machine's session, if one runs: accepted, or left out as a
        sensor fault, an idle (stopped) machine or an outlier against the current bank."""
        with machine.session_lock:
            session = machine.session
            if session is None:
                return
            session.advance(self.config.daemon.hop_seconds)
            if excluded == "idle":
                session.excluded_idle += 1
                result = "idle"
            elif excluded is not None:
                session.excluded_faults += 1
                result = "sensor_fault"
            elif fused is not None and fused > self.config.enrollment.outlier_rank:
                session.excluded_outliers += 1
                result = "outlier"
            else:
                item = BankItem.enrolled_now(f"live:{machine.name}", start, session.condition, level,
                                             machine.source.sample_rate)
                session.accept(item, {n: e[:1] for n, e in embeddings.items()})
                result = "accepted"
            done = session.done
        self.outputs.telemetry.enrollment(machine.name, session.progress, result)
        if done:
            self.finish(machine)

    def finish(self, machine: Machine) -> dict[str, Any]:
        """Save the session's windows as a new bank version (or refuse) and switch to it."""
        with machine.session_lock:
            session, machine.session = machine.session, None
        if session is None:  # finished by the worker a moment ago
            return {"ok": False, "machine": machine.name, "error": "no enrollment is running"}
        self.outputs.telemetry.enrollment(machine.name, 0.0)
        summary = session.summary()
        minimum = self.config.enrollment.min_windows
        if session.accepted < minimum:
            error = (f"only {session.accepted} clean window(s) (need {minimum}; excluded: "
                     f"{session.excluded_faults} sensor faults, {session.excluded_outliers} outliers): nothing saved")
            log.error("%s: enrollment refused: %s", machine.name, error)
            self.outputs.event("enrollment_failed", machine=machine.name, error=error, session=summary)
            machine.set_state(machine.at_rest, "enrollment refused")
            return {"ok": False, "machine": machine.name, "error": error, "session": summary}
        try:
            try:
                bank = machine.store.load()
            except BankNotFound:
                bank = Bank()
            version = machine.store.save(bank.add(session.items, session.stacked(), self.model_ids),
                                         note=f"live enrollment, condition {session.condition}, {session.accepted} windows")
        except BankError as exc:
            self.outputs.event("enrollment_failed", machine=machine.name, error=str(exc), session=summary)
            return {"ok": False, "machine": machine.name, "error": str(exc), "session": summary}
        self.outputs.event("enrolled", machine=machine.name, version=version, session=summary)
        machine.set_state("normal", f"enrolled {version}")
        self.switch_bank(machine)
        return {"ok": True, "machine": machine.name, "version": version, "session": summary}
