"""The audio path: cutting each source's ring into windows and queueing them for the workers.

One thread per source cuts windows and hands each machine on that source its window through
one bounded queue. Each machine has its own phase of the window grid (``phase_lanes``): with N
machines, machine i's windows end i x hop / N after machine 0's, so the work arrives evenly
over the hop instead of in one burst per hop, and a window waits for its own processing only.
Every window still holds exactly one window length of its machine's audio; only the moment
the grid starts moves.

Live audio never waits for the models: when the queue is full a window is dropped (the oldest
of the machine with the most waiting, so an overload thins every machine alike instead of
silencing one) and counted. A replay waits instead, so every window of it is scored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence

from monitor.audio.ring import Lane, Windower
from monitor.audio.sources import AudioSource
from monitor.outputs.fanout import Outputs
from monitor.service.machine import Machine
from monitor.service.pipeline import QueuedWindow

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often waiting threads look at the stop flag


def phase_lanes(machines: Sequence[Machine], order: Sequence[str], hop_frames: int,
                spread: bool) -> list[tuple[Lane, list[Machine]]]:
    """The lanes of one source's windower and the machines each lane feeds.

    ``order`` names every machine of the daemon (all sources): machine i of N gets the
    offset i x hop / N, so machines on different sources are spread too. Not ``spread``:
    one lane of every channel at offset 0 (all windows of a source end together).
    """
    if not spread:
        return [(Lane(), list(machines))]
    return [(Lane(round(order.index(m.name) * hop_frames / len(order)), m.config.channel), [m]) for m in machines]


class WindowQueue:
    """Windows waiting for the workers, oldest first.

    A worker gets the oldest window whose machine no other worker holds, so each machine's
    windows are scored one at a time and in order (its alert state advances window by window)
    while several workers share the queue. ``put`` drops a window when full, ``wait_put``
    waits for room.
    """

    def __init__(self, maxsize: int, outputs: Outputs, stop: threading.Event) -> None:
        self.maxsize = maxsize
        self.outputs = outputs
        self.stop = stop
        self.dropped = 0  # windows this queue dropped
        self._waiting: list[QueuedWindow] = []
        self._busy: set[str] = set()  # machines a worker is processing
        self._changed = threading.Condition()

    def put(self, item: QueuedWindow) -> None:
        """Queue a live window; a full queue loses the oldest window of the machine with the
        most windows waiting (counted)."""
        with self._changed:
            victim = self._drop_one() if len(self._waiting) >= self.maxsize else None
            self._waiting.append(item)
            self._changed.notify_all()
            depth = len(self._waiting)
        if victim is not None:
            self.outputs.dropped(victim.machine.name, victim.start)
        self.outputs.telemetry.set_queue_depth(depth)

    def _drop_one(self) -> QueuedWindow:
        waiting = Counter(item.machine.name for item in self._waiting)
        most = max(waiting.values())
        index = next(i for i, item in enumerate(self._waiting) if waiting[item.machine.name] == most)
        self.dropped += 1
        return self._waiting.pop(index)

    def wait_put(self, item: QueuedWindow) -> None:
        """Queue a replayed window, waiting for room (until stopped)."""
        with self._changed:
            while len(self._waiting) >= self.maxsize:
                if self.stop.is_set():
                    return
                self._changed.wait(POLL_SECONDS)
            self._waiting.append(item)
            self._changed.notify_all()
            depth = len(self._waiting)
        self.outputs.telemetry.set_queue_depth(depth)

    def get(self) -> QueuedWindow | None:
        """The next window for a worker, or None after ``POLL_SECONDS`` without one. The caller
        must call ``done`` with it."""
        with self._changed:
            if not self._changed.wait_for(self._free_index_exists, POLL_SECONDS):
                return None
            index = next(i for i, item in enumerate(self._waiting) if item.machine.name not in self._busy)
            item = self._waiting.pop(index)
            self._busy.add(item.machine.name)
            self._changed.notify_all()
            depth = len(self._waiting)
        self.outputs.telemetry.set_queue_depth(depth)
        return item

    def _free_index_exists(self) -> bool:
        return any(item.machine.name not in self._busy for item in self._waiting)

    def done(self, item: QueuedWindow) -> None:
        with self._changed:
            self._busy.discard(item.machine.name)
            self._changed.notify_all()

    def qsize(self) -> int:
        with self._changed:
            return len(self._waiting)

    def empty(self) -> bool:
        return self.qsize() == 0

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being processed."""
        with self._changed:
            return not self._waiting and not self._busy


def cut_windows(source: AudioSource, windower: Windower, lanes: list[list[Machine]], windows: WindowQueue,
                outputs: Outputs, stop: threading.Event) -> None:
    """Hand each window of ``source`` to the machines of its lane (``lanes[i]`` listens to
    ``windower.lanes[i]``), until stopped or until a finished replay has no full window left."""
    skipped = list(windower.skipped)
    overflows = 0
    while not stop.is_set():
        window = windower.next_window(POLL_SECONDS)
        for lane, machines in enumerate(lanes):
            for _ in range(windower.skipped[lane] - skipped[lane]):
                for machine in machines:
                    outputs.dropped(machine.name)
        skipped = list(windower.skipped)
        if source.overflows > overflows:
            outputs.telemetry.audio_overflow(source.name, source.overflows - overflows)
            overflows = source.overflows
        if window is None:
            if source.finished.is_set() and source.ring.frames_written < windower.next_start + windower.window_frames:
                break
            continue
        ready = time.monotonic()
        put = windows.put if source.live else windows.wait_put
        one_channel = windower.lanes[window.lane].channel is not None
        for machine in lanes[window.lane]:
            samples = window.samples[:, 0 if one_channel else machine.config.channel]
            put(QueuedWindow(machine, window.start_time, samples, ready))
    log.debug("windower of %s stopped", source.name)
