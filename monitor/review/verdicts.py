"""The pure parts of answering an alert: what a verdict is, how it is checked, where the alert
it answers is found, and the durable log of verdicts given.

An alert is answered by its ``event_id`` with one of three verdicts (``VERDICTS``):

* ``normal``: a false alarm. The alert's clip becomes normal sound (a new bank version).
* ``fault``: a confirmed fault. The clip and its embeddings go to the machine's library of
  confirmed anomalies, never into the bank.
* ``unsure``: recorded only.

A verdict is given once per alert: a second one is refused, so that a repeated MQTT message or
a second operator cannot enroll the same audio twice (see ``monitor.review.apply`` for how a
crash between the bank write and the record is healed).

The alert is looked up in the daemon's event log, the rotated files included
(``events.jsonl.3`` .. ``events.jsonl.1``, then ``events.jsonl``): it is the one record of which
clip belongs to which alert. Verdicts are kept in ``<state_dir>/reviews.jsonl``, one JSON line
each, appended and fsync'd under an flock (``reviews.lock``) that also serialises whole reviews,
since the daemon (MQTT, control socket) and the CLI may both write it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from monitor.config import DEFAULT_CONDITION, EnrollmentConfig
from monitor.enrollment.live import (  # the same names and payload rules as enrollment
    CONDITION_RE,
    command_object,
)
from monitor.errors import CommandError
from monitor.outputs.messages import LAST_ALERT, VERDICTS
from monitor.scoring.idle import NOISE_CONDITION

log = logging.getLogger(__name__)

# An event id names a folder of the fault library: no separators, no leading dot.
EVENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
MAX_PAYLOAD_BYTES = 4096  # a verdict is a few fields; anything bigger is a mistake or an attack
MAX_NOTE_CHARS = 1000
FIELDS = ("event_id", "verdict", "condition", "note", "token", "request_id")
WAYS = ("cli", "mqtt", "socket", "web")  # who gave a verdict: the way it came in
REVIEWS_FILE = "reviews.jsonl"
REVIEWS_LOCK = "reviews.lock"
EVENT_LOG_BACKUPS = 3  # as the daemon's EventLog rotates: events.jsonl.1 .. .3


@dataclass(frozen=True)
class Verdict:
    """One answer to one alert, checked whole (``check_verdict``) before anything changes."""

    event_id: str
    verdict: str  # one of VERDICTS
    condition: str = DEFAULT_CONDITION  # the operating condition a false alarm is enrolled under
    note: str = ""
    request_id: str | None = None


def check_verdict(event_id: Any, verdict: Any, condition: Any = None, note: Any = None,
                  config: EnrollmentConfig | None = None, request_id: Any = None) -> Verdict:
    """A ``Verdict`` from loose values (a JSON payload, the command line), or ``CommandError``
    naming the first bad one. Conditions follow enrollment's rules (``enrollment.conditions``
    when set, plus the site noise)."""
    if not isinstance(event_id, str) or not EVENT_ID_RE.fullmatch(event_id):
        raise CommandError(f"event_id must be an alert's event id (letters, digits, '_', '.', ':', '-'), got {event_id!r}")
    if verdict not in VERDICTS:
        raise CommandError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
    given, condition = condition is not None, DEFAULT_CONDITION if condition is None else condition
    if not isinstance(condition, str) or not CONDITION_RE.fullmatch(condition):
        raise CommandError(f"condition must be a short name of letters, digits, '_', '.', '-', got {condition!r}")
    allowed = config.conditions if config is not None else []
    # The list rules what is enrolled (a false alarm), and any condition named.
    if allowed and (given or verdict == "normal") and condition not in (*allowed, NOISE_CONDITION):
        raise CommandError(f"unknown condition {condition!r} (configured: {', '.join(allowed)})")
    note = "" if note is None else note
    if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS:
        raise CommandError(f"note must be text of at most {MAX_NOTE_CHARS} characters")
    if request_id is not None and not isinstance(request_id, str):
        raise CommandError("request_id must be a string")
    return Verdict(event_id, verdict, condition, " ".join(note.split()), request_id)


def parse_verdict(payload: bytes | str, config: EnrollmentConfig | None = None) -> Verdict:
    """A review command's JSON payload (MQTT, control socket), validated completely."""
    size = len(payload.encode("utf-8") if isinstance(payload, str) else payload)
    if size > MAX_PAYLOAD_BYTES:
        raise CommandError(f"payload too large ({size} bytes, at most {MAX_PAYLOAD_BYTES})")
    data = command_object(payload, FIELDS)
    return check_verdict(data.get("event_id"), data.get("verdict"), data.get("condition"), data.get("note"),
                         config, data.get("request_id"))


# ------------------------------------------------------------------ the alerts
@dataclass(frozen=True)
class Alert:
    """A raised alert as the event log recorded it."""

    event_id: str
    machine: str
    start: str
    end: str
    fused_rank: float | None
    threshold: float | None
    condition: str | None
    clip: str | None
    clip_error: str | None

    @classmethod
    def from_event(cls, alert: dict[str, Any]) -> Alert:
        return cls(str(alert["event_id"]), str(alert["machine"]), str(alert.get("start", "")), str(alert.get("end", "")),
                   alert.get("fused_rank"), alert.get("threshold"), alert.get("condition"), alert.get("clip"),
                   alert.get("clip_error"))



