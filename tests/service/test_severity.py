"""Severity levels (ok, warning, alarm) and the health trend: the pure classes, their config,
and the daemon on replayed audio with a real broker (state messages, the alert payload, the
metrics scraped over HTTP, Home Assistant discovery)."""

from __future__ import annotations

import json
import math
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.config import AlertConfig, config_from_dict
from monitor.errors import ConfigError
from monitor.service.daemon import Daemon
from monitor.service.health import (
    BUCKET_SECONDS,
    DAY_SECONDS,
    EWMA_TIME_CONSTANT_SECONDS,
    HEALTH_REPUBLISH_SECONDS,
    MAX_BUCKETS,
    HealthTrend,
)
from monitor.service.severity import SeverityLevel
from tests.daemons import clips, daemon_config, enroll

CONFIG = AlertConfig(threshold=0.99, raise_count=2, raise_window=3, clear_threshold=0.9, warning_threshold=0.95)


def _levels(ranks: list[float], alerting: list[bool] | None = None, config: AlertConfig = CONFIG) -> list[str]:
    severity = SeverityLevel()
    levels = []
    for i, rank in enumerate(ranks):
        severity.update(rank, bool(alerting and alerting[i]), config)
        levels.append(severity.level)
    return levels


# ------------------------------------------------------------------------------ severity

def test_warning_goes_up_on_n_of_m_above_the_warning_rank_and_back_down() -> None:
    assert _levels([0.5, 0.96, 0.5, 0.97, 0.97, 0.5, 0.5, 0.5]) == \
        ["ok", "ok", "ok", "warning", "warning", "warning", "ok", "ok"]


def test_a_change_of_level_is_reported_once() -> None:
    severity = SeverityLevel()
    changes = [severity.update(r, False, CONFIG) for r in (0.96, 0.96, 0.96, 0.96, 0.5, 0.5)]
    assert changes == [None, "warning", None, None, None, "ok"]


def test_an_open_alert_is_alarm_whatever_the_ranks() -> None:
    ranks = [0.999, 0.999, 0.1, 0.1, 0.1, 0.1]
    alerting = [False, True, True, True, True, False]
    assert _levels(ranks, alerting) == ["ok", "alarm", "alarm", "alarm", "alarm", "ok"]


def test_the_warning_level_is_off_with_a_null_warning_threshold() -> None:
    off = replace(CONFIG, warning_threshold=None)
    assert off.warning_rank is None
    assert _levels([0.98] * 5, config=off) == ["ok"] * 5
    assert _levels([0.98, 0.98], [False, True], config=off) == ["ok", "alarm"]


def test_a_reload_resizes_the_window_count() -> None:
    severity = SeverityLevel()
    for rank in (0.96, 0.5, 0.96):
        severity.update(rank, False, replace(CONFIG, raise_window=5))
    assert severity.level == "warning"  # 2 of 5
    assert severity.update(0.5, False, replace(CONFIG, raise_window=2)) == "ok"  # 1 of the last 2


def test_auto_warning_threshold_is_095_or_fits_between_clear_and_threshold() -> None:
    assert AlertConfig().warning_rank == 0.95
    assert AlertConfig(threshold=0.9, clear_threshold=0.8).warning_rank == pytest.approx(0.85)
    assert AlertConfig(threshold=0.9, clear_threshold=0.9).warning_rank is None


@pytest.mark.parametrize(("alerts", "message"), [
    ({"warning_threshold": 0.995}, "alerts.warning_threshold: 0.995 must be below alerts.threshold 0.99"),
    ({"warning_threshold": 0.99}, "alerts.warning_threshold: 0.99 must be below alerts.threshold 0.99"),
    ({"warning_threshold": 0.85}, "alerts.warning_threshold: 0.85 must not be below alerts.clear_threshold 0.9"),
    ({"warning_threshold": 1.5}, "alerts.warning_threshold: must be <= 1, got 1.5"),
    ({"warning_threshold": "high"}, "alerts.warning_threshold: expected a number, got 'high'"),
])
def test_a_bad_warning_threshold_is_one_line_naming_key_and_value(alerts: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"alerts": alerts}, "site.yaml")
    assert str(caught.value) == f"site.yaml: {message}"
    assert "\n" not in str(caught.value)


