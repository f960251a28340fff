"""A Sparkplug B 3.0 edge node: each machine's status for SCADA, MES and historians that speak
Sparkplug (Ignition, most MQTT historians), over MQTT.

The daemon is one edge node (``spBv1.0/<group>/.../<edge node>``) and every machine one of its
devices. Payloads are encoded and decoded by ``pysparkplug`` (the optional extra ``sparkplug``);
the MQTT connection is paho's, and our own, separate from the daemon's main one in
monitor/outputs/mqtt.py, because Sparkplug makes NDEATH the connection's will and that
connection already has a will of its own (``offline``).

The session, per the specification:

* **bdSeq**: one number per MQTT connection (0-255, wrapping), in the will's NDEATH and in the
  NBIRTH that follows the connect, so a host application can tell a death of this connection
  from a late one of an earlier connection. It is persisted under the state dir and incremented
  at every start, after every lost connection and after a refused one, so a restart after
  ``kill -9`` never repeats the number the broker is about to announce dead.
* **births**: after every connect, and when a host sends ``Node Control/Rebirth`` (NCMD), an
  NBIRTH (seq 0, bdSeq, the node's metrics) then one DBIRTH per machine with every metric.
* **data**: a DDATA per change of a machine's status (monitor/outputs/plant.py), with only the
  metrics that changed; an alert raised or cleared always carries the ``Alert/*`` metrics, its
  event id among them. seq counts every message after NBIRTH, 0-255 wrapping.
* **death**: the broker publishes the will when the connection breaks (a crash, ``kill -9``, a
  network cut); a clean stop publishes the NDEATH itself before disconnecting, since a clean
  disconnect discards the will.

All publishing happens on one thread, which drains a ``PlantFeed`` subscription: a slow broker
delays that thread only, never a window (the feed drops the oldest changes of a full queue, and
the next births carry the latest status anyway). Changes that arrive while disconnected are
dropped for the same reason: the births after the reconnect carry the whole status.

Not implemented: primary host application awareness (waiting for a host's STATE before the
births), metric aliases, and DCMD (no device metric is writable).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode
from pysparkplug import (
    DataType,
    DBirth,
    DData,
    MessageType,
    Metric,
    NBirth,
    NCmd,
    NDeath,
    Topic,
)

from monitor import __version__
from monitor.config import Config, MqttConfig
from monitor.outputs.mqtt import RECONNECT_MAX_SECONDS, make_client
from monitor.outputs.plant import (
    STATUS_FIELDS,
    Change,
    MachineStatus,
    PlantFeed,
    Subscription,
)

log = logging.getLogger(__name__)

SEQ_MODULO = 256  # seq and bdSeq are 0-255 and wrap
BD_SEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
BD_SEQ_FILE = "sparkplug-bdseq"  # under the state dir: the bdSeq of the last connection
POLL_SECONDS = 0.2  # how soon the drain thread sees a birth request or a stop
DEATH_ACK_SECONDS = 2.0  # how long a clean stop waits for the broker to take the NDEATH


@dataclass(frozen=True)
class DeviceMetric:
    """One Sparkplug metric of a machine (device), read from one ``MachineStatus`` field."""

    name: str
    datatype: DataType
    field: str  # of MachineStatus
    convert: Callable[[Any], Any] | None = None  # the field's value to the metric's, if not as is

    def read(self, status: MachineStatus) -> Any:
        """The metric's value in the form pysparkplug encodes; None is sent as a null metric."""
        value = getattr(status, self.field)
        if self.convert is not None:
            return self.convert(value)
        if self.datatype == DataType.DATETIME:
            # ISO 8601 UTC ("...Z") to a datetime; "" (not yet) is null.
            return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
        return value


def _alert_open(alert_type: str) -> bool:
    return alert_type == "raise"


