"""Live enrollment: commands, the local control socket, MQTT commands with a real broker, and
the real sounddevice path."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from monitor.bank.model import BankItem
from monitor.bank.store import BankStore
from monitor.cli import main
from monitor.config import EnrollmentConfig, MachineConfig, ScheduleConfig, SourceConfig
from monitor.enrollment.live import Session, parse_command
from monitor.errors import CommandError
from monitor.service.control import request
from tests.daemons import clips, daemon_config, enroll, events_of, wait_for, write_yaml
from tests.synth import RATE, machine_sound, write_clip

CFG = EnrollmentConfig(conditions=["day", "night"])


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1]", "expected a JSON object"),
        (b'{"action": "begin"}', "action must be one of"),
        (b'{"action": "start", "duration_s": -5, "condition": "day"}', "duration_s must be"),
        (b'{"action": "start", "duration_s": "long", "condition": "day"}', "duration_s must be"),
        (b'{"action": "start", "condition": "weekend"}', "unknown condition 'weekend'"),
        (b'{"action": "start", "condition": "../etc"}', "condition must be a short name"),
        (b'{"action": "start", "colour": "red"}', "unknown field 'colour'"),
    ],
)
def test_bad_commands_are_refused_with_a_reason(payload: bytes, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        parse_command(payload, CFG)


def test_a_valid_start_command() -> None:
    cmd = parse_command(b'{"action": "start", "duration_s": 60, "condition": "night", "request_id": "r1"}', CFG)
    assert (cmd.action, cmd.duration_s, cmd.condition, cmd.request_id) == ("start", 60.0, "night", "r1")


def test_live_enrollment_from_the_file_source_via_the_control_socket(tmp_path: Path, running, capsys) -> None:
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "nnnn"), loop=True)
    config = replace(config, enrollment=EnrollmentConfig(min_windows=4))
    daemon = running(config)
    machine = daemon.machines[0]
    assert machine.state == "idle" and machine.scorer is None
    reply = request(daemon.state_dir / "control.sock", "motor",
                    {"action": "start", "duration_s": 60, "condition": "night"})
    assert reply["ok"] and reply["session"]["condition"] == "night"
    again = request(daemon.state_dir / "control.sock", "motor", {"action": "start", "duration_s": 60})
    assert not again["ok"] and "already running" in again["error"]
    wait_for(lambda: machine.scorer is not None)
    bank = BankStore(config.daemon.state_dir / "banks" / "motor").load()
    assert bank.conditions == ["night"] and len(bank) == 6 and bank.items[0].source == "live:motor"
    assert bank.items[0].level_dbfs is not None
    enrolled = [e for e in events_of(daemon) if e["kind"] == "enrolled"]
    assert enrolled and enrolled[0]["version"] == "v000001"
    # The CLI client reaches the same socket.
    path = write_yaml(tmp_path / "daemon.yaml", config)
    capsys.readouterr()
    assert main(["enroll-live", "-c", str(path), "--machine", "motor", "status"]) == 65  # nothing running
    assert "no enrollment is running" in capsys.readouterr().out


def test_enrollment_with_too_little_clean_audio_is_refused(tmp_path: Path, running) -> None:
    folder = tmp_path / "replay"
    write_clip(folder / "silence.flac", np.zeros(10 * RATE, np.float32))
    config = daemon_config(tmp_path, [folder / "silence.flac"], loop=True)
    daemon = running(config)
    reply = request(daemon.state_dir / "control.sock", "motor", {"action": "start", "duration_s": 40})
    assert reply["ok"]
    wait_for(lambda: any(e["kind"] == "enrollment_failed" for e in events_of(daemon)))
    failed = next(e for e in events_of(daemon) if e["kind"] == "enrollment_failed")
    assert "only 0 clean window(s)" in failed["error"] and failed["session"]["excluded_sensor_faults"] == 4
    assert not BankStore(config.daemon.state_dir / "banks" / "motor").exists()
    assert daemon.machines[0].scorer is None  # still unenrolled; the silence itself stays a sensor fault


def test_outliers_against_the_existing_bank_are_left_out(tmp_path: Path, running) -> None:
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "ff"), loop=True)
    enroll(config, tmp_path / "enroll")
    daemon = running(config)
    request(daemon.state_dir / "control.sock", "motor", {"action": "start", "duration_s": 60})
    wait_for(lambda: any(e["kind"] == "enrollment_failed" for e in events_of(daemon)))
    failed = next(e for e in events_of(daemon) if e["kind"] == "enrollment_failed")
    assert failed["session"]["excluded_outliers"] == 6
    assert BankStore(config.daemon.state_dir / "banks" / "motor").versions() == ["v000001"]


def test_cancel_discards_and_stop_saves_early(tmp_path: Path, running) -> None:
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "nnnn"), loop=True)
    config = replace(config, enrollment=EnrollmentConfig(min_windows=2),
                     sources=[replace(config.sources[0], speed=20.0)])
    daemon = running(config)
    sock = daemon.state_dir / "control.sock"
    assert request(sock, "motor", {"action": "start", "duration_s": 3600})["ok"]
    assert request(sock, "motor", {"action": "cancel"})["ok"]
    assert daemon.machines[0].session is None
    assert request(sock, "motor", {"action": "start", "duration_s": 3600})["ok"]
    wait_for(lambda: daemon.machines[0].session is not None and daemon.machines[0].session.accepted >= 2)
    reply = request(sock, "motor", {"action": "stop"})
    assert reply["ok"] and reply["version"] == "v000001"
    assert request(sock, "ghost", {"action": "status"})["error"] == "unknown machine 'ghost'"


def test_mqtt_enroll_command_with_and_without_credentials(tmp_path: Path, running, mosquitto_factory) -> None:
    broker = mosquitto_factory(users={"plant": "s3cret"})
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    token = tmp_path / "token"
    token.write_text("let-me-enroll\n")
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "nnnn"), broker, loop=True)
    config = replace(config, mqtt=replace(config.mqtt, username="plant", password_file=password, commands=True,
                                          command_token_file=token),
                     enrollment=EnrollmentConfig(min_windows=2))
    daemon = running(config)
    wait_for(lambda: daemon.publisher.connected, 15)
    broker.register("asd/test/motor/reply/enroll", "operator")
    broker.publish("asd/test/motor/cmd/enroll", '{"action": "start", "duration_s": 3600, "token": "wrong"}')
    broker.publish("asd/test/motor/cmd/enroll", "{oops")
    broker.publish("asd/test/motor/cmd/enroll", '{"action": "start", "duration_s": 3600, "token": "let-me-enroll", "request_id": "r7"}')
    replies = [json.loads(p) for _r, _t, p in broker.collect("asd/test/motor/reply/enroll", 3, timeout=15, client_id="operator")]
    assert sorted(r["ok"] for r in replies) == [False, False, True]
    errors = " | ".join(r.get("error", "") for r in replies)
    assert "wrong token" in errors and "malformed JSON" in errors
    assert next(r for r in replies if r["ok"])["request_id"] == "r7"
    assert daemon.machines[0].session is not None
    # Without the broker password, a client cannot even publish a command.
    import subprocess

    rejected = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                               "-t", "asd/test/motor/cmd/enroll", "-m", '{"action": "cancel"}'], capture_output=True)
    assert rejected.returncode != 0
    time.sleep(0.5)
    assert daemon.machines[0].session is not None


def test_the_control_socket_needs_no_mqtt_token_and_every_reply_carries_the_request_id(
        tmp_path: Path, running, capsys) -> None:
    """The socket's file mode is its authentication; the MQTT token guards MQTT only. A refused
    request is answered with its request_id too, so that a client can match the answer."""
    token = tmp_path / "token"
    token.write_text("let-me-enroll\n")
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "nnnn"), loop=True)
    config = replace(config, mqtt=replace(config.mqtt, commands=True, command_token_file=token))
    daemon = running(config)
    sock = daemon.state_dir / "control.sock"
    assert request(sock, "motor", {"action": "status", "request_id": "r1"}) == {
        "ok": False, "machine": "motor", "error": "no enrollment is running on motor", "request_id": "r1"}
    assert request(sock, "ghost", {"action": "status", "request_id": "r2"})["request_id"] == "r2"
    assert request(sock, "motor", {"action": "begin", "request_id": "r3"})["request_id"] == "r3"
    assert request(sock, "motor", {"command": "reboot", "request_id": "r4"}) == {
        "ok": False, "error": "bad request: command must be one of 'enroll', 'review'", "request_id": "r4"}
    started = request(sock, "motor", {"action": "start", "duration_s": 3600, "request_id": "r5"})
    assert started["ok"] and started["request_id"] == "r5"
    path = write_yaml(tmp_path / "daemon.yaml", config)
    capsys.readouterr()
    assert main(["enroll-live", "-c", str(path), "--machine", "motor", "status"]) == 0
    assert json.loads(capsys.readouterr().out)["session"]["duration_s"] == 3600


def test_mqtt_commands_with_non_ascii_tokens_are_answered(tmp_path: Path, running, mosquitto) -> None:
    """A token is compared as UTF-8 bytes: a non-ASCII one is refused or accepted, never a crash
    without a reply."""
    token = tmp_path / "token"
    token.write_text("schlüssel-7\n", encoding="utf-8")
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "nnnn"), mosquitto, loop=True)
    config = replace(config, mqtt=replace(config.mqtt, commands=True, command_token_file=token))
    daemon = running(config)
    wait_for(lambda: daemon.publisher.connected, 15)
    mosquitto.register("asd/test/motor/reply/enroll", "operator")
    mosquitto.publish("asd/test/motor/cmd/enroll", '{"action": "status", "token": "Schlüssel-7", "request_id": "r1"}')
    mosquitto.publish("asd/test/motor/cmd/enroll", '{"action": "status", "token": "schlüssel-7", "request_id": "r2"}')
    mosquitto.publish("asd/test/motor/cmd/enroll", '{"action": "status", "request_id": "r3"}')
    replies = {r["request_id"]: r for r in (json.loads(p) for _r, _t, p in mosquitto.collect(
        "asd/test/motor/reply/enroll", 3, timeout=15, client_id="operator"))}
    assert replies["r1"]["error"] == "missing or wrong token" and replies["r3"]["error"] == "missing or wrong token"
    assert replies["r2"]["error"] == "no enrollment is running on motor"


def test_live_enrollment_through_the_real_microphone_path(tmp_path: Path, pulse_server, running) -> None:
    played = tmp_path / "normal.wav"
    sf.write(played, machine_sound(300, 24.0), RATE, subtype="PCM_16")
    config = daemon_config(tmp_path, [])
    config = replace(config, sources=[SourceConfig(name="mic", type="microphone", device="pulse")],
                     machines=[MachineConfig("motor", "mic")], daemon=replace(config.daemon, hop_seconds=2.5),
                     enrollment=EnrollmentConfig(min_windows=3))
    daemon = running(config)
    player = threading.Thread(target=pulse_server.play, args=(played, 60))
    player.start()
    time.sleep(10.5)  # the first window is full of what is being played
    reply = request(daemon.state_dir / "control.sock", "motor", {"action": "start", "duration_s": 10})
    assert reply["ok"]
    player.join()
    wait_for(lambda: daemon.machines[0].scorer is not None, 20)
    bank = BankStore(config.daemon.state_dir / "banks" / "motor").load()
    assert len(bank) >= 3 and all(item.source == "live:motor" for item in bank.items)


def test_scheduled_enrollment_starts_once_a_day_at_its_time(tmp_path: Path, running) -> None:
    """``enrollment.schedule``: at ``daily_at`` (local time) the daemon enrolls by itself,
    exactly as a start command would, and not again that day."""
    now = datetime.now()
    if now.second > 50:  # keep the whole test inside one minute
        time.sleep(61 - now.second)
        now = datetime.now()
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "nnnn"), loop=True)
    entry = ScheduleConfig(machine="motor", daily_at=now.strftime("%H:%M"), duration_seconds=40.0, condition="night")
    config = replace(config, enrollment=EnrollmentConfig(min_windows=4, schedule=[entry]))
    store = BankStore(config.daemon.state_dir / "banks" / "motor")
    daemon = running(config)
    wait_for(lambda: store.current() == "v000001")
    bank = store.load()
    assert bank.conditions == ["night"] and len(bank) == 4
    assert bank.note.startswith("live enrollment, condition night")
    started = [e for e in events_of(daemon) if e["kind"] == "command" and e["reply"].get("action") == "start"]
    assert len(started) == 1
    daemon.commands.check_schedule(now)  # the same minute again: already done today
    assert daemon.machines[0].session is None and store.versions() == ["v000001"]


def test_a_session_keeps_only_windows_that_carry_every_output() -> None:
    """The daemon embeds every output of the models while a session runs; a window embedded just
    before the session began carries fewer, and is dropped rather than leave outputs with rows
    for some windows only (the bank would refuse them at the end)."""
    session = Session("default", 60.0, "2026-01-01T00:00:00+00:00")
    item = BankItem("live:motor", 0.0, "default", "2026-01-01T00:00:00+00:00")
    row = {"aisfx.embedding-block3": np.zeros((1, 768), np.float32)}
    every = row | {"aisfx": np.zeros((1, 512), np.float32), "aisfx.block3": np.zeros((1, 256), np.float32)}
    session.accept(item, row)
    session.accept(item, every)
    session.accept(item, every)
    session.accept(item, row)  # fewer than the session holds: left out
    assert session.accepted == 2 and {n: len(e) for n, e in session.stacked().items()} == dict.fromkeys(every, 2)
