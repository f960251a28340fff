"""The MQTT publisher against a real mosquitto on 127.0.0.1.

Every assertion about delivery uses what an independent subscriber (mosquitto_sub, see
``Broker`` in conftest.py) received. Subscriptions are registered as durable sessions before
anything is published, so a broker restart or a slow reconnect cannot make a test flaky.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from monitor.config import MqttConfig, TlsConfig
from monitor.errors import MqttConfigError
from monitor.outputs import messages
from monitor.outputs.messages import StateMessage, Topics
from monitor.outputs.mqtt import Publisher, discovery_payload, discovery_payloads
from monitor.outputs.outbox import Outbox

if TYPE_CHECKING:
    from tests.broker import Broker

REPO = Path(__file__).resolve().parents[2]
TOPICS = Topics("asd", "plant1", "asd-monitor")
ALERTS = TOPICS.alert("+")
PASSWORD = "s3cret-Pässwort-7Qx"

# A daemon in a child process, so that it can be killed -9 like a real one.
CHILD = """
import sys, time
from pathlib import Path
from monitor.config import MqttConfig
from monitor.outputs.messages import Topics
from monitor.outputs.mqtt import Publisher
from monitor.outputs.outbox import Outbox

port, outbox_path, count, wait_connected = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "connected"
publisher = Publisher(MqttConfig(port=port), Topics("asd", "plant1", "asd-monitor"), Outbox(outbox_path, 1000))
publisher.start()
for i in range(count):
    publisher.publish_reliable("asd/plant1/fan1/alert", f"alert {i}")
deadline = time.monotonic() + 10
while wait_connected and not (publisher.connected and publisher.wait_idle(0.05)) and time.monotonic() < deadline:
    time.sleep(0.02)
print("ready" if publisher.connected or not wait_connected else "not connected", flush=True)
time.sleep(60)
"""


def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.db", 1000)
    yield box
    box.close()


@pytest.fixture
def make_publisher(outbox: Outbox) -> Iterator[Callable[..., Publisher]]:
    """Publishers on the test's outbox (unless given another), stopped at teardown."""
    publishers: list[Publisher] = []

    def make(broker: Broker, box: Outbox | None = None, on_command: Callable[[str, bytes], None] | None = None, **config: object) -> Publisher:
        publisher = Publisher(MqttConfig(host="127.0.0.1", port=broker.port, **config), TOPICS, box or outbox, on_command)  # type: ignore[arg-type]
        publishers.append(publisher)
        return publisher

    yield make
    for publisher in publishers:
        publisher.stop(timeout=1.0)


def run_child(broker: Broker, outbox_path: Path, count: int, wait_connected: bool) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(broker.port), str(outbox_path), str(count), "connected" if wait_connected else "offline"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], 20)
    line = child.stdout.readline() if ready else "(no answer)"
    if line != "ready\n":
        child.kill()
        child.wait(timeout=10)
        pytest.fail(f"child daemon: {line.strip()}")
    return child


def sigkill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)


def alert_payload(i: int) -> str:
    return json.dumps({"event_id": f"e{i:03d}", "machine": "fan1", "text": "Lüfter ⚠ {quoted} \"x\""}, ensure_ascii=False)


def test_reliable_messages_arrive_in_order_with_exact_payloads(mosquitto: Broker, make_publisher: Callable[..., Publisher]) -> None:
    mosquitto.register(ALERTS, "sub-order")
    publisher = make_publisher(mosquitto)
    publisher.start()
    sent = [alert_payload(i) for i in range(30)]
    for payload in sent:
        publisher.publish_reliable(TOPICS.alert("fan1"), payload)
    assert publisher.wait_idle(10)
    received = mosquitto.collect(ALERTS, 30, client_id="sub-order")
    assert received == [(False, TOPICS.alert("fan1"), payload) for payload in sent]
    assert publisher.outbox_depth == 0
    assert publisher.published_total == 30