# Every field of MachineStatus (the test checks none is missing); "/" groups metrics into
# folders in a host's tag browser.
DEVICE_METRICS: tuple[DeviceMetric, ...] = (
    DeviceMetric("State", DataType.STRING, "state"),
    DeviceMetric("State Detail", DataType.STRING, "detail"),
    DeviceMetric("Severity", DataType.STRING, "severity"),
    DeviceMetric("Fused Rank", DataType.DOUBLE, "fused_rank"),
    DeviceMetric("Anomalous", DataType.BOOLEAN, "anomalous"),
    DeviceMetric("Window End", DataType.DATETIME, "window_end"),
    DeviceMetric("Sensor Fault", DataType.STRING, "sensor_fault"),
    DeviceMetric("Health/Anomalous Ratio 1h", DataType.DOUBLE, "anomalous_1h"),
    DeviceMetric("Health/Anomalous Ratio 24h", DataType.DOUBLE, "anomalous_24h"),
    DeviceMetric("Health/Rank EWMA", DataType.DOUBLE, "rank_ewma"),
    DeviceMetric("Bank Version", DataType.STRING, "bank_version"),
    DeviceMetric("Alert/Active", DataType.BOOLEAN, "alert_type", _alert_open),  # from a raise to its clear
    DeviceMetric("Alert/Event Id", DataType.STRING, "alert_event_id"),
    DeviceMetric("Alert/Type", DataType.STRING, "alert_type"),
    DeviceMetric("Alert/Time", DataType.DATETIME, "alert_time"),
    DeviceMetric("Alert/Verdict", DataType.STRING, "verdict"),
)
# What an alert raise or clear always sends, changed or not: a host sees every alert event.
ALERT_FIELDS = frozenset({"alert_event_id", "alert_type", "alert_time", "verdict"})


def missing_status_fields() -> set[str]:
    """Fields of MachineStatus that no device metric reads (a new field needs a metric)."""
    return set(STATUS_FIELDS) - {m.field for m in DEVICE_METRICS}


def device_metrics(status: MachineStatus, timestamp: int, fields: frozenset[str] | None = None) -> tuple[Metric, ...]:
    """The machine's metrics (all of them, or those reading ``fields``), stamped ``timestamp`` (ms)."""
    return tuple(Metric(timestamp, m.name, m.datatype, value=m.read(status)) for m in DEVICE_METRICS
                 if fields is None or m.field in fields)