def test_warning_threshold_values_that_load() -> None:
    assert config_from_dict({}).alerts.warning_threshold == "auto"
    assert config_from_dict({"alerts": {"warning_threshold": None}}).alerts.warning_rank is None
    assert config_from_dict({"alerts": {"warning_threshold": 0.9}}).alerts.warning_rank == 0.9  # = clear_threshold
    # A site that lowered the alert threshold keeps a valid config without the new key.
    assert config_from_dict({"alerts": {"threshold": 0.95}}).alerts.warning_rank == pytest.approx(0.925)


# ------------------------------------------------------------------------------ health trend

def test_anomalous_share_over_the_hour_and_the_day_expires_by_time() -> None:
    trend = HealthTrend()
    t0 = 1_800_000_000.0
    for i in range(6):  # one anomalous window in six, every 10 s
        trend.update(t0 + 10 * i, 0.999 if i == 0 else 0.3, i == 0)
    figures = trend.figures()
    assert figures.anomalous_ratio_1h == pytest.approx(1 / 6) and figures.anomalous_ratio_24h == pytest.approx(1 / 6)
    later = t0 + 2 * 3600  # two hours on: out of the hour, still in the day
    figures = trend.update(later, 0.3, False)
    assert figures.anomalous_ratio_1h == 0.0 and figures.anomalous_ratio_24h == pytest.approx(1 / 7)
    figures = trend.update(t0 + DAY_SECONDS + 120, 0.3, False)  # a day on: the first minute left
    assert figures.anomalous_ratio_24h == 0.0
    assert trend.buckets == 2  # expired buckets are gone, not only skipped


def test_rank_ewma_has_a_one_hour_time_constant_whatever_the_hop() -> None:
    for hop in (1.0, 10.0, 60.0):
        trend = HealthTrend()
        trend.update(0.0, 0.0, False)
        t = 0.0
        while t < EWMA_TIME_CONSTANT_SECONDS:
            t += hop
            figures = trend.update(t, 1.0, False)
        # After one time constant a step from 0 to 1 has come 1 - 1/e of the way.
        assert figures.rank_ewma == pytest.approx(1 - math.exp(-1), abs=1e-9), hop
    trend = HealthTrend()
    trend.update(0.0, 0.2, False)
    assert trend.update(2 * 3600.0, 0.8, False).rank_ewma == pytest.approx(0.8 - 0.6 * math.exp(-2))  # a gap weighs as its time


def test_memory_is_bounded_by_minute_buckets() -> None:
    trend = HealthTrend()
    for i in range(int(2 * DAY_SECONDS / 5)):  # two days at a 5 s hop: 34 560 windows
        trend.update(1_800_000_000.0 + 5 * i, 0.5, False)
    assert trend.buckets <= MAX_BUCKETS == DAY_SECONDS / BUCKET_SECONDS


def test_health_republish_needs_a_move_of_001_and_five_minutes() -> None:
    trend = HealthTrend()
    assert not trend.republish_due(0.0)  # nothing yet
    trend.update(0.0, 0.5, False)
    assert trend.republish_due(0.0)  # a first value
    trend.published()
    trend.update(60.0, 0.5, False)
    assert not trend.republish_due(60.0)
    trend.update(120.0, 1.0, True)  # the 1 h share jumps: but only two minutes on
    assert not trend.republish_due(120.0)
    trend.update(HEALTH_REPUBLISH_SECONDS, 0.5, False)
    assert trend.republish_due(HEALTH_REPUBLISH_SECONDS)
    calm = HealthTrend()
    calm.update(0.0, 0.5, False)
    calm.published()
    assert not calm.republish_due(1000.0) and not calm.republish_due(calm.update(1000.0, 0.5, False) and 1000.0)
    calm.update(1300.0, 0.52, False)  # the mean moves by 0.0016: long enough ago, but too little
    assert not calm.republish_due(1300.0)


