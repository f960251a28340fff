"""Shared fixtures: the real recordings in the workspace's shared/data tree, a private
PulseAudio server standing in for a sound card, and a real MQTT broker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.broker import Broker, free_port, tool

# The team's labelled recordings: ``../shared/data`` beside the repository, or wherever
# ASD_SHARED_DATA points (a clone elsewhere).
SHARED_DATA_ENV = "ASD_SHARED_DATA"
SHARED_DATA = Path(os.environ.get(SHARED_DATA_ENV) or Path(__file__).resolve().parents[1].parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder; skips the test where it is absent (e.g. a bare clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}: set {SHARED_DATA_ENV}=/path/to/shared/data to run this test")
    return SHARED_DATA


# --- a real MQTT broker (tests/broker.py) ------------------------------------------------------

@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Starts brokers: ``make()`` anonymous, ``make(users={"name": "password"})`` with a
    password file and anonymous access off, ``make(tls=(cert, key))`` over TLS. Every broker is
    stopped at teardown."""
    brokers: list[Broker] = []

    def make(users: dict[str, str] | None = None, tls: tuple[Path, Path] | None = None) -> Broker:
        tool("mosquitto")
        tool("mosquitto_sub")
        directory = tmp_path / f"mosquitto-{len(brokers)}"
        directory.mkdir()
        broker = Broker(directory, free_port(), dict(users or {}), tls)
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Broker]) -> Broker:
    """A running anonymous broker; ``.stop()``/``.start()`` restart it on the same port."""
    return mosquitto_factory()


class PulseServer:
    """A private PulseAudio server with a 16 kHz mono null sink, driven by the tests.

    It stands in for a sound card: clients reach it through ``PULSE_SERVER`` (set in this
    process's environment, which the ALSA ``pulse`` device that PortAudio opens reads), audio
    played into the sink with ``paplay`` comes back, paced in real time, from the sink's monitor,
    the default source. ``kill()`` and ``start()`` simulate a device going away and coming back.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "pulse.sock"
        self.log = directory / "pulseaudio.log"
        # HOME too, so the server's cookie and state land here rather than in the real home.
        self.env = {**os.environ, "XDG_RUNTIME_DIR": str(directory), "HOME": str(directory), "PULSE_SERVER": f"unix:{self.socket}"}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        command = [
            "pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--log-target=stderr",
            "-L", f"module-native-protocol-unix auth-anonymous=1 socket={self.socket}",
            "-L", "module-null-sink sink_name=vsink rate=16000 channels=1",
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if subprocess.run(["pactl", "info"], env=self.env, capture_output=True).returncode == 0:
                return
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"pulseaudio did not start; log:\n{self.log.read_text(errors='replace')[-2000:]}")

    def kill(self) -> None:
        """SIGKILL, like a crashed server or an unplugged device: no goodbye to clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
        self.socket.unlink(missing_ok=True)

    def play(self, path: Path, timeout: float = 30.0) -> None:
        """Play a file into the null sink in real time; returns when it has been played."""
        subprocess.run(["paplay", "--device=vsink", str(path)], env=self.env, check=True, timeout=timeout, capture_output=True)


@pytest.fixture(scope="session")
def pulse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PulseServer]:
    """A running ``PulseServer``, with ``PULSE_SERVER`` set for this process; skips where
    PulseAudio is not installed.

    PortAudio lists devices when ``sounddevice`` is first imported, so the environment must be
    in place before that; if something imported it earlier, devices are re-enumerated here.
    """
    missing = [tool for tool in ("pulseaudio", "pactl", "paplay") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"PulseAudio not installed (missing {', '.join(missing)})")
    server = PulseServer(tmp_path_factory.mktemp("pulse"))
    previous = os.environ.get("PULSE_SERVER")
    server.start()
    os.environ["PULSE_SERVER"] = server.env["PULSE_SERVER"]
    if "sounddevice" in sys.modules:
        from monitor.audio.sources import _refresh_devices

        _refresh_devices()
    try:
        yield server
    finally:
        server.kill()
        if previous is None:
            os.environ.pop("PULSE_SERVER", None)
        else:
            os.environ["PULSE_SERVER"] = previous


# --- daemons running in the background (tests/daemons.py) -------------------------------------

@pytest.fixture
def running(tmp_path: Path):
    """``running(config)`` starts a daemon with its main loop in a thread; every daemon started
    is stopped at teardown."""
    from monitor.service.daemon import Daemon

    started: list[tuple[Daemon, threading.Thread]] = []

    def start(config) -> Daemon:
        daemon = Daemon(config)
        daemon.start()
        runner = threading.Thread(target=daemon.run)
        runner.start()
        started.append((daemon, runner))
        return daemon

    yield start
    for daemon, runner in started:
        daemon.stop_event.set()
        runner.join()
        daemon.stop()