class BdSeqStore:
    """The bdSeq of the latest connection, kept in a file so a restarted daemon goes on from it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def next(self) -> int:
        """The number after the stored one (0 at the very first start), stored before it is used."""
        try:
            value = (int(self.path.read_text().strip()) + 1) % SEQ_MODULO
        except FileNotFoundError:
            value = 0
        except ValueError:
            log.warning("Sparkplug: %s is not a number; bdSeq starts again at 0", self.path)
            value = 0
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(f"{value}\n")
            tmp.replace(self.path)
        except OSError as exc:  # a full disk must not stop the node (nor kill paho's thread)
            log.warning("Sparkplug: cannot store bdSeq %d in %s (%s); a restart may repeat it", value, self.path,
                        exc.strerror or exc)
        return value


class SparkplugNode:
    """The daemon's Sparkplug B edge node: ``start`` connects in the background and returns at
    once (an unreachable broker is retried, never fatal); ``stop`` sends NDEATH and disconnects."""

    def __init__(self, config: Config, plant: PlantFeed, machines: list[str], state_dir: Path) -> None:
        spb = config.sparkplug
        self.group_id = spb.group_id or config.mqtt.site
        self.edge_node_id = spb.edge_node_id or config.daemon.name
        self.machines = list(machines)
        self._broker_config: MqttConfig = spb.broker(config.mqtt)
        self._broker = f"{self._broker_config.host}:{self._broker_config.port}"
        self._plant = plant
        self._bd_seq_store = BdSeqStore(state_dir / BD_SEQ_FILE)
        self._lock = threading.Lock()  # bdSeq and the flags below: paho's thread and the drain thread
        self._bd_seq = self._bd_seq_store.next()
        self._connected = False
        self._births_due = False  # a connect or a Rebirth command asks for births
        self._born = False  # births sent on this connection: data may follow
        self._seq = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._subscription: Subscription | None = None
        self._dropped_seen = 0  # the subscription's lost changes, as of the last births
        self.births_total = 0  # sets of births sent (one per connect or Rebirth command)

        client_id = spb.client_id or f"spb-{self.edge_node_id}-{socket.gethostname()}"
        # Errors name the section the settings came from: mqtt's when this one gives none of its own.
        self._client = make_client(self._broker_config, client_id,
                                   "sparkplug" if spb.own_credentials or spb.tls else "mqtt")
        self._set_will()
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    @property
    def bd_seq(self) -> int:
        return self._bd_seq

    def topic(self, kind: MessageType, device: str | None = None) -> str:
        return str(Topic(group_id=self.group_id, message_type=kind, edge_node_id=self.edge_node_id, device_id=device))

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("SparkplugNode.start: already started (a node is single-use)")
        # Subscribed before connecting: no change between the births and the first drain is lost.
        self._subscription = self._plant.subscribe()
        log.info("Sparkplug: edge node %s/%s connecting to %s (bdSeq %d)", self.group_id, self.edge_node_id,
                 self._broker, self._bd_seq)
        self._client.connect_async(self._broker_config.host, self._broker_config.port, self._broker_config.keepalive)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._drain, name="sparkplug", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Send what is queued, then NDEATH (acknowledged, so the broker has it before the
        disconnect discards the will), then disconnect."""
        if self._thread is None or self._stopping.is_set():
            return
        self._stopping.set()
        self._thread.join()
        if self._subscription is not None:
            self._plant.unsubscribe(self._subscription)
        if self._connected:
            info = self._client.publish(self.topic(MessageType.NDEATH), self._death(), qos=1)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                info.wait_for_publish(DEATH_ACK_SECONDS)
            if not info.is_published():
                log.warning("Sparkplug: %s did not take the NDEATH within %.0f s", self._broker, DEATH_ACK_SECONDS)
        self._client.disconnect()
        self._client.loop_stop()
        log.info("Sparkplug: edge node %s/%s stopped (bdSeq %d)", self.group_id, self.edge_node_id, self._bd_seq)

    # --- the drain thread: every publish ------------------------------------------------------

    def _drain(self) -> None:
        assert self._subscription is not None
        while True:
            stopping = self._stopping.is_set()
            try:
                # Changes lost to a full queue (a broker slower than the changes) may leave a
                # host with a stale metric that no later DDATA corrects: births resend them all.
                lost = self._subscription.dropped != self._dropped_seen
                with self._lock:
                    births = (self._births_due or (lost and self._born)) and self._connected
                    self._births_due = False
                if births:
                    self._births()
                change = self._subscription.get(0 if stopping else POLL_SECONDS)
                if change is not None:
                    self._data(change)
                elif stopping:
                    return
            except Exception:  # the thread must outlive any bug: a host would see a stale status
                log.exception("Sparkplug: publishing failed")
                time.sleep(POLL_SECONDS)

    def _births(self) -> None:
        """NBIRTH then a DBIRTH per machine, from the current status. Queued changes are already
        in that status, so they are dropped first."""
        assert self._subscription is not None
        while self._subscription.get(0) is not None:
            pass
        self._dropped_seen = self._subscription.dropped
        now = int(time.time() * 1000)
        self._seq = 0
        node = (Metric(now, BD_SEQ, DataType.INT64, value=self._bd_seq),
                Metric(now, REBIRTH, DataType.BOOLEAN, value=False),
                Metric(now, "Properties/Software Version", DataType.STRING, value=__version__),
                Metric(now, "Properties/Machines", DataType.INT64, value=len(self.machines)))
        self._publish(self.topic(MessageType.NBIRTH), NBirth(now, self._next_seq(), node).encode())
        status = self._plant.snapshot()
        for machine in self.machines:
            metrics = device_metrics(status.get(machine) or MachineStatus(machine), now)
            self._publish(self.topic(MessageType.DBIRTH, machine), DBirth(now, self._next_seq(), metrics).encode())
        with self._lock:
            self._born = self._connected
        self.births_total += 1
        log.info("Sparkplug: births sent (bdSeq %d, %d device(s))", self._bd_seq, len(self.machines))

    def _data(self, change: Change) -> None:
        machine = change.status.machine
        if not self._born or machine not in self.machines:
            return  # disconnected (the next births carry it), or a machine this node did not announce
        fields = change.changed | (ALERT_FIELDS if change.alert is not None else frozenset())
        now = int(time.time() * 1000)
        metrics = device_metrics(change.status, now, fields)
        if metrics:
            # Datatypes included, though only births must carry them: a host that joined late
            # can still read the values before it asks for a rebirth.
            payload = DData(now, self._next_seq(), metrics).encode(include_dtypes=True)
            self._publish(self.topic(MessageType.DDATA, machine), payload)

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (seq + 1) % SEQ_MODULO
        return seq

    def _publish(self, topic: str, payload: bytes) -> None:
        """QoS 0, not retained, as Sparkplug wants for births and data."""
        self._client.publish(topic, payload, qos=0, retain=False)

    def _death(self) -> bytes:
        return NDeath(int(time.time() * 1000), Metric(None, BD_SEQ, DataType.INT64, value=self._bd_seq)).encode()

    def _next_connection(self) -> None:
        """The broker has announced (or will announce) this bdSeq dead: the next connection gets
        the next number, in its will and its NBIRTH. Called with the lock held."""
        self._bd_seq = self._bd_seq_store.next()
        self._set_will()

    def _set_will(self) -> None:
        """The NDEATH the broker publishes if this connection breaks, with this connection's bdSeq."""
        self._client.will_set(self.topic(MessageType.NDEATH), self._death(), qos=1, retain=False)

    # --- paho callbacks (paho's network thread) -----------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags, reason_code: ReasonCode,
                    properties: Any) -> None:
        if reason_code.is_failure:
            with self._lock:
                self._next_connection()  # a CONNECT was sent: the next one takes the next bdSeq
            log.error("Sparkplug: broker %s refused the connection: %s; retrying with backoff up to %d s",
                      self._broker, reason_code, RECONNECT_MAX_SECONDS)
            return
        # Queued before the births (the drain thread publishes them), so the broker has the
        # subscription before a host can react to the NBIRTH with a command.
        client.subscribe(self.topic(MessageType.NCMD), qos=1)
        log.info("Sparkplug: connected to %s (bdSeq %d)", self._broker, self._bd_seq)
        with self._lock:
            self._connected = True
            self._births_due = True

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags, reason_code: ReasonCode,
                       properties: Any) -> None:
        with self._lock:
            was_connected, self._connected, self._born = self._connected, False, False
            if was_connected and not self._stopping.is_set():
                self._next_connection()
        if was_connected and not self._stopping.is_set():
            log.warning("Sparkplug: lost connection to %s (%s); reconnecting with bdSeq %d", self._broker, reason_code,
                        self._bd_seq)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """NCMD: ``Node Control/Rebirth`` true asks for births; anything else is logged and ignored."""
        try:
            command = NCmd.decode(message.payload)
        except (DecodeError, ValueError, KeyError, NotImplementedError) as exc:  # a broken or hostile publisher
            log.warning("Sparkplug: undecodable NCMD on %s ignored (%s)", message.topic, exc)
            return
        for metric in command.metrics:
            if metric.name == REBIRTH and metric.value is True:
                log.info("Sparkplug: rebirth requested")
                with self._lock:
                    self._births_due = True
            else:
                log.warning("Sparkplug: NCMD metric %r not supported, ignored", metric.name)