# ------------------------------------------------------------------------------ the daemon

def _states(received: list[tuple[bool, str, str]]) -> list[dict]:
    return [json.loads(payload) for _retained, topic, payload in received if topic.endswith("/state")]


def test_daemon_publishes_severity_and_health_on_replayed_audio(tmp_path: Path, mosquitto) -> None:
    """An alert (severity alarm), then a burst during the cooldown: a warning and no alert."""
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "nnffnnnnffnnnn"), mosquitto, backbone="aisfx",
                           cooldown_seconds=100_000.0, warning_threshold=0.85)
    config = replace(config, mqtt=replace(config.mqtt, homeassistant_discovery=True))
    enroll(config, tmp_path / "enroll")
    mosquitto.register("asd/test/motor/#", "plant")
    daemon = Daemon(config)
    daemon.start()
    try:
        runner = threading.Thread(target=daemon.run)
        runner.start()
        runner.join(120)
        assert not runner.is_alive(), "the replay did not finish in time"
        text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.telemetry.port}/metrics", timeout=5).read().decode()
    finally:
        daemon.stop()
    received = mosquitto.collect("asd/test/motor/#", 100, timeout=5, client_id="plant")
    alerts = [json.loads(p) for _r, topic, p in received if topic.endswith("/alert")]
    assert [(a["type"], a["severity"]) for a in alerts] == [("raise", "alarm"), ("clear", "ok")]
    states = _states(received)
    levels = [(s["state"], s["severity"]) for s in states]
    assert ("alert", "alarm") in levels
    warnings = [s for s in states if s["severity"] == "warning"]
    assert len(warnings) == 1, levels  # a level change is one message ...
    assert warnings[0]["state"] == "normal" and warnings[0]["schema"] == "asd.state/1"  # ... and never an alert
    assert set(warnings[0]["health"]) == {"anomalous_ratio_1h", "anomalous_ratio_24h", "rank_ewma"}
    assert 0 < warnings[0]["health"]["anomalous_ratio_1h"] < 1
    assert levels[-1] == ("normal", "ok")
    retained = json.loads(mosquitto.retained("asd/test/motor/state"))
    # Retained: the last message sent (a health figure alone re-sends it only after 5 minutes).
    assert retained == states[-1] and retained["health"]["anomalous_ratio_24h"] > 0
    events = [json.loads(line) for line in (config.daemon.state_dir / "events.jsonl").read_text().splitlines()]
    assert [e["severity"] for e in events if e["kind"] == "severity"] == ["alarm", "ok", "warning", "ok"]
    # Scraped over HTTP: the severity as a one-hot gauge, the health figures.
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert {level: samples[("asd_severity", frozenset({"machine": "motor", "level": level}.items()))]
            for level in ("ok", "warning", "alarm")} == {"ok": 1.0, "warning": 0.0, "alarm": 0.0}
    ratio_1h = samples[("asd_health_anomalous_ratio", frozenset({"machine": "motor", "period": "1h"}.items()))]
    assert ratio_1h == pytest.approx(4 / 14)
    assert 0 < samples[("asd_health_rank_ewma", frozenset({"machine": "motor"}.items()))] < 1
    # Home Assistant discovery: the binary sensor and the two new sensors, retained.
    for component, key in (("binary_sensor", ""), ("sensor", "_severity"), ("sensor", "_anomalous_1h")):
        payload = mosquitto.retained(f"homeassistant/{component}/asd_test_motor{key}/config")
        assert payload is not None, (component, key)
        assert json.loads(payload)["state_topic"] == "asd/test/motor/state"
