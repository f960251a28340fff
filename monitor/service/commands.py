"""Commands the daemon answers: from the local control socket, from MQTT, and from the
enrollment schedule: ``enroll`` (live enrollment) and ``review`` (a verdict on an alert, see
``monitor.review``). Each is authenticated and validated completely before anything changes,
and always answered with a reply (on MQTT, on the machine's reply topic) that carries the
request's ``request_id``, refusals included, so that a client can match it to its request.

Authentication differs by way in: ``mqtt.command_token_file`` guards MQTT, where anyone the
broker lets publish could send; the local control socket is guarded by its file mode (see
``monitor.service.control``) and the schedule is the daemon's own, so neither needs the token."""

from __future__ import annotations

import hmac
import json
import logging
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from monitor.config import Config
from monitor.enrollment.live import parse_command
from monitor.errors import AsdError, CommandError, first_line
from monitor.outputs.fanout import Outputs
from monitor.outputs.messages import ReviewMessage
from monitor.review.apply import Reviewer
from monitor.review.report import REPORTS_DIR, build_report, write_report
from monitor.review.verdicts import parse_verdict
from monitor.scoring.detector import Detector
from monitor.service.enrolling import LiveEnrollment
from monitor.service.machine import Machine

log = logging.getLogger(__name__)


class Commands:
    def __init__(self, config: Config, machines: list[Machine], enrollment: LiveEnrollment, outputs: Outputs,
                 models: Detector) -> None:
        self.config = config
        self.models = models  # the daemon's loaded backbones: a verdict embeds its clip with them
        self.machines = {m.name: m for m in machines}
        self.enrollment = enrollment
        self.outputs = outputs
        self._scheduled: dict[int, str] = {}  # schedule entry -> date it last started

    def handle(self, machine_name: str, payload: bytes, command: str = "enroll") -> dict[str, Any]:
        """A command from the local control socket or the schedule (no token: see above)."""
        return self._handle(machine_name, payload, token_required=False, command=command)

    def review_from_web(self, machine_name: str, payload: bytes) -> dict[str, Any]:
        """A verdict posted on the review page (``monitor.web``), whose server checked its token."""
        return self._handle(machine_name, payload, token_required=False, command="review", who="web")

    def _handle(self, machine_name: str, payload: bytes, token_required: bool, command: str = "enroll",
                who: str | None = None) -> dict[str, Any]:
        """An enrollment or review command; the reply says what happened or why nothing did
        (``who``: the way in, by default mqtt with a token and socket without)."""
        machine = self.machines.get(machine_name)
        request_id = _request_id(payload)
        try:
            if machine is None:
                raise CommandError(f"unknown machine {machine_name!r}")
            if token_required:
                self._check_token(payload)
            if command == "review":
                return self._review(machine, payload, who or ("mqtt" if token_required else "socket"))
            reply = self.enrollment.apply(machine, parse_command(payload, self.config.enrollment))
        except CommandError as exc:
            log.warning("command for %s refused: %s", machine_name, exc)
            return {"ok": False, "machine": machine_name, "error": str(exc), "request_id": request_id}
        except Exception as exc:  # a command is always answered, a bug included (logged in full)
            log.exception("command for %s failed", machine_name)
            return {"ok": False, "machine": machine_name, "error": f"internal error: {type(exc).__name__}",
                    "request_id": request_id}
        self.outputs.event("command", machine=machine_name, reply=reply)
        return reply

    def _review(self, machine: Machine, payload: bytes, who: str) -> dict[str, Any]:
        """A verdict on one of the machine's alerts (``monitor.review.apply``); a false alarm's
        new bank version is switched to at once (the bank check would within seconds)."""
        verdict = parse_verdict(payload, self.config.enrollment)
        try:
            applied = Reviewer(self.config, lambda: self.models, lambda name: self.machines[name].store).apply(
                verdict, who, machine.name)
        except CommandError:
            raise
        except AsdError as exc:  # a clip that cannot be enrolled (sensor faults, rate), a bank error: say why
            raise CommandError(first_line(exc)) from None
        record = applied.record
        if record.version is not None:
            self.enrollment.switch_bank(machine)
        try:  # the verdict is applied and recorded: the reply says so whatever happens to the news of it
            self.outputs.review(ReviewMessage(record.event_id, self.outputs.topics.site, record.machine,
                                              record.verdict, record.condition, record.note, record.time, who,
                                              record.version))
        except Exception:  # noqa: BLE001 - e.g. a full outbox
            log.exception("%s: review %s applied, but telling the outputs failed", machine.name, record.event_id)
        self._site_report(machine.name)
        return applied.reply() | {"request_id": verdict.request_id}

    def _site_report(self, machine: str) -> None:
        """After each verdict, what the reviews now say about the machine's threshold
        (``monitor.review.report``): written to ``<state_dir>/reports`` and logged. The threshold
        itself is never changed here."""
        try:
            report = build_report(self.config, machine, self.models.window_seconds)
            write_report(report, self.config.daemon.resolved_state_dir() / REPORTS_DIR)
        except Exception:  # the verdict stands whatever happens to its report
            log.exception("%s: the site report after a review failed", machine)
            return
        log.info("%s: site report: %d confirmed fault(s), %.2f days of normal windows, suggested threshold %s "
                 "(configured %g)", machine, len(report.faults), report.normal_days,
                 "none within budget" if report.suggested is None else f"{report.suggested:g}", report.current_threshold)

    def on_mqtt(self, topic: str, payload: bytes) -> None:
        """paho's network thread: hand the command to a thread of its own and return at once
        (no PUBACK is processed while this runs)."""
        parsed = self.outputs.topics.parse_command(topic)
        if parsed is None:
            log.warning("ignoring command on %s", topic)
            return
        threading.Thread(target=self._reply_mqtt, args=(*parsed, payload), name="command", daemon=True).start()

    def _reply_mqtt(self, machine: str, command: str, payload: bytes) -> None:
        reply = self._handle(machine, payload, token_required=True, command=command)
        self.outputs.publisher.publish_volatile(self.outputs.topics.reply(machine, command), json.dumps(reply))

    def _check_token(self, payload: bytes) -> None:
        path = self.config.mqtt.command_token_file
        if path is None:
            return
        try:
            token = json.loads(payload).get("token")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return  # parse_command reports the malformed payload
        check_token(token, path, "mqtt.command_token_file")

    def check_schedule(self, now: datetime) -> None:
        """Start each scheduled enrollment once on its day, at its minute."""
        for i, entry in enumerate(self.config.enrollment.schedule):
            today = now.date().isoformat()
            if now.strftime("%H:%M") == entry.daily_at and self._scheduled.get(i) != today:
                self._scheduled[i] = today
                payload = json.dumps({"action": "start", "duration_s": entry.duration_seconds,
                                      "condition": entry.condition}).encode()
                log.info("scheduled enrollment of %s: %s", entry.machine, self.handle(entry.machine, payload))


def check_token(token: Any, path: Path, key: str) -> None:
    """``CommandError`` unless ``token`` is the secret in the token file ``path`` (config ``key``),
    read at each command so a new token applies without a restart."""
    try:
        expected = path.read_bytes().strip()
    except OSError as exc:
        log.error("%s: cannot read %s (%s); refusing commands that need it", key, path, exc.strerror)
        raise CommandError("the daemon cannot read its token file") from None
    # As bytes: compare_digest refuses str holding anything but ASCII.
    if not isinstance(token, str) or not hmac.compare_digest(token.encode("utf-8"), expected):
        raise CommandError("missing or wrong token")


def _request_id(payload: bytes) -> str | None:
    """The request's ``request_id`` as far as the payload can be read (a command refused for
    another field still has one), else None."""
    try:
        data = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    request_id = data.get("request_id") if isinstance(data, dict) else None
    return request_id if isinstance(request_id, str) else None
