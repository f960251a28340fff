"""A fleet on one machine: sites of one daemon and one mosquitto each, every site broker bridged
to one central mosquitto with the shipped config/fleet/ files, and central alert consumers in a
shared subscription. Used by tests/fleet/ and benchmarks/fleet.py.

Each daemon is a real ``asd-monitor run`` process replaying the bundled MIMII fan recordings in
a loop, faster than real time: two faulty clips then two healthy ones, so that it raises and
clears an alert every four windows. The ground truth of what it raised is its own event log.
"""

from __future__ import annotations

import json
import re
import signal
import string
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from monitor.bank.store import BankStore
from monitor.config import Config, MqttConfig
from monitor.demo import DEMO_DIR, enroll_clips
from monitor.enrollment.files import enroll_files
from monitor.scoring.detector import Detector
from tests.broker import Broker, free_port
from tests.daemons import daemon_config, write_yaml
from tests.fleet.consumer import AlertConsumer, AlertKey, Arrival, first_arrivals
from tests.fleet.wan import CutKind, WanLink

ROOT = Path(__file__).resolve().parents[2]
FLEET_CONFIG = ROOT / "config" / "fleet"
SITE_BRIDGE = FLEET_CONFIG / "mosquitto-site-bridge.conf"
CENTRAL = FLEET_CONFIG / "mosquitto-central.conf"
MACHINE = "fan"
# Per loop: a raise on the second faulty window, a clear on the second healthy one.
REPLAY = [DEMO_DIR / "anomaly_00.flac", DEMO_DIR / "anomaly_01.flac", DEMO_DIR / "normal_07.flac", DEMO_DIR / "normal_08.flac"]
# With 7 enrolled windows ranks move in steps of 1/7 (see monitor/demo.py): alarm above 0.9.
METRICS_URL = re.compile(r"serving metrics on http://127\.0\.0\.1:(\d+)/metrics")
ALERTS = {"threshold": 0.9, "raise_count": 2, "raise_window": 2, "clear_threshold": 0.8, "clear_count": 2,
          "cooldown_seconds": 0.0}


def render(template: Path, **values: str) -> str:
    """A shipped config file with its ``${NAME}`` placeholders filled in, as envsubst would."""
    return string.Template(template.read_text()).substitute(values)


def _enrolled_bank(detector: Detector, directory: Path) -> BankStore:
    store = BankStore(directory)
    enroll_files(detector, store, enroll_clips(), "default")
    return store


@dataclass
class Site:
    """One site: a broker bridged to the centre over its WAN link and a daemon (``box``)
    publishing to it."""

    name: str
    directory: Path
    broker: Broker
    wan: WanLink
    config: Config
    config_path: Path
    process: subprocess.Popen | None = None

    @property
    def daemon(self) -> str:
        return self.config.daemon.name

    @property
    def state_dir(self) -> Path:
        return self.config.daemon.resolved_state_dir()

    @property
    def metrics_port(self) -> int | None:
        """The port the running daemon serves /metrics on (it picks a free one: a port chosen
        here could be taken by another process before the daemon binds it), from its log."""
        log = self.directory / "daemon.log"
        ports = METRICS_URL.findall(log.read_text(errors="replace")) if log.exists() else []
        return int(ports[-1]) if ports else None

    @property
    def status_topic(self) -> str:
        return f"{self.config.mqtt.topic_prefix}/{self.name}/{self.daemon}/status"

    def start_daemon(self) -> None:
        assert self.process is None, f"{self.name}: daemon already running"
        with open(self.directory / "daemon.log", "ab") as log:
            # -v: the log says which port the metrics endpoint took.
            self.process = subprocess.Popen([sys.executable, "-m", "monitor.cli", "run", "-v", "-c", str(self.config_path)],
                                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def stop_daemon(self, timeout: float = 60.0) -> int:
        """SIGTERM: the daemon drains its outbox (up to 5 s), says ``offline`` and exits."""
        return self._end(signal.SIGTERM, timeout)

    def kill_daemon(self) -> None:
        """SIGKILL: no goodbye; the broker publishes the daemon's will."""
        self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: int, timeout: float) -> int:
        process, self.process = self.process, None
        if process is None:
            return 0
        process.send_signal(sig)
        return process.wait(timeout)

    def raised(self) -> list[dict]:
        """Every alert (raise and clear) in the daemon's event log, with the time it was logged."""
        path = self.config.daemon.resolved_event_log()
        lines = path.read_text().splitlines() if path.exists() else []
        return [{**event["alert"], "logged": event["time"]} for event in map(json.loads, lines) if event["kind"] == "alert"]

    def keys(self) -> set[AlertKey]:
        return {(a["site"], a["event_id"], a["type"]) for a in self.raised()}