def test_alerts_published_during_a_broker_outage_all_arrive_in_order(mosquitto: Broker, make_publisher: Callable[..., Publisher]) -> None:
    mosquitto.register(ALERTS, "sub-outage")
    publisher = make_publisher(mosquitto)
    changes: list[bool] = []
    publisher.on_connection_change = changes.append
    publisher.start()
    assert wait_for(lambda: publisher.connected)
    mosquitto.stop()
    assert wait_for(lambda: not publisher.connected)
    sent = [alert_payload(i) for i in range(20)]
    for payload in sent:
        publisher.publish_reliable(TOPICS.alert("fan1"), payload)
    assert publisher.outbox_depth == 20
    mosquitto.start()  # same port
    assert publisher.wait_idle(15), "not delivered after the broker came back"
    received = mosquitto.collect(ALERTS, 20, client_id="sub-outage")
    assert [payload for _, _, payload in received] == sent
    assert changes == [True, False, True]
    assert mosquitto.retained(TOPICS.status()) == messages.ONLINE, "online is re-published on reconnect"


def test_a_message_in_flight_when_the_broker_dies_is_sent_again(mosquitto: Broker, make_publisher: Callable[..., Publisher]) -> None:
    """Sent but not acknowledged: it stays in the outbox and goes out again after reconnecting."""
    publisher = make_publisher(mosquitto)
    publisher.start()
    assert wait_for(lambda: publisher.connected)
    assert mosquitto.process is not None
    mosquitto.process.send_signal(signal.SIGSTOP)  # frozen: reads nothing, acknowledges nothing
    topic = TOPICS.state("fan1")
    publisher.publish_reliable(topic, "in flight", retain=True)
    time.sleep(0.3)  # let the delivery thread send it into the frozen broker's socket
    assert publisher.outbox_depth == 1, "acked without a PUBACK"
    mosquitto.kill()  # the unread message dies with the broker
    assert wait_for(lambda: not publisher.connected)
    mosquitto.start()
    assert publisher.wait_idle(15)
    assert mosquitto.retained(topic) == "in flight"


def test_undelivered_messages_survive_a_killed_daemon(mosquitto: Broker, make_publisher: Callable[..., Publisher], tmp_path: Path) -> None:
    mosquitto.register(ALERTS, "sub-kill")
    mosquitto.stop()
    path = tmp_path / "child-outbox.db"
    sigkill(run_child(mosquitto, path, 5, wait_connected=False))  # broker down: nothing sent
    mosquitto.start()
    box = Outbox(path, 1000)
    try:
        assert len(box) == 5
        publisher = make_publisher(mosquitto, box)
        publisher.start()
        assert publisher.wait_idle(10)
        publisher.stop()
    finally:
        box.close()
    received = mosquitto.collect(ALERTS, 5, client_id="sub-kill")
    assert [payload for _, _, payload in received] == [f"alert {i}" for i in range(5)]


def test_volatile_messages_are_dropped_while_disconnected(mosquitto: Broker, make_publisher: Callable[..., Publisher]) -> None:
    topic = TOPICS.score("fan1")
    mosquitto.register(topic, "sub-volatile")
    publisher = make_publisher(mosquitto)
    publisher.start()
    assert wait_for(lambda: publisher.connected)
    mosquitto.stop()
    assert wait_for(lambda: not publisher.connected)
    assert publisher.publish_volatile(topic, "while down") is False
    assert publisher.dropped_volatile_total == 1 and publisher.outbox_depth == 0
    mosquitto.start()
    assert wait_for(lambda: publisher.connected, 15)
    assert publisher.publish_volatile(topic, "while up") is True
    assert publisher.published_total == 1
    # Had "while down" been queued anywhere, it would have been sent first.
    assert mosquitto.collect(topic, 1, client_id="sub-volatile") == [(False, topic, "while up")]