def event_logs(path: Path, backups: int = EVENT_LOG_BACKUPS) -> list[Path]:
    """The event log and its rotated files that exist, oldest first."""
    older = [path.with_name(f"{path.name}.{i}") for i in range(backups, 0, -1)]
    return [p for p in (*older, path) if p.is_file()]


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL file; a line that does not parse (cut off by a crash) is skipped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc.strerror or exc)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: line %d is not JSON; skipped", path, number)
            continue
        if isinstance(record, dict):
            yield record


@dataclass(frozen=True)
class AlertLog:
    """The alerts of the event log and its rotated files, read in one pass."""

    raises: list[Alert]  # every raised alert, oldest first (an event id logged twice counts once)
    clears: dict[str, str]  # event id -> end of the window that cleared it (ISO 8601)


def read_alert_log(path: Path) -> AlertLog:
    """Raises and clears together: the event log may hold up to its rotation cap, so a caller
    needing both reads it once."""
    raises: dict[str, Alert] = {}
    clears: dict[str, str] = {}
    for file in event_logs(path):
        for record in _lines(file):
            alert = record.get("alert")
            if record.get("kind") != "alert" or not isinstance(alert, dict):
                continue
            if alert.get("type") == "raise":
                try:
                    raises.setdefault(str(alert["event_id"]), Alert.from_event(alert))
                except KeyError:
                    continue
            elif alert.get("type") == "clear":
                clears.setdefault(str(alert.get("event_id")), str(alert.get("end", "")))
    return AlertLog(list(raises.values()), clears)


def read_alerts(path: Path) -> list[Alert]:
    """Every raised alert in the event log and its rotated files, oldest first (an event id
    logged twice, e.g. after a restart, counts once)."""
    return read_alert_log(path).raises


def last_alert(path: Path, machine: str | None) -> Alert:
    """The machine's latest raised alert (``event_id: "last"``), or ``CommandError``."""
    if machine is None:
        raise CommandError(f"event_id {LAST_ALERT!r} needs the machine (a command on its topic)")
    for alert in reversed(read_alerts(path)):
        if alert.machine == machine:
            return alert
    raise CommandError(f"{machine} has no alert to review in {path} or its rotated files")


def find_alert(path: Path, event_id: str) -> Alert:
    """The raised alert ``event_id``, or ``CommandError`` when the event log does not hold it."""
    for alert in read_alerts(path):
        if alert.event_id == event_id:
            return alert
    raise CommandError(f"unknown event {event_id!r}: no alert with this id in {path} or its rotated files")


# ------------------------------------------------------------------ the reviews log
@dataclass(frozen=True)
class ReviewRecord:
    """One line of ``reviews.jsonl``: the verdict, who gave it, and what it created."""

    time: str
    event_id: str
    machine: str
    verdict: str
    condition: str
    note: str
    who: str  # one of WAYS
    version: str | None = None  # bank version holding the reviewed audio (normal)
    library: str | None = None  # folder in the fault library (fault)
    request_id: str | None = None


class ReviewLog:
    """``<state_dir>/reviews.jsonl``: every verdict given, appended whole and fsync'd.

    ``locked()`` holds an flock on ``reviews.lock`` for a whole review (check, apply, record),
    so two writers (the daemon's command threads, a CLI) never give two verdicts to one alert."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / REVIEWS_FILE
        self.lock_path = Path(state_dir) / REVIEWS_LOCK

    def records(self) -> list[ReviewRecord]:
        known = set(ReviewRecord.__dataclass_fields__)
        out = []
        for record in _lines(self.path) if self.path.is_file() else ():
            try:
                out.append(ReviewRecord(**{k: v for k, v in record.items() if k in known}))
            except TypeError:
                log.warning("%s: a line without the fields of a review; skipped", self.path)
        return out

    def find(self, event_id: str) -> ReviewRecord | None:
        return next((r for r in self.records() if r.event_id == event_id), None)

    def append(self, record: ReviewRecord) -> None:
        line = (json.dumps(asdict(record), ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+b") as file:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(file.fileno(), fcntl.LOCK_UN)


def describe(reply: dict[str, Any]) -> str:
    """One line saying what a verdict did (the CLI prints it, from its own or the daemon's reply)."""
    head = f"review {reply.get('event_id')} ({reply.get('machine')}): {reply.get('verdict')}"
    again = " (found from an interrupted earlier attempt)" if reply.get("recovered") else ""
    if reply.get("version"):
        return (f"{head}: the clip is now normal sound in bank {reply.get('bank')} version {reply['version']}{again}; "
                f"undo with: asd-monitor bank rollback --bank {reply.get('bank')}")
    if reply.get("library"):
        return f"{head}: confirmed fault kept in {reply['library']}{again}"
    return f"{head}: recorded"
