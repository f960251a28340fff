"""Daemons for the tests: small configs replaying synthetic machine sound, enrolled banks, and
waiting for what a running daemon does."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import yaml

from monitor.bank.store import BankStore
from monitor.config import (
    AlertConfig,
    BackboneConfig,
    Config,
    DaemonConfig,
    MachineConfig,
    MetricsConfig,
    MqttConfig,
    SourceConfig,
)
from monitor.enrollment.files import enroll_files
from monitor.scoring.detector import Detector
from monitor.service.daemon import Daemon
from tests.synth import machine_sound, write_clip


def clips(folder: Path, kinds: str, seconds: float = 10.0, seed: int = 100) -> list[Path]:
    """One clip per letter: n = normal, f = faulty."""
    return [write_clip(folder / f"{i:02d}_{k}.flac", machine_sound(seed + i, seconds, fault=k == "f"))
            for i, k in enumerate(kinds)]


def daemon_config(tmp_path: Path, paths: list[Path], broker=None, backbone: str = "logmel", loop: bool = False,
                  **alerts) -> Config:
    alert_cfg = AlertConfig(**({"threshold": 0.9, "raise_count": 2, "raise_window": 3, "clear_threshold": 0.8,
                                "clear_count": 2, "cooldown_seconds": 0.0} | alerts))
    mqtt = MqttConfig(enabled=broker is not None, port=broker.port if broker else 1883, site="test",
                      client_id=f"daemon-{tmp_path.name}")
    return Config(
        backbones=[BackboneConfig(backbone)],
        alerts=alert_cfg,
        daemon=DaemonConfig(name="asd-test", state_dir=tmp_path / "state", hop_seconds=10.0),
        sources=[SourceConfig(name="replay", type="file", paths=paths, speed=1000.0, loop=loop)],
        machines=[MachineConfig("motor", "replay")],
        mqtt=mqtt,
        metrics=MetricsConfig(port=0),
    )


def enroll(config: Config, folder: Path, n: int = 6) -> None:
    normals = clips(folder, "n" * n, seed=0)
    store = BankStore(config.daemon.state_dir / "banks" / "motor")
    enroll_files(Detector.from_config(config), store, normals, "default")


def run_to_end(daemon: Daemon, timeout: float = 120.0) -> None:
    daemon.start()
    runner = threading.Thread(target=daemon.run)
    runner.start()
    runner.join(timeout)
    assert not runner.is_alive(), "the replay did not finish in time"
    daemon.stop()


def write_yaml(path: Path, config: Config) -> Path:
    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list):
            return [plain(v) for v in value]
        if hasattr(value, "__dataclass_fields__"):
            return {k: plain(getattr(value, k)) for k in value.__dataclass_fields__}
        return value

    path.write_text(yaml.safe_dump(plain(config)))
    return path


def events_of(daemon: Daemon) -> list[dict]:
    path = daemon.state_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