def test_status_is_online_while_connected_and_offline_after_stop(mosquitto: Broker, make_publisher: Callable[..., Publisher]) -> None:
    publisher = make_publisher(mosquitto)
    changes: list[bool] = []
    publisher.on_connection_change = changes.append
    publisher.start()
    assert wait_for(lambda: publisher.connected)
    assert wait_for(lambda: mosquitto.retained(TOPICS.status()) == messages.ONLINE, 5)
    publisher.publish_reliable(TOPICS.state("fan1"), "last state", retain=True)
    publisher.stop()
    assert not publisher.connected and changes == [True, False]
    assert mosquitto.retained(TOPICS.status()) == messages.OFFLINE
    assert mosquitto.retained(TOPICS.state("fan1")) == "last state", "stop() drains the outbox"


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _packet_size(buffer: bytes) -> int | None:
    """Length of the MQTT packet at the start of ``buffer``; None until its header is complete."""
    length = 0
    for i, byte in enumerate(buffer[1:5], start=1):
        length += (byte & 0x7F) << (7 * (i - 1))
        if not byte & 0x80:
            return 1 + i + length
    return None


class SlowLink:
    """A TCP hop for one client connection that behaves like a slow network: the broker's
    packets reach the client ``LATENCY`` s late, the client's reach the broker one at a time,
    ``GAP`` s apart. A broker packet arriving after the client closed its socket makes the
    client's kernel answer with a reset, which this hop passes on to the broker, as TCP would:
    the broker then drops the connection as broken, before reading what the client sent last."""

    LATENCY, GAP = 0.05, 0.2

    def __init__(self, broker_port: int) -> None:
        self._broker_port = broker_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(10)
        self.port = self._listener.getsockname()[1]
        self._pumps: list[threading.Thread] = []
        self._accepted = threading.Thread(target=self._accept, daemon=True)
        self._accepted.start()

    def __enter__(self) -> SlowLink:
        return self

    def __exit__(self, *_exc: object) -> None:
        """Once everything the client sent has reached the broker (or the link was reset)."""
        self._accepted.join()
        for pump in self._pumps:
            pump.join(timeout=5)
        self._listener.close()

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        broker = socket.create_connection(("127.0.0.1", self._broker_port))
        packets: queue.Queue[bytes | None] = queue.Queue()
        closed = threading.Event()
        for pump in (lambda: self._read_client(client, packets, closed), lambda: self._to_broker(packets, broker),
                     lambda: self._to_client(broker, client, closed)):
            self._pumps.append(threading.Thread(target=pump, daemon=True))
            self._pumps[-1].start()

    @staticmethod
    def _read_client(client: socket.socket, packets: queue.Queue[bytes | None], closed: threading.Event) -> None:
        buffer = b""
        while chunk := _recv(client):
            buffer += chunk
            while (size := _packet_size(buffer)) is not None and len(buffer) >= size:
                packets.put(buffer[:size])
                buffer = buffer[size:]
        closed.set()
        packets.put(None)
        client.close()

    def _to_broker(self, packets: queue.Queue[bytes | None], broker: socket.socket) -> None:
        while (packet := packets.get()) is not None:
            try:
                broker.sendall(packet)
            except OSError:
                return  # reset
            time.sleep(self.GAP)
        with contextlib.suppress(OSError):  # unless the broker has closed the connection already
            broker.shutdown(socket.SHUT_WR)

    def _to_client(self, broker: socket.socket, client: socket.socket, closed: threading.Event) -> None:
        while data := _recv(broker):
            time.sleep(self.LATENCY)
            if closed.is_set():
                broker.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                broker.shutdown(socket.SHUT_RDWR)
                broker.close()
                return
            try:
                client.sendall(data)
            except OSError:
                return
        broker.close()


def test_stop_says_offline_exactly_once_over_a_slow_link(mosquitto: Broker, make_publisher: Callable[..., Publisher]) -> None:
    """stop() disconnects only once ``offline`` is acknowledged: a DISCONNECT sent right behind
    it lets the PUBACK cross the client's close, the broker sees a broken connection and its will
    says ``offline`` a second time (``online -> offline -> offline``, "Broken pipe" in its log)."""
    mosquitto.register(TOPICS.status(), "sub-status")
    with SlowLink(mosquitto.port) as link:
        publisher = make_publisher(link)
        publisher.start()
        assert wait_for(lambda: mosquitto.retained(TOPICS.status()) == messages.ONLINE, 5)
        publisher.stop()
    received = mosquitto.collect(TOPICS.status(), 4, timeout=2, client_id="sub-status")
    assert [payload for retained, _topic, payload in received if not retained] == [messages.ONLINE, messages.OFFLINE]
    assert mosquitto.retained(TOPICS.status()) == messages.OFFLINE


