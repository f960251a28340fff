"""Answering alerts of a running daemon: over MQTT (real mosquitto, token, replies with the
request id, the review message, the counter scraped over HTTP) and through the control socket,
which the CLI uses while the daemon runs."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import replace
from pathlib import Path

from monitor.bank.store import BankStore
from monitor.cli import main
from tests.daemons import clips, daemon_config, enroll, events_of, wait_for, write_yaml


def _raised(daemon) -> list[dict]:
    return [e["alert"] for e in events_of(daemon) if e["kind"] == "alert" and e["alert"]["type"] == "raise"]


def _scrape(daemon) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{daemon.telemetry.port}/metrics", timeout=5).read().decode()


def test_review_over_mqtt_and_the_control_socket(tmp_path: Path, running, mosquitto, capsys) -> None:
    token = tmp_path / "token"
    token.write_text("let-me-review\n")
    # Two alerts (as in tests/service/test_daemon.py: cleared once no longer above every normal window).
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "ffnnnffnnn"), mosquitto,
                           threshold=0.99, clear_threshold=0.99)
    config = replace(config, mqtt=replace(config.mqtt, commands=True, command_token_file=token))
    enroll(config, tmp_path / "enroll", n=12)
    mosquitto.register("asd/test/motor/reply/review", "operator")
    mosquitto.register("asd/test/motor/review", "plant")
    daemon = running(config)
    wait_for(lambda: len(_raised(daemon)) >= 2 and daemon.publisher.connected, 30)
    first, second = (a["event_id"] for a in _raised(daemon)[:2])
    store = BankStore(config.daemon.state_dir / "banks" / "motor")
    assert store.current() == "v000001"

    def send(**fields) -> None:
        mosquitto.publish("asd/test/motor/cmd/review", json.dumps(fields))

    send(event_id=first, verdict="normal", token="wrong", request_id="r1")
    send(event_id="motor-1", verdict="normal", token="let-me-review", request_id="r2")
    send(event_id=first, verdict="normal", note="a forklift", token="let-me-review", request_id="r3")
    replies = {}
    for _r, _t, payload in mosquitto.collect("asd/test/motor/reply/review", 3, timeout=30, client_id="operator"):
        reply = json.loads(payload)
        replies[reply["request_id"]] = reply
    assert replies["r1"] == {"ok": False, "machine": "motor", "error": "missing or wrong token", "request_id": "r1"}
    assert not replies["r2"]["ok"] and "unknown event 'motor-1'" in replies["r2"]["error"]
    assert replies["r3"]["ok"] and replies["r3"]["version"] == "v000002" and replies["r3"]["verdict"] == "normal"
    assert store.current() == "v000002" and daemon.machines[0].bank_version == "v000002"  # switched at once

    ((retained, _topic, payload),) = mosquitto.collect("asd/test/motor/review", 1, timeout=10, client_id="plant")
    message = json.loads(payload)
    assert not retained
    assert (message["schema"], message["event_id"], message["verdict"], message["who"], message["version"],
            message["note"]) == ("asd.review/1", first, "normal", "mqtt", "v000002", "a forklift")
    text = _scrape(daemon)
    assert 'asd_reviews_total{machine="motor",verdict="normal"} 1.0' in text
    assert 'asd_reviews_total{machine="motor",verdict="fault"} 0.0' in text

    # A second verdict on the same alert, and a malformed one: refused, nothing changed.
    send(event_id=first, verdict="fault", token="let-me-review", request_id="r4")
    mosquitto.publish("asd/test/motor/cmd/review", "{oops")
    replies = [json.loads(p) for _r, _t, p in mosquitto.collect("asd/test/motor/reply/review", 2, timeout=30,
                                                                client_id="operator")]
    errors = {r["request_id"]: r["error"] for r in replies if not r["ok"]}
    assert "already reviewed: normal" in errors["r4"] and "malformed JSON" in errors[None]
    assert store.versions() == ["v000001", "v000002"]
    assert not (config.daemon.state_dir / "faults").exists()

    # The CLI while the daemon runs: through the control socket (no token there), applied by the daemon.
    path = write_yaml(tmp_path / "site.yaml", config)
    capsys.readouterr()
    assert main(["review", "-c", str(path), second, "fault", "--note", "bearing"]) == 0
    assert "confirmed fault kept in" in capsys.readouterr().out
    assert main(["review", "-c", str(path), second, "unsure"]) == 65
    assert "already reviewed: fault (socket" in capsys.readouterr().err
    assert (config.daemon.state_dir / "faults" / "motor" / second / "embeddings.npz").is_file()

    reviews = [json.loads(line) for line in (config.daemon.state_dir / "reviews.jsonl").read_text().splitlines()]
    assert [(r["event_id"], r["verdict"], r["who"]) for r in reviews] == [(first, "normal", "mqtt"),
                                                                         (second, "fault", "socket")]
    logged = [e for e in events_of(daemon) if e["kind"] == "review"]
    assert [(e["event_id"], e["who"]) for e in logged] == [(first, "mqtt"), (second, "socket")]
    assert 'asd_reviews_total{machine="motor",verdict="fault"} 1.0' in _scrape(daemon)
    # Each verdict left the machine's site report behind (monitor/review/report.py) with the confirmed fault.
    report = json.loads((config.daemon.state_dir / "reports" / "motor.json").read_text())
    assert report["faults"] + report["faults_not_in_history"] == [second]
    assert (config.daemon.state_dir / "reports" / "motor.png").stat().st_size > 1000
