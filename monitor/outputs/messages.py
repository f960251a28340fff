"""Messages the daemon sends to the plant: versioned JSON payloads, their MQTT topics, and the
vocabulary they speak (machine states, window statuses, alert types), which every other module
imports from here.

Subscribers parse these, so field names and meanings only change with the schema version.
Times are ISO 8601 UTC with milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Literal, get_args

from monitor.config import AlertRule

ALERT_SCHEMA = "asd.alert/1"
SCORE_SCHEMA = "asd.score/1"
STATE_SCHEMA = "asd.state/1"
HEALTH_SCHEMA = "asd.health/1"
REVIEW_SCHEMA = "asd.review/1"
ONLINE = "online"
OFFLINE = "offline"

MachineState = Literal["normal", "alert", "sensor_fault", "idle", "starting", "enrolling"]
MACHINE_STATES: tuple[str, ...] = get_args(MachineState)
WindowStatus = Literal["ok", "sensor_fault", "idle"]  # of a window that was handled
WINDOW_STATUSES: tuple[str, ...] = get_args(WindowStatus)
AlertType = Literal["raise", "clear"]
ALERT_TYPES: tuple[str, ...] = get_args(AlertType)
ALERT_RULES: tuple[str, ...] = get_args(AlertRule)
# How worried to be about a machine (monitor/service/severity.py): alarm while an alert is open.
Severity = Literal["ok", "warning", "alarm"]
SEVERITIES: tuple[str, ...] = get_args(Severity)
DaemonStatus = Literal["ok", "degraded"]  # whether the daemon keeps up with its machines
# A person's answer to an alert (monitor/review/): a false alarm, a confirmed fault, or unsure.
VerdictName = Literal["normal", "fault", "unsure"]
VERDICTS: tuple[str, ...] = get_args(VerdictName)
# An event id that means "the machine's latest alert": what a dashboard button sends, since it
# cannot know the id (Home Assistant's discovery payloads are fixed).
LAST_ALERT = "last"
# The commands a machine's ``cmd/<command>`` topic takes (and the local control socket).
COMMANDS: tuple[str, ...] = ("enroll", "review")


def iso_time(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class BackboneScore:
    score: float  # raw KNN distance (scale depends on the backbone)
    rank: float  # share of the reference below it, in [0, 1]


class _Payload:
    """A message that goes out as compact, sorted JSON (NaN refused: subscribers parse it)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class AlertEvent(_Payload):
    """A raise or a clear. Both carry the episode's ``event_id``, so a subscriber can pair them
    and drop duplicates (delivery is at least once).

    ``rule`` (``n_of_m`` or ``cusum``; a clear carries its raise's) was added after the first
    release of ``asd.alert/1``: an added field does not change what any existing field means,
    and subscribers ignore fields they do not know, so the schema version stays. ``start`` of a
    CUSUM raise is its change-point estimate (where the statistic last left 0), not the first
    window above ``threshold``."""

    event_id: str
    type: AlertType
    site: str
    machine: str
    start: str  # first anomalous window's start (raise) / the episode's start (clear)
    end: str  # last window's end
    fused_rank: float
    threshold: float
    backbones: dict[str, BackboneScore]
    condition: str | None  # the enrolled operating condition nearest to the audio
    clip: str | None  # FLAC of the alarming window, or None
    clip_error: str | None = None  # why no clip was saved (disk full, disabled, ...)
    rule: AlertRule = "n_of_m"  # the rule that raised the episode
    severity: Severity = "alarm"  # the machine's level after it: alarm on a raise (added within /1)
    schema: str = ALERT_SCHEMA


@dataclass(frozen=True)
class ScoreMessage(_Payload):
    """Per-window score (QoS 0: a lost one is harmless, the next comes in ``hop`` seconds)."""

    site: str
    machine: str
    start: str
    end: str
    status: WindowStatus
    fused_rank: float | None
    anomalous: bool
    backbones: dict[str, BackboneScore] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    schema: str = SCORE_SCHEMA


@dataclass(frozen=True)
class StateMessage(_Payload):
    """A machine's current state, retained so a new subscriber learns it at once.

    ``severity`` (ok, warning, alarm) and ``health`` (``anomalous_ratio_1h``,
    ``anomalous_ratio_24h``, ``rank_ewma``; each None until a scored window) were added after
    the first release of ``asd.state/1``, as ``AlertEvent.rule`` was: an added field changes no
    existing field's meaning and subscribers ignore fields they do not know, so the schema
    version stays. The message is re-sent (same ``state`` and ``since``) when the severity
    changes, and when a health figure moved by 0.01, at most every 5 minutes.

    ``last_alert`` (added the same way) names the machine's latest alert whether open or not:
    ``event_id``, ``type`` (raise or clear), ``time`` (end of the deciding window) and
    ``verdict`` (empty until someone answers it; the message is re-sent when they do), so that
    a dashboard can show and answer it (``event_id: "last"`` in a review command)."""

    site: str
    machine: str
    state: MachineState
    since: str
    detail: str = ""
    event_id: str | None = None  # the open alert's id while state == "alert"
    severity: Severity = "ok"
    health: dict[str, float | None] = field(default_factory=dict)
    last_alert: dict[str, str] = field(default_factory=dict)  # empty before the machine's first alert
    schema: str = STATE_SCHEMA


