"""The daemon end to end, with real components: ONNX models, a mosquitto broker on loopback
with an independent subscriber, the Prometheus endpoint checked by promtool, and a microphone
through sounddevice/PortAudio/PulseAudio."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from threadpoolctl import threadpool_info

from monitor.bank.store import BankStore
from monitor.cli import main
from monitor.config import (
    MachineConfig,
    MetricsConfig,
    SourceConfig,
)
from monitor.enrollment.files import enroll_files
from monitor.errors import EXIT_CONFIG
from monitor.scoring.detector import Detector
from monitor.service.daemon import Daemon
from tests.daemons import clips, daemon_config, enroll, run_to_end, write_yaml
from tests.synth import RATE, machine_sound, write_clip

ALERT_FIELDS = {"schema", "event_id", "type", "site", "machine", "start", "end", "fused_rank", "threshold",
                "backbones", "condition", "clip", "clip_error", "rule", "severity"}  # rule, severity: added within asd.alert/1


def alerts_of(received: list[tuple[bool, str, str]]) -> list[dict]:
    return [json.loads(payload) for _retained, topic, payload in received if topic.endswith("/alert")]


def test_alert_reaches_an_independent_subscriber(tmp_path: Path, mosquitto) -> None:
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "nnffffnnnn"), mosquitto, backbone="aisfx")
    enroll(config, tmp_path / "enroll")
    mosquitto.register("asd/test/motor/alert", "plant")
    run_to_end(Daemon(config))
    received = alerts_of(mosquitto.collect("asd/test/motor/alert", 2, timeout=10, client_id="plant"))
    assert [a["type"] for a in received] == ["raise", "clear"]
    raised, cleared = received
    assert set(raised) == ALERT_FIELDS and raised["schema"] == "asd.alert/1" and raised["rule"] == "n_of_m"
    assert raised["severity"] == "alarm" and cleared["severity"] in ("ok", "warning")
    assert raised["event_id"] == cleared["event_id"] and raised["machine"] == "motor" and raised["site"] == "test"
    assert raised["fused_rank"] > 0.9 and raised["threshold"] == 0.9 and raised["condition"] == "default"
    assert set(raised["backbones"]) == {"aisfx"} and raised["backbones"]["aisfx"]["rank"] > 0.9
    audio, rate = sf.read(raised["clip"])
    assert rate == RATE and len(audio) == 10 * RATE
    state = json.loads(mosquitto.retained("asd/test/motor/state"))
    assert state["state"] == "normal" and state["schema"] == "asd.state/1"
    events = [json.loads(line) for line in (config.daemon.state_dir / "events.jsonl").read_text().splitlines()]
    assert [e["alert"]["type"] for e in events if e["kind"] == "alert"] == ["raise", "clear"]


def test_every_alert_arrives_after_a_broker_outage(tmp_path: Path, mosquitto) -> None:
    # Clear when windows are no longer above every normal one: robust to one odd normal window.
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "ffnnnffnnnffnnn"), mosquitto,
                           threshold=0.99, clear_threshold=0.99)
    enroll(config, tmp_path / "enroll", n=12)
    mosquitto.register("asd/test/motor/alert", "plant")
    mosquitto.stop()
    daemon = Daemon(config)
    daemon.start()
    try:
        deadline = time.monotonic() + 60
        while not daemon.replay_finished() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not daemon.publisher.connected
        assert daemon.telemetry.registry.get_sample_value("asd_alerts_total", {"machine": "motor", "type": "raise"}) == 3
        assert daemon.publisher.outbox_depth >= 6  # waiting on disk, with the retained states
        mosquitto.start()
        assert daemon.publisher.wait_idle(30)
    finally:
        daemon.stop()
    received = alerts_of(mosquitto.collect("asd/test/motor/alert", 6, timeout=10, client_id="plant"))
    assert [a["type"] for a in received] == ["raise", "clear"] * 3
    assert len({a["event_id"] for a in received}) == 3


def _outbox_alerts(state_dir: Path) -> int:
    """Alerts waiting in the outbox (only readable once the daemon holding it is gone)."""
    with closing(sqlite3.connect(f"file:{state_dir / 'outbox.sqlite'}?mode=ro", uri=True, timeout=1)) as db:
        return db.execute("SELECT count(*) FROM outbox WHERE topic LIKE '%/alert'").fetchone()[0]


def _raised(state_dir: Path) -> set[str]:
    path = state_dir / "events.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {e["alert"]["event_id"] for e in map(json.loads, lines) if e["kind"] == "alert"}


def test_alerts_survive_kill_9_of_the_daemon(tmp_path: Path, mosquitto) -> None:
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "ffnnffnn"), mosquitto, loop=True)
    enroll(config, tmp_path / "enroll")
    path = write_yaml(tmp_path / "daemon.yaml", config)
    mosquitto.register("asd/test/motor/alert", "plant")
    mosquitto.stop()
    command = [sys.executable, "-m", "monitor.cli", "run", "-c", str(path)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(_raised(config.daemon.state_dir)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    undelivered = _raised(config.daemon.state_dir)
    assert len(undelivered) >= 2 and _outbox_alerts(config.daemon.state_dir) >= 2
    mosquitto.start()
    second = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        received = alerts_of(mosquitto.collect("asd/test/motor/alert", len(undelivered) * 2, timeout=30, client_id="plant"))
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    assert undelivered <= {a["event_id"] for a in received}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_metrics_endpoint_passes_promtool(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "nnff"), loop=True)
    enroll(config, tmp_path / "enroll")
    daemon = Daemon(config)
    daemon.start()
    try:
        deadline = time.monotonic() + 60
        while daemon.windows_processed < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.telemetry.port}/metrics", timeout=5).read().decode()
    finally:
        daemon.stop()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert 'asd_windows_total{machine="motor",status="ok"}' in text
    assert 'asd_inference_seconds_count{backbone="logmel"}' in text
    assert 'asd_alerts_total{machine="motor",type="raise"}' in text
    assert 'asd_audio_overflows_total{source="replay"} 0.0' in text  # exists before the first overflow
    ok = [line for line in text.splitlines() if line.startswith('asd_windows_total{machine="motor",status="ok"}')]
    assert float(ok[0].split()[-1]) >= 6


def test_messages_delivered_to_the_broker_are_counted_in_the_metrics(tmp_path: Path, mosquitto) -> None:
    """``asd_mqtt_published_total`` counts what the broker really got (retained states
    acknowledged, scores sent), read over HTTP while the daemon runs."""
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "nn"), mosquitto, loop=True)
    enroll(config, tmp_path / "enroll")
    daemon = Daemon(config)
    daemon.start()
    try:
        deadline = time.monotonic() + 60
        while daemon.publisher.published_total < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        before = daemon.publisher.published_total
        text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.telemetry.port}/metrics", timeout=5).read().decode()
        after = daemon.publisher.published_total
    finally:
        daemon.stop()
    (line,) = [line for line in text.splitlines() if line.startswith("asd_mqtt_published_total ")]
    assert 4 <= before <= float(line.split()[-1]) <= after


def test_queue_sized_by_machine_count_and_compute_threads_limited_in_every_thread(tmp_path: Path) -> None:
    """Every hop delivers one window per machine at once: the automatic queue holds twice that.
    numpy/faiss thread limits are per thread for OpenMP, so each daemon thread sets its own."""
    base = daemon_config(tmp_path, clips(tmp_path / "replay", "n"))
    many = replace(base, machines=[MachineConfig(f"m{i}", "replay") for i in range(12)])
    assert base.daemon.resolved_queue_size(len(base.machines)) == 8
    assert many.daemon.resolved_queue_size(len(many.machines)) == 24
    assert replace(many.daemon, queue_size=5).resolved_queue_size(len(many.machines)) == 5

    daemon = Daemon(replace(base, runtime=replace(base.runtime, compute_threads=1)))
    seen: list[list[int]] = []
    daemon._spawn(lambda: seen.append([pool["num_threads"] for pool in threadpool_info()]), "probe")
    daemon._threads[-1].join(10)
    assert seen and seen[0] and set(seen[0]) == {1}, seen


def test_sensor_faults_from_files_are_never_scored(tmp_path: Path) -> None:
    """Silence and clipping in replayed audio: sensor_fault windows, no alert, no 'normal'."""
    folder = tmp_path / "replay"
    write_clip(folder / "0_silence.flac", np.zeros(10 * RATE, np.float32))
    write_clip(folder / "1_clipped.flac", np.clip(machine_sound(5) * 30, -1, 1))
    config = daemon_config(tmp_path, [folder / "0_silence.flac", folder / "1_clipped.flac"])
    enroll(config, tmp_path / "enroll")
    daemon = Daemon(config)
    run_to_end(daemon)
    events = [json.loads(line) for line in (config.daemon.state_dir / "events.jsonl").read_text().splitlines()]
    faults = [e["faults"] for e in events if e["kind"] == "sensor_fault"]
    assert "silence" in faults[0]  # with low_level: the level is also far below the enrolled one
    assert not any(e["kind"] == "alert" for e in events)
    assert not any(e["kind"] == "state" and e["state"] == "normal" and e["detail"] == "" for e in events)
    metrics = daemon.telemetry.registry.get_sample_value
    assert metrics("asd_windows_total", {"machine": "motor", "status": "sensor_fault"}) == 2
    assert metrics("asd_sensor_faults_total", {"machine": "motor", "fault": "clipping"}) == 1


def test_bad_config_exits_78_and_starts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"daemon:\n  state_dir: {tmp_path / 'state'}\nmachines:\n  - name: m\n    source: nowhere\n")
    result = subprocess.run([sys.executable, "-m", "monitor.cli", "run", "-c", str(bad)], capture_output=True, text=True)
    assert result.returncode == 78
    assert result.stderr.strip() == f"asd-monitor: config error: {bad}: machines[0].source: unknown source 'nowhere' (defined: none)"
    assert not (tmp_path / "state").exists()
    ok = subprocess.run([sys.executable, "-m", "monitor.cli", "check-config", str(bad)], capture_output=True, text=True)
    assert ok.returncode == 78


def test_a_machine_without_a_bank_is_idle_not_normal(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "nn"))
    daemon = Daemon(config)
    run_to_end(daemon)
    assert daemon.telemetry.registry.get_sample_value("asd_windows_total", {"machine": "motor", "status": "idle"}) == 2
    assert daemon.machines[0].state == "idle"


# ---------------------------------------------------------------- microphone

def test_missing_microphone_is_a_sensor_fault_and_the_daemon_keeps_running(tmp_path: Path, pulse_server, mosquitto) -> None:
    config = daemon_config(tmp_path, [], mosquitto)
    config = replace(config, sources=[SourceConfig(name="mic", type="microphone", device="no-such-device")],
                     machines=[MachineConfig("motor", "mic")])
    enroll(config, tmp_path / "enroll")
    daemon = Daemon(config)
    daemon.start()
    stopper = threading.Timer(3.0, daemon.stop_event.set)
    stopper.start()
    try:
        daemon.run()
        state = json.loads(mosquitto.retained("asd/test/motor/state", timeout=5))
    finally:
        daemon.stop()
    assert state["state"] == "sensor_fault" and "no-such-device" in state["detail"]
    assert daemon.telemetry.registry.get_sample_value("asd_sensor_faults_total", {"machine": "motor", "fault": "device"}) >= 1


def test_microphone_path_raises_on_faulty_sound_and_flags_silence_and_clipping(tmp_path: Path, pulse_server, mosquitto) -> None:
    """Real time through sounddevice: normal, faulty, silent and clipped audio played into a
    PulseAudio null sink and captured from its monitor, as from a microphone."""
    parts = [machine_sound(200, 10.0), machine_sound(201, 18.0, fault=True),
             np.zeros(13 * RATE, np.float32), np.clip(machine_sound(202, 10.0) * 30, -1, 1)]
    played = tmp_path / "played.wav"
    sf.write(played, np.concatenate(parts), RATE, subtype="PCM_16")
    config = daemon_config(tmp_path, [], mosquitto, backbone="aisfx", cooldown_seconds=600.0)
    config = replace(config, sources=[SourceConfig(name="mic", type="microphone", device="pulse")],
                     machines=[MachineConfig("motor", "mic")],
                     daemon=replace(config.daemon, hop_seconds=2.5))
    enroll(config, tmp_path / "enroll")
    mosquitto.register("asd/test/motor/alert", "plant")
    daemon = Daemon(config)
    daemon.start()
    try:
        pulse_server.play(played, timeout=90)
        time.sleep(3.0)  # the last windows
    finally:
        daemon.stop()
    received = alerts_of(mosquitto.collect("asd/test/motor/alert", 1, timeout=10, client_id="plant"))
    assert [a["type"] for a in received] == ["raise"]
    metric = daemon.telemetry.registry.get_sample_value
    assert metric("asd_alerts_total", {"machine": "motor", "type": "raise"}) == 1  # sensor faults raise nothing
    assert metric("asd_sensor_faults_total", {"machine": "motor", "fault": "silence"}) >= 1
    assert metric("asd_sensor_faults_total", {"machine": "motor", "fault": "clipping"}) >= 1
    assert metric("asd_windows_total", {"machine": "motor", "status": "ok"}) >= 4


# ---------------------------------------------------------------- systemd protocol, reload

def _notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import socket as socketlib

    path = tmp_path / "notify.sock"
    sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    return sock


def _drain(sock) -> list[str]:
    messages = []
    while True:
        try:
            messages += sock.recv(4096).decode().split("\n")
        except OSError:
            return messages


def test_systemd_notifications_and_watchdog_from_the_processing_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = _notify_socket(tmp_path, monkeypatch)
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "nnnn"), loop=True)
    enroll(config, tmp_path / "enroll")
    daemon = Daemon(config)
    daemon.start()
    try:
        time.sleep(3.0)
        messages = _drain(sock)
        assert "READY=1" in messages and any(m.startswith("STATUS=") and "motor" in m for m in messages)
        assert messages.count("WATCHDOG=1") >= 2
        # A wedged processing loop stops the pings even though every other thread lives on.
        daemon._wedge_after = daemon.windows_processed
        time.sleep(1.5)
        _drain(sock)
        time.sleep(2.5)
        assert "WATCHDOG=1" not in _drain(sock)
    finally:
        daemon._wedge_after = None
        daemon.stop()


def test_reload_switches_bank_versions_without_stopping_audio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = _notify_socket(tmp_path, monkeypatch)
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "nnnn"), loop=True)
    enroll(config, tmp_path / "enroll")
    path = write_yaml(tmp_path / "daemon.yaml", config)
    daemon = Daemon(config, path)
    daemon.start()
    runner = threading.Thread(target=daemon.run)  # the main loop follows banks and reloads
    runner.start()
    try:
        machine = daemon.machines[0]
        daemon.banks.wait_fitted(machine)  # banks are fitted while the audio starts
        assert machine.bank_version == "v000001"
        enroll(config, tmp_path / "enroll2", n=3)  # a new version, made by another "process"
        deadline = time.monotonic() + 30
        while machine.bank_version != "v000002" and time.monotonic() < deadline and runner.is_alive():
            time.sleep(0.1)
        assert runner.is_alive(), "the main loop died"
        assert machine.bank_version == "v000002"  # followed without any signal
        BankStore(config.daemon.state_dir / "banks" / "motor").set_current("v000001")  # a rollback
        path.write_text(path.read_text().replace("threshold: 0.9", "threshold: 0.95"))
        _drain(sock)
        daemon.reload_requested.set()
        deadline = time.monotonic() + 30
        while machine.bank_version != "v000001" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert machine.bank_version == "v000001" and daemon.config.alerts.threshold == 0.95
        assert "RELOADING=1" in _drain(sock)
        path.write_text("scoring: {k: 0}\n")  # a broken config is reported and the running one kept
        daemon.reload_requested.set()
        time.sleep(1.5)
        assert daemon.config.alerts.threshold == 0.95
        processed = daemon.windows_processed
        time.sleep(1.0)
        assert daemon.windows_processed > processed  # audio kept flowing throughout
    finally:
        daemon.stop_event.set()
        runner.join()
        daemon.stop()
    kinds = [json.loads(line)["kind"] for line in (config.daemon.state_dir / "events.jsonl").read_text().splitlines()]
    assert "reload_error" in kinds and kinds.count("bank") >= 3


def test_a_taken_metrics_port_is_a_config_error_naming_it(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """exit 78, not a TelemetryError: the port must change in the config, and systemd must not
    restart the daemon into the same clash."""
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "n"))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write_yaml(tmp_path / "site.yaml", replace(config, metrics=MetricsConfig(port=port)))
        assert main(["run", "-c", str(path)]) == EXIT_CONFIG
    assert capfd.readouterr().err.endswith(f"asd-monitor: config error: {path}: metrics.host, metrics.port: "
                                           f"cannot serve metrics on 127.0.0.1:{port}: Address already in use\n")


def test_run_leaves_its_files_owner_only(tmp_path: Path, mosquitto) -> None:
    """events.jsonl, the outbox, alert clips and the folders they are in: owner only
    (daemon.file_mode: private, the default), whatever umask the shell had; the caller's umask
    is given back when main() returns."""
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "nnffffnnnn"), mosquitto, backbone="aisfx")
    config = replace(config, machines=[MachineConfig("motor", "replay", bank=tmp_path / "bank")])
    enroll_files(Detector.from_config(config), BankStore(tmp_path / "bank"), clips(tmp_path / "enroll", "nnnnnn", seed=0), "default")
    path = write_yaml(tmp_path / "site.yaml", config)
    previous = os.umask(0o022)
    try:
        assert main(["run", "-c", str(path)]) == 0
    finally:
        assert os.umask(previous) == 0o022
    state = config.daemon.state_dir
    written = [state, *state.rglob("*")]
    assert {state / "events.jsonl", state / "outbox.sqlite", state / "clips"} <= set(written)
    assert any(p.suffix == ".flac" for p in written), "an alert clip was saved"
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert modes == {name: "0o700" if (tmp_path / name).is_dir() else "0o600" for name in modes}


def test_enroll_with_file_mode_group_lets_the_group_read(tmp_path: Path) -> None:
    config = tmp_path / "group.yaml"
    config.write_text("backbones: [{model: logmel}]\ndaemon: {file_mode: group}\n")
    bank = tmp_path / "bank"
    previous = os.umask(0o022)
    try:
        assert main(["enroll", "-c", str(config), "--bank", str(bank), *map(str, clips(tmp_path / "n", "nn"))]) == 0
    finally:
        os.umask(previous)
    written = [bank, *bank.rglob("*")]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in written if p.is_dir()} == {"0o750"}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in written if p.is_file()} == {"0o640"}
