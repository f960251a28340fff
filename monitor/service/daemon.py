"""The daemon, wired in one place: sources -> windows -> scores -> alerts -> MQTT, metrics, logs.

Threads, and why each exists:

* one per source: PortAudio's callback (or the file replayer) copies audio into a ring;
* one windower per source: cuts its ring into windows every hop and hands each machine on that
  source its channel, through one bounded queue (when processing falls behind, the oldest
  window is dropped and counted: the audio path never waits for the models);
* one worker: sensor checks, embedding, KNN, ranking, alert state, outputs. onnxruntime already
  uses the cores inside each call, so one worker keeps windows in order at no cost in speed;
* paho's network thread and the outbox delivery thread (``monitor.outputs.mqtt``), and the metrics
  HTTP server.

The main thread only waits for a stop request (signal, or the end of a replayed file).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from monitor import __version__
from monitor.service.alerts import AlertTracker, Transition
from monitor.audio.files import Audio
from monitor.scoring.backbone import Backbone, BackboneError
from monitor.bank.store import Bank, BankError, BankItem, BankNotFound, BankStore, check_audio_rate
from monitor.outputs.clips import ClipStore
from monitor.config import Config, ConfigError, MachineConfig, load_config
from monitor.service.control import ControlServer
from monitor.scoring.detector import Detector
from monitor.enrollment.files import enrolled_level
from monitor.enrollment.live import Command, CommandError, Session, parse_command
from monitor.outputs.events import EventLog
from monitor.scoring.ranking import FusionError
from monitor.scoring.idle import NOISE_CONDITION, noise_rows
from monitor.scoring.knn import KnnError
from monitor.outputs.messages import AlertEvent, BackboneScore, ScoreMessage, StateMessage, Topics, iso_time
from monitor.outputs.mqtt import Publisher, discovery_payload
from monitor.outputs.outbox import Outbox
from monitor.scoring.reference import RollingReference
from monitor.audio.ring import Window, Windower
from monitor.audio.sensor import check_window
from monitor.audio.sources import AudioDeviceError, AudioSource, FileSource, MicrophoneSource, make_source
from monitor.service.systemd import Notifier
from monitor.outputs.telemetry import Telemetry
from monitor.service.threads import limit_compute_threads

log = logging.getLogger(__name__)
console = logging.getLogger("asd.console")  # alerts and sensor faults, for a person watching
windows = logging.getLogger("asd.windows")  # one line per scored window (-v, or -vv under systemd)

STOP_POLL_SECONDS = 0.5
BANK_CHECK_SECONDS = 2.0  # how soon a bank switched by another process is picked up
STATUS_SECONDS = 10.0
# Sections a reload cannot apply to a running daemon.
RESTART_KEYS = ("backbones", "runtime", "daemon", "sources", "machines", "mqtt", "metrics")
FAULT_INJECTION_ENV = "ASD_FAULT_INJECTION"


def _fault_injection() -> int | None:
    """``ASD_FAULT_INJECTION=wedge-worker-after=N``: the processing loop hangs after N windows.
    For the watchdog test under systemd; a production environment never sets it."""
    value = os.environ.get(FAULT_INJECTION_ENV, "")
    prefix = "wedge-worker-after="
    return int(value[len(prefix):]) if value.startswith(prefix) else None


@dataclass(frozen=True)
class Scoring:
    """What scoring a machine's windows needs from its bank. Replaced whole on a bank switch:
    the worker reads ``machine.scoring`` once per window, so a window is never scored half
    with the old bank and half with the new, and no lock can starve the switch."""

    detector: Detector
    references: dict[str, RollingReference]
    level_dbfs: float | None
    bank_version: str | None


@dataclass
class Machine:
    """Everything the worker keeps per monitored machine."""

    config: MachineConfig
    source: AudioSource
    store: BankStore
    tracker: AlertTracker
    scoring: Scoring | None = None  # None until a bank is enrolled
    state: str = "starting"
    session: Session | None = None  # a live enrollment in progress
    # Guards ``session`` between the worker and command threads (short sections only).
    session_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def bank_version(self) -> str | None:
        return self.scoring.bank_version if self.scoring else None


@dataclass(frozen=True)
class QueuedWindow:
    machine: Machine
    window: Window
    ready: float  # time.monotonic() when the window's last sample was available


class Daemon:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = Notifier()
        self.reload_requested = threading.Event()
        self._wedge_after = _fault_injection()
        self.state_dir = config.daemon.resolved_state_dir()
        self.telemetry = Telemetry()
        self.topics = Topics(config.mqtt.topic_prefix, config.mqtt.site, config.daemon.name)
        self.backbones: list[Backbone] = []
        self.sources: dict[str, AudioSource] = {}
        self.machines: list[Machine] = []
        self.queue: queue.Queue[QueuedWindow] = queue.Queue(
            maxsize=config.daemon.resolved_queue_size(len(config.machines)))
        self.stop_event = threading.Event()
        self.publisher: Publisher | None = None
        self.control: ControlServer | None = None
        self._scheduled: dict[int, str] = {}  # schedule entry -> date it last started
        self.events: EventLog | None = None
        self.clips: ClipStore | None = None
        self._threads: list[threading.Thread] = []
        self._queue_lock = threading.Lock()
        self._last_ping = 0.0
        self.windows_processed = 0

    # ---------------------------------------------------------------- start-up
    def start(self) -> None:
        """Load models and banks, open outputs, start audio. Raises on any start-up problem,
        before audio starts, so a bad setup never half-runs."""
        cfg = self.config
        limit_compute_threads(cfg.runtime.compute_threads)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"daemon.state_dir: cannot create {self.state_dir} ({exc.strerror or exc})") from None
        self.backbones = [Backbone.load(b.model, cfg.runtime.provider, cfg.runtime.threads) for b in cfg.backbones]
        self.sources = {s.name: make_source(s) for s in cfg.sources}
        self.machines = [self._make_machine(m) for m in cfg.machines]
        self.events = EventLog(cfg.daemon.event_log or self.state_dir / "events.jsonl")
        self.clips = ClipStore(self.state_dir / "clips", cfg.clips)
        if cfg.metrics.enabled:
            self.telemetry.serve(cfg.metrics.host, cfg.metrics.port)
            log.info("metrics on http://%s:%s/metrics", cfg.metrics.host, self.telemetry.port)
        if cfg.mqtt.enabled:
            self._start_mqtt()
        for machine in self.machines:
            self._load_bank(machine)
        if cfg.enrollment.control_socket:
            self.control = ControlServer(self.state_dir / "control.sock", self.command)
            self.control.start()
        for source in self.sources.values():
            self._start_source(source)
        self._spawn(self._work, "worker")
        self.events.write("started", version=__version__, machines=[m.name for m in self.machines])
        log.info("started: %d machine(s), backbones %s", len(self.machines), ", ".join(b.name for b in self.backbones))
        self.notifier.ready(self.status_line())

    def _make_machine(self, cfg: MachineConfig) -> Machine:
        bank_dir = cfg.bank or self.state_dir / "banks" / cfg.name
        machine = Machine(cfg, self.sources[cfg.source], BankStore(bank_dir), AlertTracker(cfg.name, self.config.alerts))
        self.telemetry.add_machine(cfg.name, [b.name for b in self.backbones])
        return machine

    def _load_bank(self, machine: Machine) -> None:
        """Fit the machine's detector on its current bank and swap it in (a missing bank
        leaves the machine idle). Audio keeps flowing meanwhile; see ``Scoring``."""
        try:
            bank = machine.store.load()
        except BankNotFound:
            log.warning("%s: no bank in %s: windows are not scored until one is enrolled "
                        "(asd-monitor enroll --bank %s ...)", machine.name, machine.store.path, machine.store.path)
            self._set_state(machine, "idle", "no bank enrolled")
            return
        if len(noise_rows(bank.condition_labels())) == len(bank):
            log.warning("%s: bank %s holds only site noise: windows are not scored until the running machine "
                        "is enrolled", machine.name, bank.version)
            self._set_state(machine, "idle", "only site noise enrolled")
            return
        detector = Detector(self.backbones, self.config)
        check_audio_rate(bank.recorded_rates, machine.source.sample_rate, detector.model_rate,
                         f"{machine.name}: bank {bank.version} for source {machine.source.name}")
        detector.fit(bank)
        references = {
            b.name: RollingReference(detector.reference(b.name), self.config.reference.rolling_size)
            for b in self.backbones
        }
        previous = machine.bank_version
        machine.scoring = Scoring(detector, references, enrolled_level(bank), bank.version)
        self.telemetry.set_bank(machine.name, bank.version or "", {n: len(bank) for n in bank.backbones})
        self.events.write("bank", machine=machine.name, version=bank.version, previous=previous, windows=len(bank))
        log.info("%s: bank %s in use (%d windows)%s", machine.name, bank.version, len(bank),
                 f", was {previous}" if previous else "")
        if machine.state in ("starting", "idle"):
            self._set_state(machine, "normal", f"bank {bank.version}")

    def _start_mqtt(self) -> None:
        cfg = self.config.mqtt
        outbox = Outbox(self.state_dir / "outbox.sqlite", cfg.outbox_max_messages)
        self.publisher = Publisher(cfg, self.topics, outbox, self._on_mqtt_command if cfg.commands else None)
        self.publisher.on_connection_change = self._on_mqtt_connection
        self.publisher.start()
        if cfg.homeassistant_discovery:
            for machine in self.config.machines:
                topic, payload = discovery_payload(self.topics, machine.name, cfg.discovery_prefix)
                self.publisher.publish_reliable(topic, payload, retain=True)

    def _on_mqtt_connection(self, connected: bool) -> None:
        self.telemetry.set_mqtt_connected(connected)
        log.info("MQTT %s %s:%s", "connected to" if connected else "disconnected from",
                 self.config.mqtt.host, self.config.mqtt.port)

    def _start_source(self, source: AudioSource) -> None:
        window = round(self.backbones[0].meta.window_seconds * source.sample_rate)
        hop = round(self.config.daemon.hop_seconds * source.sample_rate)
        self.telemetry.add_source(source.name)
        windower = Windower(source.ring, window, hop)
        if isinstance(source, MicrophoneSource):
            # A missing microphone is a sensor fault to report and retry, not a reason to exit
            # (systemd would only restart us into the same missing device).
            try:
                source.start()
            except AudioDeviceError as exc:
                log.error("%s", exc)
                source.error = str(exc)
            self._spawn(lambda: source.run_supervised(self.stop_event), f"supervise-{source.name}")
        else:
            source.start()
        self._spawn(lambda: self._cut_windows(source, windower), f"windows-{source.name}")

    def _spawn(self, target, name: str) -> None:
        threads = self.config.runtime.compute_threads

        def run() -> None:
            limit_compute_threads(threads)
            target()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # ------------------------------------------------------------- audio path
    def _cut_windows(self, source: AudioSource, windower: Windower) -> None:
        """Hand each window of ``source`` to every machine listening to it (never blocks on
        the worker: a full queue loses its oldest window)."""
        machines = [m for m in self.machines if m.source is source]
        skipped = 0
        overflows = 0
        while not self.stop_event.is_set():
            window = windower.next_window(STOP_POLL_SECONDS)
            if windower.skipped_windows > skipped:
                for machine in machines:
                    for _ in range(windower.skipped_windows - skipped):
                        self.telemetry.window(machine.name, "dropped")
                skipped = windower.skipped_windows
            if source.overflows > overflows:
                self.telemetry.audio_overflow(source.name, source.overflows - overflows)
                overflows = source.overflows
            if window is None:
                if isinstance(source, FileSource) and source.finished.is_set() and not self._has_full_window(source, windower):
                    break
                continue
            ready = time.monotonic()
            for machine in machines:
                item = QueuedWindow(machine, window, ready)
                # A replayed file can wait for the models (every window gets scored); a
                # microphone cannot, so live audio drops the oldest queued window instead.
                self._wait_enqueue(item) if isinstance(source, FileSource) else self._enqueue(item)
        log.debug("windower of %s stopped", source.name)

    @staticmethod
    def _has_full_window(source: AudioSource, windower: Windower) -> bool:
        return source.ring.frames_written >= windower.next_start + windower.window_frames

    def _enqueue(self, item: QueuedWindow) -> None:
        with self._queue_lock:
            while True:
                try:
                    self.queue.put_nowait(item)
                    break
                except queue.Full:
                    try:
                        dropped = self.queue.get_nowait()
                    except queue.Empty:
                        continue
                    self.queue.task_done()
                    self.telemetry.window(dropped.machine.name, "dropped")
                    log.warning("%s: processing fell behind, dropped the window at %s",
                                dropped.machine.name, iso_time(dropped.window.start_time))
            self.telemetry.set_queue_depth(self.queue.qsize())

    def _wait_enqueue(self, item: QueuedWindow) -> None:
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=STOP_POLL_SECONDS)
                self.telemetry.set_queue_depth(self.queue.qsize())
                return
            except queue.Full:
                continue

    def _work(self) -> None:
        """The processing loop; it alone pings the systemd watchdog, so a wedged pipeline
        (not merely a live process) is what gets the daemon restarted."""
        while not self.stop_event.is_set() or not self.queue.empty():
            self._heartbeat()
            try:
                item = self.queue.get(timeout=STOP_POLL_SECONDS)
            except queue.Empty:
                continue
            if self._wedge_after is not None and self.windows_processed >= self._wedge_after:
                log.error("fault injection: wedging the processing loop")
                self.stop_event.wait()
            try:
                self.process(item)
            except Exception:  # one bad window must not end monitoring of every machine
                log.exception("%s: processing the window at %s failed", item.machine.name,
                              iso_time(item.window.start_time))
            finally:
                self.queue.task_done()
                self.telemetry.set_queue_depth(self.queue.qsize())

    def _heartbeat(self) -> None:
        """Ping the watchdog unless the audio path is dead: every windower must be running
        (a finished replay excepted)."""
        if self.notifier.watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_ping < min(self.notifier.watchdog_interval, 5.0):
            return
        windowers = [t for t in self._threads if t.name.startswith("windows-")]
        replay_done = all(isinstance(s, FileSource) and s.finished.is_set() for s in self.sources.values())
        if all(t.is_alive() for t in windowers) or replay_done:
            self.notifier.watchdog()
            self._last_ping = now

    # -------------------------------------------------------- one window
    def process(self, item: QueuedWindow) -> None:
        machine, window = item.machine, item.window
        rate = machine.source.sample_rate
        samples = window.samples[:, machine.config.channel]
        start = window.start_time
        end = start + len(samples) / rate
        scoring = machine.scoring
        report = check_window(samples, rate, self.config.sensor, scoring.level_dbfs if scoring else None)
        faults = list(report.faults) + (["device"] if machine.source.error else [])
        if faults:
            self._sensor_fault(machine, start, end, faults, report.rms_dbfs)
            self._enroll_window(machine, start, None, None, report.rms_dbfs, "sensor_fault")
        elif scoring is None:
            self._idle(machine, start, end)
            if machine.session is not None:
                embedded = Detector(self.backbones, self.config).embed(Audio(samples, rate, machine.name))
                self._enroll_window(machine, start, embedded.embeddings, None, report.rms_dbfs)
        else:
            detector = scoring.detector
            embedded = detector.embed(Audio(samples, rate, machine.name))
            for name, seconds in detector.last_inference_seconds.items():
                self.telemetry.observe_inference(name, seconds)
            enrolling_noise = self._enrolling_noise(machine)
            if enrolling_noise or detector.idle(embedded.embeddings)[0]:
                # The machine is stopped: nothing to judge (and site noise being enrolled
                # must not raise an alarm against the machine's own bank).
                self._idle(machine, start, end)
                self._enroll_window(machine, start, embedded.embeddings, None, report.rms_dbfs,
                                    None if enrolling_noise else "idle")
            else:
                fused = self._score(machine, scoring, embedded.embeddings, samples, rate, start, end)
                self._enroll_window(machine, start, embedded.embeddings, fused, report.rms_dbfs)
        self.telemetry.observe_latency(machine.name, time.monotonic() - item.ready)
        if self.publisher is not None:
            self.telemetry.set_mqtt_outbox(self.publisher.outbox_depth)
        self.windows_processed += 1

    def _idle(self, machine: Machine, start: float, end: float) -> None:
        """A window without an anomaly decision: no bank yet, or the machine is stopped."""
        self.telemetry.window(machine.name, "idle")
        self._publish_score(ScoreMessage(self.topics.site, machine.name, iso_time(start), iso_time(end),
                                         "idle", None, False))
        if machine.scoring is not None and machine.state not in ("idle", "enrolling") and not machine.tracker.alerting:
            self._set_state(machine, "idle", "machine not running (sounds like the enrolled site noise)")

    @staticmethod
    def _enrolling_noise(machine: Machine) -> bool:
        session = machine.session
        return session is not None and session.condition == NOISE_CONDITION

    def _score(self, machine: Machine, scoring: Scoring, embeddings: dict[str, np.ndarray], samples, rate: int,
               start: float, end: float) -> float:
        detector, tracker = scoring.detector, machine.tracker
        raw, conditions = detector.raw_scores(embeddings)
        scores = {name: float(values[0]) for name, values in raw.items()}
        ranks = {name: scoring.references[name].rank(score) for name, score in scores.items()}
        fused = float(detector.fuse({name: [rank] for name, rank in ranks.items()})[0])
        backbones = {name: BackboneScore(scores[name], ranks[name]) for name in scores}
        anomalous = tracker.is_anomalous(fused)
        transition = tracker.update(start, end, fused)
        # Only clearly normal windows teach the reference: a window between the clear and the
        # raise threshold may be a fault building up, and learning it would hide the fault.
        if fused < self.config.alerts.clear_threshold and not tracker.alerting:
            for name, score in scores.items():
                scoring.references[name].add(score)
        self.telemetry.window(machine.name, "ok")
        self.telemetry.set_ranks(machine.name, fused, backbones)
        self._publish_score(ScoreMessage(self.topics.site, machine.name, iso_time(start), iso_time(end), "ok",
                                         fused, anomalous, backbones))
        windows.info("%-12s %s  fused %.3f%s  %s", machine.name, iso_time(start)[11:19], fused,
                     " ANOMALOUS" if anomalous else "",
                     "  ".join(f"{n} {r.rank:.3f} ({r.score:.3g})" for n, r in backbones.items()))
        if transition is not None:
            self._alert(machine, transition, fused, backbones, conditions[0], samples, rate)
        elif not tracker.alerting and machine.state not in ("normal", "enrolling"):
            self._set_state(machine, "normal")
        return fused

    # ------------------------------------------------------- live enrollment
    def command(self, machine_name: str, payload: bytes) -> dict:
        """An enrollment command from the control socket or MQTT; validated completely before
        anything changes, answered with a reply dict either way."""
        machine = next((m for m in self.machines if m.name == machine_name), None)
        try:
            if machine is None:
                raise CommandError(f"unknown machine {machine_name!r}")
            self._check_token(payload)
            cmd = parse_command(payload, self.config.enrollment)
            reply = self._apply(machine, cmd)
        except CommandError as exc:
            log.warning("command for %s refused: %s", machine_name, exc)
            return {"ok": False, "machine": machine_name, "error": str(exc)}
        self.events.write("command", machine=machine_name, reply=reply)
        return reply

    def _check_token(self, payload: bytes) -> None:
        path = self.config.mqtt.command_token_file
        if path is None:
            return
        try:
            token = json.loads(payload).get("token")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return  # parse_command reports the malformed payload
        if not isinstance(token, str) or not hmac.compare_digest(token, path.read_text().strip()):
            raise CommandError("missing or wrong token")

    def _apply(self, machine: Machine, cmd: Command) -> dict:
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
            return self._finish_enrollment(machine) | {"action": "stop", "request_id": cmd.request_id}
        if cmd.action == "start":
            self._set_state(machine, "enrolling", f"condition {cmd.condition}, {cmd.duration_s:g} s")
        elif cmd.action == "cancel":
            self.telemetry.enrollment(machine.name, 0.0)
            self._set_state(machine, "normal" if machine.scoring else "idle", "enrollment cancelled")
        return {"ok": True, "machine": machine.name, "action": cmd.action, "request_id": cmd.request_id,
                "session": session.summary()}

    def _enroll_window(self, machine: Machine, start: float, embeddings: dict | None, fused: float | None,
                       level: float, fault: str | None = None) -> None:
        with machine.session_lock:
            session = machine.session
            if session is None:
                return
            session.advance(self.config.daemon.hop_seconds)
            if fault == "idle":
                session.excluded_idle += 1
                result = "idle"
            elif fault is not None:
                session.excluded_faults += 1
                result = "sensor_fault"
            elif fused is not None and fused > self.config.enrollment.outlier_rank:
                session.excluded_outliers += 1
                result = "outlier"
            else:
                item = BankItem(f"live:{machine.name}", start, session.condition,
                                iso_time(time.time()), level, machine.source.sample_rate)
                session.accept(item, {n: e[:1] for n, e in embeddings.items()})
                result = "accepted"
            done = session.done
        self.telemetry.enrollment(machine.name, session.progress, result)
        if done:
            self._finish_enrollment(machine)

    def _finish_enrollment(self, machine: Machine) -> dict:
        """Save the session's windows as a new bank version (or refuse) and switch to it."""
        with machine.session_lock:
            session, machine.session = machine.session, None
        if session is None:  # finished by the worker a moment ago
            return {"ok": False, "machine": machine.name, "error": "no enrollment is running"}
        self.telemetry.enrollment(machine.name, 0.0)
        summary = session.summary()
        minimum = self.config.enrollment.min_windows
        if session.accepted < minimum:
            error = (f"only {session.accepted} clean window(s) (need {minimum}; excluded: "
                     f"{session.excluded_faults} sensor faults, {session.excluded_outliers} outliers): nothing saved")
            log.error("%s: enrollment refused: %s", machine.name, error)
            self.events.write("enrollment_failed", machine=machine.name, error=error, session=summary)
            self._set_state(machine, "normal" if machine.scoring else "idle", "enrollment refused")
            return {"ok": False, "machine": machine.name, "error": error, "session": summary}
        try:
            try:
                bank = machine.store.load()
            except BankNotFound:
                bank = Bank()
            model_ids = {b.name: b.meta.model_id for b in self.backbones}
            version = machine.store.save(bank.add(session.items, session.stacked(), model_ids),
                                         note=f"live enrollment, condition {session.condition}, {session.accepted} windows")
        except BankError as exc:
            self.events.write("enrollment_failed", machine=machine.name, error=str(exc), session=summary)
            return {"ok": False, "machine": machine.name, "error": str(exc), "session": summary}
        self.events.write("enrolled", machine=machine.name, version=version, session=summary)
        self._set_state(machine, "normal", f"enrolled {version}")
        self._reload_bank(machine)
        return {"ok": True, "machine": machine.name, "version": version, "session": summary}

    def _on_mqtt_command(self, topic: str, payload: bytes) -> None:
        """paho's thread: hand the command over and return at once."""
        parts = topic.split("/")
        if len(parts) != 5 or parts[3] != "cmd" or parts[4] != "enroll":
            log.warning("ignoring command on %s", topic)
            return
        machine = parts[2]
        threading.Thread(target=self._reply_mqtt, args=(machine, payload), name="command", daemon=True).start()

    def _reply_mqtt(self, machine: str, payload: bytes) -> None:
        reply = self.command(machine, payload)
        self.publisher.publish_volatile(self.topics.reply(machine), json.dumps(reply))

    def _check_schedule(self) -> None:
        now = datetime.now()
        for i, entry in enumerate(self.config.enrollment.schedule):
            today = now.date().isoformat()
            if now.strftime("%H:%M") == entry.daily_at and self._scheduled.get(i) != today:
                self._scheduled[i] = today
                payload = json.dumps({"action": "start", "duration_s": entry.duration_seconds,
                                      "condition": entry.condition}).encode()
                log.info("scheduled enrollment of %s: %s", entry.machine, self.command(entry.machine, payload))

    def _alert(self, machine: Machine, transition: Transition, fused: float,
               backbones: dict[str, BackboneScore], condition: str, samples, rate: int) -> None:
        clip, clip_error = None, None
        if transition.type == "raise":
            try:
                saved = self.clips.save(machine.name, transition.end - len(samples) / rate, samples, rate)
                clip, clip_error = (str(saved.path) if saved.path else None), saved.error
            except Exception as exc:  # noqa: BLE001 - the alert goes out whatever happened to its clip
                log.exception("%s: saving the alert's clip failed", machine.name)
                clip_error = f"clip not saved: {type(exc).__name__}: {exc}"
        event = AlertEvent(transition.event_id, transition.type, self.topics.site, machine.name,
                           iso_time(transition.start), iso_time(transition.end), fused,
                           self.config.alerts.threshold, backbones, condition, clip, clip_error)
        self.telemetry.alert(machine.name, transition.type)
        self.events.write("alert", **{"alert": event})
        if self.publisher is not None:
            self.publisher.publish_reliable(self.topics.alert(machine.name), event.to_json())
        console.warning("%-12s ALERT %s %s (fused rank %.3f)%s", machine.name, transition.type.upper(),
                        transition.event_id, fused, f", clip {clip}" if clip else f", no clip: {clip_error}")
        if transition.type == "raise":
            self._set_state(machine, "alert", f"fused rank {fused:.3f}", transition.event_id)
        else:
            self._set_state(machine, "normal", f"cleared {transition.event_id}")

    def _sensor_fault(self, machine: Machine, start: float, end: float, faults: list[str], level: float) -> None:
        self.telemetry.window(machine.name, "sensor_fault")
        for fault in faults:
            self.telemetry.sensor_fault(machine.name, fault)
        self._publish_score(ScoreMessage(self.topics.site, machine.name, iso_time(start), iso_time(end),
                                         "sensor_fault", None, False, faults=faults))
        console.warning("%-12s %s  SENSOR FAULT %s (level %.1f dBFS)", machine.name, iso_time(start)[11:19],
                        ",".join(faults), level)
        if machine.state != "sensor_fault":
            self.events.write("sensor_fault", machine=machine.name, faults=faults, level_dbfs=level,
                              start=iso_time(start))
            self._set_state(machine, "sensor_fault", ",".join(faults))

    # ------------------------------------------------------------- outputs
    def _publish_score(self, message: ScoreMessage) -> None:
        if self.publisher is not None and self.config.mqtt.publish_scores:
            self.publisher.publish_volatile(self.topics.score(message.machine), message.to_json())

    def _set_state(self, machine: Machine, state: str, detail: str = "", event_id: str | None = None) -> None:
        if machine.tracker.alerting and state not in ("alert", "sensor_fault"):
            event_id = machine.tracker.open_event
            state = "alert"
        if state == machine.state:
            return
        machine.state = state
        self.telemetry.set_state(machine.name, state)
        message = StateMessage(self.topics.site, machine.name, state, iso_time(time.time()), detail, event_id)
        if self.events is not None:
            self.events.write("state", machine=machine.name, state=state, detail=detail)
        if self.publisher is not None:
            self.publisher.publish_reliable(self.topics.state(machine.name), message.to_json(), retain=True)
        log.info("%s: state %s (%s)", machine.name, state, detail)

    # ---------------------------------------------------------------- running
    def replay_finished(self) -> bool:
        """True once every source is a file replay that has ended and every window is done."""
        sources = list(self.sources.values())
        return (bool(sources) and all(isinstance(s, FileSource) and s.finished.is_set() for s in sources)
                and not any(t.is_alive() for t in self._threads if t.name.startswith("windows-"))
                and self.queue.unfinished_tasks == 0)

    def run(self) -> None:
        """Block until a stop is requested or every replayed file is done; meanwhile report
        device faults, follow bank versions switched by `asd-monitor bank` or enrollment,
        reload on SIGHUP, and keep systemd's status line current."""
        last_status = last_bank_check = 0.0
        while not self.stop_event.wait(STOP_POLL_SECONDS):
            self._check_devices()
            self._check_schedule()
            now = time.monotonic()
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            elif now - last_bank_check >= BANK_CHECK_SECONDS:
                last_bank_check = now
                self._follow_banks()
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
        return f"{self.windows_processed} windows; {states}{mqtt}"

    def _follow_banks(self) -> None:
        for machine in self.machines:
            try:
                current = machine.store.current()
            except BankError as exc:
                log.error("%s: %s", machine.name, exc)
                continue
            if current is not None and current != machine.bank_version:
                self._reload_bank(machine)

    def _reload_bank(self, machine: Machine) -> None:
        """Switch to the bank's current version; a bad version leaves the good one in use."""
        try:
            self._load_bank(machine)
        except (BankError, BackboneError, FusionError, KnnError) as exc:
            log.error("%s: keeping bank %s: %s", machine.name, machine.bank_version, exc)
            self.events.write("bank_error", machine=machine.name, error=str(exc), kept=machine.bank_version)
        except Exception:  # noqa: BLE001 - the main loop must survive whatever a bank holds
            log.exception("%s: keeping bank %s after an unexpected error", machine.name, machine.bank_version)

    def reload(self) -> None:
        """SIGHUP: re-read the config file and every bank, without stopping the audio.

        Thresholds, scoring, fusion, sensor and clip settings apply at once; a changed
        backbone, source, machine, MQTT or metrics section needs a restart (logged). An
        invalid file is reported and the running config kept.
        """
        self.notifier.reloading()
        if self.config_path is not None:
            try:
                new = load_config(self.config_path)
            except ConfigError as exc:
                log.error("reload: %s; keeping the running configuration", exc)
                self.events.write("reload_error", error=str(exc))
                new = self.config
            fixed = [key for key in RESTART_KEYS if getattr(new, key) != getattr(self.config, key)]
            if fixed:
                log.warning("reload: changes to %s need a restart; applying the rest", ", ".join(fixed))
                new = replace(new, **{key: getattr(self.config, key) for key in fixed})
            self.config = new
            self.clips = ClipStore(self.state_dir / "clips", new.clips)
        for machine in self.machines:
            machine.tracker.config = self.config.alerts
            self._reload_bank(machine)
        self.events.write("reloaded")
        self.notifier.ready(self.status_line())

    def _check_devices(self) -> None:
        """A dead device delivers no windows, so its fault must be reported from here."""
        for machine in self.machines:
            error = machine.source.error
            if error and machine.state != "sensor_fault" and isinstance(machine.source, MicrophoneSource):
                self.telemetry.sensor_fault(machine.name, "device")
                self.events.write("sensor_fault", machine=machine.name, faults=["device"], detail=error)
                self._set_state(machine, "sensor_fault", f"device: {error}")

    def stop(self) -> None:
        self.notifier.stopping()
        self.stop_event.set()
        for source in self.sources.values():
            source.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        if self.control is not None:
            self.control.stop()
        if self.publisher is not None:
            self.publisher.stop()
        self.telemetry.stop()
        if self.events is not None:
            self.events.write("stopped", windows=self.windows_processed)
            self.events.close()
        log.info("stopped after %d windows", self.windows_processed)

