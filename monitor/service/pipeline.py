"""One window of one machine through every stage:

    sensor checks -> embed -> KNN distance -> rank -> fuse -> (idle?) -> alert state -> outputs

A window with a sensor fault is reported and never scored (a dead microphone is not "normal");
a window that sounds like the enrolled site noise is ``idle`` (machine stopped: no verdict).
Each stage's time is measured and handed on with the window's report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from monitor.audio.files import Audio
from monitor.audio.sensor import check_window
from monitor.config import Config
from monitor.outputs.fanout import Outputs, WindowReport
from monitor.scoring.detector import Detector
from monitor.scoring.live import LiveScorer, WindowScore
from monitor.service.enrolling import LiveEnrollment
from monitor.service.machine import Machine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueuedWindow:
    machine: Machine
    start: float  # epoch seconds of the window's first sample
    samples: np.ndarray  # [window frames] of the machine's channel
    ready: float  # time.monotonic() when the window's last sample was available


class Pipeline:
    """``models`` embeds (its backbones are shared by every machine); each machine's own
    ``LiveScorer`` scores."""

    def __init__(self, config: Config, models: Detector, outputs: Outputs, enrollment: LiveEnrollment) -> None:
        self.config = config
        self.models = models
        self.outputs = outputs
        self.enrollment = enrollment

    def process(self, item: QueuedWindow) -> WindowReport:
        began = time.monotonic()
        machine = item.machine
        rate = machine.source.sample_rate
        samples, start = item.samples, item.start
        end = start + len(samples) / rate
        scorer = machine.scorer  # read once: a bank switch replaces it whole
        clock = _Stopwatch()
        report = check_window(samples, rate, self.config.sensor, scorer.level_dbfs if scorer else None)
        faults = list(report.faults) + (["device"] if machine.source.error else [])
        clock.lap("sensor")
        score = None
        if faults:
            self._sensor_fault(machine, start, end, faults, report.rms_dbfs)
            self.enrollment.window(machine, start, None, None, report.rms_dbfs, "sensor_fault")
            status = "sensor_fault"
        elif scorer is None:
            status = "idle"
            self._idle(machine, start, end)
            if machine.session is not None:  # the first enrollment of a machine without a bank
                embeddings = self._embed(samples, rate, machine, clock)
                self.enrollment.window(machine, start, embeddings, None, report.rms_dbfs)
        else:
            embeddings = self._embed(samples, rate, machine, clock, scorer)
            score = scorer.score(embeddings)
            clock.lap("score")
            noise = self.enrollment.enrolling_noise(machine)
            if noise or score.idle:
                # The machine is stopped: nothing to judge (and site noise being enrolled must
                # not raise an alarm against the machine's own bank).
                status = "idle"
                self._idle(machine, start, end)
                self.enrollment.window(machine, start, embeddings, None, report.rms_dbfs, None if noise else "idle")
            else:
                status = "ok"
                self._judge(machine, scorer, score, samples, rate, start, end)
                self.enrollment.window(machine, start, embeddings, score.fused, report.rms_dbfs)
        clock.lap("outputs")
        done = WindowReport(machine.name, start, end, status, item.ready, began, time.monotonic(),
                            score if status == "ok" else None, tuple(faults), clock.laps, clock.inference)
        self.outputs.window_done(done)
        return done

    def _embed(self, samples: np.ndarray, rate: int, machine: Machine, clock: _Stopwatch,
               scorer: LiveScorer | None = None) -> dict[str, np.ndarray]:
        # Every output of the models while enrolling (a bank keeps them all), and for a bank that
        # holds only the file's own embedding (``Detector.falls_back``); one run either way.
        features = machine.session is not None or (scorer is not None and scorer.detector.falls_back)
        embedded = self.models.embed(Audio(samples, rate, machine.name), features=features)
        clock.lap("embed")
        clock.inference = embedded.inference_seconds
        return embedded.embeddings

    def _judge(self, machine: Machine, scorer: LiveScorer, score: WindowScore, samples: np.ndarray, rate: int,
               start: float, end: float) -> None:
        """The alert stage: anomalous or not, raise or clear, and what the reference learns."""
        tracker = machine.tracker
        anomalous = tracker.is_anomalous(score.fused)
        # CUSUM caps a rank by the reference's resolution (the coarsest backbone's) and turns
        # its false-alarm target in days into windows at the hop.
        transition = tracker.update(start, end, score.fused, hop_seconds=self.config.daemon.hop_seconds,
                                    reference_size=min(len(r) for r in scorer.references.values()))
        # Only clearly normal windows teach the reference: a window between the clear and the
        # raise threshold may be a fault building up, and learning it would hide the fault.
        if score.fused < self.config.alerts.clear_threshold and not tracker.alerting:
            scorer.learn(score)
        self.outputs.scored(machine.name, start, end, score, anomalous)
        # Severity and health (never an alert): both ride on the retained state message, so they
        # are updated first and a state change in this window carries them in its one message.
        health = machine.health.update(end, score.fused, anomalous)
        self.outputs.health_trend(machine.name, health.anomalous_ratio_1h, health.anomalous_ratio_24h, health.rank_ewma)
        severity = machine.severity.update(score.fused, tracker.alerting, self.config.alerts)
        if severity is not None:
            self.outputs.severity(machine.name, severity)
        before = machine.state
        if transition is not None:
            self.outputs.alert(machine.name, transition.type, transition.event_id, transition.start, transition.end,
                               score, samples, rate, transition.rule, machine.severity.level)
            if transition.type == "raise":
                machine.set_state("alert", f"fused rank {score.fused:.3f}", transition.event_id)
            else:
                machine.set_state("normal", f"cleared {transition.event_id}")
        elif not tracker.alerting and machine.state not in ("normal", "enrolling"):
            machine.set_state("normal")
        if machine.state == before:  # no state message went out in this window
            machine.set_severity(severity)
        machine.health_moved(end)

    def _idle(self, machine: Machine, start: float, end: float) -> None:
        self.outputs.idle(machine.name, start, end)
        if machine.scorer is not None and machine.state not in ("idle", "enrolling") and not machine.tracker.alerting:
            machine.set_state("idle", "machine not running (sounds like the enrolled site noise)")

    def _sensor_fault(self, machine: Machine, start: float, end: float, faults: list[str], level: float) -> None:
        new = machine.state != "sensor_fault"
        self.outputs.sensor_fault(machine.name, start, end, faults, level, new)
        if new:
            machine.set_state("sensor_fault", ",".join(faults))


class _Stopwatch:
    """Seconds spent in each stage of one window."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.inference: dict[str, float] = {}  # per backbone: its onnxruntime calls within "embed"
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = self.laps.get(stage, 0.0) + now - self._last
        self._last = now
