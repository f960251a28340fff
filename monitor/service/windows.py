"""The audio path: cutting each source's ring into windows and queueing them for the worker.

One thread per source cuts windows every hop and hands each machine on that source its window
through one bounded queue. Live audio never waits for the models: when the queue is full its
oldest window is dropped and counted. A replay waits instead, so every window of it is scored.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from monitor.audio.ring import Windower
from monitor.audio.sources import AudioSource
from monitor.outputs.fanout import Outputs
from monitor.service.machine import Machine
from monitor.service.pipeline import QueuedWindow

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often waiting threads look at the stop flag


class WindowQueue:
    """Windows waiting for the worker; ``put`` drops the oldest when full, ``wait_put`` waits."""

    def __init__(self, maxsize: int, outputs: Outputs, stop: threading.Event) -> None:
        self.queue: queue.Queue[QueuedWindow] = queue.Queue(maxsize=maxsize)
        self.outputs = outputs
        self.stop = stop
        self._lock = threading.Lock()  # one dropper at a time, so a drop never overshoots

    def put(self, item: QueuedWindow) -> None:
        """Queue a live window; a full queue loses its oldest window (counted)."""
        with self._lock:
            while True:
                try:
                    self.queue.put_nowait(item)
                    break
                except queue.Full:
                    try:
                        dropped = self.queue.get_nowait()
                    except queue.Empty:
                        continue
                    self.queue.task_done()
                    self.outputs.dropped(dropped.machine.name, dropped.window.start_time)
        self.outputs.telemetry.set_queue_depth(self.queue.qsize())

    def wait_put(self, item: QueuedWindow) -> None:
        """Queue a replayed window, waiting for room (until stopped)."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=POLL_SECONDS)
                self.outputs.telemetry.set_queue_depth(self.queue.qsize())
                return
            except queue.Full:
                continue

    def get(self) -> QueuedWindow | None:
        """The next window, or None after ``POLL_SECONDS`` without one."""
        try:
            return self.queue.get(timeout=POLL_SECONDS)
        except queue.Empty:
            return None

    def done(self) -> None:
        self.queue.task_done()
        self.outputs.telemetry.set_queue_depth(self.queue.qsize())

    def empty(self) -> bool:
        return self.queue.empty()

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being processed."""
        return self.queue.unfinished_tasks == 0


def cut_windows(source: AudioSource, windower: Windower, machines: list[Machine], windows: WindowQueue,
                outputs: Outputs, stop: threading.Event) -> None:
    """Hand each window of ``source`` to every machine listening to it, until stopped or until
    a finished replay has no full window left."""
    skipped = overflows = 0
    while not stop.is_set():
        window = windower.next_window(POLL_SECONDS)
        if windower.skipped_windows > skipped:
            for machine in machines:
                for _ in range(windower.skipped_windows - skipped):
                    outputs.dropped(machine.name)
            skipped = windower.skipped_windows
        if source.overflows > overflows:
            outputs.telemetry.audio_overflow(source.name, source.overflows - overflows)
            overflows = source.overflows
        if window is None:
            if source.finished.is_set() and source.ring.frames_written < windower.next_start + windower.window_frames:
                break
            continue
        ready = time.monotonic()
        put = windows.put if source.live else windows.wait_put
        for machine in machines:
            put(QueuedWindow(machine, window, ready))
    log.debug("windower of %s stopped", source.name)
