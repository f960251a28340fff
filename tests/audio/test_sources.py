"""Tests for monitor.audio.sources: file replay against the files' own samples, and a microphone through
the real sounddevice/PortAudio path, fed by a private PulseAudio server (``pulse_server``)."""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from monitor.audio import sources
from monitor.audio.files import load_audio, resample
from monitor.audio.ring import Window, Windower
from monitor.audio.sensor import check_window, level_dbfs
from monitor.audio.sources import FileSource, MicrophoneSource, make_source
from monitor.config import SensorConfig, SourceConfig
from monitor.errors import AudioDeviceError, AudioError

RATE = 16000
START = 1_700_000_000.0


def write_noise(path: Path, seconds: float, rate: int = RATE, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Write 16-bit noise and return it as read back (float32 [n, channels]), the exact
    samples a reader of the file gets."""
    data = 0.3 * np.random.default_rng(seed).standard_normal((int(seconds * rate), channels))
    sf.write(str(path), np.clip(data, -1, 1), rate, subtype="PCM_16")
    return sf.read(str(path), dtype="float32", always_2d=True)[0]


def write_tone(path: Path, seconds: float, hz: float, amplitude: float, rate: int = RATE) -> None:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate, subtype="PCM_16")


def file_config(paths: list[Path], **overrides: object) -> SourceConfig:
    values: dict = {"name": "replay", "type": "file", "paths": paths, "sample_rate": RATE, "block_size": 1000, "speed": 1000.0}
    values.update(overrides)
    return SourceConfig(**values)


def drain(source: FileSource, windower: Windower, limit: int | None = None) -> list[Window]:
    """Windows until the source finished and no complete window is left (or ``limit``)."""
    windows: list[Window] = []
    while limit is None or len(windows) < limit:
        window = windower.next_window(timeout=0.2)
        if window is not None:
            windows.append(window)
        elif source.finished.is_set():
            return windows
    return windows


def stitch(windows: list[Window], hop: int) -> np.ndarray:
    """The stream back from consecutive windows: each hop's first frames, plus the last window."""
    return np.concatenate([w.samples[:hop] for w in windows[:-1]] + [windows[-1].samples])


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# --- file replay -----------------------------------------------------------------------------


def test_replay_reproduces_files_in_order_with_consistent_times(tmp_path: Path) -> None:
    folder = tmp_path / "clips"
    folder.mkdir()
    # Sorted by name: a.flac plays before b.wav although written second.
    b = write_noise(folder / "b.wav", 2.3, seed=1)
    a = write_noise(folder / "a.flac", 1.7, seed=2)
    (folder / "notes.txt").write_text("not audio")
    # A 3 s ring with 1000x replay: only back-pressure keeps the slow reader from losing audio.
    source = FileSource(file_config([folder]), ring_seconds=3.0)
    assert [p.name for p in source.files] == ["a.flac", "b.wav"]
    windower = Windower(source.ring, window_frames=RATE, hop_frames=RATE // 2)
    source.start(start_time=START)
    windows = []
    for window in iter(lambda: windower.next_window(timeout=2), None):
        windows.append(window)
        time.sleep(0.01)  # slower than the replay
        if source.finished.is_set() and windower.next_start + RATE > source.ring.frames_written:
            break
    expected = np.concatenate([a, b])
    assert [w.start_frame for w in windows] == list(range(0, len(expected) - RATE + 1, RATE // 2))
    stream = stitch(windows, RATE // 2)
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    for window in windows:
        assert window.start_time == pytest.approx(START + window.start_frame / RATE, abs=1e-6)
    assert source.finished.is_set() and not source.alive
    assert source.ring.overruns == 0 and windower.skipped_windows == 0 and source.error is None
    assert source.ring.frames_written == len(expected)


def test_replay_is_paced(tmp_path: Path) -> None:
    write_noise(tmp_path / "a.wav", 2.0)
    source = FileSource(file_config([tmp_path / "a.wav"], speed=10.0))
    began = time.monotonic()
    source.start()
    assert source.finished.wait(timeout=5)
    assert 0.18 <= time.monotonic() - began < 1.0  # 2 s of audio at 10x: 0.2 s


def test_loop_repeats_the_files(tmp_path: Path) -> None:
    a = write_noise(tmp_path / "a.wav", 0.7, seed=3)
    b = write_noise(tmp_path / "b.wav", 0.4, seed=4)
    source = FileSource(file_config([tmp_path / "a.wav", tmp_path / "b.wav"], loop=True, block_size=333))
    windower = Windower(source.ring, window_frames=RATE // 2, hop_frames=RATE // 2)
    source.start(start_time=START)
    try:
        windows = drain(source, windower, limit=12)  # 6 s: more than five passes
    finally:
        source.stop()
    assert not source.finished.is_set() and not source.alive
    cycle = np.concatenate([a, b])
    expected = np.tile(cycle, (7, 1))
    np.testing.assert_array_equal(np.concatenate([w.samples for w in windows]), expected[: 12 * RATE // 2])
    assert windows[-1].start_time == pytest.approx(START + 11 * 0.5)


def test_resampling_to_the_source_rate(tmp_path: Path) -> None:
    write_tone(tmp_path / "tone32k.wav", 2.0, hz=1000.0, amplitude=0.5, rate=32000)
    source = FileSource(file_config([tmp_path / "tone32k.wav"]))
    windower = Windower(source.ring, window_frames=RATE // 2, hop_frames=RATE // 2)
    source.start(start_time=START)
    windows = drain(source, windower)
    assert source.ring.frames_written == 2 * RATE
    audio = load_audio(tmp_path / "tone32k.wav")
    expected = resample(audio.samples, 32000, RATE)
    np.testing.assert_allclose(np.concatenate([w.samples[:, 0] for w in windows]), expected, atol=1e-6)
    assert dominant_hz(windows[1].samples[:, 0], RATE) == pytest.approx(1000.0, abs=4)
    assert windows[2].start_time == pytest.approx(START + 1.0)


def test_channels_mono_fills_every_channel_and_multichannel_is_kept(tmp_path: Path) -> None:
    stereo = write_noise(tmp_path / "a_stereo.wav", 0.5, channels=2, seed=5)
    mono = write_noise(tmp_path / "b_mono.wav", 0.5, channels=1, seed=6)
    source = FileSource(file_config([tmp_path], channels=2))
    windower = Windower(source.ring, window_frames=RATE // 2, hop_frames=RATE // 2)
    source.start()
    first, second = drain(source, windower)
    np.testing.assert_array_equal(first.samples, stereo)
    np.testing.assert_array_equal(second.samples, np.repeat(mono, 2, axis=1))


def test_unreadable_file_is_skipped_and_reported_not_a_device_error(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"RIFF but not really a wav file")
    b = write_noise(tmp_path / "b.wav", 0.5)
    source = FileSource(file_config([tmp_path]))
    skipped: list[tuple[Path, str]] = []
    source.on_skip = lambda path, reason: skipped.append((path, reason))
    windower = Windower(source.ring, window_frames=RATE // 2, hop_frames=RATE // 2)
    source.start()
    (window,) = drain(source, windower)
    np.testing.assert_array_equal(window.samples, b)
    assert source.error is None  # a device error would make every later window a sensor fault
    assert [path.name for path, _ in skipped] == ["a.wav"] and "cannot read audio" in skipped[0][1]


def test_file_below_the_source_rate_is_skipped(tmp_path: Path) -> None:
    write_tone(tmp_path / "a_phone.wav", 1.0, hz=1000.0, amplitude=0.5, rate=8000)
    b = write_noise(tmp_path / "b.wav", 0.5)
    source = FileSource(file_config([tmp_path]))
    skipped: list[tuple[Path, str]] = []
    source.on_skip = lambda path, reason: skipped.append((path, reason))
    windower = Windower(source.ring, window_frames=RATE // 2, hop_frames=RATE // 2)
    source.start()
    (window,) = drain(source, windower)
    np.testing.assert_array_equal(window.samples, b)
    ((path, reason),) = skipped
    assert path.name == "a_phone.wav" and "8000 Hz" in reason and f"{RATE} Hz" in reason and source.error is None


def test_loop_over_only_unreadable_files_ends_and_reports_each_once(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"junk")
    frames = len(write_noise(tmp_path / "b.wav", 0.25))
    source = FileSource(file_config([tmp_path / "a.wav"], loop=True))
    skipped: list[Path] = []
    source.on_skip = lambda path, _reason: skipped.append(path)
    source.start()
    assert source.finished.wait(timeout=5)
    assert skipped == [tmp_path / "a.wav"] and source.error is None
    looping = FileSource(file_config([tmp_path / "a.wav", tmp_path / "b.wav"], loop=True))
    looping.on_skip = lambda path, _reason: skipped.append(path)
    looping.start()
    assert wait_until(lambda: looping.ring.frames_written >= 3 * frames, 5)  # three passes over both files
    looping.stop()
    assert skipped == [tmp_path / "a.wav"] * 2  # once per source, not once per pass


def test_no_audio_files(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(AudioError, match="no audio files"):
        FileSource(file_config([tmp_path]))


def test_make_source(tmp_path: Path) -> None:
    write_noise(tmp_path / "a.wav", 0.1)
    assert isinstance(make_source(file_config([tmp_path])), FileSource)
    microphone = make_source(SourceConfig(name="mic", type="microphone", device="x"))
    assert isinstance(microphone, MicrophoneSource) and not microphone.alive


# --- microphone supervision, with a fake sounddevice for exact timing -------------------------


class FakeSoundDevice:
    """Just enough of sounddevice for MicrophoneSource: a device that can be absent, streams the
    test drives by calling their callbacks, and a record of each open attempt."""

    class PortAudioError(Exception):
        pass

    def __init__(self) -> None:
        self.present = False
        self.attempts: list[float] = []
        self.streams: list[types.SimpleNamespace] = []

    def InputStream(self, device: object, callback: Callable, **kwargs: object) -> types.SimpleNamespace:  # noqa: N802 - sounddevice's name
        self.attempts.append(time.monotonic())
        if not self.present:
            raise ValueError(f"No input device matching {device!r}")
        stream = types.SimpleNamespace(active=False, callback=callback)
        stream.start = lambda: setattr(stream, "active", True)
        stream.close = lambda ignore_errors=False: setattr(stream, "active", False)
        self.streams.append(stream)
        return stream

    def query_devices(self) -> list[dict]:
        return [{"name": "fake mic", "max_input_channels": 1}] if self.present else []

    def _terminate(self) -> None:
        pass

    def _initialize(self) -> None:
        pass


def feed(stream: types.SimpleNamespace, frames: int = 160, overflow: bool = False) -> None:
    """What PortAudio does: call back with a block, its timing and status."""
    timing = types.SimpleNamespace(inputBufferAdcTime=50.0, currentTime=50.25)
    stream.callback(np.zeros((frames, 1), np.float32), frames, timing, types.SimpleNamespace(input_overflow=overflow))


def test_supervision_backs_off_recovers_and_detects_dead_and_stalled_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeSoundDevice()
    monkeypatch.setattr(sources, "_sounddevice", lambda: fake)
    source = MicrophoneSource(
        SourceConfig(name="mic", type="microphone", device="fake mic"),
        backoff_initial=0.1, backoff_max=0.3, stall_seconds=0.4,
    )
    with pytest.raises(AudioDeviceError, match="'fake mic'.*no input devices"):
        source.start()
    stop = threading.Event()
    thread = threading.Thread(target=source.supervise, args=(stop,))
    thread.start()
    try:
        assert wait_until(lambda: len(fake.attempts) >= 6, 5)
        assert "'fake mic' cannot be opened" in (source.error or "") and not source.alive
        gaps = np.diff(fake.attempts[1:6])  # attempt 0 was start()
        assert gaps == pytest.approx([0.1, 0.2, 0.3, 0.3], abs=0.05)  # doubling, capped

        fake.present = True  # plugged in
        assert wait_until(lambda: source.alive, 2) and source.error is None
        stream = fake.streams[-1]
        before = time.time()
        feed(stream, overflow=True)
        assert source.overflows == 1
        # The block's first frame was captured one block (10 ms) before its callback.
        assert source.ring.time_of(0) == pytest.approx(before - 0.01, abs=0.02)

        stream.active = False  # unplugged: PortAudio ended the stream
        assert wait_until(lambda: source.error is not None, 2)
        assert "stopped delivering audio" in source.error
        assert wait_until(lambda: len(fake.streams) == 2 and source.alive, 2)  # after a pause

        for _ in range(10):  # a healthy stream is not a stalled one
            feed(fake.streams[-1])
            time.sleep(0.05)
        assert source.alive
        assert wait_until(lambda: source.error is not None, 2)  # then callbacks stop coming
        assert "delivered no audio for 0.4 s" in source.error
        assert wait_until(lambda: len(fake.streams) == 3, 2)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive() and not source.alive
    assert not fake.streams[-1].active  # closed on the way out


# --- microphone through PortAudio and PulseAudio ----------------------------------------------


def pulse_config(**overrides: object) -> SourceConfig:
    values: dict = {"name": "mic", "type": "microphone", "device": "pulse", "sample_rate": RATE, "channels": 1, "block_size": 800}
    values.update(overrides)
    return SourceConfig(**values)


def test_microphone_captures_what_is_played(pulse_server, tmp_path: Path) -> None:
    amplitude, hz = 0.25, 1000.0
    write_tone(tmp_path / "tone.wav", 2.5, hz=hz, amplitude=amplitude)
    source = MicrophoneSource(pulse_config(), ring_seconds=20)
    windower = Windower(source.ring, window_frames=RATE // 2, hop_frames=RATE // 4)
    source.start()
    try:
        assert source.ring.wait_for_frames(RATE // 2, timeout=10), "no audio from the pulse device"
        assert source.alive
        played_at = time.time()
        pulse_server.play(tmp_path / "tone.wav")
        assert source.ring.wait_for_frames(source.ring.frames_written + RATE // 2, timeout=5)
    finally:
        source.stop()
    assert not source.alive
    windows = list(iter(lambda: windower.next_window(timeout=0), None))
    assert windows and windower.skipped_windows == 0 and source.overflows == 0
    sensor = SensorConfig()
    # Before the tone, the null sink's monitor is digital silence, and the checks say so.
    assert check_window(windows[0].samples[:, 0], RATE, sensor, None).faults == ("silence",)
    levels = np.array([level_dbfs(w.samples) for w in windows])
    expected_dbfs = 20 * np.log10(amplitude / np.sqrt(2))
    inside = [w for w, level in zip(windows, levels) if level > levels.max() - 1.0]
    assert len(inside) >= 5  # 2.5 s of tone holds at least 8 windows of 0.5 s every 0.25 s
    assert levels.max() == pytest.approx(expected_dbfs, abs=1.0)
    for window in inside:
        assert dominant_hz(window.samples[:, 0], RATE) == pytest.approx(hz, abs=5)
        assert check_window(window.samples[:, 0], RATE, sensor, expected_dbfs).ok
        # Timed by capture, not by when we read it (all windows were read after the tone).
        assert played_at - 0.5 < window.start_time < played_at + 3.0
    times = np.array([w.start_time for w in windows])
    assert np.diff(times) == pytest.approx(0.25, abs=0.05)


def test_missing_device_is_named(pulse_server) -> None:
    source = MicrophoneSource(pulse_config(device="no-such-microphone"))
    with pytest.raises(AudioDeviceError) as error:
        source.start()
    message = str(error.value)
    assert "'no-such-microphone'" in message and "'pulse'" in message and "\n" not in message
    assert not source.alive


def test_supervised_microphone_survives_a_sound_server_restart(pulse_server) -> None:
    source = MicrophoneSource(pulse_config(), ring_seconds=10, backoff_initial=0.1, backoff_max=0.4)
    stop = threading.Event()
    thread = threading.Thread(target=source.supervise, args=(stop,))
    thread.start()
    try:
        assert wait_until(lambda: source.alive and source.ring.frames_written > 0, 10)
        pulse_server.kill()
        assert wait_until(lambda: source.error is not None, 5)
        assert not source.alive and "'pulse'" in source.error
        time.sleep(1.0)  # several attempts while the device is gone
        assert source.error is not None and "cannot be opened" in source.error
        frames_while_down = source.ring.frames_written
        pulse_server.start()
        assert wait_until(lambda: source.alive, 10), source.error
        assert source.error is None
        assert source.ring.wait_for_frames(frames_while_down + RATE // 2, timeout=10)
    finally:
        stop.set()
        thread.join(timeout=10)
        if pulse_server.process is None:
            pulse_server.start()
    assert not thread.is_alive() and not source.alive