@dataclass
class Fleet:
    """``sites_count`` sites bridged to one central broker, with ``consumers_count`` members of
    one shared subscription group there (``shared=False``: plain subscriptions, see
    ``AlertConsumer``). ``start()`` brings everything up and returns once every bridge is
    connected; daemons start with ``start_daemons()``; ``close()`` stops everything (use
    ``contextlib.closing``)."""

    directory: Path
    sites_count: int = 3
    speed: float = 10.0
    consumers_count: int = 2
    shared: bool = True
    central: Broker = field(init=False)
    sites: list[Site] = field(default_factory=list, init=False)
    consumers: list[AlertConsumer] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        central_dir = self.directory / "central"
        central_dir.mkdir(parents=True)
        self.central = Broker(central_dir, free_port(), extra_config=CENTRAL.read_text())
        for i in range(self.sites_count):
            name = f"site{i + 1}"
            site_dir = self.directory / name
            broker_dir = site_dir / "mosquitto"
            broker_dir.mkdir(parents=True)
            wan = WanLink(self.central.port)
            bridge = render(SITE_BRIDGE, SITE=name, CENTRAL=f"127.0.0.1:{wan.port}")
            broker = Broker(broker_dir, free_port(), extra_config=bridge)
            base = daemon_config(site_dir, REPLAY, broker, loop=True, **ALERTS)
            source = replace(base.sources[0], speed=self.speed)
            config = replace(
                base, sources=[source], machines=[replace(base.machines[0], name=MACHINE)],
                daemon=replace(base.daemon, name=f"box-{name}"),
                mqtt=MqttConfig(port=broker.port, site=name, client_id=f"asd-box-{name}"))  # metrics: port 0
            self.sites.append(Site(name, site_dir, broker, wan, config, write_yaml(site_dir / "asd-monitor.yaml", config)))

    # --- bring up and down ---------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Central broker, consumers, site brokers (each bridge connected), and every site's
        bank enrolled from the bundled healthy clips (one enrollment, copied to the others)."""
        self.central.start()
        for i in range(self.consumers_count):
            consumer = AlertConsumer(self.central.port, f"alerting-{i + 1}", "alerting" if self.shared else None)
            consumer.start()
            self.consumers.append(consumer)
        bridged = self.bridges_connected()
        for site in self.sites:
            site.wan.start()
            site.broker.start()
        self.wait_bridges(bridged, timeout)
        first = self.sites[0]
        store = _enrolled_bank(Detector.from_config(first.config), first.config.machines[0].bank_dir(first.state_dir))
        archive = self.directory / "bank.tar.gz"
        store.export(archive)
        for site in self.sites[1:]:
            BankStore(site.config.machines[0].bank_dir(site.state_dir)).import_archive(archive)

    def start_daemons(self) -> None:
        for site in self.sites:
            site.start_daemon()

    def close(self) -> None:
        """Daemons (SIGTERM), consumers, site brokers, central broker; tolerant of any state."""
        for site in self.sites:
            try:
                site.stop_daemon(timeout=30)
            except subprocess.TimeoutExpired:
                site.kill_daemon()
        for consumer in self.consumers:
            consumer.stop()
        for site in self.sites:
            site.broker.stop()
            site.wan.stop()
        self.central.stop()

    # --- bridges ---------------------------------------------------------------------------------

    def bridges_connected(self) -> int:
        """How many bridge connections the central broker has accepted so far (its log)."""
        return sum(self.central.log.count(f" as asd-bridge-{site.name} ") for site in self.sites)

    def wait_bridges(self, before: int, timeout: float = 30.0) -> float:
        """Wait until every site's bridge connected again after ``bridges_connected()`` read
        ``before``; returns the seconds waited."""
        began = time.monotonic()
        wait_until(lambda: self.bridges_connected() >= before + len(self.sites), timeout,
                   lambda: f"bridges connected: {self.bridges_connected() - before} of {len(self.sites)}")
        return time.monotonic() - began

    def cut_wan(self, kind: CutKind = "reset") -> None:
        """Every site's WAN link down; the central broker and its consumers stay up."""
        for site in self.sites:
            site.wan.cut(kind)

    def restore_wan(self) -> float:
        """Every site's WAN link back; returns the time (epoch seconds)."""
        for site in self.sites:
            site.wan.restore()
        return time.time()

    def restart_central(self, down_seconds: float) -> float:
        """Stop the central broker (the WAN cut), keep it down, start it again; returns the time
        (epoch seconds) it accepted connections again."""
        self.central.stop()
        time.sleep(down_seconds)
        self.central.start()
        return time.time()

    # --- what arrived ------------------------------------------------------------------------------

    def truth(self) -> set[AlertKey]:
        """Every alert the daemons logged (their event logs: the ground truth)."""
        return set().union(*(site.keys() for site in self.sites))

    def arrivals(self) -> list[Arrival]:
        return [a for consumer in self.consumers for a in consumer.arrivals()]

    def received(self) -> set[AlertKey]:
        return set(first_arrivals(self.arrivals()))

    def wait_delivered(self, expected: set[AlertKey], timeout: float = 60.0) -> None:
        wait_until(lambda: expected <= self.received(), timeout,
                   lambda: f"{len(expected - self.received())} of {len(expected)} alerts not received: "
                           f"{sorted(expected - self.received())[:4]}")

    def wait_alerts(self, per_site: int, timeout: float = 60.0) -> None:
        """Until every site's daemon has logged at least ``per_site`` more alerts than now."""
        start = {site.name: len(site.raised()) for site in self.sites}
        wait_until(lambda: all(len(site.raised()) >= start[site.name] + per_site for site in self.sites), timeout,
                   lambda: "alerts logged: " + ", ".join(f"{s.name} {len(s.raised()) - start[s.name]}" for s in self.sites))


def wait_until(predicate: Callable[[], bool], timeout: float, describe: Callable[[], str]) -> None:
    """Poll ``predicate`` every 0.1 s; fail after ``timeout`` seconds with ``describe()``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s: {describe()}")
        time.sleep(0.1)
