"""Answering the last alert from Home Assistant: the discovery payloads (buttons, last-alert
sensor) against HA's documented keys, and a button press, rendered as Home Assistant would
render it, answering a running daemon's latest alert over a real broker."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from monitor.outputs.messages import StateMessage, Topics
from monitor.outputs.mqtt import discovery_payloads
from monitor.review.verdicts import parse_verdict
from tests.daemons import clips, daemon_config, enroll, events_of, wait_for

jinja2 = pytest.importorskip("jinja2")

TOPICS = Topics("asd", "plant1", "asd-monitor")
# Keys of Home Assistant's MQTT button (https://www.home-assistant.io/integrations/button.mqtt/) these
# payloads use; Home Assistant ignores a misspelt key without a word.
HA_BUTTON_KEYS = {"name", "unique_id", "command_topic", "command_template", "payload_press", "qos",
                  "availability_topic", "payload_available", "payload_not_available", "device", "icon"}
HA_SENSOR_KEYS = {"name", "unique_id", "state_topic", "value_template", "availability_topic", "payload_available",
                  "payload_not_available", "device", "icon", "json_attributes_topic", "json_attributes_template"}
TOKEN = 'let-me"review'  # a quote: the template must still give valid JSON


def press(button: dict, token: str | None = None) -> str:
    """The payload Home Assistant publishes when the button is pressed: ``payload_press``, or the
    ``command_template`` rendered with it as ``value`` and HA's ``states()``."""
    if "command_template" not in button:
        return button["payload_press"]
    env = jinja2.Environment()
    env.filters["tojson"] = json.dumps  # Home Assistant's to_json/tojson: a JSON literal
    return env.from_string(button["command_template"]).render(value="PRESS", states=lambda entity: token)


def _buttons(payloads: list[tuple[str, str]]) -> dict[str, dict]:
    return {topic: json.loads(text) for topic, text in payloads if "/button/" in topic}


def test_buttons_carry_no_token_and_answer_the_last_alert() -> None:
    assert not _buttons(discovery_payloads(TOPICS, "fan1", "homeassistant"))  # commands off: none
    plain = _buttons(discovery_payloads(TOPICS, "fan1", "homeassistant", buttons=True))
    assert sorted(plain) == ["homeassistant/button/asd_plant1_fan1_review_fault/config",
                             "homeassistant/button/asd_plant1_fan1_review_normal/config"]
    guarded = _buttons(discovery_payloads(TOPICS, "fan1", "homeassistant", buttons=True,
                                          token_entity="input_text.asd_token"))
    for topic, button in {**plain, **guarded}.items():
        assert set(button) <= HA_BUTTON_KEYS, set(button) - HA_BUTTON_KEYS
        assert button["command_topic"] == TOPICS.command("fan1", "review")
        assert "let-me" not in json.dumps(button)  # never a token in a retained payload
        verdict = parse_verdict(press(button, TOKEN))
        assert verdict.event_id == "last" and verdict.verdict == ("normal" if topic.endswith("normal/config") else "fault")
    for button in guarded.values():
        assert json.loads(press(button, TOKEN))["token"] == TOKEN
        assert "input_text.asd_token" in button["command_template"]


def test_the_last_alert_sensor_reads_the_state_message() -> None:
    (text,) = [t for topic, t in discovery_payloads(TOPICS, "fan1", "homeassistant") if topic.endswith("_last_alert/config")]
    sensor = json.loads(text)
    assert set(sensor) <= HA_SENSOR_KEYS, set(sensor) - HA_SENSOR_KEYS
    last = {"event_id": "fan1-1700000000000", "type": "raise", "time": "2024-01-01T00:00:10.000Z", "verdict": ""}
    state = json.loads(StateMessage("plant1", "fan1", "alert", "2024-01-01T00:00:00.000Z", last_alert=last).to_json())
    env = jinja2.Environment()
    env.filters["tojson"] = json.dumps
    assert env.from_string(sensor["value_template"]).render(value_json=state) == last["event_id"]
    assert json.loads(env.from_string(sensor["json_attributes_template"]).render(value_json=state)) == last


def test_a_button_press_answers_the_running_daemons_latest_alert(tmp_path: Path, running, mosquitto) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "ffnnnffnnn"), mosquitto,
                           threshold=0.99, clear_threshold=0.99)
    config = replace(config, mqtt=replace(config.mqtt, commands=True, command_token_file=token,
                                          homeassistant_discovery=True, homeassistant_token_entity="input_text.asd_token"))
    enroll(config, tmp_path / "enroll", n=12)
    mosquitto.register("asd/test/motor/reply/review", "phone")
    daemon = running(config)

    def raised() -> list[str]:
        return [e["alert"]["event_id"] for e in events_of(daemon) if e["kind"] == "alert" and e["alert"]["type"] == "raise"]

    wait_for(lambda: len(raised()) >= 2 and daemon.publisher.connected, 30)
    wait_for(lambda: daemon.windows_processed >= 10, 30)
    button = json.loads(mosquitto.retained("homeassistant/button/asd_test_motor_review_normal/config") or "{}")
    mosquitto.publish(button["command_topic"], press(button, TOKEN))
    mosquitto.publish(button["command_topic"], press(button, TOKEN))  # pressed twice: answered once
    replies = [json.loads(p) for _r, _t, p in mosquitto.collect("asd/test/motor/reply/review", 2, timeout=30,
                                                                client_id="phone")]
    (applied,), (refused,) = [r for r in replies if r["ok"]], [r for r in replies if not r["ok"]]  # either order
    assert applied["event_id"] == raised()[-1] and applied["verdict"] == "normal"
    assert "already reviewed: normal" in refused["error"]
    state = json.loads(mosquitto.retained("asd/test/motor/state") or "{}")
    assert state["last_alert"]["event_id"] == raised()[-1] and state["last_alert"]["verdict"] == "normal"
