"""Prometheus metrics of the daemon, served on a small HTTP endpoint.

The plant's monitoring stack scrapes ``/metrics`` to see, without reading logs, whether each
machine is being listened to (windows per status, sensor faults, dropped windows), what it
currently sounds like (rank gauges, state), and whether alerts can reach anyone (MQTT link and
outbox). Every metric lives in a registry owned by one :class:`Telemetry`, never the process-wide
default, so tests and several daemons in one process never collide. Label values are checked
against fixed sets where the set is known, because a typo would otherwise silently create a new
series that no dashboard or alert rule looks at.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import threading
from collections.abc import Iterable, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    start_http_server,
)

from monitor import __version__
from monitor.audio.sensor import FAULTS
from monitor.errors import TelemetryError
from monitor.outputs.messages import (
    ALERT_TYPES,
    MACHINE_STATES,
    SEVERITIES,
    VERDICTS,
    WINDOW_STATUSES,
    BackboneScore,
)

log = logging.getLogger(__name__)

# A window is handled (messages.WINDOW_STATUSES) or dropped unhandled when processing fell behind.
WINDOW_COUNTS = (*WINDOW_STATUSES, "dropped")
ENROLLMENT_RESULTS = ("accepted", "sensor_fault", "outlier", "idle")

# One backbone on one window: a DSP feature takes milliseconds, a CNN on a slow CPU seconds.
INFERENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# End of a window's audio to its result published: all backbones plus queueing; with the
# default 10 s hop, anything near or above the hop means the daemon is falling behind.
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r} (allowed: {', '.join(allowed)})")


def _onnxruntime_version() -> str:
    """Version of whichever onnxruntime build is installed, read without importing it (slow)."""
    for distribution in ("onnxruntime", "onnxruntime-gpu"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Telemetry:
    """The daemon's metrics and the methods it calls when something happens.

    Prometheus metric objects are thread-safe, so any daemon thread may call these methods.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._lock = threading.Lock()
        self._bank_versions: dict[str, str] = {}
        self._server: WSGIServer | None = None
        self._endpoint = ""
        self._thread: threading.Thread | None = None

        # Memory, CPU and open files of the daemon itself: a leak shows here weeks before it
        # takes the machine monitoring down. (The default registry would add it; ours must.)
        ProcessCollector(registry=r)
        self._build = Info("asd_build", "Versions of the running monitor, Python and ONNX Runtime.", registry=r)
        self._build.info({"version": __version__, "python": platform.python_version(), "onnxruntime": _onnxruntime_version()})

        self._windows = Counter(
            "asd_windows", "Audio windows handled per machine, by outcome: ok (scored), sensor_fault, idle (machine off), dropped (processing fell behind).",
            ["machine", "status"], registry=r)
        self._alerts = Counter("asd_alerts", "Alerts raised and cleared per machine.", ["machine", "type"], registry=r)
        self._rank = Gauge(
            "asd_anomaly_rank_ratio", "Fused anomaly rank of the last scored window: share of normal audio that scored lower (0..1; anomalous above the alert threshold, 0.99 by default).",
            ["machine"], registry=r)
        self._backbone_rank = Gauge(
            "asd_backbone_rank_ratio", "Anomaly rank of the last scored window for one backbone (0..1).", ["machine", "backbone"], registry=r)
        self._inference = Histogram(
            "asd_inference_seconds", "Time one backbone took to embed and score one window.", ["backbone"], buckets=INFERENCE_BUCKETS, registry=r)
        self._latency = Histogram(
            "asd_window_latency_seconds", "Delay from the end of a window's audio to its result being published.",
            ["machine"], buckets=LATENCY_BUCKETS, registry=r)
        self._queue_depth = Gauge("asd_queue_depth", "Windows waiting to be scored; staying near the queue size means windows will be dropped.", registry=r)
        self._dropped = Counter(
            "asd_windows_dropped", "Windows skipped unscored because processing fell behind the audio (machine not monitored meanwhile).",
            ["machine"], registry=r)
        self._overflows = Counter(
            "asd_audio_overflows", "Audio input overflows per source: samples lost before the daemon saw them.", ["source"], registry=r)
        self._faults = Counter(
            "asd_sensor_faults", "Windows failing a sensor check, by fault (silence, low_level, clipping, dc_offset, nonfinite, dropout, device): check the microphone.",
            ["machine", "fault"], registry=r)
        self._bank_embeddings = Gauge(
            "asd_bank_embeddings", "Normal-sound embeddings enrolled in the machine's current bank, per backbone.", ["machine", "backbone"], registry=r)
        self._bank_version = Gauge(
            "asd_bank_version_info", "Bank version currently used per machine (value 1; the version is the label).", ["machine", "version"], registry=r)
        self._degraded = Gauge(
            "asd_degraded", "1 while the daemon cannot keep up and drops windows (the MQTT health topic says why).", registry=r)
        self._capacity = Gauge(
            "asd_capacity_machines", "Machines this daemon could score at its hop, from the measured time per window and its workers (0 until measured).",
            registry=r)
        self._mqtt_connected = Gauge("asd_mqtt_connected", "1 while connected to the MQTT broker, 0 while alerts can only be queued.", registry=r)
        self._mqtt_outbox = Gauge("asd_mqtt_outbox_messages", "Messages queued for the MQTT broker, not yet acknowledged.", registry=r)
        self._mqtt_published = Counter("asd_mqtt_published", "Messages delivered to the MQTT broker.", registry=r)
        self._state = Gauge(
            "asd_machine_state", "Current state per machine: 1 for the state it is in, 0 for the others.", ["machine", "state"], registry=r)
        self._severity = Gauge(
            "asd_severity", "Current severity per machine: 1 for its level (ok, warning: windows crossing alerts.warning_threshold, alarm: an alert open), 0 for the others.",
            ["machine", "level"], registry=r)
        self._health_ratio = Gauge(
            "asd_health_anomalous_ratio", "Share of scored windows above the alert threshold that ended within the period (1h, 24h), per machine.",
            ["machine", "period"], registry=r)
        self._health_ewma = Gauge(
            "asd_health_rank_ewma", "Exponentially weighted mean of the fused rank per machine, time constant 1 h (0..1).",
            ["machine"], registry=r)
        self._enrollment_progress = Gauge(
            "asd_enrollment_progress_ratio", "Progress of the live enrollment running on a machine (0..1; 0 when none runs).",
            ["machine"], registry=r)
        self._enrollment_windows = Counter(
            "asd_enrollment_windows", "Windows seen by live enrollment: accepted, or excluded for a sensor fault or as an outlier.",
            ["machine", "result"], registry=r)
        self._reviews = Counter(
            "asd_reviews", "Verdicts on alerts applied by this daemon: normal (false alarm, enrolled), fault (confirmed), unsure.",
            ["machine", "verdict"], registry=r)

    def add_machine(self, machine: str, backbones: Iterable[str] = ()) -> None:
        """Create a machine's series at zero and put it in state ``starting``.

        A counter that appears only at its first increment hides that increment from
        ``rate()`` and ``increase()``, so the first sensor fault or alert would go unseen.
        """
        for status in WINDOW_COUNTS:
            self._windows.labels(machine, status)
        for kind in ALERT_TYPES:
            self._alerts.labels(machine, kind)
        for fault in FAULTS:
            self._faults.labels(machine, fault)
        self._dropped.labels(machine)
        self._enrollment_progress.labels(machine).set(0)
        for result in ENROLLMENT_RESULTS:
            self._enrollment_windows.labels(machine, result)
        for verdict in VERDICTS:
            self._reviews.labels(machine, verdict)
        for backbone in backbones:
            self._inference.labels(backbone)
        self.set_state(machine, "starting")
        self.set_severity(machine, "ok")

    def enrollment(self, machine: str, progress: float, result: str | None = None) -> None:
        """Progress of a live enrollment, and one more window's outcome when given."""
        if result is not None:
            if result not in ENROLLMENT_RESULTS:
                raise ValueError(f"unknown enrollment result {result!r} (expected one of {', '.join(ENROLLMENT_RESULTS)})")
            self._enrollment_windows.labels(machine, result).inc()
        self._enrollment_progress.labels(machine).set(progress)

    def window(self, machine: str, status: str) -> None:
        """Count one window; ``dropped`` also counts in ``asd_windows_dropped_total``."""
        _check(status, WINDOW_COUNTS, "window status")
        self._windows.labels(machine, status).inc()
        if status == "dropped":
            self._dropped.labels(machine).inc()

    def alert(self, machine: str, kind: str) -> None:
        """Count an alert ``raise`` or ``clear``."""
        _check(kind, ALERT_TYPES, "alert type")
        self._alerts.labels(machine, kind).inc()

    def review(self, machine: str, verdict: str) -> None:
        """Count one verdict on one of the machine's alerts."""
        _check(verdict, VERDICTS, "verdict")
        self._reviews.labels(machine, verdict).inc()

    def set_ranks(self, machine: str, fused_rank: float, backbones: Mapping[str, BackboneScore]) -> None:
        """Record the ranks of the last scored window (fused and per backbone)."""
        self._rank.labels(machine).set(fused_rank)
        for backbone, score in backbones.items():
            self._backbone_rank.labels(machine, backbone).set(score.rank)

    def observe_inference(self, backbone: str, seconds: float) -> None:
        self._inference.labels(backbone).observe(seconds)

    def observe_latency(self, machine: str, seconds: float) -> None:
        """Record the delay from the end of a window's audio to its published result."""
        self._latency.labels(machine).observe(seconds)

    def set_queue_depth(self, depth: int) -> None:
        self._queue_depth.set(depth)

    def add_source(self, source: str) -> None:
        """Create the source's series at zero, so that ``rate()`` and alerts on overflows work
        before the first one (a series that appears at its first increment loses that one)."""
        self._overflows.labels(source)

    def audio_overflow(self, source: str, count: int = 1) -> None:
        self._overflows.labels(source).inc(count)

    def sensor_fault(self, machine: str, fault: str) -> None:
        _check(fault, FAULTS, "sensor fault")
        self._faults.labels(machine, fault).inc()

    def set_bank(self, machine: str, version: str, embeddings: Mapping[str, int]) -> None:
        """Record the bank a machine now scores against (its version and size per backbone).

        The previous version's series is removed, so only the current version reads 1 and a
        dashboard can join on it without picking the newest by hand.
        """
        with self._lock:
            previous = self._bank_versions.get(machine)
            if previous is not None and previous != version:
                self._bank_version.remove(machine, previous)
            self._bank_versions[machine] = version
            self._bank_version.labels(machine, version).set(1)
        for backbone, count in embeddings.items():
            self._bank_embeddings.labels(machine, backbone).set(count)

    def set_health(self, degraded: bool, capacity_machines: int | None) -> None:
        self._degraded.set(1 if degraded else 0)
        self._capacity.set(capacity_machines or 0)

    def set_mqtt_connected(self, connected: bool) -> None:
        self._mqtt_connected.set(1 if connected else 0)

    def set_mqtt_outbox(self, messages: int) -> None:
        self._mqtt_outbox.set(messages)

    def mqtt_published(self, count: int = 1) -> None:
        self._mqtt_published.inc(count)

    def set_state(self, machine: str, state: str) -> None:
        """Make ``state`` the machine's only state reading 1 (the others read 0)."""
        _check(state, MACHINE_STATES, "machine state")
        for candidate in MACHINE_STATES:
            self._state.labels(machine, candidate).set(1 if candidate == state else 0)

    def set_severity(self, machine: str, level: str) -> None:
        """Make ``level`` the machine's only severity reading 1 (the others read 0)."""
        _check(level, SEVERITIES, "severity")
        for candidate in SEVERITIES:
            self._severity.labels(machine, candidate).set(1 if candidate == level else 0)

    def set_health_trend(self, machine: str, anomalous_1h: float | None, anomalous_24h: float | None,
                         rank_ewma: float | None) -> None:
        """A machine's health figures (a None, before its first scored window, is left out)."""
        for period, value in (("1h", anomalous_1h), ("24h", anomalous_24h)):
            if value is not None:
                self._health_ratio.labels(machine, period).set(value)
        if rank_ewma is not None:
            self._health_ewma.labels(machine).set(rank_ewma)

    @property
    def port(self) -> int | None:
        """The port actually served (the free one picked when asked for port 0), None when not serving."""
        return self._server.server_port if self._server is not None else None

    def serve(self, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
        """Serve ``/metrics`` on host:port in a daemon thread; port 0 picks a free port (see :attr:`port`)."""
        if self._server is not None:
            raise TelemetryError(f"metrics endpoint already served on {self._endpoint}")
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise TelemetryError(f"cannot serve metrics on {_endpoint(host, port)}: {reason}") from exc
        self._server, self._thread = server, thread
        self._endpoint = _endpoint(host, server.server_port)
        log.info("serving metrics on http://%s/metrics", self._endpoint)
        return server, thread

    def stop(self) -> None:
        """Shut the endpoint down and free its port; does nothing when not serving."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        server.server_close()
        thread.join(timeout=5.0)
        self._server = self._thread = None
        log.info("metrics endpoint %s stopped", self._endpoint)
