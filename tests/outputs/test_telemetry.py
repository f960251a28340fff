"""Tests of monitor.outputs.telemetry: the real HTTP endpoint, every metric's value, promtool's lint."""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor import __version__
from monitor.audio.sensor import FAULTS as SENSOR_FAULTS
from monitor.errors import TelemetryError
from monitor.outputs.messages import MACHINE_STATES, BackboneScore
from monitor.outputs.telemetry import Telemetry


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    t = Telemetry()
    t.serve("127.0.0.1", 0)
    yield t
    t.stop()


def _scrape(t: Telemetry) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{t.port}/metrics", timeout=5) as response:
        assert response.status == 200
        return response.read().decode("utf-8")


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _drive(t: Telemetry) -> None:
    """Every metric at least once, as the daemon would."""
    t.add_machine("press-1", ["aisfx", "logmel"])
    t.add_machine("pump-2")
    for status in ("ok", "ok", "ok", "sensor_fault", "idle", "dropped"):
        t.window("press-1", status)
    t.alert("press-1", "raise")
    t.alert("press-1", "clear")
    t.alert("press-1", "raise")
    t.set_ranks("press-1", 0.995, {"aisfx": BackboneScore(12.5, 0.999), "logmel": BackboneScore(3.1, 0.97)})
    t.observe_inference("aisfx", 0.2)
    t.observe_inference("aisfx", 0.004)
    t.observe_inference("logmel", 40.0)
    t.observe_latency("press-1", 0.75)
    t.set_queue_depth(3)
    t.audio_overflow("line-in")
    t.audio_overflow("line-in", 2)
    for fault in SENSOR_FAULTS:
        t.sensor_fault("pump-2", fault)
    t.sensor_fault("pump-2", "clipping")
    t.set_bank("press-1", "v000001", {"aisfx": 100, "logmel": 100})
    t.set_bank("press-1", "v000002", {"aisfx": 140, "logmel": 140})
    t.set_mqtt_connected(True)
    t.set_mqtt_outbox(7)
    t.mqtt_published()
    t.mqtt_published(4)
    t.set_state("press-1", "normal")
    t.set_state("press-1", "alert")
    t.set_state("pump-2", "sensor_fault")
    t.set_severity("press-1", "warning")
    t.set_health_trend("press-1", 0.25, 0.05, 0.62)


def test_every_metric_over_http(telemetry: Telemetry) -> None:
    _drive(telemetry)
    s = _samples(_scrape(telemetry))

    (build,) = [labels for name, labels in s if name == "asd_build_info"]
    build = dict(build)
    assert build["version"] == __version__ and build["python"].count(".") == 2 and build["onnxruntime"]
    assert _value(s, "asd_windows_total", machine="press-1", status="ok") == 3
    assert _value(s, "asd_windows_total", machine="press-1", status="dropped") == 1
    assert _value(s, "asd_windows_total", machine="pump-2", status="ok") == 0  # created at add_machine
    assert _value(s, "asd_windows_dropped_total", machine="press-1") == 1
    assert _value(s, "asd_windows_dropped_total", machine="pump-2") == 0
    assert _value(s, "asd_alerts_total", machine="press-1", type="raise") == 2
    assert _value(s, "asd_alerts_total", machine="press-1", type="clear") == 1
    assert _value(s, "asd_anomaly_rank_ratio", machine="press-1") == pytest.approx(0.995)
    assert _value(s, "asd_backbone_rank_ratio", machine="press-1", backbone="aisfx") == pytest.approx(0.999)
    assert _value(s, "asd_backbone_rank_ratio", machine="press-1", backbone="logmel") == pytest.approx(0.97)
    assert _value(s, "asd_inference_seconds_count", backbone="aisfx") == 2
    assert _value(s, "asd_inference_seconds_sum", backbone="aisfx") == pytest.approx(0.204)
    assert _value(s, "asd_inference_seconds_bucket", backbone="aisfx", le="0.005") == 1
    assert _value(s, "asd_inference_seconds_bucket", backbone="aisfx", le="30.0") == 2
    assert _value(s, "asd_inference_seconds_bucket", backbone="logmel", le="30.0") == 0
    assert _value(s, "asd_inference_seconds_bucket", backbone="logmel", le="+Inf") == 1
    assert _value(s, "asd_window_latency_seconds_count", machine="press-1") == 1
    assert _value(s, "asd_window_latency_seconds_bucket", machine="press-1", le="1.0") == 1
    assert _value(s, "asd_window_latency_seconds_bucket", machine="press-1", le="0.5") == 0
    assert _value(s, "asd_queue_depth") == 3
    assert _value(s, "asd_audio_overflows_total", source="line-in") == 3
    for fault in SENSOR_FAULTS:
        expected = 2 if fault == "clipping" else 1
        assert _value(s, "asd_sensor_faults_total", machine="pump-2", fault=fault) == expected
        assert _value(s, "asd_sensor_faults_total", machine="press-1", fault=fault) == 0
    assert _value(s, "asd_bank_embeddings", machine="press-1", backbone="aisfx") == 140
    assert _value(s, "asd_bank_version_info", machine="press-1", version="v000002") == 1
    assert ("asd_bank_version_info", frozenset({("machine", "press-1"), ("version", "v000001")})) not in s
    assert _value(s, "asd_mqtt_connected") == 1
    assert _value(s, "asd_mqtt_outbox_messages") == 7
    assert _value(s, "asd_mqtt_published_total") == 5
    for state in MACHINE_STATES:
        assert _value(s, "asd_machine_state", machine="press-1", state=state) == (state == "alert")
        assert _value(s, "asd_machine_state", machine="pump-2", state=state) == (state == "sensor_fault")
    for level in ("ok", "warning", "alarm"):
        assert _value(s, "asd_severity", machine="press-1", level=level) == (level == "warning")
        assert _value(s, "asd_severity", machine="pump-2", level=level) == (level == "ok")  # from add_machine
    assert _value(s, "asd_health_anomalous_ratio", machine="press-1", period="1h") == 0.25
    assert _value(s, "asd_health_anomalous_ratio", machine="press-1", period="24h") == 0.05
    assert _value(s, "asd_health_rank_ewma", machine="press-1") == 0.62
    assert ("asd_health_rank_ewma", frozenset({("machine", "pump-2")})) not in s  # no scored window yet
    assert _value(s, "process_resident_memory_bytes") > 0

    telemetry.set_mqtt_connected(False)
    assert _value(_samples(_scrape(telemetry)), "asd_mqtt_connected") == 0


