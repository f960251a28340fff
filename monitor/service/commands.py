"""Commands the daemon answers: from the local control socket, from MQTT, and from the
enrollment schedule. Each is authenticated and validated completely before anything changes,
and always answered with a reply (on MQTT, on the machine's reply topic)."""

from __future__ import annotations

import hmac
import json
import logging
import threading
from datetime import datetime
from typing import Any

from monitor.config import Config
from monitor.enrollment.live import parse_command
from monitor.errors import CommandError
from monitor.outputs.fanout import Outputs
from monitor.service.enrolling import LiveEnrollment
from monitor.service.machine import Machine

log = logging.getLogger(__name__)


class Commands:
    def __init__(self, config: Config, machines: list[Machine], enrollment: LiveEnrollment, outputs: Outputs) -> None:
        self.config = config
        self.machines = {m.name: m for m in machines}
        self.enrollment = enrollment
        self.outputs = outputs
        self._scheduled: dict[int, str] = {}  # schedule entry -> date it last started

    def handle(self, machine_name: str, payload: bytes) -> dict[str, Any]:
        """An enrollment command; the reply says what happened or why nothing did."""
        machine = self.machines.get(machine_name)
        try:
            if machine is None:
                raise CommandError(f"unknown machine {machine_name!r}")
            self._check_token(payload)
            reply = self.enrollment.apply(machine, parse_command(payload, self.config.enrollment))
        except CommandError as exc:
            log.warning("command for %s refused: %s", machine_name, exc)
            return {"ok": False, "machine": machine_name, "error": str(exc)}
        self.outputs.event("command", machine=machine_name, reply=reply)
        return reply

    def on_mqtt(self, topic: str, payload: bytes) -> None:
        """paho's network thread: hand the command to a thread of its own and return at once
        (no PUBACK is processed while this runs)."""
        machine = self.outputs.topics.command_machine(topic)
        if machine is None:
            log.warning("ignoring command on %s", topic)
            return
        threading.Thread(target=self._reply_mqtt, args=(machine, payload), name="command", daemon=True).start()

    def _reply_mqtt(self, machine: str, payload: bytes) -> None:
        reply = self.handle(machine, payload)
        self.outputs.publisher.publish_volatile(self.outputs.topics.reply(machine), json.dumps(reply))

    def _check_token(self, payload: bytes) -> None:
        path = self.config.mqtt.command_token_file
        if path is None:
            return
        try:
            token = json.loads(payload).get("token")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return  # parse_command reports the malformed payload
        if not isinstance(token, str) or not hmac.compare_digest(token, path.read_text().strip()):
            raise CommandError("missing or wrong token")

    def check_schedule(self, now: datetime) -> None:
        """Start each scheduled enrollment once on its day, at its minute."""
        for i, entry in enumerate(self.config.enrollment.schedule):
            today = now.date().isoformat()
            if now.strftime("%H:%M") == entry.daily_at and self._scheduled.get(i) != today:
                self._scheduled[i] = today
                payload = json.dumps({"action": "start", "duration_s": entry.duration_seconds,
                                      "condition": entry.condition}).encode()
                log.info("scheduled enrollment of %s: %s", entry.machine, self.handle(entry.machine, payload))
