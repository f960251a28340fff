"""The hand-off between the audio callback and the scoring loop: a ring buffer and a windower.

The PortAudio callback runs on a real-time thread: if it waits (on a slow lock, the allocator, the
garbage collector freeing a large array) the device overflows and audio is lost. So the writer side
only copies each block into memory allocated once, and holds the lock only to move indices. The
scoring loop (the consumer) is slow and bursty (a backbone can take longer than a hop); the ring
absorbs that, and when the consumer falls so far behind that audio it still needed was overwritten,
that is counted (``RingBuffer.overruns``) and the windower jumps forward instead of scoring a torn
window (``Windower.skipped_windows``).

Frames are addressed by an absolute, monotonically increasing frame number (frames written since
the ring was made), never by position in the array, so a window keeps its identity across
wraparounds and stream restarts. Each written block carries the wall-clock time its first frame was
captured; a small table of these marks turns a frame number back into a time, so a window's time is
when its audio was heard, not when the slow consumer got round to it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# Time marks kept (one per written block). Older frames are timed by extrapolating back from the
# oldest mark at the sample rate, which stays exact unless the stream restarted in between.
DEFAULT_MAX_MARKS = 1024


class RingBuffer:
    """Preallocated float32 ring of ``capacity_frames`` x ``channels`` with a single writer.

    ``sample_rate`` lets frames inside a block (and frames older than the kept marks) be timed
    exactly; without it a frame gets the capture time of the block mark at or before it.
    ``overruns`` counts the writes that overwrote audio the consumer had not released yet.
    """

    def __init__(
        self,
        channels: int,
        capacity_frames: int,
        sample_rate: float | None = None,
        max_marks: int = DEFAULT_MAX_MARKS,
    ) -> None:
        if channels < 1 or capacity_frames < 1 or max_marks < 1:
            raise ValueError(f"channels, capacity_frames and max_marks must be >= 1, got {channels}, {capacity_frames}, {max_marks}")
        if sample_rate is not None and not sample_rate > 0:
            raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
        self.channels = channels
        self.capacity = capacity_frames
        self.sample_rate = sample_rate
        self._data = np.zeros((capacity_frames, channels), dtype=np.float32)
        self._mark_frames = np.zeros(max_marks, dtype=np.int64)
        self._mark_times = np.zeros(max_marks, dtype=np.float64)
        self._mark_count = 0
        self._written = 0  # frames completely written and readable
        self._writing_end = 0  # frames the writer may be touching right now (>= _written)
        self._consumer: int | None = None  # oldest frame the consumer still needs
        self.overruns = 0
        self.condition = threading.Condition(threading.Lock())

    @property
    def frames_written(self) -> int:
        """Total frames written since creation (the absolute number of the next frame)."""
        with self.condition:
            return self._written

    @property
    def oldest_frame(self) -> int:
        """The oldest absolute frame held that no write in progress can touch."""
        with self.condition:
            return max(0, self._writing_end - self.capacity)

    def write(self, block: np.ndarray, capture_time: float) -> None:
        """Append ``block`` [n, channels] whose first frame was captured at ``capture_time``.

        Called from the audio callback: copies into the preallocated array and takes the lock
        only around index updates. The target region is announced before the copy so a reader
        copying concurrently can tell its window may have been torn.
        """
        n = block.shape[0]
        if block.ndim != 2 or block.shape[1] != self.channels:
            raise ValueError(f"block must be [n, {self.channels}], got {block.shape}")
        if n == 0:
            return
        with self.condition:
            start = self._written
            end = start + n
            self._writing_end = end
            if self._consumer is not None and end - self.capacity > self._consumer:
                self.overruns += 1
            slot = self._mark_count % len(self._mark_frames)
            self._mark_frames[slot] = start
            self._mark_times[slot] = capture_time
            self._mark_count += 1
        if n > self.capacity:  # only the newest capacity frames can survive anyway
            block = block[n - self.capacity :]
            start = end - self.capacity
            n = self.capacity
        offset = start % self.capacity
        first = min(n, self.capacity - offset)
        np.copyto(self._data[offset : offset + first], block[:first])
        if first < n:
            np.copyto(self._data[: n - first], block[first:])
        with self.condition:
            self._written = end
            self.condition.notify_all()

    def release(self, frame: int) -> None:
        """Declare that the consumer no longer needs frames before ``frame``.

        From then on, writing over frames at or after it counts as an overrun. A producer that
        can wait (file replay) uses this to apply back-pressure, see ``wait_for_space``.
        """
        with self.condition:
            self._consumer = frame
            self.condition.notify_all()

    def wait_for_space(self, frames: int, timeout: float) -> bool:
        """Block until ``frames`` more can be written without overwriting unconsumed audio.

        Returns False on timeout. Without a registered consumer there is always space.
        """
        needed = min(frames, self.capacity)
        with self.condition:
            return self.condition.wait_for(
                lambda: self._consumer is None or self._written + needed - self.capacity <= self._consumer,
                timeout,
            )

    def wait_for_frames(self, frames_written: int, timeout: float) -> bool:
        """Block until at least ``frames_written`` frames were written; False on timeout."""
        with self.condition:
            return self.condition.wait_for(lambda: self._written >= frames_written, timeout)

    def read(self, start: int, frames: int, channel: int | None = None) -> np.ndarray | None:
        """A copy of frames [start, start + frames) of every channel, or of ``channel`` alone
        ([frames, 1]), or None when any of them is no longer held.

        The check is repeated after the copy against the writer's announced region, because the
        writer does not wait for readers.
        """
        with self.condition:
            if start < 0 or frames > self.capacity or start + frames > self._written:
                raise ValueError(f"frames [{start}, {start + frames}) are not available (written {self._written}, capacity {self.capacity})")
            if start < self._writing_end - self.capacity:
                return None
        columns = slice(None) if channel is None else slice(channel, channel + 1)
        out = np.empty((frames, self.channels if channel is None else 1), dtype=np.float32)
        offset = start % self.capacity
        first = min(frames, self.capacity - offset)
        out[:first] = self._data[offset : offset + first, columns]
        out[first:] = self._data[: frames - first, columns]
        with self.condition:
            if start < self._writing_end - self.capacity:
                return None
        return out

    def time_of(self, frame: int) -> float:
        """Wall-clock time (epoch seconds) at which absolute ``frame`` was captured."""
        with self.condition:
            count = min(self._mark_count, len(self._mark_frames))
            if count == 0:
                raise ValueError("no audio written yet")
            # Once the mark table has wrapped, the oldest mark sits at the next slot to write.
            oldest = self._mark_count % count if self._mark_count > count else 0
            frames = np.roll(self._mark_frames[:count], -oldest)
            times = np.roll(self._mark_times[:count], -oldest)
        index = max(int(np.searchsorted(frames, frame, side="right")) - 1, 0)
        if self.sample_rate is None:
            return float(times[index])
        return float(times[index] + (frame - int(frames[index])) / self.sample_rate)


@dataclass(frozen=True)
class Window:
    """``samples`` [window, channels] starting at absolute frame ``start_frame``, captured at
    ``start_time`` (epoch seconds of its first frame), cut for ``Lane`` number ``lane``; a lane
    of one channel gives [window, 1]."""

    start_frame: int
    samples: np.ndarray
    start_time: float
    lane: int = 0


@dataclass(frozen=True)
class Lane:
    """One phase of the window grid: its windows start at ``offset`` + k x hop frames and hold
    ``channel`` alone (None: every channel)."""

    offset: int = 0
    channel: int | None = None


class Windower:
    """Cuts the ring's stream into windows of ``window_frames`` every ``hop_frames``, on one or
    more ``lanes`` (phases of the grid), handing out the window that ends first next.

    Several lanes spread the windows of the machines on one source over the hop, so the
    scorer gets them one by one instead of all at the same instant. It is the ring's consumer:
    it releases the audio no lane needs any more, so overruns measure how far the slowest lane
    fell behind. Lane offsets count from the oldest frame the ring holds when it is made.
    """

    def __init__(self, ring: RingBuffer, window_frames: int, hop_frames: int, lanes: Sequence[Lane] = (Lane(),)) -> None:
        if window_frames < 1 or hop_frames < 1:
            raise ValueError(f"window_frames and hop_frames must be >= 1, got {window_frames} and {hop_frames}")
        if not lanes or min(lane.offset for lane in lanes) < 0:
            raise ValueError(f"lanes need offsets >= 0, got {[lane.offset for lane in lanes]}")
        reach = window_frames + max(lane.offset for lane in lanes)
        if reach > ring.capacity:
            raise ValueError(f"a window of {window_frames} frames at offsets up to {reach - window_frames} "
                             f"does not fit a ring of {ring.capacity}")
        self.ring = ring
        self.window_frames = window_frames
        self.hop_frames = hop_frames
        self.lanes = tuple(lanes)
        first = ring.oldest_frame
        self._next = [first + lane.offset for lane in self.lanes]
        self.skipped = [0] * len(self.lanes)  # windows lost per lane
        ring.release(self.next_start)

    @property
    def next_start(self) -> int:
        """The first frame of the earliest window still to cut (on any lane)."""
        return min(self._next)

    @property
    def skipped_windows(self) -> int:
        return sum(self.skipped)

    def next_window(self, timeout: float) -> Window | None:
        """The next window, waiting up to ``timeout`` seconds for its audio; None on timeout.

        When its audio was overwritten, its lane skips forward along the hop grid to the oldest
        window still complete in the ring, counting the windows lost.
        """
        deadline = time.monotonic() + timeout
        while True:
            lane = self._next.index(self.next_start)
            start = self._next[lane]
            if not self.ring.wait_for_frames(start + self.window_frames, max(0.0, deadline - time.monotonic())):
                return None
            samples = self.ring.read(start, self.window_frames, self.lanes[lane].channel)
            if samples is not None:
                window = Window(start, samples, self.ring.time_of(start), lane)
                self._next[lane] = start + self.hop_frames
                self.ring.release(self.next_start)
                return window
            self._skip_forward(lane)

    def _skip_forward(self, lane: int) -> None:
        oldest = self.ring.oldest_frame
        skip = max(1, math.ceil((oldest - self._next[lane]) / self.hop_frames))
        self.skipped[lane] += skip
        self._next[lane] += skip * self.hop_frames
        log.warning("consumer fell behind the audio: skipped %d window(s) of lane %d, resuming at frame %d",
                    skip, lane, self._next[lane])
        self.ring.release(self.next_start)
