"""The daemon's lifecycle and threads; what happens to a window is ``monitor.service.pipeline``.

Threads, and why each exists:

* per source, one that keeps it running (a microphone is reopened with back-off when it fails)
  and one that cuts its audio into windows (``monitor.service.windows``);
* workers: every window through the pipeline, each machine's windows one at a time and in
  order (``WindowQueue``); how many, and how many cores each onnxruntime call uses, is
  ``monitor.service.capacity``'s choice;
* at start, a few threads fitting the banks while the first windows are being recorded;
* paho's network thread and the outbox delivery thread (``monitor.outputs.mqtt``), the metrics
  HTTP server, and the control socket.

The main thread waits for a stop request (signal, or the end of a replay) and meanwhile follows
bank switches, reloads on SIGHUP, reports dead devices, says when the box cannot keep up
(``degraded``) and keeps systemd's status current.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from monitor import __version__
from monitor.audio.ring import Windower
from monitor.audio.sources import AudioSource, FileSource, make_source
from monitor.bank.store import BankStore
from monitor.config import Config, MachineConfig, load_config
from monitor.errors import (
    AudioDeviceError,
    ConfigError,
    MissingDependency,
    TelemetryError,
)
from monitor.outputs.clips import ClipStore
from monitor.outputs.events import EventLog
from monitor.outputs.fanout import Outputs, WindowListener
from monitor.outputs.history import ScoreHistory
from monitor.outputs.messages import HealthMessage, Topics, iso_time
from monitor.outputs.mqtt import Publisher
from monitor.outputs.outbox import Outbox
from monitor.outputs.plant import PlantFeed
from monitor.outputs.telemetry import Telemetry
from monitor.review.verdicts import ReviewLog, read_alert_log
from monitor.scoring.detector import Detector
from monitor.service.alerts import AlertTracker
from monitor.service.banks import Banks
from monitor.service.capacity import Overload, WorkPlan, plan_work
from monitor.service.commands import Commands
from monitor.service.control import ControlServer
from monitor.service.enrolling import LiveEnrollment
from monitor.service.machine import Machine
from monitor.service.pipeline import Pipeline
from monitor.service.systemd import Notifier
from monitor.service.threads import limit_compute_threads
from monitor.service.windows import POLL_SECONDS, WindowQueue, cut_windows, phase_lanes

if TYPE_CHECKING:
    from monitor.outputs.opcua import OpcUaServer
    from monitor.outputs.sparkplug import SparkplugNode
    from monitor.web.server import WebServer

log = logging.getLogger(__name__)

RING_SECONDS = 60.0  # audio a source holds at least (a slow window, phases over the hop)
BANK_CHECK_SECONDS = 2.0  # how soon a bank switched by another process is picked up
STATUS_SECONDS = 10.0
# Sections a reload cannot apply to a running daemon.
RESTART_KEYS = ("backbones", "runtime", "daemon", "sources", "machines", "mqtt", "metrics", "sparkplug", "opcua",
                "web")
FAULT_INJECTION_ENV = "ASD_FAULT_INJECTION"


def _sparkplug_node(config: Config, plant: PlantFeed, state_dir: Path) -> SparkplugNode:
    """The Sparkplug B edge node; its library is an optional extra, imported only when enabled."""
    try:
        from monitor.outputs.sparkplug import SparkplugNode
    except ImportError as exc:
        raise MissingDependency(f"sparkplug.enabled: pysparkplug is not installed: pip install 'asd-monitor[sparkplug]' "
                                f"and pip install --no-deps pysparkplug==0.6.1 ({exc})") from None
    return SparkplugNode(config, plant, [m.name for m in config.machines], state_dir)


def _fault_injection() -> int | None:
    """``ASD_FAULT_INJECTION=wedge-worker-after=N``: the processing loop hangs after N windows.
    For the watchdog test under systemd; a production environment never sets it."""
    value = os.environ.get(FAULT_INJECTION_ENV, "")
    prefix = "wedge-worker-after="
    return int(value[len(prefix):]) if value.startswith(prefix) else None


class Daemon:
    """Starts every part in order, runs the threads, reloads and stops; owns no per-window logic.

    ``start`` raises on any start-up problem before audio starts, so a bad setup never
    half-runs. A listener added with ``add_listener`` sees every window's report (tests and
    benchmarks measure the daemon through it).
    """

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.state_dir = config.daemon.resolved_state_dir()
        self.notifier = Notifier()
        self.telemetry = Telemetry()
        self.plant = PlantFeed()  # subscribe before start to see every change
        self.stop_event = threading.Event()
        self.reload_requested = threading.Event()
        self.sources: dict[str, AudioSource] = {}
        self.machines: list[Machine] = []
        self.publisher: Publisher | None = None
        self.sparkplug: SparkplugNode | None = None  # from start(), when sparkplug.enabled
        self.opcua: OpcUaServer | None = None  # from start(), when opcua.enabled
        self.control: ControlServer | None = None
        self.web: WebServer | None = None  # from start(), when web.enabled
        self.outputs: Outputs | None = None  # from start()
        self.banks: Banks | None = None  # from start()
        self.windows_processed = 0
        self._threads: list[threading.Thread] = []
        self._listeners: list[WindowListener] = []
        self._wedge_after = _fault_injection()
        self._last_ping = 0.0
        self._worker_beats: list[float] = []  # when each worker last came round its loop
        self._count_lock = threading.Lock()

    def add_listener(self, listener: WindowListener) -> None:
        """Call ``listener`` with every window's ``WindowReport`` (from the worker thread)."""
        self._listeners.append(listener)
        if self.outputs is not None:
            self.outputs.add_listener(listener)

    # ---------------------------------------------------------------- start-up
    def start(self) -> None:
        cfg = self.config
        limit_compute_threads(cfg.runtime.compute_threads)
        cores = os.cpu_count() or 1
        self.plan: WorkPlan = plan_work(cfg, cores)
        # First: a model that will not load leaves nothing behind.
        self.models = Detector.from_config(replace(cfg, runtime=replace(cfg.runtime, threads=self.plan.threads)))
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"daemon.state_dir: cannot create {self.state_dir} ({exc.strerror or exc})") from None
        ring = max(RING_SECONDS, 2 * (self.models.window_seconds + cfg.daemon.hop_seconds))
        self.sources = {s.name: make_source(s, ring) for s in cfg.sources}
        if cfg.metrics.enabled:
            try:
                self.telemetry.serve(cfg.metrics.host, cfg.metrics.port)
            except TelemetryError as exc:
                # A port taken or an address not on this host: the config must change (exit 78,
                # no restart loop into the same clash), whatever else holds the port.
                where = f"{self.config_path}: " if self.config_path else ""
                raise ConfigError(f"{where}metrics.host, metrics.port: {exc}") from None
            log.info("metrics on http://%s:%s/metrics", cfg.metrics.host, self.telemetry.port)
        topics = Topics(cfg.mqtt.topic_prefix, cfg.mqtt.site, cfg.daemon.name)
        if cfg.mqtt.enabled:
            outbox = Outbox(self.state_dir / "outbox.sqlite", cfg.mqtt.outbox_max_messages)
            self.publisher = Publisher(cfg.mqtt, topics, outbox)
        if cfg.sparkplug.enabled:
            self.sparkplug = _sparkplug_node(cfg, self.plant, self.state_dir)
        self.outputs = Outputs(cfg, topics, self.telemetry, EventLog(cfg.daemon.resolved_event_log()),
                               ClipStore(self.state_dir / "clips", cfg.clips), self.publisher,
                               ScoreHistory(self.state_dir / "history"), plant=self.plant)
        self.outputs.recall_alerts(read_alert_log(cfg.daemon.resolved_event_log()), ReviewLog(self.state_dir).records())
        for listener in self._listeners:
            self.outputs.add_listener(listener)
        if cfg.opcua.enabled:
            self.opcua = self._opcua()
        self.machines = [self._machine(m) for m in cfg.machines]
        self.banks = Banks(cfg, self.models, self.outputs)
        self.enrollment = LiveEnrollment(cfg, self.models.feature_model_ids, self.outputs, self.banks.switch)
        self.commands = Commands(cfg, self.machines, self.enrollment, self.outputs, self.models)
        self.pipeline = Pipeline(cfg, self.models, self.outputs, self.enrollment)
        self.windows = WindowQueue(cfg.daemon.resolved_queue_size(len(cfg.machines)), self.outputs, self.stop_event)
        self.overload = Overload(len(self.machines), cfg.daemon.hop_seconds, self.plan.workers)
        self.outputs.add_listener(self.overload.window)
        if self.publisher is not None:
            if cfg.mqtt.commands:
                self.publisher.on_command = self.commands.on_mqtt
            self.publisher.start()
        self.outputs.announce_machines([m.name for m in self.machines], [b.name for b in self.models.backbones])
        if self.sparkplug is not None:
            self.sparkplug.start()  # after the machines are announced: its births carry them all
        banks = [(m, bank) for m in self.machines if (bank := self.banks.read(m)) is not None]
        self._health()
        if cfg.enrollment.control_socket:
            self.control = ControlServer(self.state_dir / "control.sock", self.commands.handle)
            self.control.start()
        if cfg.web.enabled:
            self.web = self._start_web()
        self.banks.fit_at_start(banks, cores)  # in config order: the order of the first windows
        for source in self.sources.values():
            self._start_source(source)
        for index in range(self.plan.workers):
            self._worker_beats.append(time.monotonic())
            self._spawn(lambda index=index: self._work(index), f"worker-{index}")
        self.outputs.event("started", version=__version__, machines=[m.name for m in self.machines])
        log.info("started: %d machine(s), backbones %s, %d worker(s) x %s onnxruntime thread(s), windows %s",
                 len(self.machines), ", ".join(b.name for b in self.models.backbones), self.plan.workers,
                 self.plan.threads or "auto", cfg.daemon.window_phase)
        self.notifier.ready(self.status_line())

    def _machine(self, cfg: MachineConfig) -> Machine:
        store = BankStore(cfg.bank_dir(self.state_dir))
        return Machine(cfg, self.sources[cfg.source], store, AlertTracker(cfg.name, self.config.alerts),
                       self.outputs.state)

    def _opcua(self) -> OpcUaServer:
        """The OPC UA server, listening before any audio; asyncua is imported only here, so a
        box without the optional extra runs everything else."""
        where = f"{self.config_path}: " if self.config_path else ""
        try:
            from monitor.outputs.opcua import OpcUaServer
        except ImportError as exc:
            raise MissingDependency(f"{where}opcua.enabled: asyncua is not installed: pip install 'asd-monitor[opcua]' ({exc})") from None
        cfg = self.config
        server = OpcUaServer(cfg.opcua, cfg.mqtt.site, cfg.daemon.name, [m.name for m in cfg.machines], self.plant, where)
        server.start()
        return server

    def _start_web(self) -> WebServer:
        """The review page (monitor/web), listening before any audio; starlette and uvicorn are
        imported only here, so a box without the optional extra runs everything else."""
        where = f"{self.config_path}: " if self.config_path else ""
        try:
            from monitor.web.server import WebServer
            from monitor.web.views import Site
        except ImportError as exc:
            raise MissingDependency(f"{where}web.enabled: starlette or uvicorn is not installed: pip install 'asd-monitor[web]' ({exc})") from None
        assert self.outputs is not None
        outputs = self.outputs
        site = Site(lambda: self.config, self.machines, outputs.history, lambda: outputs.clips.directory,
                    self.commands.review_from_web)
        server = WebServer(self.config.web, site)
        try:
            server.start()
        except OSError as exc:  # a taken port or a foreign address: the config must change (exit 78)
            raise ConfigError(f"{where}web.host, web.port: {exc.strerror or exc}") from None
        return server

    def _start_source(self, source: AudioSource) -> None:
        window = round(self.models.window_seconds * source.sample_rate)
        hop = round(self.config.daemon.hop_seconds * source.sample_rate)
        self.telemetry.add_source(source.name)
        listeners = [m for m in self.machines if m.source is source]
        lanes = phase_lanes(listeners, [m.name for m in self.machines], hop, self.config.daemon.window_phase == "spread")
        windower = Windower(source.ring, window, hop, [lane for lane, _ in lanes])
        if isinstance(source, FileSource):
            source.on_skip = lambda path, reason: self.outputs.event(
                "file_skipped", source=source.name, machines=[m.name for m in listeners], file=str(path), error=reason)
        try:
            source.start()
        except AudioDeviceError as exc:
            # A missing microphone is a sensor fault to report and retry, not a reason to exit
            # (systemd would only restart us into the same missing device).
            log.error("%s", exc)
            source.error = str(exc)
        self._spawn(lambda: source.supervise(self.stop_event), f"supervise-{source.name}")
        self._spawn(lambda: cut_windows(source, windower, [fed for _, fed in lanes], self.windows, self.outputs,
                                        self.stop_event), f"windows-{source.name}")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        threads = self.config.runtime.compute_threads

        def run() -> None:
            limit_compute_threads(threads)
            target()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # ---------------------------------------------------------------- the workers
    def _work(self, index: int) -> None:
        """One worker's processing loop. Only the workers ping the systemd watchdog, and only
        while every one of them comes round its loop, so a wedged pipeline (not merely a live
        process) is what gets the daemon restarted."""
        while not self.stop_event.is_set() or not self.windows.empty():
            self._worker_beats[index] = time.monotonic()
            self._heartbeat()
            item = self.windows.get()
            if item is None:
                continue
            if self._wedge_after is not None and self.windows_processed >= self._wedge_after:
                log.error("fault injection: wedging the processing loop")
                self.stop_event.wait()
            try:
                self.banks.wait_fitted(item.machine)
                self.pipeline.process(item)
            except Exception:  # one bad window must not end monitoring of every machine
                log.exception("%s: processing the window at %.3f failed", item.machine.name, item.start)
            finally:
                with self._count_lock:
                    self.windows_processed += 1
                self.windows.done(item)

    def _heartbeat(self) -> None:
        """Ping the watchdog unless a worker is stuck or the audio path is dead: every
        windower must be running (a finished replay excepted)."""
        interval = self.notifier.watchdog_interval
        now = time.monotonic()
        if interval is None or now - self._last_ping < min(interval, 5.0):
            return
        if any(now - beat > interval for beat in self._worker_beats):
            return
        if all(t.is_alive() for t in self._threads if t.name.startswith("windows-")) or self._replays_done():
            self.notifier.watchdog()
            self._last_ping = now

    # ---------------------------------------------------------------- running
    def _replays_done(self) -> bool:
        return bool(self.sources) and all(s.finished.is_set() for s in self.sources.values())

    def replay_finished(self) -> bool:
        """True once every source is a replay that has ended and every window is done."""
        return (self._replays_done() and self.windows.idle
                and not any(t.is_alive() for t in self._threads if t.name.startswith("windows-")))

    def run(self) -> None:
        """Block until a stop is requested or every replayed file is done."""
        last_status = last_bank_check = 0.0
        while not self.stop_event.wait(POLL_SECONDS):
            self._check_devices()
            self.commands.check_schedule(datetime.now())
            now = time.monotonic()
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            elif now - last_bank_check >= BANK_CHECK_SECONDS:
                last_bank_check = now
                self.banks.follow(self.machines)
            if self.overload.check(self.outputs.dropped_windows, now):
                self._health()
            if now - last_status >= STATUS_SECONDS:
                last_status = now
                self.notifier.status(self.status_line())
            if self.replay_finished():
                log.info("replay finished: %d windows processed", self.windows_processed)
                break

    def status_line(self) -> str:
        states = ", ".join(f"{m.name} {m.state}" for m in self.machines)
        mqtt = "" if self.publisher is None else (
            f"; MQTT {'up' if self.publisher.connected else 'DOWN'}, outbox {self.publisher.outbox_depth}")
        degraded = f"DEGRADED ({self.overload.reason}); " if self.overload.degraded else ""
        return f"{degraded}{self.windows_processed} windows; {states}{mqtt}"

    def _health(self) -> None:
        """Publish whether the daemon keeps up (at start, and when that changes)."""
        load, cfg = self.overload, self.config
        self.outputs.health(HealthMessage(
            cfg.mqtt.site, cfg.daemon.name, "degraded" if load.degraded else "ok", iso_time(time.time()), load.reason,
            len(self.machines), self.plan.workers, None if load.cost is None else round(load.cost, 4), load.capacity,
            self.outputs.dropped_windows))
        self.notifier.status(self.status_line())

    def _check_devices(self) -> None:
        """A dead device delivers no windows, so its fault must be reported from here."""
        for machine in self.machines:
            error = machine.source.error
            if error and machine.source.live and machine.state != "sensor_fault":
                self.outputs.device_fault(machine.name, error)
                machine.set_state("sensor_fault", f"device: {error}")

    def reload(self) -> None:
        """SIGHUP: re-read the config file and every bank, without stopping the audio.

        Thresholds, scoring, fusion, sensor, enrollment and clip settings apply at once; a
        changed backbone, source, machine, MQTT or metrics section needs a restart (logged). An
        invalid file is reported and the running config kept.
        """
        self.notifier.reloading()
        if self.config_path is not None:
            try:
                new = load_config(self.config_path)
            except ConfigError as exc:
                log.error("reload: %s; keeping the running configuration", exc)
                self.outputs.event("reload_error", error=str(exc))
                new = self.config
            fixed = [key for key in RESTART_KEYS if getattr(new, key) != getattr(self.config, key)]
            if fixed:
                log.warning("reload: changes to %s need a restart; applying the rest", ", ".join(fixed))
                new = replace(new, **{key: getattr(self.config, key) for key in fixed})
            self.config = self.models.config = new
            self.pipeline.config = self.enrollment.config = self.commands.config = self.banks.config = new
            self.outputs.reconfigure(new, ClipStore(self.state_dir / "clips", new.clips))
        for machine in self.machines:
            machine.tracker.config = self.config.alerts
            self.banks.switch(machine)
        self.outputs.event("reloaded")
        self.notifier.ready(self.status_line())

    def stop(self) -> None:
        self.notifier.stopping()
        self.stop_event.set()
        if self.banks is not None:
            self.banks.stop()
        for source in self.sources.values():
            source.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        if self.control is not None:
            self.control.stop()
        if self.web is not None:
            self.web.stop()
        if self.opcua is not None:
            self.opcua.stop()
        if self.sparkplug is not None:
            self.sparkplug.stop()
        if self.publisher is not None:
            self.publisher.stop()
        self.telemetry.stop()
        if self.outputs is not None:
            self.outputs.event("stopped", windows=self.windows_processed)
            self.outputs.events.close()
            if self.outputs.history is not None:
                self.outputs.history.close()
        log.info("stopped after %d windows", self.windows_processed)
