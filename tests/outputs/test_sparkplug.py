"""The Sparkplug B edge node against a real mosquitto, seen by a decoding host application (a
paho client decoding with pysparkplug): births, data on change and on an alert raised by the
real daemon on real audio, a rebirth command, and the NDEATH will after ``kill -9``."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pysparkplug", reason="the optional extra 'sparkplug' (pysparkplug) is not installed")

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pysparkplug import DataType, MessageType, Metric, NCmd, Topic

from monitor import demo
from monitor.bank.store import BankStore
from monitor.config import (
    DEFAULT_CONDITION,
    BackboneConfig,
    Config,
    DaemonConfig,
    MqttConfig,
    SparkplugConfig,
    config_from_dict,
)
from monitor.enrollment.files import enroll_files
from monitor.errors import ConfigError, MissingDependency
from monitor.outputs.plant import MachineStatus, PlantFeed
from monitor.outputs.sparkplug import (
    BD_SEQ,
    DEVICE_METRICS,
    REBIRTH,
    SparkplugNode,
    device_metrics,
    missing_status_fields,
)
from monitor.scoring.detector import Detector
from monitor.service.daemon import Daemon, _sparkplug_node
from tests.broker import Broker
from tests.daemons import (
    clips,
    daemon_config,
    events_of,
    run_to_end,
    wait_for,
    write_yaml,
)

GROUP = "plant"
_client_ids = itertools.count()


@dataclass(frozen=True)
class Received:
    topic: Topic
    payload: Any  # the pysparkplug payload of topic.message_type

    @property
    def kind(self) -> MessageType:
        return MessageType(self.topic.message_type)

    def metrics(self) -> dict[str, Metric]:
        return {m.name: m for m in self.payload.metrics}

    def bd_seq(self) -> int:
        metric = self.payload.bd_seq_metric if self.kind == MessageType.NDEATH else self.metrics()[BD_SEQ]
        assert metric.datatype == DataType.INT64
        return metric.value


class Host:
    """A Sparkplug host application's view of the broker: every message of the group, decoded."""

    def __init__(self, broker: Broker, group: str = GROUP) -> None:
        self.received: list[Received] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._group = group
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"host-{next(_client_ids)}")
        self.client.on_connect = lambda client, *_: client.subscribe(f"spBv1.0/{group}/#", qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        for user, password in list(broker.users.items())[:1]:
            self.client.username_pw_set(user, password)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the host did not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        topic = Topic.from_str(message.topic)
        payload = MessageType(topic.message_type).payload.decode(message.payload)
        with self._cond:
            self.received.append(Received(topic, payload))
            self._cond.notify_all()

    def wait(self, predicate: Callable[[list[Received]], bool], timeout: float = 20.0) -> list[Received]:
        """Every message so far, once ``predicate`` holds for them."""
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self.received), timeout), \
                f"timed out; received {[(str(r.topic), r.payload) for r in self.received]}"
            return list(self.received)

    def of(self, kind: MessageType, device: str | None = None) -> list[Received]:
        with self._cond:
            return [r for r in self.received if r.kind == kind and (device is None or r.topic.device_id == device)]

    def count(self, kind: MessageType, n: int, timeout: float = 20.0) -> list[Received]:
        self.wait(lambda _: len(self.of(kind)) >= n, timeout)
        return self.of(kind)

    def command_rebirth(self, edge_node: str) -> None:
        now = int(time.time() * 1000)
        payload = NCmd(now, (Metric(now, REBIRTH, DataType.BOOLEAN, value=True),)).encode(include_dtypes=True)
        self.client.publish(f"spBv1.0/{self._group}/NCMD/{edge_node}", payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def host(mosquitto: Broker):
    listener = Host(mosquitto)
    yield listener
    listener.close()


def node_config(tmp_path: Path, broker: Broker, **sparkplug: Any) -> Config:
    (tmp_path / "state").mkdir(exist_ok=True)  # the daemon makes it before the node starts
    return Config(daemon=DaemonConfig(name="box-1", state_dir=tmp_path / "state"),
                  mqtt=MqttConfig(enabled=False, port=broker.port, site=GROUP),
                  sparkplug=SparkplugConfig(enabled=True, **sparkplug))


def seqs_after_last_nbirth(received: list[Received]) -> list[int]:
    last = max(i for i, r in enumerate(received) if r.kind == MessageType.NBIRTH)
    return [r.payload.seq for r in received[last:] if r.kind != MessageType.NDEATH]


# --- the metrics ----------------------------------------------------------------------------

def test_every_status_field_is_a_metric_that_survives_encoding_with_its_type() -> None:
    assert missing_status_fields() == set()
    status = MachineStatus("fan", state="alert", severity="alarm", fused_rank=0.995, anomalous=True,
                           window_end="2026-12-02T01:00:10.250Z", alert_event_id="e1", alert_type="raise",
                           alert_time="2026-12-02T01:00:10.250Z", anomalous_1h=0.25)
    (decoded,) = [Metric.from_pb(m.to_pb(include_dtype=True)) for m in device_metrics(status, 0) if m.name == "Window End"]
    assert decoded.datatype == DataType.DATETIME
    assert decoded.value == datetime(2026, 12, 2, 1, 0, 10, 250000, tzinfo=timezone.utc)
    values = {m.name: m for m in device_metrics(status, 0)}
    assert values["Fused Rank"].datatype == DataType.DOUBLE and values["Fused Rank"].value == 0.995
    assert values["Alert/Active"].value is True and values["Alert/Event Id"].value == "e1"
    assert values["Health/Rank EWMA"].value is None  # not yet: a null metric, not a made-up 0
    assert Metric.from_pb(values["Health/Rank EWMA"].to_pb(include_dtype=True)).is_null


def test_a_sparkplug_id_with_a_topic_separator_is_refused_by_key() -> None:
    with pytest.raises(ConfigError, match=r"sparkplug\.group_id: 'line/2' must not contain"):
        config_from_dict({"sparkplug": {"enabled": True, "group_id": "line/2"}})
    with pytest.raises(ConfigError, match=r"sparkplug\.tls\.ca_file: /nonexistent/ca\.pem does not exist"):
        config_from_dict({"sparkplug": {"tls": {"enabled": True, "ca_file": "/nonexistent/ca.pem"}}})


def test_without_the_extra_the_daemon_names_what_to_install(tmp_path: Path, mosquitto: Broker,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "monitor.outputs.sparkplug")
    monkeypatch.setitem(sys.modules, "pysparkplug", None)  # as if not installed: importing it fails
    with pytest.raises(MissingDependency, match=r"sparkplug\.enabled: pysparkplug is not installed: pip install"):
        _sparkplug_node(node_config(tmp_path, mosquitto), PlantFeed(), tmp_path / "state")


# --- the node on its own: births, data, rebirth, seq, death -------------------------------------

def test_births_data_on_change_a_rebirth_command_and_ndeath_on_stop(tmp_path: Path, mosquitto: Broker, host: Host) -> None:
    feed = PlantFeed()
    feed.add_machines(["fan", "pump"])
    node = SparkplugNode(node_config(tmp_path, mosquitto), feed, ["fan", "pump"], tmp_path / "state")
    node.start()
    try:
        host.count(MessageType.DBIRTH, 2)
        (nbirth,) = host.of(MessageType.NBIRTH)
        assert str(nbirth.topic) == "spBv1.0/plant/NBIRTH/box-1"  # group: mqtt.site, edge node: daemon.name
        assert nbirth.bd_seq() == 0 == node.bd_seq and (tmp_path / "state" / "sparkplug-bdseq").read_text() == "0\n"
        assert nbirth.metrics()[REBIRTH].value is False and nbirth.metrics()[REBIRTH].datatype == DataType.BOOLEAN
        births = {r.topic.device_id: r for r in host.of(MessageType.DBIRTH)}
        assert set(births) == {"fan", "pump"}
        assert {(m.name, m.datatype) for m in births["fan"].payload.metrics} == {(m.name, m.datatype) for m in DEVICE_METRICS}
        assert births["fan"].metrics()["State"].value == "starting"

        feed.update("fan", fused_rank=0.5, state="normal")
        (data,) = [r.payload for r in host.count(MessageType.DDATA, 1)]
        assert {m.name: m.value for m in data.metrics} == {"Fused Rank": 0.5, "State": "normal"}  # what changed, only

        host.command_rebirth("box-1")
        host.count(MessageType.NBIRTH, 2)
        rebirths = host.count(MessageType.DBIRTH, 4)[2:]
        assert host.of(MessageType.NBIRTH)[1].bd_seq() == 0  # the same connection: the same bdSeq
        assert {r.topic.device_id: r.metrics()["Fused Rank"].value for r in rebirths} == {"fan": 0.5, "pump": None}

        for i in range(300):  # seq wraps at 256
            feed.update("pump", fused_rank=i / 1000)
        host.count(MessageType.DDATA, 301)
        assert seqs_after_last_nbirth(host.wait(lambda _: True)) == [i % 256 for i in range(3 + 300)]
    finally:
        node.stop()
    (death,) = host.count(MessageType.NDEATH, 1)
    assert death.bd_seq() == 0 and str(death.topic) == "spBv1.0/plant/NDEATH/box-1"


def test_the_node_logs_in_with_the_mqtt_credentials(tmp_path: Path, mosquitto_factory: Callable[..., Broker],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    broker = mosquitto_factory(users={"asd": "s3cret"})  # anonymous access off
    monkeypatch.setenv("ASD_TEST_MQTT_PASSWORD", "s3cret")
    config = node_config(tmp_path, broker)
    config = replace(config, mqtt=replace(config.mqtt, username="asd", password_env="ASD_TEST_MQTT_PASSWORD"))
    host = Host(broker)
    node = SparkplugNode(config, PlantFeed(), ["fan"], tmp_path / "state")
    node.start()
    try:
        assert host.count(MessageType.DBIRTH, 1)[0].topic.device_id == "fan"
    finally:
        node.stop()
        host.close()


def test_a_refused_connect_uses_up_its_bdseq(tmp_path: Path, mosquitto_factory: Callable[..., Broker],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    broker = mosquitto_factory(users={"asd": "s3cret"})
    monkeypatch.setenv("ASD_TEST_SPB_PASSWORD", "wrong")
    node = SparkplugNode(node_config(tmp_path, broker, username="asd", password_env="ASD_TEST_SPB_PASSWORD"),
                         PlantFeed(), ["fan"], tmp_path / "state")
    node.start()
    try:
        wait_for(lambda: node.bd_seq >= 1, 10)  # each CONNECT sent takes the next number, per the spec
    finally:
        node.stop()
    assert node.births_total == 0
    assert (tmp_path / "state" / "sparkplug-bdseq").read_text() == f"{node.bd_seq}\n"


def test_a_lost_connection_is_reborn_with_the_next_bdseq(tmp_path: Path, mosquitto: Broker) -> None:
    feed = PlantFeed()
    node = SparkplugNode(node_config(tmp_path, mosquitto), feed, ["fan"], tmp_path / "state")
    node.start()
    try:
        wait_for(lambda: node.births_total == 1, 20)
        mosquitto.kill()  # a crash: the connection breaks without a word
        mosquitto.start()
        host = Host(mosquitto)
        (nbirth,) = host.count(MessageType.NBIRTH, 1, timeout=30)  # paho's reconnect backoff starts at 1 s
        assert nbirth.bd_seq() == 1 == node.bd_seq
        host.close()
    finally:
        node.stop()


# --- the daemon: an alert on real audio; kill -9 -------------------------------------------------

def test_an_alert_raised_on_real_audio_reaches_the_host_as_ddata(tmp_path: Path, mosquitto: Broker, host: Host) -> None:
    state = tmp_path / "state"
    # The shipped log-mel backbone, which raises the demo's alert too, in a third of aisfx's time.
    base = Config(backbones=[BackboneConfig("logmel")],
                  sparkplug=SparkplugConfig(enabled=True, group_id=GROUP, host="127.0.0.1", port=mosquitto.port))
    config = demo.demo_config(state, 40.0, base)  # the demo fan: healthy clips, then the faulty ones
    config = replace(config, mqtt=replace(config.mqtt, enabled=False))  # Sparkplug's own connection only
    enroll_files(Detector.from_config(config), BankStore(demo.bank_dir(state)), demo.enroll_clips(), DEFAULT_CONDITION)
    daemon = Daemon(config)
    run_to_end(daemon)

    (raised,) = [e["alert"] for e in events_of(daemon) if e["kind"] == "alert" and e["alert"]["type"] == "raise"]
    host.count(MessageType.NDEATH, 1)
    received = host.wait(lambda _: True)
    births = [r for r in received if r.kind == MessageType.DBIRTH]
    assert [r.topic.device_id for r in births] == [demo.MACHINE] and str(births[0].topic).startswith("spBv1.0/plant/DBIRTH/asd-demo/")
    data = [r.metrics() for r in received if r.kind == MessageType.DDATA]
    (alert,) = [m for m in data if "Alert/Event Id" in m and m["Alert/Event Id"].value == raised["event_id"]]
    assert alert["Alert/Type"].value == "raise" and alert["Alert/Active"].value is True
    assert alert["Alert/Time"].datatype == DataType.DATETIME
    assert alert["Alert/Time"].value == datetime.fromisoformat(raised["end"].replace("Z", "+00:00"))
    assert any(m.get("State") is not None and m["State"].value == "alert" for m in data)
    assert any("Fused Rank" in m and m["Fused Rank"].value > 0.9 for m in data)
    (nbirth,) = [r for r in received if r.kind == MessageType.NBIRTH]
    assert received[-1].kind == MessageType.NDEATH and received[-1].bd_seq() == nbirth.bd_seq() == 0
    assert seqs_after_last_nbirth(received) == [i % 256 for i in range(len(received) - 1)]


def test_kill_9_leaves_the_ndeath_will_and_a_restart_takes_the_next_bdseq(tmp_path: Path, mosquitto: Broker, host: Host) -> None:
    config = daemon_config(tmp_path, clips(tmp_path / "replay", "nn"), loop=True)  # runs until stopped
    config = replace(config, sparkplug=SparkplugConfig(enabled=True, group_id=GROUP, port=mosquitto.port))
    path = write_yaml(tmp_path / "daemon.yaml", config)
    executable = Path(sys.executable).with_name("asd-monitor")
    command = [str(executable), "run", "--config", str(path)]

    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (nbirth,) = host.count(MessageType.NBIRTH, 1, timeout=60)
        host.count(MessageType.DBIRTH, 1)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    (death,) = host.count(MessageType.NDEATH, 1)  # the broker's, from the will: the process said nothing
    assert nbirth.bd_seq() == death.bd_seq() == 0 and str(death.topic) == "spBv1.0/plant/NDEATH/asd-test"

    second = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        reborn = host.count(MessageType.NBIRTH, 2, timeout=60)[1]
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    assert reborn.bd_seq() == 1
    assert [d.bd_seq() for d in host.count(MessageType.NDEATH, 2)] == [0, 1]  # the clean stop's own NDEATH
