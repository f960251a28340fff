"""A private mosquitto broker on a free 127.0.0.1 port, for the tests (fixtures in conftest.py)
and the benchmarks.

The MQTT tests run against a real mosquitto (no mocks: the behaviour under test is what a
broker does on restart, on kill and on a refused login). Assertions use what an independent
subscriber (mosquitto_sub) received, never what the publisher believes it sent.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def tool(name: str) -> str:
    """The path of a mosquitto binary, or a skip: the package is a test dependency from apt."""
    path = shutil.which(name, path=SBIN_PATH)
    if path is None:
        pytest.skip(f"{name} not installed (apt-get install mosquitto mosquitto-clients)")
    return path


_HANDED_OUT: set[int] = set()  # ports given out in this process, never given twice


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free 127.0.0.1 port, for a listener bound later (a broker started after relays and
    clients connected). Drawn below the kernel's ephemeral range: an outgoing connection's local
    port comes from that range, so it cannot take the port between now and the bind (a port from
    ``bind(0)`` lies inside it, and the fleet tests saw one taken that way)."""
    low = _ephemeral_low()
    candidates = list(range(max(1024, low - 12000), low))
    random.shuffle(candidates)
    for port in candidates:
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port below {low}")


@dataclass
class Broker:
    """A mosquitto process on a fixed 127.0.0.1 port, restartable on that same port."""

    directory: Path
    port: int
    users: dict[str, str] = field(default_factory=dict)  # empty: anonymous access
    tls: tuple[Path, Path] | None = None  # (certificate, key): the listener speaks TLS only
    process: subprocess.Popen | None = None
    # mosquitto.conf lines appended after the generated ones, as a conf.d file would be (its
    # settings win over the defaults above): a bridge, queue limits (tests/fleet/).
    extra_config: str = ""

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
                subprocess.run([tool("mosquitto_passwd"), "-b", *create, str(passwords), user, password], check=True, capture_output=True, timeout=10)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        if self.extra_config:
            lines.append(self.extra_config.rstrip("\n"))
        config = self.directory / "mosquitto.conf"
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self, timeout: float = 10.0) -> None:
        assert self.process is None, "broker already running"
        config = self.write_config()
        starts = self.log.count(" running")
        with open(self.directory / "console.log", "ab") as console:  # errors before logging starts
            self.process = subprocess.Popen([tool("mosquitto"), "-c", str(config)], stdout=console, stderr=subprocess.STDOUT)
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

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds the broker has used so far (from /proc)."""
        if self.process is None:
            return None
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

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
            [tool("mosquitto_sub"), *self._client_args(), "-c", "-i", client_id, "-q", "1", "-t", topic, "-E"],
            check=True, capture_output=True, timeout=10,
        )

    def collect(self, topic: str, count: int, timeout: float = 10.0, client_id: str | None = None) -> list[tuple[bool, str, str]]:
        """Up to ``count`` messages as (retained, topic, payload), waiting at most ``timeout``
        seconds. With ``client_id``, resumes the durable session made by :meth:`register`."""
        session = ["-c", "-i", client_id] if client_id else []
        result = subprocess.run(
            [tool("mosquitto_sub"), *self._client_args(), *session, "-q", "1", "-t", topic,
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
        subprocess.run([tool("mosquitto_pub"), *self._client_args(), "-q", "1", "-t", topic, "-m", payload], check=True, capture_output=True, timeout=10)

    def retained(self, topic: str, timeout: float = 2.0) -> str | None:
        """The retained payload of ``topic`` now, or None."""
        received = self.collect(topic, 1, timeout)
        return received[0][2] if received and received[0][0] else None
