"""Tests for monitor.audio.ring: windows are exactly the written stream, timed, and robust to a slow
consumer and to a concurrent writer."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from monitor.audio.ring import RingBuffer, Window, Windower

RATE = 1000
T0 = 1_700_000_000.0


def ramp(start: int, frames: int, channels: int = 2) -> np.ndarray:
    """Frame i carries the value i (+ 0.5 on the second channel), so any misplaced, repeated
    or swapped frame is visible. float32 is exact for integers below 2**24."""
    values = np.arange(start, start + frames, dtype=np.float32)[:, None]
    return values + np.arange(channels, dtype=np.float32) * 0.5


def write_ramp(ring: RingBuffer, total: int, block_sizes: list[int], start: int = 0) -> int:
    """Write frames [start, start + total) in blocks cycling through ``block_sizes``, each with
    its capture time (the frame's time at RATE from T0)."""
    frame, i = start, 0
    while frame < start + total:
        n = min(block_sizes[i % len(block_sizes)], start + total - frame)
        ring.write(ramp(frame, n, ring.channels), T0 + frame / RATE)
        frame, i = frame + n, i + 1
    return frame


def test_windows_equal_written_signal_with_hop_and_overlap() -> None:
    ring = RingBuffer(2, 700, sample_rate=RATE)
    windower = Windower(ring, window_frames=250, hop_frames=100)
    frame = write_ramp(ring, 300, [7, 13, 1, 31])  # odd sizes: blocks never line up with windows
    first = windower.next_window(timeout=0)
    assert first is not None and first.start_frame == 0
    np.testing.assert_array_equal(first.samples, ramp(0, 250))
    assert windower.next_window(timeout=0) is None  # frames 100..350 not there yet
    starts = [0]
    while frame < 3000:  # wraps the 700-frame ring four times
        frame = write_ramp(ring, 120, [7, 13, 1, 31], start=frame)
        while (window := windower.next_window(timeout=0)) is not None:
            np.testing.assert_array_equal(window.samples, ramp(window.start_frame, 250))
            starts.append(window.start_frame)
    assert starts == list(range(0, frame - 250 + 1, 100))
    assert ring.overruns == 0 and windower.skipped_windows == 0


def test_window_is_a_copy() -> None:
    ring = RingBuffer(1, 100, sample_rate=RATE)
    windower = Windower(ring, 50, 50)
    write_ramp(ring, 50, [50])
    window = windower.next_window(0)
    assert window is not None
    write_ramp(ring, 100, [100], start=50)  # overwrites every slot the window was read from
    np.testing.assert_array_equal(window.samples, ramp(0, 50, 1))


def test_interleaved_writes_and_reads_across_wraparound() -> None:
    # The smallest ring that never overruns here: a window plus the largest block but one frame.
    ring = RingBuffer(2, 40 + 29 - 1, sample_rate=RATE)
    windower = Windower(ring, window_frames=40, hop_frames=40)  # no overlap
    frame, seen = 0, []
    for size in [3, 17, 29, 5, 11, 23] * 20:
        frame = write_ramp(ring, size, [size], start=frame)
        while (window := windower.next_window(0)) is not None:
            np.testing.assert_array_equal(window.samples, ramp(window.start_frame, 40))
            seen.append(window.start_frame)
    assert seen == list(range(0, frame - 40 + 1, 40))
    assert ring.overruns == 0 and windower.skipped_windows == 0


def test_overrun_counts_and_skips_forward_to_oldest_complete_window() -> None:
    ring = RingBuffer(1, 1000, sample_rate=RATE)
    windower = Windower(ring, window_frames=300, hop_frames=100)
    write_ramp(ring, 2550, [50])  # consumer asleep: frames 0..1549 were overwritten
    assert ring.overruns > 0
    assert ring.oldest_frame == 1550
    window = windower.next_window(timeout=0)
    assert window is not None
    # The oldest window on the hop grid (multiples of 100) whose frames are all still held.
    assert window.start_frame == 1600
    assert windower.skipped_windows == 16
    np.testing.assert_array_equal(window.samples, ramp(1600, 300, 1))
    overruns = ring.overruns
    write_ramp(ring, 100, [50], start=2550)  # the consumer keeps up again: no new overruns
    assert ring.overruns == overruns
    assert windower.next_window(0).start_frame == 1700


def test_overruns_need_a_consumer() -> None:
    """With no consumer the ring is a plain circular buffer: old audio is meant to go."""
    ring = RingBuffer(1, 100)
    write_ramp(ring, 1000, [30])
    assert ring.overruns == 0
    assert ring.frames_written == 1000


def test_block_larger_than_ring_keeps_its_newest_frames() -> None:
    ring = RingBuffer(1, 100, sample_rate=RATE)
    ring.write(ramp(0, 250, 1), T0)
    assert ring.frames_written == 250
    np.testing.assert_array_equal(ring.read(150, 100), ramp(150, 100, 1))
    assert ring.read(50, 100) is None  # partly overwritten
    assert ring.time_of(150) == pytest.approx(T0 + 0.150)


def test_timestamps_follow_capture_times_within_and_across_blocks() -> None:
    ring = RingBuffer(1, 10_000, sample_rate=RATE)
    windower = Windower(ring, window_frames=1000, hop_frames=250)
    write_ramp(ring, 3000, [97, 160])
    window = windower.next_window(0)
    assert window is not None and window.start_time == pytest.approx(T0)
    times = [w.start_time for w in iter(lambda: windower.next_window(0), None)]
    assert times == pytest.approx([T0 + k * 0.25 for k in range(1, 9)], abs=1e-6)


def test_timestamps_jump_after_a_gap_in_capture() -> None:
    """A stream restart resumes the frame count but not the clock: windows after it carry
    their own capture time, not one extrapolated across the gap."""
    ring = RingBuffer(1, 10_000, sample_rate=RATE)
    windower = Windower(ring, window_frames=500, hop_frames=500)
    ring.write(ramp(0, 1000, 1), T0)
    ring.write(ramp(1000, 1000, 1), T0 + 60.0)  # device was down for 59 s
    times = [w.start_time for w in iter(lambda: windower.next_window(0), None)]
    assert times == pytest.approx([T0, T0 + 0.5, T0 + 60.0, T0 + 60.5])


def test_timestamps_older_than_kept_marks_are_extrapolated() -> None:
    ring = RingBuffer(1, 10_000, sample_rate=RATE, max_marks=4)
    write_ramp(ring, 1000, [10])  # 100 marks written, only the last 4 kept
    assert ring.time_of(0) == pytest.approx(T0)
    assert ring.time_of(995) == pytest.approx(T0 + 0.995)


def test_without_sample_rate_a_frame_gets_its_block_time() -> None:
    ring = RingBuffer(1, 100)
    ring.write(ramp(0, 10, 1), T0)
    ring.write(ramp(10, 10, 1), T0 + 1)
    assert ring.time_of(5) == T0 and ring.time_of(10) == T0 + 1 and ring.time_of(19) == T0 + 1


def test_next_window_times_out_and_waits() -> None:
    ring = RingBuffer(1, 1000, sample_rate=RATE)
    windower = Windower(ring, 100, 100)
    assert windower.next_window(timeout=0.05) is None
    timer = threading.Timer(0.05, lambda: ring.write(ramp(0, 100, 1), T0))
    timer.start()
    window = windower.next_window(timeout=5)
    timer.join()
    assert isinstance(window, Window) and window.start_frame == 0


def test_wait_for_space_applies_back_pressure() -> None:
    ring = RingBuffer(1, 100, sample_rate=RATE)
    windower = Windower(ring, 50, 50)
    write_ramp(ring, 100, [100])
    assert not ring.wait_for_space(10, timeout=0)  # the consumer still needs all 100 frames
    windower.next_window(0)
    assert ring.wait_for_space(50, timeout=0) and not ring.wait_for_space(51, timeout=0)


@pytest.mark.parametrize(
    "args",
    [(0, 10), (1, 0), (1, 10, 0.0)],
)
def test_invalid_ring(args: tuple) -> None:
    with pytest.raises(ValueError):
        RingBuffer(*args)


def test_invalid_block_and_window() -> None:
    ring = RingBuffer(2, 100)
    with pytest.raises(ValueError, match="block must be"):
        ring.write(np.zeros((10, 1), np.float32), T0)
    with pytest.raises(ValueError, match="does not fit"):
        Windower(ring, 101, 10)
    with pytest.raises(ValueError):
        Windower(ring, 10, 0)


def test_concurrent_writer_and_reader_see_every_frame_in_order() -> None:
    """A writer thread streams a ramp in odd blocks as fast as it can while the reader windows
    it: every window must equal the ramp (no torn copies), and windows are either consecutive
    on the hop grid or skipped over and counted."""
    ring = RingBuffer(2, 4096, sample_rate=RATE)
    windower = Windower(ring, window_frames=1024, hop_frames=512)
    total = 400_000
    done = threading.Event()

    def writer() -> None:
        frame, i, sizes = 0, 0, [37, 128, 1, 333, 64]
        while frame < total:
            n = min(sizes[i % len(sizes)], total - frame)
            ring.write(ramp(frame, n), T0 + frame / RATE)
            frame, i = frame + n, i + 1
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    count, last = 0, -512
    while not (done.is_set() and ring.frames_written - windower.next_start < 1024):
        window = windower.next_window(timeout=1)
        if window is None:
            continue
        np.testing.assert_array_equal(window.samples, ramp(window.start_frame, 1024))
        assert window.start_time == pytest.approx(T0 + window.start_frame / RATE)
        assert (window.start_frame - last) % 512 == 0 and window.start_frame > last
        count += 1
        last = window.start_frame
    thread.join()
    assert count + windower.skipped_windows == (total - 1024) // 512 + 1
    assert (windower.skipped_windows > 0) == (ring.overruns > 0)
