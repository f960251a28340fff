"""The bundled demo: real recordings of one fan (MIMII, CC BY-SA 4.0: see assets/NOTICE).

Normal clips 00-06 are enrolled; the daemon then replays 07-09 (held-out healthy audio) followed
by anomaly_00-04 (the same fan with a fault) through the whole pipeline, so a fresh machine
without a microphone shows windows, ranks, an alert, metrics and (when a broker is there) MQTT.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from monitor.config import (
    Config,
    DaemonConfig,
    MachineConfig,
    MetricsConfig,
    MqttConfig,
    SourceConfig,
)
from monitor.outputs.fanout import WindowReport
from monitor.scoring.backbone import ASSETS

DEMO_DIR = ASSETS / "demo" / "mimii-fan"
ENROLLED = 7
MACHINE = "demo-fan"
BROKER = ("127.0.0.1", 1883)


def _clips(label: str) -> list[Path]:
    return sorted(DEMO_DIR.glob(f"{label}_*.flac"))


def enroll_clips() -> list[Path]:
    return _clips("normal")[:ENROLLED]


def replay_clips() -> list[Path]:
    return _clips("normal")[ENROLLED:] + _clips("anomaly")


def healthy_seconds() -> float:
    """How long the replay's healthy part lasts: the fault begins after it."""
    import soundfile as sf

    return sum(sf.info(str(p)).duration for p in _clips("normal")[ENROLLED:])


def fault_marker(config: Config, replay_start: Callable[[], float | None]) -> Callable[[WindowReport], None]:
    """A window listener that prints one line where the replayed audio turns faulty: after the
    last window of healthy audio only, before the first that holds some of the fault."""
    healthy, hop = healthy_seconds(), config.daemon.hop_seconds
    shown = False

    def mark(report: WindowReport) -> None:
        nonlocal shown
        start = replay_start()
        if shown or start is None:
            return
        if report.end - start + hop > healthy + 1e-6:
            shown = True
            print(f"-- the fault begins {healthy:g} s into the replay: the next windows hold the faulty fan --",
                  flush=True)

    return mark


def explain(config: Config) -> str:
    """What the console lines mean, and why the demo's threshold is not the default one."""
    return (f"   each line: window start, fused rank (share of enrolled normal windows that scored lower), then per\n"
            f"   backbone its rank and, in brackets, its raw KNN distance to the nearest enrolled window.\n"
            f"   ANOMALOUS above rank {config.alerts.threshold:g}; an alert needs {config.alerts.raise_count} of "
            f"{config.alerts.raise_window} windows. The default threshold is 0.99, but only {ENROLLED} recordings\n"
            f"   are enrolled here, so ranks move in steps of 1/{ENROLLED} and 0.99 would mean 'above every enrolled\n"
            f"   window'. Enroll minutes of audio in production.")


def bank_dir(state_dir: Path) -> Path:
    return state_dir / "banks" / MACHINE


def broker_reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def demo_config(state_dir: Path, speed: float, base: Config) -> Config:
    """``base`` (built-in defaults or the user's --config) with the demo's source and machine.

    Windows every 5 s; metrics on a free loopback port; MQTT only when a broker answers on
    127.0.0.1:1883 (otherwise the outbox would just fill for nobody). The demo enrolls only 70 s
    of audio, so its rank reference holds 7 values (a resolution of 1/7): a rank threshold of
    0.99 would mean "above every enrolled window", which one odd enrolled clip can make
    unreachable; it alarms above 0.9 instead. Enroll minutes of audio in production.
    """
    source = SourceConfig(name="replay", type="file", paths=replay_clips(), speed=speed)
    mqtt = MqttConfig(enabled=broker_reachable(*BROKER), host=BROKER[0], port=BROKER[1], site="demo")
    return replace(
        base,
        sources=[source],
        machines=[MachineConfig(MACHINE, "replay")],
        daemon=DaemonConfig(name="asd-demo", state_dir=state_dir, hop_seconds=5.0),
        mqtt=mqtt,
        metrics=MetricsConfig(port=0),
        alerts=replace(base.alerts, threshold=0.9, clear_threshold=0.8),
    )


def describe_outputs(config: Config) -> str:
    mqtt = (f"MQTT to {config.mqtt.host}:{config.mqtt.port} under {config.mqtt.topic_prefix}/{config.mqtt.site}/"
            if config.mqtt.enabled else "no MQTT broker on 127.0.0.1:1883, not publishing")
    return f"{mqtt}; Prometheus metrics on a free loopback port while it runs (URL below)"
