"""Each machine's status as a plant system reads it, kept current for the plant protocols
(OPC UA, Sparkplug B).

Those protocols model a machine as a set of variables (state, severity, last rank, health,
sensor fault, bank version, last alert) that change now and then, plus alert events. The
pipeline already reports each fact to ``Outputs``; ``PlantFeed`` folds them into one
``MachineStatus`` per machine and hands every change to its subscribers through a bounded
queue per subscriber, which each protocol drains on its own thread. So a slow or hostile
client can delay only its own queue, never a window: when a queue is full its oldest change
is dropped and counted, and the latest status is always in ``snapshot()``.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, fields, replace

from monitor.outputs.messages import AlertEvent, MachineState, ReviewMessage, Severity

log = logging.getLogger(__name__)

QUEUE_CHANGES = 1000  # per subscriber: 100 machines x 10 changes before the oldest go


@dataclass(frozen=True)
class MachineStatus:
    """What a plant system reads about one machine. Times are ISO 8601 UTC; an empty string
    or None means "not yet" (no window scored, no alert since the daemon started)."""

    machine: str
    state: MachineState = "starting"
    detail: str = ""  # why the machine is in its state
    severity: Severity = "ok"
    fused_rank: float | None = None  # of the last scored window
    anomalous: bool = False  # the last scored window was above the alert threshold
    window_end: str = ""  # end of the last window handled (scored, idle or faulty)
    sensor_fault: str = ""  # the last window's fault kinds, comma-separated; "" when none
    anomalous_1h: float | None = None  # share of anomalous windows (monitor/service/health.py)
    anomalous_24h: float | None = None
    rank_ewma: float | None = None
    bank_version: str = ""
    alert_event_id: str = ""  # the last alert raised or cleared
    alert_type: str = ""  # "raise" or "clear"
    alert_time: str = ""  # end of the window that decided it
    verdict: str = ""  # a person's verdict on alert_event_id, once reviewed


STATUS_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(MachineStatus) if f.name != "machine")


@dataclass(frozen=True)
class Change:
    """A machine's status after a change, the fields that changed, and the alert (raise or
    clear) that caused it, if one did."""

    status: MachineStatus
    changed: frozenset[str]
    alert: AlertEvent | None = None


class Subscription:
    """One consumer's queue of changes, bounded (oldest dropped first)."""

    def __init__(self, maxsize: int) -> None:
        self._changes: deque[Change] = deque()
        self._maxsize = maxsize
        self._ready = threading.Condition()
        self.dropped = 0  # changes lost to a full queue (the latest status is still in the snapshot)

    def put(self, change: Change) -> None:
        with self._ready:
            if len(self._changes) >= self._maxsize:
                self._changes.popleft()
                self.dropped += 1
            self._changes.append(change)
            self._ready.notify()

    def get(self, timeout: float | None = None) -> Change | None:
        """The oldest change, waiting up to ``timeout`` seconds; None if none came."""
        with self._ready:
            if not self._changes:
                self._ready.wait(timeout)
            return self._changes.popleft() if self._changes else None


class PlantFeed:
    """The latest ``MachineStatus`` of every machine, and the changes, for subscribers.

    ``update`` is called on the pipeline's threads: it only swaps a frozen status under a lock
    and appends to each subscriber's queue, so it never waits for a consumer."""

    def __init__(self) -> None:
        self._status: dict[str, MachineStatus] = {}
        self._subscribers: list[Subscription] = []
        self._lock = threading.Lock()

    def add_machines(self, names: list[str]) -> None:
        with self._lock:
            for name in names:
                self._status.setdefault(name, MachineStatus(name))

    def subscribe(self, maxsize: int = QUEUE_CHANGES) -> Subscription:
        subscription = Subscription(maxsize)
        with self._lock:
            self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscribers:
                self._subscribers.remove(subscription)

    def snapshot(self) -> dict[str, MachineStatus]:
        with self._lock:
            return dict(self._status)

    def update(self, machine: str, alert: AlertEvent | None = None, **values: object) -> MachineStatus:
        """Set some of a machine's fields (names of ``MachineStatus``); subscribers hear of it
        when something changed or an alert came."""
        unknown = set(values) - set(STATUS_FIELDS)
        if unknown:
            raise TypeError(f"unknown machine status fields: {', '.join(sorted(unknown))}")
        with self._lock:
            before = self._status.get(machine) or MachineStatus(machine)
            after = replace(before, **values)
            changed = frozenset(name for name in values if getattr(before, name) != getattr(after, name))
            self._status[machine] = after
            if changed or alert is not None:
                change = Change(after, changed, alert)
                for subscription in self._subscribers:
                    subscription.put(change)
        return after

    def alert(self, event: AlertEvent) -> None:
        self.update(event.machine, alert=event, alert_event_id=event.event_id, alert_type=event.type,
                    alert_time=event.end, verdict="")

    def review(self, message: ReviewMessage) -> None:
        """A verdict on the machine's last alert becomes its ``verdict`` (an acknowledgement, to a
        plant system); a verdict on an older alert changes nothing here."""
        if self.snapshot().get(message.machine, MachineStatus(message.machine)).alert_event_id == message.event_id:
            self.update(message.machine, verdict=message.verdict)
