"""Shared fixtures: the real recordings in the workspace's shared/data tree, a private
PulseAudio server standing in for a sound card, and a real MQTT broker."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ``../shared/data`` beside the repository; skips the test where it is absent (e.g. a bare clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


# --- a real MQTT broker ----------------------------------------------------------------------------
# The MQTT tests run against a real mosquitto on 127.0.0.1 (no mocks: the behaviour under test is
# what a broker does on restart, on kill and on a refused login). Assertions use what an
# independent subscriber (mosquitto_sub) received, never what the publisher believes it sent.

_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def _tool(name: str) -> str:
    """The path of a mosquitto binary, or a skip: the package is a test dependency from apt."""
    path = shutil.which(name, path=_SBIN_PATH)
    if path is None:
        pytest.skip(f"{name} not installed (apt-get install mosquitto mosquitto-clients)")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Broker:
    """A mosquitto process on a fixed 127.0.0.1 port, restartable on that same port."""

    directory: Path
    port: int
    users: dict[str, str] = field(default_factory=dict)  # empty: anonymous access
    tls: tuple[Path, Path] | None = None  # (certificate, key): the listener speaks TLS only
    process: subprocess.Popen | None = None

    @property
    def log(self) -> str:
        path = self.directory / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def write_config(self) -> Path:
        lines = [
            f"listener {self.port} 127.0.0.1",
            *([f"certfile {self.tls[0]}", f"keyfile {self.tls[1]}"] if self.tls else []),
            "persistence true",
            f"persistence_location {self.directory}/",
            "autosave_interval 1",
            # A durable subscriber (see register) also gets QoS 0 messages sent while it was away.
            "queue_qos0_messages true",
            f"log_dest file {self.directory / 'mosquitto.log'}",  # flushed per line, unlike stdout
            "log_type all",
        ]
        if os.geteuid() == 0:
            # As root mosquitto drops to user "mosquitto", which cannot write a root-owned dir.
            lines.append("user root")
        if self.users:
            passwords = self.directory / "passwd"
            for i, (user, password) in enumerate(self.users.items()):
                create = ["-c"] if i == 0 else []
                subprocess.run([_tool("mosquitto_passwd"), "-b", *create, str(passwords), user, password], check=True, capture_output=True, timeout=10)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        config = self.directory / "mosquitto.conf"
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self, timeout: float = 10.0) -> None:
        assert self.process is None, "broker already running"
        config = self.write_config()
        starts = self.log.count(" running")
        with open(self.directory / "console.log", "ab") as console:  # errors before logging starts
            self.process = subprocess.Popen([_tool("mosquitto"), "-c", str(config)], stdout=console, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                # A taken port makes mosquitto exit 1; a bare port check would then succeed
                # against whatever holds the port.
                code, self.process = self.process.returncode, None
                console = (self.directory / "console.log").read_text(errors="replace")
                raise RuntimeError(f"mosquitto on port {self.port} exited with {code}: {console[-300:]} {self.log[-300:]}")
            if self.log.count(" running") > starts and self._accepts():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mosquitto on port {self.port} not ready within {timeout} s")
            time.sleep(0.02)

    def _accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        """SIGTERM: a clean shutdown that saves the persistence file (retained messages)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash; retained messages older than autosave_interval survive."""
        self._end(signal.SIGKILL)

    def _end(self, sig: int) -> None:
        if self.process is None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def _client_args(self) -> list[str]:
        args = ["-h", "127.0.0.1", "-p", str(self.port), "-V", "mqttv311"]
        if self.tls:
            args += ["--cafile", str(self.tls[0])]  # the certificate is self-signed
        if self.users:
            user, password = next(iter(self.users.items()))
            args += ["-u", user, "-P", password]
        return args

    def register(self, topic: str, client_id: str) -> None:
        """Create a durable (clean session off) QoS 1 subscription: the broker keeps what
        arrives for it until :meth:`collect` with the same ``client_id`` picks it up, so a test
        never races a subscriber against the publisher, across broker restarts included."""
        subprocess.run(
            [_tool("mosquitto_sub"), *self._client_args(), "-c", "-i", client_id, "-q", "1", "-t", topic, "-E"],
            check=True, capture_output=True, timeout=10,
        )

    def collect(self, topic: str, count: int, timeout: float = 10.0, client_id: str | None = None) -> list[tuple[bool, str, str]]:
        """Up to ``count`` messages as (retained, topic, payload), waiting at most ``timeout``
        seconds. With ``client_id``, resumes the durable session made by :meth:`register`."""
        session = ["-c", "-i", client_id] if client_id else []
        result = subprocess.run(
            [_tool("mosquitto_sub"), *self._client_args(), *session, "-q", "1", "-t", topic,
             "-F", "%r %t %p", "-C", str(count), "-W", str(max(1, round(timeout)))],
            capture_output=True, encoding="utf-8", timeout=timeout + 10,
        )
        received = []
        for line in result.stdout.splitlines():
            retained, name, payload = line.split(" ", 2)
            received.append((retained == "1", name, payload))
        return received

    def publish(self, topic: str, payload: str) -> None:
        """Publish one QoS 1 message, as another client of the plant would."""
        subprocess.run([_tool("mosquitto_pub"), *self._client_args(), "-q", "1", "-t", topic, "-m", payload], check=True, capture_output=True, timeout=10)

    def retained(self, topic: str, timeout: float = 2.0) -> str | None:
        """The retained payload of ``topic`` now, or None."""
        received = self.collect(topic, 1, timeout)
        return received[0][2] if received and received[0][0] else None


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Starts brokers: ``make()`` anonymous, ``make(users={"name": "password"})`` with a
    password file and anonymous access off, ``make(tls=(cert, key))`` over TLS. Every broker is
    stopped at teardown."""
    brokers: list[Broker] = []

    def make(users: dict[str, str] | None = None, tls: tuple[Path, Path] | None = None) -> Broker:
        _tool("mosquitto")
        _tool("mosquitto_sub")
        directory = tmp_path / f"mosquitto-{len(brokers)}"
        directory.mkdir()
        broker = Broker(directory, _free_port(), dict(users or {}), tls)
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
        from monitor.sources import _refresh_devices

        _refresh_devices()
    try:
        yield server
    finally:
        server.kill()
        if previous is None:
            os.environ.pop("PULSE_SERVER", None)
        else:
            os.environ["PULSE_SERVER"] = previous