@dataclass(frozen=True)
class HealthMessage(_Payload):
    """Whether the daemon keeps up, retained: ``degraded`` while it drops windows for lack of
    time, with the reason in words and the figures behind it (capacity is what the measured
    cost per window allows at the hop; None before a window was measured)."""

    site: str
    daemon: str
    status: DaemonStatus
    since: str
    reason: str = ""
    machines: int = 0
    workers: int = 1
    seconds_per_window: float | None = None
    capacity_machines: int | None = None
    dropped_windows: int = 0  # since start
    schema: str = HEALTH_SCHEMA


@dataclass(frozen=True)
class ReviewMessage(_Payload):
    """A verdict on an alert (QoS 1, not retained): the plant's systems learn that ``event_id``
    was answered, how, and which bank version a false alarm created (None otherwise)."""

    event_id: str
    site: str
    machine: str
    verdict: VerdictName
    condition: str
    note: str
    time: str
    who: str  # the way in: mqtt, socket, cli or web
    version: str | None = None  # bank version with the reviewed audio (verdict normal)
    schema: str = REVIEW_SCHEMA


@dataclass(frozen=True)
class Topics:
    """Topic layout: ``<prefix>/<site>/<machine>/{alert,score,state,review,cmd/...,reply/...}`` and one
    availability topic per daemon, ``<prefix>/<site>/<daemon>/status`` (``online``/``offline``,
    retained, ``offline`` also as the last will: one MQTT connection has one will)."""

    prefix: str
    site: str
    daemon: str

    def status(self) -> str:
        return f"{self.prefix}/{self.site}/{self.daemon}/status"

    def health(self) -> str:
        """The daemon's ``HealthMessage`` (retained): ok or degraded, and why."""
        return f"{self.prefix}/{self.site}/{self.daemon}/health"

    def alert(self, machine: str) -> str:
        return f"{self.prefix}/{self.site}/{machine}/alert"

    def score(self, machine: str) -> str:
        return f"{self.prefix}/{self.site}/{machine}/score"

    def state(self, machine: str) -> str:
        return f"{self.prefix}/{self.site}/{machine}/state"

    def commands(self) -> str:
        return f"{self.prefix}/{self.site}/+/cmd/#"

    def review(self, machine: str) -> str:
        """A verdict on one of the machine's alerts (``ReviewMessage``)."""
        return f"{self.prefix}/{self.site}/{machine}/review"

    def command(self, machine: str, name: str) -> str:
        """Where commands ``name`` (one of ``COMMANDS``) for ``machine`` are sent."""
        return f"{self.prefix}/{self.site}/{machine}/cmd/{name}"

    def parse_command(self, topic: str) -> tuple[str, str] | None:
        """(machine, command) of a command topic ``<prefix>/<site>/<machine>/cmd/<command>``
        with a command of ``COMMANDS``; None for any other topic."""
        head = f"{self.prefix}/{self.site}/"
        parts = topic[len(head):].split("/") if topic.startswith(head) else []
        if len(parts) == 3 and parts[0] and parts[1] == "cmd" and parts[2] in COMMANDS:
            return parts[0], parts[2]
        return None

    def command_machine(self, topic: str) -> str | None:
        """The machine an enrollment command topic (``<prefix>/<site>/<machine>/cmd/enroll``)
        is for; None for any other topic."""
        head = f"{self.prefix}/{self.site}/"
        parts = topic[len(head):].split("/") if topic.startswith(head) else []
        return parts[0] if len(parts) == 3 and parts[0] and parts[1:] == ["cmd", "enroll"] else None

    def reply(self, machine: str, command: str = "enroll") -> str:
        """Replies to commands (outside ``cmd/`` so the daemon never receives its own)."""
        return f"{self.prefix}/{self.site}/{machine}/reply/{command}"

    def discovery(self, discovery_prefix: str, machine: str, component: str = "binary_sensor", key: str = "") -> str:
        """Home Assistant's ``<discovery_prefix>/<component>/<object id>/config``; ``key`` tells
        a machine's several entities of one component apart."""
        suffix = f"_{key}" if key else ""
        return f"{discovery_prefix}/{component}/{self.prefix}_{self.site}_{machine}{suffix}/config"