def test_last_will_says_offline_when_the_daemon_is_killed(mosquitto: Broker, tmp_path: Path) -> None:
    child = run_child(mosquitto, tmp_path / "child-outbox.db", 0, wait_connected=True)
    try:
        assert mosquitto.retained(TOPICS.status()) == messages.ONLINE
    finally:
        sigkill(child)
    assert wait_for(lambda: mosquitto.retained(TOPICS.status(), timeout=1) == messages.OFFLINE, 10)


def test_commands_are_received_and_resubscribed_after_a_reconnect(mosquitto: Broker, make_publisher: Callable[..., Publisher]) -> None:
    commands: list[tuple[str, bytes]] = []
    publisher = make_publisher(mosquitto, on_command=lambda topic, payload: commands.append((topic, payload)))
    publisher.start()
    topic = "asd/plant1/fan1/cmd/enroll"

    def delivered(payload: str) -> bool:
        # The subscription is made in the background after connecting: retry until it is live.
        def check() -> bool:
            mosquitto.publish(topic, payload)
            return (topic, payload.encode()) in commands
        return wait_for(check, 10)

    assert wait_for(lambda: publisher.connected)
    assert delivered('{"seconds": 60}')
    mosquitto.stop()
    mosquitto.start()
    assert wait_for(lambda: publisher.connected, 15)
    assert delivered("again")


def test_retained_messages_through_the_outbox_are_retained(mosquitto: Broker, make_publisher: Callable[..., Publisher]) -> None:
    publisher = make_publisher(mosquitto)
    publisher.start()
    topic, payload = discovery_payload(TOPICS, "fan1", "homeassistant")
    publisher.publish_reliable(topic, payload, retain=True)
    assert publisher.wait_idle(10)
    assert mosquitto.retained(topic) == payload


