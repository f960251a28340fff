"""Which bank each machine scores against: loaded at start, switched when its ``CURRENT``
moves (``asd-monitor bank``, an enrollment, a reload). A version that cannot be used never
replaces the one in use."""

from __future__ import annotations

import logging

from monitor.config import Config
from monitor.errors import AsdError, BankNotFound
from monitor.outputs.fanout import Outputs
from monitor.scoring.detector import Detector
from monitor.scoring.idle import noise_rows
from monitor.scoring.live import LiveScorer
from monitor.service.machine import Machine

log = logging.getLogger(__name__)


class Banks:
    def __init__(self, config: Config, models: Detector, outputs: Outputs) -> None:
        self.config = config
        self.models = models  # the loaded backbones every machine's scorer shares
        self.outputs = outputs
        self._lost_current: set[str] = set()  # machines whose CURRENT vanished while running, already reported

    def load(self, machine: Machine) -> None:
        """Fit the machine's scorer on its current bank and swap it in (with nothing enrolled the
        machine stays idle); raises when the bank cannot be used, a bank that lost its ``CURRENT``
        included. Audio keeps flowing meanwhile."""
        try:
            bank = machine.store.load()
        except BankNotFound:
            log.warning("%s: no bank in %s: windows are not scored until one is enrolled "
                        "(asd-monitor enroll --bank %s ...)", machine.name, machine.store.path, machine.store.path)
            machine.set_state("idle", "no bank enrolled")
            return
        if len(noise_rows(bank.condition_labels())) == len(bank):
            log.warning("%s: bank %s holds only site noise: windows are not scored until the running machine "
                        "is enrolled", machine.name, bank.version)
            machine.set_state("idle", "only site noise enrolled")
            return
        scorer = LiveScorer.fit(self.models, bank, self.config.reference.rolling_size, machine.source.sample_rate,
                                f"{machine.name}: bank {bank.version} for source {machine.source.name}")
        previous, machine.scorer = machine.bank_version, scorer
        self.outputs.bank(machine.name, bank.version, previous, {n: len(bank) for n in bank.backbones})
        if machine.state in ("starting", "idle"):
            machine.set_state("normal", f"bank {bank.version}")

    def switch(self, machine: Machine) -> None:
        """Switch to the bank's current version; a bad version leaves the good one in use."""
        try:
            self.load(machine)
        except AsdError as exc:
            log.error("%s: keeping bank %s: %s", machine.name, machine.bank_version, exc)
            self.outputs.event("bank_error", machine=machine.name, error=str(exc), kept=machine.bank_version)
        except Exception:  # noqa: BLE001 - the main loop must survive whatever a bank holds
            log.exception("%s: keeping bank %s after an unexpected error", machine.name, machine.bank_version)

    def follow(self, machines: list[Machine]) -> None:
        """Switch every machine whose ``CURRENT`` names another version than the one in use.

        A ``CURRENT`` deleted under the running daemon leaves the bank in use in place, but a
        restart would refuse the bank and stop watching the machine: that is reported (once) now.
        """
        for machine in machines:
            try:
                current = machine.store.current()
            except AsdError as exc:
                log.error("%s: %s", machine.name, exc)
                continue
            if current is None and machine.bank_version is not None:
                self._report_lost_current(machine)
                continue
            self._lost_current.discard(machine.name)
            if current is not None and current != machine.bank_version:
                self.switch(machine)

    def _report_lost_current(self, machine: Machine) -> None:
        if machine.name in self._lost_current:
            return
        self._lost_current.add(machine.name)
        path = machine.store.path
        error = (f"bank {path}: CURRENT was deleted; still scoring against {machine.bank_version}, but a restart will "
                 f"refuse the bank until: asd-monitor bank use --bank {path} --version {machine.bank_version}")
        log.error("%s: %s", machine.name, error)
        self.outputs.event("bank_error", machine=machine.name, error=error, kept=machine.bank_version)
