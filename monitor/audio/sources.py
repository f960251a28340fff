"""Audio sources: a live input device, or files replayed as if they were one.

Both write into a ``RingBuffer`` with a capture time per block, so everything downstream (windows,
sensor checks, scoring) is the same whether audio comes from a microphone next to the machine or
from recordings being replayed for a test or an evaluation.

``sounddevice`` is imported lazily, inside the functions that need it, never at module import:
PortAudio reads its environment (``PULSE_SERVER``, ``ALSA_CONFIG_PATH``) and enumerates devices
once, when ``sounddevice`` is first imported, so a test fixture or the daemon must be able to set
that environment after importing this module. A file-only setup also never needs PortAudio.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import soundfile as sf

from monitor.audio.files import find_audio, load_audio, resample
from monitor.audio.ring import RingBuffer
from monitor.config import SourceConfig
from monitor.errors import AudioDeviceError, AudioError

if TYPE_CHECKING:
    import sounddevice

log = logging.getLogger(__name__)

_LISTED_DEVICES = 8  # how many input devices an error message names


class AudioSource(Protocol):
    """What the daemon needs from any source of audio."""

    name: str
    sample_rate: int
    channels: int
    ring: RingBuffer
    overflows: int  # input overflows reported by the device (audio lost before the ring)
    error: str | None  # the last device error while the source is down, else None
    # Live audio cannot wait for the models: when processing falls behind, the oldest window
    # is dropped (and counted). A replay can wait, so every window of it gets scored.
    live: bool
    finished: threading.Event  # set when a replay has played everything; never for live audio

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def supervise(self, stop_event: threading.Event) -> None:
        """Keep the source running until ``stop_event`` is set (run in a thread of its own)."""

    @property
    def alive(self) -> bool: ...


def _sounddevice() -> Any:
    """``sounddevice``, imported on first use (see the module docstring for why not earlier)."""
    import sounddevice

    return sounddevice


# PortAudio is process-global: one lock serialises opening, closing and re-enumeration across
# every MicrophoneSource, and the count of open streams says when re-enumeration is safe.
_portaudio_lock = threading.Lock()
_open_streams = 0


def _refresh_devices() -> None:
    """Re-enumerate devices so one plugged in (or a sound server restarted) after start is seen.

    PortAudio lists devices only when it initialises and sounddevice has no public rescan, so
    this terminates and re-initialises it through sounddevice's private helpers. That would
    close every open stream, so it is skipped while any stream in the process is open; the
    device list then stays as it was, which still covers a device that only went away for a
    while (a restarted sound server keeps its device names).
    """
    with _portaudio_lock:
        if _open_streams:
            return
        sd = _sounddevice()
        sd._terminate()
        sd._initialize()


def _input_devices_summary() -> str:
    devices = [(i, d["name"]) for i, d in enumerate(_sounddevice().query_devices()) if d["max_input_channels"] > 0]
    if not devices:
        return "no input devices"
    listed = ", ".join(f"{i} {name!r}" for i, name in devices[:_LISTED_DEVICES])
    more = f" and {len(devices) - _LISTED_DEVICES} more" if len(devices) > _LISTED_DEVICES else ""
    return f"inputs: {listed}{more}"


def _device_label(device: str | int | None) -> str:
    return "the default input device" if device is None else f"input device {device!r}"


class MicrophoneSource:
    """A sounddevice input stream whose callback only copies blocks into the ring.

    ``start()`` opens the device once and fails fast (``AudioDeviceError``) so a wrong device
    name in the config is reported at startup. ``supervise()`` is the long-running mode:
    run in its own thread, it keeps the stream open, and when the device is missing, unplugged
    or stops delivering audio it sets ``error`` (the daemon reports a sensor fault) and retries
    with exponential back-off until the device is back.
    """

    def __init__(
        self,
        config: SourceConfig,
        ring_seconds: float = 60.0,
        *,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        stall_seconds: float = 5.0,
    ) -> None:
        self.config = config
        self.name = config.name
        self.sample_rate = config.sample_rate
        self.channels = config.channels
        self.ring = RingBuffer(config.channels, round(ring_seconds * config.sample_rate), sample_rate=config.sample_rate)
        self.overflows = 0
        self.error: str | None = None
        self.live = True
        self.finished = threading.Event()  # a microphone never finishes
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        # Longer than a device's start-up latency (about 1 s through PulseAudio) so opening is
        # not mistaken for a stall.
        self.stall_seconds = stall_seconds
        self._stream: sounddevice.InputStream | None = None
        self._lock = threading.Lock()  # guards _stream against start/stop from other threads
        self._stopping = threading.Event()

    @property
    def alive(self) -> bool:
        stream = self._stream
        return stream is not None and stream.active and self.error is None

    def start(self) -> None:
        """Open and start the stream; raises ``AudioDeviceError`` when that is impossible."""
        self._stopping.clear()
        self._open()

    def stop(self) -> None:
        """Close the stream and end ``supervise``; safe to call from any thread."""
        self._stopping.set()
        self._close()

    def supervise(self, stop_event: threading.Event) -> None:
        """Keep the stream running until ``stop_event`` is set (or ``stop()`` is called).

        Uses an already started stream if there is one. While the device is down, ``error``
        says why and attempts are spaced ``backoff_initial`` doubling to ``backoff_max``
        seconds (reset once the stream is open again), so a missing device neither spins the
        CPU nor floods the log (a warning when the error changes, debug for each retry).
        """
        delay = self.backoff_initial
        while not self._should_stop(stop_event):
            if self._stream is None:
                try:
                    _refresh_devices()
                    self._open()
                except AudioDeviceError as exc:
                    if self.error != str(exc):
                        log.warning("%s: %s; retrying with back-off", self.name, exc)
                    else:
                        log.debug("%s: still down, next attempt in %.3g s", self.name, delay)
                    self.error = str(exc)
                    self._sleep(stop_event, delay)
                    delay = min(delay * 2.0, self.backoff_max)
                    continue
                if self.error is not None:
                    log.info("%s: %s is back", self.name, _device_label(self.config.device))
            self.error = None
            delay = self.backoff_initial
            reason = self._watch(stop_event)
            if reason is None:
                break
            log.warning("%s: %s", self.name, reason)
            self.error = reason
            self._close()
            # Not straight back: a device that just vanished is rarely back within a second, and
            # the pause keeps the fault visible in ``error`` long enough to be reported.
            self._sleep(stop_event, delay)
        self._close()

    def _open(self) -> None:
        global _open_streams
        sd = _sounddevice()
        with self._lock:
            if self._stream is not None or self._stopping.is_set():
                return
            with _portaudio_lock:
                try:
                    stream = sd.InputStream(
                        device=self.config.device,
                        samplerate=self.sample_rate,
                        channels=self.channels,
                        blocksize=self.config.block_size,
                        dtype="float32",
                        callback=self._callback,
                    )
                except (ValueError, sd.PortAudioError) as exc:
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise AudioDeviceError(
                        f"{_device_label(self.config.device)} cannot be opened ({reason}); {_input_devices_summary()}"
                    ) from None
                _open_streams += 1
                try:
                    stream.start()
                except sd.PortAudioError as exc:
                    stream.close(ignore_errors=True)
                    _open_streams -= 1
                    raise AudioDeviceError(f"{_device_label(self.config.device)} cannot be started ({exc})") from None
            self._stream = stream
        log.info("%s: capturing from %s at %d Hz, %d channel(s)", self.name, _device_label(self.config.device), self.sample_rate, self.channels)

    def _close(self) -> None:
        global _open_streams
        with self._lock:
            stream, self._stream = self._stream, None
            if stream is None:
                return
            with _portaudio_lock:
                stream.close(ignore_errors=True)
                _open_streams -= 1

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        """Runs on PortAudio's thread: count overflows, copy into the ring, nothing else."""
        if status.input_overflow:
            self.overflows += 1
        # The block ends about now, so its first frame is one block earlier. PortAudio's
        # ``time_info.inputBufferAdcTime`` is not used: through the ALSA pulse plugin its latency
        # was seen to fall from 0.32 s to 0.01 s within a few blocks while callbacks kept an even
        # pace, which would make window times jump; device latency (tens of ms) is immaterial
        # for 10 s windows.
        self.ring.write(indata, time.time() - frames / self.sample_rate)

    def _watch(self, stop_event: threading.Event) -> str | None:
        """Wait while the stream is healthy; the reason it failed, or None when stopping.

        An unplugged device or a vanished sound server makes PortAudio end the stream
        (``active`` turns false); a device that hangs keeps the stream active but stops calling
        back, which only the absence of new frames reveals.
        """
        last_frames = self.ring.frames_written
        last_progress = time.monotonic()
        poll = min(0.25, self.stall_seconds / 4)
        while not self._should_stop(stop_event):
            stop_event.wait(poll)
            stream = self._stream
            if stream is None:
                return None if self._should_stop(stop_event) else "stream was closed"
            if not stream.active:
                return f"{_device_label(self.config.device)} stopped delivering audio (stream ended)"
            frames = self.ring.frames_written
            if frames != last_frames:
                last_frames, last_progress = frames, time.monotonic()
            elif time.monotonic() - last_progress > self.stall_seconds:
                return f"{_device_label(self.config.device)} delivered no audio for {self.stall_seconds:g} s"
        return None

    def _should_stop(self, stop_event: threading.Event) -> bool:
        return stop_event.is_set() or self._stopping.is_set()

    def _sleep(self, stop_event: threading.Event, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early when either stop signal is set."""
        deadline = time.monotonic() + seconds
        while not self._should_stop(stop_event):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            stop_event.wait(min(remaining, 0.1))


class FileSource:
    """Replays files as a stream of ``block_size`` blocks, ``speed`` times faster than real time.

    Capture times advance by the audio's own duration from the start time, so windows get the
    times they would have had live even at ``speed=1000``. Unlike a microphone, a file can wait:
    when the ring's consumer is behind, replay pauses instead of overwriting audio it has not
    read, so every window of the files is scored whatever the speed. When the files end and
    ``loop`` is off, ``finished`` is set so the daemon can drain the last windows and stop.

    A file that cannot be played as promised (unreadable, or recorded below the source's rate)
    is skipped and the replay goes on with the next: ``on_skip(path, reason)`` tells the owner
    (the daemon logs an event). ``error`` stays None, since it means "the device is down" and
    would turn every later window into a sensor fault.
    """

    def __init__(self, config: SourceConfig, ring_seconds: float = 60.0) -> None:
        self.config = config
        self.name = config.name
        self.sample_rate = config.sample_rate
        self.channels = config.channels
        try:  # each path in the order given (a replay plays them in turn), each folder sorted
            self.files = [f for path in config.paths for f in find_audio([path])]
        except AudioError as exc:
            raise AudioError(f"source {config.name!r}: {exc}") from None
        self.ring = RingBuffer(config.channels, round(ring_seconds * config.sample_rate), sample_rate=config.sample_rate)
        self.overflows = 0  # never incremented: a file cannot overflow; kept for the common interface
        self.error: str | None = None
        self.live = False
        self.finished = threading.Event()
        self.start_time: float | None = None
        self.on_skip: Callable[[Path, str], None] | None = None  # called on the replay thread
        self._skipped: set[Path] = set()  # reported once: a looping replay meets them every pass
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, start_time: float | None = None) -> None:
        """Start replaying in a thread; ``start_time`` (epoch seconds, default now) is the
        capture time of the first frame."""
        if self.alive:
            return
        self.start_time = time.time() if start_time is None else start_time
        self._stopping.clear()
        self.finished.clear()
        self._thread = threading.Thread(target=self._run, name=f"file-source-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def supervise(self, stop_event: threading.Event) -> None:
        """Nothing to supervise: a replay thread has no device to lose."""

    def _run(self) -> None:
        assert self.start_time is not None
        rate = self.sample_rate * self.config.speed
        paced_from = time.monotonic()
        frame = 0
        while not self._stopping.is_set():
            played = 0
            for audio in self._decoded():
                for offset in range(0, len(audio), self.config.block_size):
                    block = audio[offset : offset + self.config.block_size]
                    delay = paced_from + frame / rate - time.monotonic()
                    if delay > 0 and self._stopping.wait(delay):
                        return
                    if not self.ring.wait_for_space(len(block), 0.0):
                        while not self.ring.wait_for_space(len(block), 0.1):
                            if self._stopping.is_set():
                                return
                        # Resume pacing from now rather than bursting to catch up on the pause.
                        paced_from = time.monotonic() - frame / rate
                    self.ring.write(block, self.start_time + frame / self.sample_rate)
                    frame += len(block)
                    played += len(block)
            if not self.config.loop or played == 0:
                break
        if not self._stopping.is_set():
            log.info("%s: replay finished after %.1f s of audio", self.name, frame / self.sample_rate)
            self.finished.set()

    def _decoded(self) -> Iterator[np.ndarray]:
        """Each file as float32 [n, channels] at the source rate, one at a time (a folder of
        recordings need not fit in memory). A file that cannot be used is skipped; the first
        time, it is logged and passed to ``on_skip``."""
        for path in self.files:
            if self._stopping.is_set():
                return
            try:
                yield self._load(path)
            except AudioError as exc:
                if path in self._skipped:
                    continue
                self._skipped.add(path)
                log.error("%s: skipping %s", self.name, exc)
                if self.on_skip is not None:
                    self.on_skip(path, str(exc))

    def _load(self, path: Path) -> np.ndarray:
        if self.channels > 1 and _file_channels(path) == self.channels:
            try:
                data, rate = sf.read(str(path), dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError, OSError) as exc:
                raise AudioError(f"{path}: cannot read audio ({exc})") from None
            if data.shape[0] == 0 or not np.all(np.isfinite(data)):
                raise AudioError(f"{path}: no audio samples, or NaN/Inf samples")
        else:
            audio = load_audio(path)
            data, rate = audio.samples[:, None], audio.sample_rate
        if rate < self.sample_rate:
            # Upsampling cannot restore the band above rate/2, so the windows would be judged
            # against a bank enrolled with sound the file never had (enroll and score refuse the
            # same through ``check_audio_rate``).
            raise AudioError(f"{path}: recorded at {int(rate)} Hz, below the source's {self.sample_rate} Hz: it holds "
                             f"no sound above {rate / 2:g} Hz; resampling cannot add it")
        data = resample(data, int(rate), self.sample_rate)
        if data.shape[1] != self.channels:
            data = np.repeat(data, self.channels, axis=1)
        return np.ascontiguousarray(data, dtype=np.float32)


def _file_channels(path: Path) -> int:
    try:
        return sf.info(str(path)).channels
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"{path}: cannot read audio ({exc})") from None


def make_source(config: SourceConfig, ring_seconds: float = 60.0) -> AudioSource:
    """The source for ``config.type``, holding ``ring_seconds`` of audio."""
    if config.type == "microphone":
        return MicrophoneSource(config, ring_seconds)
    return FileSource(config, ring_seconds)