def test_password_from_file_works_and_is_never_logged(mosquitto_factory: Callable[..., Broker], make_publisher: Callable[..., Publisher], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    broker = mosquitto_factory(users={"asd": PASSWORD})
    broker.register(ALERTS, "sub-auth")
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")  # as `echo secret > file` writes it
    publisher = make_publisher(broker, username="asd", password_file=password_file)
    publisher.start()
    publisher.publish_reliable(TOPICS.alert("fan1"), "authenticated")
    assert publisher.wait_idle(10)
    publisher.stop()
    assert broker.collect(ALERTS, 1, client_id="sub-auth") == [(False, TOPICS.alert("fan1"), "authenticated")]
    assert any(r.name.startswith("monitor.outputs.mqtt") and r.levelno == logging.DEBUG for r in caplog.records), "DEBUG logs were captured"
    assert PASSWORD not in caplog.text


def test_password_from_environment_works(mosquitto_factory: Callable[..., Broker], make_publisher: Callable[..., Publisher], monkeypatch: pytest.MonkeyPatch) -> None:
    broker = mosquitto_factory(users={"asd": PASSWORD})
    monkeypatch.setenv("ASD_TEST_MQTT_PASSWORD", PASSWORD)
    publisher = make_publisher(broker, username="asd", password_env="ASD_TEST_MQTT_PASSWORD")
    publisher.start()
    assert wait_for(lambda: publisher.connected)


def test_wrong_password_logs_a_clear_error_and_keeps_retrying(mosquitto_factory: Callable[..., Broker], make_publisher: Callable[..., Publisher], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    broker = mosquitto_factory(users={"asd": "the-right-one"})
    monkeypatch.setenv("ASD_TEST_MQTT_PASSWORD", PASSWORD)
    publisher = make_publisher(broker, username="asd", password_env="ASD_TEST_MQTT_PASSWORD")
    publisher.start()  # must not raise
    publisher.publish_reliable(TOPICS.alert("fan1"), "waits for the operator")

    def refusals() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == "monitor.outputs.mqtt"]

    assert wait_for(lambda: refusals(), 10)
    first = refusals()[0]
    assert f"127.0.0.1:{broker.port}" in first and "refused" in first and "check mqtt.username and the password" in first
    assert "\n" not in first
    assert not publisher.connected and publisher.outbox_depth == 1
    # The operator fixes the broker's user list: the daemon gets in by itself, alert included.
    broker.stop()
    broker.users = {"asd": PASSWORD}
    broker.start()
    assert wait_for(lambda: publisher.connected, 15)
    assert publisher.wait_idle(10)
    assert PASSWORD not in caplog.text


def test_password_sources_that_cannot_be_read_name_the_source(mosquitto: Broker, outbox: Outbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASD_TEST_NO_SUCH_VAR", raising=False)
    with pytest.raises(MqttConfigError, match="^mqtt.password_env: environment variable ASD_TEST_NO_SUCH_VAR is not set$"):
        Publisher(MqttConfig(port=mosquitto.port, username="asd", password_env="ASD_TEST_NO_SUCH_VAR"), TOPICS, outbox)
    missing = tmp_path / "gone"
    with pytest.raises(MqttConfigError, match=f"^mqtt.password_file: cannot read {missing} "):
        Publisher(MqttConfig(port=mosquitto.port, username="asd", password_file=missing), TOPICS, outbox)
    secret = tmp_path / "secret"
    secret.write_text(PASSWORD)
    with pytest.raises(MqttConfigError, match="^mqtt.username: required when a password is configured$") as info:
        Publisher(MqttConfig(port=mosquitto.port, password_file=secret), TOPICS, outbox)
    assert PASSWORD not in str(info.value)


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


def test_tls_connection_verifies_the_broker(mosquitto_factory: Callable[..., Broker], make_publisher: Callable[..., Publisher], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cert, key = self_signed(tmp_path, "broker")
    broker = mosquitto_factory(tls=(cert, key))
    broker.register(ALERTS, "sub-tls")
    publisher = make_publisher(broker, tls=TlsConfig(enabled=True, ca_file=cert))
    publisher.start()
    publisher.publish_reliable(TOPICS.alert("fan1"), "over TLS")
    assert publisher.wait_idle(10)
    assert broker.collect(ALERTS, 1, client_id="sub-tls") == [(False, TOPICS.alert("fan1"), "over TLS")]
    # A broker whose certificate the configured CA did not sign is refused.
    other_ca, _ = self_signed(tmp_path, "other")
    with caplog.at_level(logging.WARNING, logger="monitor.outputs.mqtt"):
        impostor = make_publisher(broker, Outbox(tmp_path / "other.db", 10), client_id="other", tls=TlsConfig(enabled=True, ca_file=other_ca))
        impostor.start()
        assert wait_for(lambda: any("TLS handshake failed" in r.getMessage() for r in caplog.records), 5)
    assert not impostor.connected


def test_unreadable_tls_files_name_the_file(outbox: Outbox, tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(MqttConfigError, match=f"^mqtt.tls: cannot load ca_file {junk} "):
        Publisher(MqttConfig(tls=TlsConfig(enabled=True, ca_file=junk)), TOPICS, outbox)


def test_unreachable_broker_at_start_is_not_an_error(mosquitto: Broker, make_publisher: Callable[..., Publisher], caplog: pytest.LogCaptureFixture) -> None:
    mosquitto.stop()
    publisher = make_publisher(mosquitto)
    with caplog.at_level(logging.WARNING, logger="monitor.outputs.mqtt"):
        publisher.start()
        publisher.publish_reliable(TOPICS.alert("fan1"), "early alert")
        assert wait_for(lambda: any("cannot connect to" in r.getMessage() for r in caplog.records), 5)
    mosquitto.start()
    assert publisher.wait_idle(15)


def test_discovery_payload_maps_the_alert_state_to_a_problem_sensor() -> None:
    topic, text = discovery_payload(TOPICS, "fan1", "homeassistant")
    assert topic == "homeassistant/binary_sensor/asd_plant1_fan1/config"
    config = json.loads(text)
    assert config["device_class"] == "problem"
    assert config["state_topic"] == TOPICS.state("fan1")
    assert config["availability_topic"] == TOPICS.status()
    assert (config["payload_available"], config["payload_not_available"]) == (messages.ONLINE, messages.OFFLINE)
    assert config["unique_id"] and config["unique_id"] != json.loads(discovery_payload(TOPICS, "fan2", "homeassistant")[1])["unique_id"]
    assert config["device"]["name"] == "fan1" and config["device"]["identifiers"]
    # Home Assistant renders value_template with Jinja2: check it on real state messages.
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(config["value_template"])
    for state, expected in [("alert", config["payload_on"]), ("normal", config["payload_off"]), ("sensor_fault", config["payload_off"])]:
        payload = StateMessage("plant1", "fan1", state, "2024-01-01T00:00:00.000Z").to_json()  # type: ignore[arg-type]
        assert template.render(value_json=json.loads(payload)) == expected


# Keys of Home Assistant's MQTT discovery for a sensor (https://www.home-assistant.io/integrations/sensor.mqtt/),
# the ones these payloads use; a misspelt key is ignored by Home Assistant without a word.
HA_SENSOR_KEYS = {"name", "unique_id", "state_topic", "value_template", "availability_topic", "payload_available",
                  "payload_not_available", "device", "unit_of_measurement", "device_class", "state_class", "options",
                  "icon"}


def _render(config: dict, state: StateMessage) -> str:
    jinja2 = pytest.importorskip("jinja2")
    return jinja2.Environment().from_string(config["value_template"]).render(value_json=json.loads(state.to_json()))


def test_discovery_adds_severity_and_health_sensors_on_the_same_device() -> None:
    payloads = discovery_payloads(TOPICS, "fan1", "homeassistant")
    assert payloads[0] == discovery_payload(TOPICS, "fan1", "homeassistant")  # the binary sensor, unchanged
    (severity_topic, severity_text), (health_topic, health_text) = payloads[1:3]
    assert severity_topic == "homeassistant/sensor/asd_plant1_fan1_severity/config"
    assert health_topic == "homeassistant/sensor/asd_plant1_fan1_anomalous_1h/config"
    binary = json.loads(payloads[0][1])
    unique_ids = {binary["unique_id"]}
    for text in (severity_text, health_text):
        config = json.loads(text)
        assert set(config) <= HA_SENSOR_KEYS, set(config) - HA_SENSOR_KEYS
        assert config["name"] and config["state_topic"] == TOPICS.state("fan1")
        assert config["availability_topic"] == TOPICS.status()
        assert (config["payload_available"], config["payload_not_available"]) == (messages.ONLINE, messages.OFFLINE)
        assert config["device"]["identifiers"] == binary["device"]["identifiers"]  # one device, three entities
        assert config["unique_id"] not in unique_ids
        unique_ids.add(config["unique_id"])
    other = {json.loads(t)["unique_id"] for _topic, t in discovery_payloads(TOPICS, "fan2", "homeassistant")}
    assert not other & unique_ids

    severity, health = json.loads(severity_text), json.loads(health_text)
    assert "unit_of_measurement" not in severity and severity["device_class"] == "enum"
    assert set(severity["options"]) == {"ok", "warning", "alarm"}
    assert health["unit_of_measurement"] == "%" and health["state_class"] == "measurement"
    since = "2024-01-01T00:00:00.000Z"
    for level in ("ok", "warning", "alarm"):
        assert _render(severity, StateMessage("plant1", "fan1", "normal", since, severity=level)) == level  # type: ignore[arg-type]
    figures = {"anomalous_ratio_1h": 0.1234, "anomalous_ratio_24h": 0.01, "rank_ewma": 0.5}
    assert _render(health, StateMessage("plant1", "fan1", "normal", since, health=figures)) == "12.3"
    # Before the first scored window: "None", which Home Assistant shows as unknown, not 0 %.
    assert _render(health, StateMessage("plant1", "fan1", "starting", since)) == "None"
    assert _render(health, StateMessage("plant1", "fan1", "starting", since, health={"anomalous_ratio_1h": None})) == "None"