def test_promtool_lint_is_clean(telemetry: Telemetry) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    _drive(telemetry)
    result = subprocess.run([promtool, "check", "metrics"], input=_scrape(telemetry), capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_registries_are_separate() -> None:
    first, second = Telemetry(), Telemetry()
    first.window("m", "ok")
    assert first.registry is not second.registry
    assert first.registry.get_sample_value("asd_windows_total", {"machine": "m", "status": "ok"}) == 1
    assert second.registry.get_sample_value("asd_windows_total", {"machine": "m", "status": "ok"}) is None


def test_unknown_label_values_are_refused() -> None:
    t = Telemetry()
    with pytest.raises(ValueError, match="window status"):
        t.window("m", "fine")
    with pytest.raises(ValueError, match="machine state"):
        t.set_state("m", "broken")
    with pytest.raises(ValueError, match="sensor fault"):
        t.sensor_fault("m", "loud")
    with pytest.raises(ValueError, match="alert type"):
        t.alert("m", "open")


def test_port_in_use_names_host_and_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t = Telemetry()
        with pytest.raises(TelemetryError) as info:
            t.serve("127.0.0.1", port)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "\n" not in message
    assert t.port is None


def test_stop_frees_the_port() -> None:
    t = Telemetry()
    server, thread = t.serve("127.0.0.1", 0)
    port = t.port
    assert port == server.server_port != 0 and thread.is_alive()
    with pytest.raises(TelemetryError, match=f"127.0.0.1:{port}"):
        t.serve("127.0.0.1", 0)
    t.stop()
    assert not thread.is_alive() and t.port is None
    t.stop()  # a second stop is harmless
    again = Telemetry()
    again.serve("127.0.0.1", port)
    try:
        assert "asd_queue_depth" in _scrape(again)
    finally:
        again.stop()


def test_the_grafana_dashboard_queries_metrics_the_daemon_serves(telemetry: Telemetry) -> None:
    """A renamed metric would leave a dashboard panel silently empty: every ``asd_*`` series a
    panel queries must be in a real scrape, and every panel must have a query."""
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "grafana-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    assert panels and all(p.get("targets") for p in panels), [p.get("title") for p in panels if not p.get("targets")]
    queried = {name for p in panels for t in p["targets"] for name in re.findall(r"\basd_[a-z_]+", t.get("expr", ""))}
    _drive(telemetry)
    served = {name for name, _labels in _samples(_scrape(telemetry))}
    assert queried and queried <= served, sorted(queried - served)
