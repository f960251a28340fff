"""One place that tells the world what happened to a machine.

The pipeline calls ``Outputs`` once per window and once per state change or alert; from here
each fact goes to every output that wants it: MQTT (reliable for alerts and states, volatile
for scores), Prometheus, the JSONL event log, saved clips and the console. Listeners added with
``add_listener`` get a ``WindowReport`` per window: what tests and benchmarks hook into
instead of the daemon's insides.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from monitor.config import AlertRule, Config
from monitor.outputs.clips import ClipStore
from monitor.outputs.events import EventLog
from monitor.outputs.history import ScoreHistory
from monitor.outputs.messages import (
    AlertEvent,
    AlertType,
    BackboneScore,
    HealthMessage,
    MachineState,
    ReviewMessage,
    ScoreMessage,
    Severity,
    StateMessage,
    Topics,
    WindowStatus,
    iso_time,
)
from monitor.outputs.mqtt import Publisher, discovery_payloads
from monitor.outputs.plant import PlantFeed
from monitor.outputs.telemetry import Telemetry
from monitor.review.verdicts import AlertLog, ReviewRecord
from monitor.scoring.live import WindowScore

log = logging.getLogger(__name__)
# Two streams for a person watching, beside each module's own logger (named after the module):
CONSOLE_LOG = "monitor.console"  # alerts and sensor faults
WINDOWS_LOG = "monitor.windows"  # one line per scored window (-v; -vv under systemd)
console = logging.getLogger(CONSOLE_LOG)
windows = logging.getLogger(WINDOWS_LOG)


@dataclass(frozen=True)
class WindowReport:
    """What became of one window, for listeners."""

    machine: str
    start: float  # epoch seconds of its first sample
    end: float
    status: WindowStatus
    ready: float  # time.monotonic() when its last sample was available
    began: float  # time.monotonic() when the worker took it (after waiting in the queue)
    done: float  # time.monotonic() when every output for it had been issued
    score: WindowScore | None = None
    faults: tuple[str, ...] = ()
    stage_seconds: dict[str, float] = field(default_factory=dict)  # sensor, embed, score, outputs
    inference_seconds: dict[str, float] = field(default_factory=dict)  # per backbone, part of embed


WindowListener = Callable[[WindowReport], None]


def backbone_scores(score: WindowScore) -> dict[str, BackboneScore]:
    return {name: BackboneScore(score.raw[name], score.ranks[name]) for name in score.raw}


class Outputs:
    def __init__(self, config: Config, topics: Topics, telemetry: Telemetry, events: EventLog, clips: ClipStore,
                 publisher: Publisher | None = None, history: ScoreHistory | None = None,
                 plant: PlantFeed | None = None) -> None:
        self.config = config
        self.topics = topics
        self.telemetry = telemetry
        self.events = events
        self.clips = clips
        self.publisher = publisher
        self.history = history  # every window's outcome on disk, for the trend plot and reports
        self._listeners: list[WindowListener] = []
        self.plant = plant or PlantFeed()  # each machine's status for the plant protocols (OPC UA, Sparkplug B)
        self._states: dict[str, StateMessage] = {}  # the last state message per machine (re-sent on a verdict)
        self.dropped_windows = 0  # since start, every machine (the daemon's overload check reads it)
        self._drop_lock = threading.Lock()  # windowers and workers drop from their own threads
        if publisher is not None:
            publisher.on_published = telemetry.mqtt_published
            publisher.on_connection_change = self._mqtt_connection

    def add_listener(self, listener: WindowListener) -> None:
        """Call ``listener`` with every window's report (on the worker thread: keep it short)."""
        self._listeners.append(listener)

    def reconfigure(self, config: Config, clips: ClipStore) -> None:
        """A reload: new thresholds and clip settings apply to the next window."""
        self.config, self.clips = config, clips

    def announce_machines(self, names: list[str], backbones: list[str]) -> None:
        """Create every machine's series at zero; publish Home Assistant discovery."""
        self.plant.add_machines(names)
        for name in names:
            self.telemetry.add_machine(name, backbones)
        mqtt = self.config.mqtt
        if self.publisher is not None and mqtt.homeassistant_discovery:
            # Buttons answer the last alert by command: never with the token in a retained payload.
            buttons = mqtt.commands and (mqtt.command_token_file is None or mqtt.homeassistant_token_entity is not None)
            if mqtt.commands and not buttons:
                log.warning("Home Assistant gets no review buttons: commands need the token from "
                            "mqtt.command_token_file, and mqtt.homeassistant_token_entity names no entity holding it")
            for name in names:
                for topic, payload in discovery_payloads(self.topics, name, mqtt.discovery_prefix, buttons=buttons,
                                                         token_entity=mqtt.homeassistant_token_entity):
                    self.publisher.publish_reliable(topic, payload, retain=True)

    def event(self, kind: str, **fields: Any) -> None:
        """A line in the event log (started, reloaded, commands, enrollments, ...)."""
        self.events.write(kind, **fields)

    # ------------------------------------------------------------ per window
    def scored(self, machine: str, start: float, end: float, score: WindowScore, anomalous: bool) -> None:
        backbones = backbone_scores(score)
        self.telemetry.window(machine, "ok")
        self.telemetry.set_ranks(machine, score.fused, backbones)
        self._record(machine, end, "ok", score.fused, anomalous)
        self.plant.update(machine, fused_rank=score.fused, anomalous=anomalous, window_end=iso_time(end), sensor_fault="")
        self._publish_score(ScoreMessage(self.topics.site, machine, iso_time(start), iso_time(end), "ok",
                                         score.fused, anomalous, backbones))
        windows.info("%-12s %s  fused %.3f%s  %s", machine, iso_time(start)[11:19], score.fused,
                     " ANOMALOUS" if anomalous else "",
                     "  ".join(f"{n} {r.rank:.3f} ({r.score:.3g})" for n, r in backbones.items()))

    def idle(self, machine: str, start: float, end: float) -> None:
        """A window without an anomaly decision: no bank yet, or the machine is stopped."""
        self.telemetry.window(machine, "idle")
        self._record(machine, end, "idle", None, False)
        self.plant.update(machine, window_end=iso_time(end), sensor_fault="")
        self._publish_score(ScoreMessage(self.topics.site, machine, iso_time(start), iso_time(end), "idle", None, False))

    def sensor_fault(self, machine: str, start: float, end: float, faults: list[str], level: float,
                     new: bool) -> None:
        """A faulty window; ``new`` when the machine was not in a sensor fault before it."""
        self.telemetry.window(machine, "sensor_fault")
        self._record(machine, end, "sensor_fault", None, False)
        for fault in faults:
            self.telemetry.sensor_fault(machine, fault)
        self.plant.update(machine, window_end=iso_time(end), sensor_fault=",".join(faults))
        self._publish_score(ScoreMessage(self.topics.site, machine, iso_time(start), iso_time(end),
                                         "sensor_fault", None, False, faults=faults))
        console.warning("%-12s %s  SENSOR FAULT %s (level %.1f dBFS)", machine, iso_time(start)[11:19],
                        ",".join(faults), level)
        if new:
            self.events.write("sensor_fault", machine=machine, faults=faults, level_dbfs=level, start=iso_time(start))

    def device_fault(self, machine: str, error: str) -> None:
        """A dead input delivers no windows: its fault is reported without one."""
        self.telemetry.sensor_fault(machine, "device")
        self.plant.update(machine, sensor_fault="device")
        self.events.write("sensor_fault", machine=machine, faults=["device"], detail=error)

    def dropped(self, machine: str, start: float | None = None) -> None:
        """A window lost unscored because processing fell behind the audio."""
        with self._drop_lock:
            self.dropped_windows += 1
        self.telemetry.window(machine, "dropped")
        if start is not None:
            log.warning("%s: processing fell behind, dropped the window at %s", machine, iso_time(start))

    def window_done(self, report: WindowReport) -> None:
        """Every output for a window is issued: its latency, the outbox depth, listeners."""
        self.telemetry.observe_latency(report.machine, report.done - report.ready)
        for backbone, seconds in report.inference_seconds.items():
            self.telemetry.observe_inference(backbone, seconds)
        if self.publisher is not None:
            self.telemetry.set_mqtt_outbox(self.publisher.outbox_depth)
        for listener in self._listeners:
            listener(report)

    # ------------------------------------------------------------ transitions
    def alert(self, machine: str, kind: AlertType, event_id: str, start: float, end: float, score: WindowScore,
              samples: np.ndarray, rate: int, rule: AlertRule = "n_of_m", severity: Severity | None = None) -> AlertEvent:
        """An alert raised or cleared (``start``: the episode's first anomalous window, ``end``:
        the end of the window that decided; ``rule``: the rule that raised it; ``severity``: the
        machine's level after it, by default alarm on a raise and ok on a clear). A raise saves
        the deciding window's clip first; the alert goes out whatever happened to the clip."""
        clip, clip_error = None, None
        if kind == "raise":
            try:
                saved = self.clips.save(machine, end - len(samples) / rate, samples, rate)
                clip, clip_error = (str(saved.path) if saved.path else None), saved.error
            except Exception as exc:
                log.exception("%s: saving the alert's clip failed", machine)
                clip_error = f"clip not saved: {type(exc).__name__}: {exc}"
        event = AlertEvent(event_id, kind, self.topics.site, machine, iso_time(start), iso_time(end), score.fused,
                           self.config.alerts.threshold, backbone_scores(score), score.condition, clip, clip_error, rule,
                           severity or ("alarm" if kind == "raise" else "ok"))
        # The outbox first: once there (fsynced) the alert reaches the broker whatever happens to
        # this process; logged first, a kill -9 in between would leave an alert no broker hears of.
        if self.publisher is not None:
            self.publisher.publish_reliable(self.topics.alert(machine), event.to_json())
        self.telemetry.alert(machine, kind)
        self.plant.alert(event)
        self.events.write("alert", alert=event)
        console.warning("%-12s ALERT %s %s (%s, fused rank %.3f)%s", machine, kind.upper(), event_id, rule, score.fused, f", clip {clip}" if clip else f", no clip: {clip_error}")
        return event

    def state(self, machine: str, state: MachineState, detail: str, event_id: str | None, *,
              severity: Severity = "ok", health: Mapping[str, float | None] | None = None, since: float | None = None,
              change: str = "state") -> None:
        """A machine's state message, retained on MQTT. ``change`` says why it goes out: a new
        state (also in the metrics, the event log and the journal), or the same state again with
        a new ``severity`` or new ``health`` figures (those are reported by :meth:`severity` and
        :meth:`health_trend`). ``since``: when the state began (default now)."""
        self.plant.update(machine, state=state, detail=detail)
        if change == "state":
            self.telemetry.set_state(machine, state)
            self.events.write("state", machine=machine, state=state, detail=detail)
            log.info("%s: state %s (%s)", machine, state, detail)
        if self.publisher is not None:
            message = StateMessage(self.topics.site, machine, state, iso_time(time.time() if since is None else since),
                                   detail, event_id, severity, dict(health or {}), self._last_alert(machine))
            self._states[machine] = message
            self.publisher.publish_reliable(self.topics.state(machine), message.to_json(), retain=True)

    def _last_alert(self, machine: str) -> dict[str, str]:
        status = self.plant.snapshot().get(machine)
        if status is None or not status.alert_event_id:
            return {}
        return {"event_id": status.alert_event_id, "type": status.alert_type, "time": status.alert_time,
                "verdict": status.verdict}

    def recall_alerts(self, logged: AlertLog, reviews: list[ReviewRecord]) -> None:
        """At start: each machine's latest alert, its clear and its verdict from the event log and
        the reviews, so the state message names it before the next alert."""
        verdicts = {r.event_id: r.verdict for r in reviews}
        latest = {a.machine: a for a in logged.raises}  # oldest first: the last one wins
        for machine, alert in latest.items():
            cleared = logged.clears.get(alert.event_id)
            self.plant.update(machine, alert_event_id=alert.event_id, alert_type="clear" if cleared else "raise",
                              alert_time=cleared or alert.end, verdict=verdicts.get(alert.event_id, ""))

    def severity(self, machine: str, level: Severity) -> None:
        """A machine's new severity level: in the metrics, the event log and the journal (the
        machine re-sends its state message with it; a level change never raises an alert)."""
        self.telemetry.set_severity(machine, level)
        self.plant.update(machine, severity=level)
        self.events.write("severity", machine=machine, severity=level)
        log.log(logging.WARNING if level == "warning" else logging.INFO, "%s: severity %s", machine, level)

    def health_trend(self, machine: str, anomalous_1h: float | None, anomalous_24h: float | None,
                     rank_ewma: float | None) -> None:
        """A machine's health figures after a scored window (monitor/service/health.py): the gauges."""
        self.telemetry.set_health_trend(machine, anomalous_1h, anomalous_24h, rank_ewma)
        self.plant.update(machine, anomalous_1h=anomalous_1h, anomalous_24h=anomalous_24h, rank_ewma=rank_ewma)

    def health(self, message: HealthMessage) -> None:
        """Whether the daemon keeps up: retained on MQTT, in the metrics, the event log and
        the journal (a degraded daemon is a warning: machines go partly unwatched)."""
        degraded = message.status == "degraded"
        self.telemetry.set_health(degraded, message.capacity_machines)
        self.events.write("health", status=message.status, reason=message.reason)
        if self.publisher is not None:
            self.publisher.publish_reliable(self.topics.health(), message.to_json(), retain=True)
        log.log(logging.WARNING if degraded else logging.INFO, "daemon %s%s", message.status,
                f": {message.reason}" if message.reason else "")

    def review(self, message: ReviewMessage) -> None:
        """A person's verdict on an alert, applied by this daemon: counted, in the event log and
        on MQTT (reliable, not retained: each verdict is news once, like an alert)."""
        self.telemetry.review(message.machine, message.verdict)
        self.plant.review(message)
        last, now = self._states.get(message.machine), self._last_alert(message.machine)
        if self.publisher is not None and last is not None and last.last_alert != now:
            self.publisher.publish_reliable(self.topics.state(message.machine), replace(last, last_alert=now).to_json(),
                                            retain=True)
        self.events.write("review", machine=message.machine, event_id=message.event_id, verdict=message.verdict,
                          condition=message.condition, note=message.note, who=message.who, version=message.version)
        if self.publisher is not None:
            self.publisher.publish_reliable(self.topics.review(message.machine), message.to_json())
        console.warning("%-12s REVIEW %s %s (%s)%s", message.machine, message.event_id, message.verdict.upper(),
                        message.who, f", bank {message.version}" if message.version else "")

    def bank(self, machine: str, version: str | None, previous: str | None, embeddings: Mapping[str, int]) -> None:
        """The machine now scores against bank ``version``."""
        self.telemetry.set_bank(machine, version or "", embeddings)
        self.plant.update(machine, bank_version=version or "")
        windows_count = max(embeddings.values(), default=0)
        self.events.write("bank", machine=machine, version=version, previous=previous, windows=windows_count)
        log.info("%s: bank %s in use (%d windows)%s", machine, version, windows_count,
                 f", was {previous}" if previous else "")

    # ------------------------------------------------------------ plumbing
    def _record(self, machine: str, end: float, status: WindowStatus, fused: float | None, anomalous: bool) -> None:
        """A window into the score history; a full disk loses trend points, never the window."""
        if self.history is None:
            return
        try:
            self.history.record(machine, end, status, fused, anomalous)
        except OSError as exc:
            log.warning("%s: score history not written: %s", machine, exc)

    def _publish_score(self, message: ScoreMessage) -> None:
        if self.publisher is not None and self.config.mqtt.publish_scores:
            self.publisher.publish_volatile(self.topics.score(message.machine), message.to_json())

    def _mqtt_connection(self, connected: bool) -> None:
        self.telemetry.set_mqtt_connected(connected)
        log.info("MQTT %s %s:%s", "connected to" if connected else "disconnected from",
                 self.config.mqtt.host, self.config.mqtt.port)
