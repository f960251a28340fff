"""A central alert consumer, as a plant's alert service would run one: a member of an MQTT v5
shared subscription on the central broker, de-duplicating alerts by ``(site, event_id, type)``.

Delivery from a daemon to the centre is at least once (the daemon's outbox, QoS 1, bridges that
re-send after a reconnect), so the consumer, not the transport, is where duplicates end. It keeps
every arrival, so a test can count duplicates before and after de-duplication and the delay of
each alert, and the latest ``status`` payload of every daemon (the retained ``online`` and the
will's ``offline``, forwarded by the site bridges).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# Alerts of every site and machine: <prefix>/<site>/<machine>/alert (monitor/outputs/messages.Topics).
ALERTS = "asd/+/+/alert"
STATUS = "asd/+/+/status"
# How long the central broker keeps this consumer's session (subscription and queue) while it is
# away: longer than any restart or deployment of the consumer.
SESSION_EXPIRY_SECONDS = 24 * 3600

AlertKey = tuple[str, str, str]  # (site, event_id, type): a raise and its clear share the event id


@dataclass(frozen=True)
class Arrival:
    """One alert message as it arrived (``at``: epoch seconds at the consumer)."""

    at: float
    consumer: str
    key: AlertKey
    redelivered: bool  # the MQTT DUP flag: the broker re-sent it after a lost acknowledgement


class AlertConsumer:
    """One member of the shared subscription group ``group``; several members share the alerts
    between them (each message goes to one member), and the group's union is what the centre got.
    Reconnects by itself (1-2 s backoff) and resumes its persistent session after a central
    broker restart.

    ``group=None`` subscribes to the alerts directly instead (every such consumer gets every
    alert): mosquitto 2.0.11 restores a persistent session's plain subscriptions after a restart
    but not its shared ones, so alerts reaching a restarted broker before the group members
    subscribed again are dropped (measured by benchmarks/fleet.py, see docs/fleet.md)."""

    def __init__(self, port: int, client_id: str, group: str | None = "alerting", host: str = "127.0.0.1") -> None:
        self.client_id = client_id
        self.group = group
        self._lock = threading.Lock()
        self._arrivals: list[Arrival] = []
        self._status: dict[str, str] = {}
        self._subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self._client.reconnect_delay_set(1, 2)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._host, self._port = host, port

    def start(self, timeout: float = 10.0) -> None:
        """Connect (persistent session: clean start off, a session expiry) and subscribe."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
        self._client.connect(self._host, self._port, keepalive=10, clean_start=False, properties=properties)
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            raise RuntimeError(f"consumer {self.client_id}: no SUBACK from 127.0.0.1:{self._port} within {timeout} s")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def arrivals(self) -> list[Arrival]:
        with self._lock:
            return list(self._arrivals)

    def status(self, topic: str) -> str | None:
        """The latest payload seen on a daemon's status topic, or None."""
        with self._lock:
            return self._status.get(topic)

    def _on_connect(self, client: mqtt.Client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return
        # Every connect: the session keeps the subscriptions, but the status topic's retained
        # messages come only with a SUBSCRIBE, and they are what says a daemon died meanwhile.
        alerts = ALERTS if self.group is None else f"$share/{self.group}/{ALERTS}"
        client.subscribe([(alerts, 1), (STATUS, 1)])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if not any(code.is_failure for code in reason_codes):
            self._subscribed.set()

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        at = time.time()
        if message.topic.endswith("/status"):
            with self._lock:
                self._status[message.topic] = message.payload.decode()
            return
        alert = json.loads(message.payload)
        arrival = Arrival(at, self.client_id, (alert["site"], alert["event_id"], alert["type"]), bool(message.dup))
        with self._lock:
            self._arrivals.append(arrival)


def first_arrivals(arrivals: list[Arrival]) -> dict[AlertKey, Arrival]:
    """De-duplicated: the first arrival of every alert key (what the consumer acts on)."""
    first: dict[AlertKey, Arrival] = {}
    for arrival in sorted(arrivals, key=lambda a: a.at):
        first.setdefault(arrival.key, arrival)
    return first
