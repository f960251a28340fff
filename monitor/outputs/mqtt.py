"""MQTT output: alerts and states delivered at least once and in order; scores best effort.

Two kinds of message leave the daemon:

* **Reliable** (alerts, retained states, discovery): :meth:`Publisher.publish_reliable` commits
  the message to the on-disk :class:`~monitor.outputs.outbox.Outbox` and returns. One delivery thread
  sends the oldest stored message with QoS 1, waits for its PUBACK, only then deletes it and
  goes on to the next. A single message in flight is what keeps the order strict: with several,
  a message lost with a connection could be re-sent after a younger one. Nothing is deleted
  before the broker has it, so a broker outage, a restart or ``kill -9`` of the daemon delays
  delivery but loses nothing; a crash between PUBACK and delete re-sends one message, which is
  why alerts carry an ``event_id`` (delivery is at least once, not exactly once).
* **Volatile** (per-window scores): :meth:`Publisher.publish_volatile` sends with QoS 0 while
  connected and drops the message otherwise. A score is stale ten seconds later; queueing
  thousands of them during an outage would only delay the alerts behind them.

Availability: the client's last will publishes a retained ``offline`` on ``topics.status()``
if the daemon dies or its connection breaks; every (re)connect publishes a retained ``online``;
:meth:`Publisher.stop` publishes ``offline`` itself, because a clean disconnect cancels the will,
and disconnects once it is acknowledged, so that subscribers see it exactly once.

An unreachable broker or a refused login is never fatal: paho retries with exponential backoff
(1 s to 60 s) for as long as the daemon runs, since the broker or its user list may be fixed
while the machines keep being monitored and alerts keep accumulating in the outbox.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from monitor.config import MqttConfig
from monitor.errors import MqttConfigError, OutboxError
from monitor.outputs import messages
from monitor.outputs.messages import LAST_ALERT, Topics
from monitor.outputs.outbox import Outbox, OutboxMessage

log = logging.getLogger(__name__)
_paho_log = logging.getLogger(f"{__name__}.paho")

RECONNECT_MIN_SECONDS = 1
RECONNECT_MAX_SECONDS = 60
# A connected broker that has not acknowledged a message in this long has lost it (a broker bug
# or an overloaded bridge): send it again. A duplicate is allowed, a lost alert is not.
PUBACK_TIMEOUT_SECONDS = 30.0
# How long stop() waits for the broker to acknowledge "offline" before disconnecting anyway.
OFFLINE_ACK_SECONDS = 2.0
# After a disk error in the outbox, how long the delivery thread waits before trying again.
OUTBOX_RETRY_SECONDS = 5.0
# CONNACK reason codes that mean "the credentials are wrong" (paho maps v3.1.1's 4 and 5 to these).
_BAD_USERNAME_OR_PASSWORD, _NOT_AUTHORIZED = 0x86, 0x87


class Publisher:
    """The daemon's MQTT connection: reliable delivery from the outbox, volatile scores,
    availability, and commands.

    Hooks, set before ``start``: ``on_connection_change`` (True/False, from paho's thread) and
    ``on_published`` (once per message delivered: a reliable one acknowledged or a volatile one
    sent) feed the daemon's metrics, as do the counters ``published_total`` and
    ``dropped_volatile_total``. ``on_command(topic, payload)``, when set, subscribes to the
    command topics; it runs on paho's network thread, so it must hand the command over and
    return quickly, since no PUBACK is processed meanwhile.
    """

    def __init__(self, config: MqttConfig, topics: Topics, outbox: Outbox, on_command: Callable[[str, bytes], None] | None = None) -> None:
        self._config = config
        self._topics = topics
        self._outbox = outbox
        self.on_command = on_command
        self._broker = f"{config.host}:{config.port}"
        self.on_connection_change: Callable[[bool], None] | None = None
        self.on_published: Callable[[], None] | None = None
        self.published_total = 0
        self.dropped_volatile_total = 0
        self._counter_lock = threading.Lock()  # volatile publishes and deliveries run on different threads

        # Everything the delivery thread waits for is guarded by this one condition: connection
        # state, PUBACKs, new messages, acks, stop. Its holder never calls into paho: paho calls
        # our callbacks with its own locks held, so waiting on paho under it could deadlock.
        self._cond = threading.Condition()
        self._connected = False
        self._connections = 0  # increments on every successful connect
        self._delivering = False  # a reliable message is awaiting its PUBACK
        self._acked_mids: set[int] = set()  # PUBACKs seen while delivering
        self._stopping = False
        self._unreachable_logged = False
        self._thread: threading.Thread | None = None

        self._client_id = config.client_id or f"{topics.daemon}-{socket.gethostname()}"
        self._client = make_client(config, self._client_id)
        self._client.will_set(topics.status(), messages.OFFLINE, qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def outbox_depth(self) -> int:
        return len(self._outbox)

    def start(self) -> None:
        """Connect in the background and start delivering; returns at once. An unreachable
        broker is logged and retried, never raised: monitoring must start without it."""
        if self._thread is not None:
            raise RuntimeError("Publisher.start: already started (a Publisher is single-use)")
        log.info("MQTT: connecting to %s as %s (%d message(s) waiting in the outbox)", self._broker, self._client_id, len(self._outbox))
        self._client.connect_async(self._config.host, self._config.port, self._config.keepalive)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._deliver_forever, name="mqtt-delivery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what the outbox holds for up to ``timeout`` seconds, publish ``offline``,
        disconnect. Undelivered messages stay in the outbox for the next start.

        The drain comes before ``offline`` so that the last states reach subscribers while the
        daemon is still shown available. Without a connection there is nothing to drain into:
        the messages are safe on disk and the will has already said ``offline``.
        """
        if self._thread is None or self._stopping:
            return
        if self._connected:
            self.wait_idle(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        if self._connected:
            # Disconnect only once the broker has acknowledged "offline": with the DISCONNECT sent
            # right behind it, the PUBACK can reach a socket already closed, whose reset makes the
            # broker drop the connection as broken before it reads the DISCONNECT, and its will
            # then says "offline" a second time. Bounded: an unanswering broker is left to its will.
            info = self._client.publish(self._topics.status(), messages.OFFLINE, qos=1, retain=True)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                info.wait_for_publish(OFFLINE_ACK_SECONDS)
            if not info.is_published():
                log.warning("MQTT: %s did not acknowledge 'offline' within %.0f s; its will says it", self._broker, OFFLINE_ACK_SECONDS)
        self._client.disconnect()
        self._client.loop_stop()
        left = len(self._outbox)
        if left:
            log.warning("MQTT: stopped with %d message(s) undelivered; they stay in the outbox %s for the next start", left, self._outbox.path)
        else:
            log.info("MQTT: stopped, outbox empty")

    def publish_reliable(self, topic: str, payload: str, retain: bool = False) -> None:
        """Store the message in the outbox; the delivery thread sends it in order, QoS 1, at
        least once. Raises :class:`~monitor.outputs.outbox.OutboxFull` only when the outbox is full of
        alerts, so the caller always knows an alert was not accepted."""
        self._outbox.put(topic, payload, qos=1, retain=retain)
        with self._cond:
            self._cond.notify_all()

    def publish_volatile(self, topic: str, payload: str) -> bool:
        """Send now with QoS 0, or drop (returning False) while disconnected; never queued."""
        sent = self._connected and self._client.publish(topic, payload, qos=0).rc == MQTTErrorCode.MQTT_ERR_SUCCESS
        if sent:
            self._count_published()
        else:
            with self._counter_lock:
                self.dropped_volatile_total += 1
        return sent

    def wait_idle(self, timeout: float) -> bool:
        """True once every outbox message has been acknowledged; False after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._outbox):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    # --- delivery thread ---------------------------------------------------------------------

    def _deliver_forever(self) -> None:
        while not self._stopping:
            try:
                message = self._next_message()
                if message is not None:
                    self._deliver(message)
            except OutboxError as exc:
                # A disk error must not end delivery for good: the messages are still on disk.
                log.error("MQTT: %s; retrying in %.0f s", exc, OUTBOX_RETRY_SECONDS)
                self._pause()
            except Exception:  # the thread must outlive any bug: alerts are waiting behind it
                log.exception("MQTT: delivery failed; retrying in %.0f s", OUTBOX_RETRY_SECONDS)
                self._pause()

    def _pause(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._stopping, OUTBOX_RETRY_SECONDS)

    def _next_message(self) -> OutboxMessage | None:
        """Block until connected with a message waiting; None once stopping."""
        with self._cond:
            while not self._stopping:
                if self._connected:
                    message = self._outbox.peek()
                    if message is not None:
                        return message
                self._cond.wait()
        return None

    def _deliver(self, message: OutboxMessage) -> None:
        """Publish one message and ack it after its PUBACK. If the connection drops first,
        paho re-sends it (same mid) after reconnecting, so waiting on is enough."""
        with self._cond:
            # Forget acknowledgements of other messages (status, scores, abandoned attempts):
            # mids wrap at 65535, and a stale one must never pass for this message's PUBACK.
            self._acked_mids.clear()
            self._delivering = True
        try:
            mid = self._client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain).mid
            acked = self._await_puback(mid, message)
        finally:
            with self._cond:
                self._delivering = False
        if not acked:
            return  # stopping, or sent again by the next round
        self._outbox.ack(message.id)
        self._count_published()
        with self._cond:
            self._cond.notify_all()  # wait_idle

    def _await_puback(self, mid: int, message: OutboxMessage) -> bool:
        with self._cond:
            connections = self._connections
            deadline = time.monotonic() + PUBACK_TIMEOUT_SECONDS
            while mid not in self._acked_mids:
                if self._stopping:
                    return False
                if self._connections != connections:  # reconnected: paho re-sent it just now
                    connections = self._connections
                    deadline = time.monotonic() + PUBACK_TIMEOUT_SECONDS
                if not self._connected:
                    self._cond.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("MQTT: no PUBACK from %s for outbox message %d on %s within %.0f s; sending it again", self._broker, message.id, message.topic, PUBACK_TIMEOUT_SECONDS)
                    return False
                self._cond.wait(remaining)
            self._acked_mids.discard(mid)
            return True

    # --- paho callbacks (paho's network thread) ------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags, reason_code: ReasonCode, properties: Any) -> None:
        if reason_code.is_failure:
            hint = " (check mqtt.username and the password)" if reason_code.value in (_BAD_USERNAME_OR_PASSWORD, _NOT_AUTHORIZED) else ""
            log.error("MQTT: broker %s refused the connection: %s%s; retrying with backoff up to %d s", self._broker, reason_code, hint, RECONNECT_MAX_SECONDS)
            return
        client.publish(self._topics.status(), messages.ONLINE, qos=1, retain=True)
        if self.on_command is not None:
            client.subscribe(self._topics.commands(), qos=1)
        log.info("MQTT: connected to %s (%d message(s) waiting in the outbox)", self._broker, len(self._outbox))
        self._unreachable_logged = False
        with self._cond:
            self._connected = True
            self._connections += 1
            self._cond.notify_all()
        self._notify_connection(True)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # Logged once per outage: with a 60 s backoff a warning a minute for days is noise.
        if self._unreachable_logged:
            log.debug("MQTT: still cannot connect to %s", self._broker)
            return
        self._unreachable_logged = True
        # paho does not pass on why: say what it can be.
        causes = "broker down or unreachable, or the TLS handshake failed" if self._config.tls.enabled else "broker down or unreachable"
        log.warning("MQTT: cannot connect to %s (%s); retrying with backoff up to %d s, reliable messages wait in the outbox", self._broker, causes, RECONNECT_MAX_SECONDS)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags, reason_code: ReasonCode, properties: Any) -> None:
        with self._cond:
            was_connected = self._connected
            self._connected = False
            self._cond.notify_all()
        if not was_connected:
            return  # a refused or failed attempt, already logged
        if self._stopping:
            log.info("MQTT: disconnected from %s", self._broker)
        else:
            log.warning("MQTT: lost connection to %s (%s); reconnecting with backoff up to %d s", self._broker, reason_code, RECONNECT_MAX_SECONDS)
        self._notify_connection(False)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any) -> None:
        with self._cond:
            # Only while delivering (the mid is learnt from publish(), possibly after its PUBACK
            # arrived): the QoS 0 scores sent in between would otherwise pile up here.
            if self._delivering:
                self._acked_mids.add(mid)
                self._cond.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Any) -> None:
        # A broker ACL can refuse the subscription while accepting the connection; commands
        # would then never arrive, with nothing else to say so.
        for code in reason_codes:
            if code.is_failure:
                log.error("MQTT: broker %s refused the subscription to %s: %s", self._broker, self._topics.commands(), code)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.on_command is None:
            return
        try:
            self.on_command(message.topic, message.payload)
        except Exception:  # a faulty handler must not kill paho's network thread
            log.exception("MQTT: command handler failed for a message on %s", message.topic)

    def _count_published(self) -> None:
        with self._counter_lock:
            self.published_total += 1
        if self.on_published is not None:
            try:
                self.on_published()
            except Exception:  # a faulty metrics hook must not stop delivery
                log.exception("MQTT: on_published failed")

    def _notify_connection(self, connected: bool) -> None:
        if self.on_connection_change is None:
            return
        try:
            self.on_connection_change(connected)
        except Exception:  # a faulty metrics hook must not kill paho's network thread
            log.exception("MQTT: on_connection_change(%s) failed", connected)


def _on_paho_log(client: mqtt.Client, userdata: Any, level: int, text: str) -> None:
    # paho's own messages are protocol detail, logged at DEBUG whatever paho calls them: it
    # reports every clean stop and every retry as an ERROR ("Client is not connected"). What an
    # operator needs (connected, refused, lost, unreachable) is logged by the callbacks above.
    _paho_log.debug("paho: %s", text)


def make_client(config: MqttConfig, client_id: str, section: str = "mqtt") -> mqtt.Client:
    """A paho client (MQTT 3.1.1, clean session) with ``config``'s credentials and TLS, the
    reconnect back-off, and paho's own log at DEBUG; callbacks and will are the caller's.
    ``section`` names the config section in errors (the Sparkplug B node's own connection)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True)
    password = _read_password(config, section)
    if config.username is not None:
        client.username_pw_set(config.username, password)
    elif password is not None:
        raise MqttConfigError(f"{section}.username: required when a password is configured")
    if config.tls.enabled:
        _set_tls(client, config, section)
    client.reconnect_delay_set(RECONNECT_MIN_SECONDS, RECONNECT_MAX_SECONDS)
    client.on_log = _on_paho_log
    return client


def _read_password(config: MqttConfig, section: str) -> str | None:
    """The password from its file (trailing newline stripped) or environment variable. Errors
    name where it was looked for, never what it is."""
    if config.password_file is not None:
        try:
            return config.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise MqttConfigError(f"{section}.password_file: cannot read {config.password_file} ({reason})") from None
    if config.password_env is not None:
        password = os.environ.get(config.password_env)
        if password is None:
            raise MqttConfigError(f"{section}.password_env: environment variable {config.password_env} is not set")
        return password
    return None


def _set_tls(client: mqtt.Client, config: MqttConfig, section: str) -> None:
    tls = config.tls
    try:
        client.tls_set(
            ca_certs=str(tls.ca_file) if tls.ca_file else None,
            certfile=str(tls.cert_file) if tls.cert_file else None,
            keyfile=str(tls.key_file) if tls.key_file else None,
        )
    except OSError as exc:  # ssl.SSLError included: it is an OSError
        files = ", ".join(f"{key} {path}" for key, path in (("ca_file", tls.ca_file), ("cert_file", tls.cert_file), ("key_file", tls.key_file)) if path)
        raise MqttConfigError(f"{section}.tls: cannot load {files or 'the system CA certificates'} ({exc})") from None


def discovery_payload(topics: Topics, machine: str, discovery_prefix: str) -> tuple[str, str]:
    """Home Assistant MQTT discovery for one machine: a ``problem`` binary sensor that is ON
    while the machine's retained state is ``alert``, unavailable while the daemon is offline.
    Returns (topic, JSON); the daemon publishes it retained through the outbox."""
    object_id = f"{topics.prefix}_{topics.site}_{machine}"
    config = {
        "name": "Acoustic anomaly",
        "unique_id": f"{object_id}_anomaly",
        "device_class": "problem",
        "state_topic": topics.state(machine),
        "value_template": "{{ 'ON' if value_json.state == 'alert' else 'OFF' }}",
        "payload_on": "ON",
        "payload_off": "OFF",
        # The whole state message (since, detail, event_id) as entity attributes.
        "json_attributes_topic": topics.state(machine),
        "availability_topic": topics.status(),
        "payload_available": messages.ONLINE,
        "payload_not_available": messages.OFFLINE,
        "device": {
            "identifiers": [object_id],
            "name": machine,
            "model": "Acoustic anomaly detection",
        },
    }
    return topics.discovery(discovery_prefix, machine), json.dumps(config, sort_keys=True)


def _sensor(topics: Topics, machine: str, discovery_prefix: str, key: str, name: str, template: str,
            **extra: Any) -> tuple[str, str]:
    object_id = f"{topics.prefix}_{topics.site}_{machine}"
    config = {
        "name": name,
        "unique_id": f"{object_id}_{key}",
        "state_topic": topics.state(machine),
        "value_template": template,
        "availability_topic": topics.status(),
        "payload_available": messages.ONLINE,
        "payload_not_available": messages.OFFLINE,
        # The same device as the binary sensor: Home Assistant groups the three entities.
        "device": {"identifiers": [object_id], "name": machine, "model": "Acoustic anomaly detection"},
        **extra,
    }
    return topics.discovery(discovery_prefix, machine, "sensor", key), json.dumps(config, sort_keys=True)


def discovery_payloads(topics: Topics, machine: str, discovery_prefix: str, *, buttons: bool = False,
                       token_entity: str | None = None) -> list[tuple[str, str]]:
    """Every Home Assistant discovery message of one machine, as (topic, JSON): the ``problem``
    binary sensor of :func:`discovery_payload`, a ``sensor`` for the severity level (ok, warning,
    alarm; an enum) and one for the health figure ``anomalous_ratio_1h`` in % (a measurement, so
    Home Assistant keeps its long-term statistics), all read from the retained state message and
    unavailable while the daemon is offline; a ``sensor`` naming the last alert (its time, type and
    verdict as attributes); and with ``buttons`` (commands on) the buttons of :func:`review_button`.
    The daemon publishes them retained at start."""
    severity = _sensor(topics, machine, discovery_prefix, "severity", "Severity",
                       "{{ value_json.severity | default('ok') }}", device_class="enum",
                       options=list(messages.SEVERITIES), icon="mdi:alert-decagram")
    # None before the first scored window: HA shows "unknown" rather than a made-up 0 %.
    health = _sensor(topics, machine, discovery_prefix, "anomalous_1h", "Anomalous windows (1 h)",
                     "{% set r = (value_json.health | default({})).anomalous_ratio_1h | default(none) %}"
                     "{{ (r * 100) | round(1) if r is not none else none }}",
                     unit_of_measurement="%", state_class="measurement", icon="mdi:heart-pulse")
    last = _sensor(topics, machine, discovery_prefix, "last_alert", "Last alert",
                   "{{ (value_json.last_alert | default({})).event_id | default(none) }}",
                   json_attributes_template="{{ value_json.last_alert | default({}) | tojson }}", icon="mdi:bell-alert")
    answers = [review_button(topics, machine, discovery_prefix, verdict, name, token_entity)
               for verdict, name in (("normal", "Last alert: false alarm"), ("fault", "Last alert: confirmed fault"))]
    return [discovery_payload(topics, machine, discovery_prefix), severity, health, last, *(answers if buttons else [])]


def review_button(topics: Topics, machine: str, discovery_prefix: str, verdict: str, name: str,
                  token_entity: str | None) -> tuple[str, str]:
    """A Home Assistant ``button`` that answers the machine's latest alert with ``verdict``
    through its review command topic (``event_id: "last"``). The payload is fixed in the
    retained discovery message, so it cannot carry the alert's id nor, readable by every
    subscriber, the token: with ``token_entity`` the button's ``command_template`` reads the
    token from that Home Assistant entity when pressed."""
    object_id = f"{topics.prefix}_{topics.site}_{machine}"
    command = {"event_id": LAST_ALERT, "verdict": verdict, "note": "Home Assistant"}
    if token_entity is None:
        payload: dict[str, Any] = {"payload_press": json.dumps(command, sort_keys=True)}
    else:
        fields = json.dumps(command, sort_keys=True)[:-1]
        payload = {"command_template": f"{fields}, \"token\": {{{{ states('{token_entity}') | tojson }}}}}}"}
    config = {
        "name": name,
        "unique_id": f"{object_id}_review_{verdict}",
        "command_topic": topics.command(machine, "review"),
        "qos": 1,
        "availability_topic": topics.status(),
        "payload_available": messages.ONLINE,
        "payload_not_available": messages.OFFLINE,
        "device": {"identifiers": [object_id], "name": machine, "model": "Acoustic anomaly detection"},
        "icon": "mdi:check-circle" if verdict == "normal" else "mdi:alert-octagon",
        **payload,
    }
    return topics.discovery(discovery_prefix, machine, "button", f"review_{verdict}"), json.dumps(config, sort_keys=True)
