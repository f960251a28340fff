"""Which bank each machine scores against: checked before start, fitted while audio already
flows, switched when its ``CURRENT`` moves (``asd-monitor bank``, an enrollment, a reload). A
version that cannot be used never replaces the one in use."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor, wait

from monitor.bank.model import Bank
from monitor.config import Config
from monitor.errors import AsdError, BankNotFound
from monitor.outputs.fanout import Outputs
from monitor.scoring.detector import Detector
from monitor.scoring.idle import noise_rows
from monitor.scoring.live import LiveScorer
from monitor.service.machine import Machine
from monitor.service.threads import limit_compute_threads

log = logging.getLogger(__name__)


class Banks:
    def __init__(self, config: Config, models: Detector, outputs: Outputs) -> None:
        self.config = config
        self.models = models  # the loaded backbones every machine's scorer shares
        self.outputs = outputs
        self._lost_current: set[str] = set()  # machines whose CURRENT vanished while running, already reported
        self._fits: dict[str, Future[None]] = {}  # start-up fits by machine (``fit_at_start``)
        self._pool: ThreadPoolExecutor | None = None

    def load(self, machine: Machine) -> None:
        """Fit the machine's scorer on its current bank and swap it in (with nothing enrolled the
        machine stays idle); raises when the bank cannot be used, a bank that lost its ``CURRENT``
        included. Audio keeps flowing meanwhile."""
        bank = self.read(machine)
        if bank is not None:
            self.use(machine, bank)

    def read(self, machine: Machine) -> Bank | None:
        """The cheap half of ``load``: the machine's current bank, checked against the models
        and its source (raises when unusable); None, with the machine idle, when nothing of the
        running machine is enrolled."""
        try:
            bank = machine.store.load()
        except BankNotFound:
            log.warning("%s: no bank in %s: windows are not scored until one is enrolled "
                        "(asd-monitor enroll --bank %s ...)", machine.name, machine.store.path, machine.store.path)
            machine.set_state("idle", "no bank enrolled")
            return None
        if len(noise_rows(bank.condition_labels())) == len(bank):
            log.warning("%s: bank %s holds only site noise: windows are not scored until the running machine "
                        "is enrolled", machine.name, bank.version)
            machine.set_state("idle", "only site noise enrolled")
            return None
        LiveScorer.check(self.models, bank, machine.source.sample_rate, self._what(machine, bank))
        return bank

    def use(self, machine: Machine, bank: Bank) -> None:
        """The costly half of ``load``: fit a scorer on ``bank`` and swap it in."""
        scorer = LiveScorer.fit(self.models, bank, self.config.reference.rolling_size, machine.source.sample_rate,
                                self._what(machine, bank))
        previous, machine.scorer = machine.bank_version, scorer
        self.outputs.bank(machine.name, bank.version, previous, {n: len(bank) for n in bank.backbones})
        # A bank from before every output was kept: scored the earlier way, said once per version.
        outdated = scorer.detector.reenroll_notice(machine.store.path)
        if outdated:
            log.warning("%s: %s", machine.name, outdated)
            self.outputs.event("bank_outdated", machine=machine.name, version=bank.version, detail=outdated)
        if machine.state in ("starting", "idle") or (outdated and machine.state == "normal"):
            used = ", ".join(scorer.detector.scored)
            machine.set_state("normal", f"bank {bank.version}" + (f", earlier layout: scored as {used}" if outdated else ""))

    @staticmethod
    def _what(machine: Machine, bank: Bank) -> str:
        return f"{machine.name}: bank {bank.version} for source {machine.source.name}"

    def fit_at_start(self, banks: list[tuple[Machine, Bank]], threads: int) -> None:
        """Fit the banks ``read`` at start on ``threads`` threads while audio already flows, in
        the order given (the order the machines' first windows end): with many machines,
        fitting them one after another took longer than the first window (48 machines, 18.7 s
        on the 2-core test machine). A window waits only for its own machine's fit
        (``wait_fitted``)."""
        compute_threads = self.config.runtime.compute_threads
        self._pool = ThreadPoolExecutor(max(1, threads), "bank-fit", limit_compute_threads, (compute_threads,))
        for machine, bank in banks:
            self._fits[machine.name] = self._pool.submit(self._fit, machine, bank)

    def _fit(self, machine: Machine, bank: Bank) -> None:
        try:
            self.use(machine, bank)
        except Exception as exc:
            log.exception("%s: fitting bank %s failed", machine.name, bank.version)
            self.outputs.event("bank_error", machine=machine.name, error=str(exc), kept=None)
            machine.set_state("idle", f"bank {bank.version} could not be fitted")

    def wait_fitted(self, machine: Machine) -> None:
        """Return once the machine's start-up fit (if any) is over."""
        fit = self._fits.get(machine.name)
        if fit is not None and not fit.done():
            wait([fit])

    def fitting(self, machine: Machine) -> bool:
        fit = self._fits.get(machine.name)
        return fit is not None and not fit.done()

    def stop(self) -> None:
        """Drop the start-up fits not begun (a stopping daemon scores nothing more)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def switch(self, machine: Machine) -> None:
        """Switch to the bank's current version; a bad version leaves the good one in use."""
        self.wait_fitted(machine)
        try:
            self.load(machine)
        except AsdError as exc:
            log.error("%s: keeping bank %s: %s", machine.name, machine.bank_version, exc)
            self.outputs.event("bank_error", machine=machine.name, error=str(exc), kept=machine.bank_version)
        except Exception:
            log.exception("%s: keeping bank %s after an unexpected error", machine.name, machine.bank_version)

    def follow(self, machines: list[Machine]) -> None:
        """Switch every machine whose ``CURRENT`` names another version than the one in use.

        A ``CURRENT`` deleted under the running daemon leaves the bank in use in place, but a
        restart would refuse the bank and stop watching the machine: that is reported (once) now.
        """
        for machine in machines:
            if self.fitting(machine):
                continue
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
