"""A running daemon with its review page on a free loopback port, after a replay of the shipped
demo recordings (a real fan, MIMII) has raised an alert with a saved clip."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from monitor.bank.store import BankStore
from monitor.config import BackboneConfig, Config, WebConfig
from monitor.demo import bank_dir, demo_config, enroll_clips
from monitor.enrollment.files import enroll_files
from monitor.scoring.detector import Detector
from monitor.service.daemon import Daemon
from tests.daemons import events_of, wait_for

TOKEN = "page-token-123"


@dataclass
class ReviewSite:
    daemon: Daemon
    url: str
    token: str | None
    event_id: str  # the raised alert's
    clip: Path

    @property
    def state_dir(self) -> Path:
        return self.daemon.state_dir

    @property
    def store(self) -> BankStore:
        return BankStore(bank_dir(self.state_dir))


@pytest.fixture
def review_site(tmp_path: Path, running) -> Callable[..., ReviewSite]:
    """``review_site(token=True, broker=None)``: a daemon (logmel backbone, the demo's enrolled
    normal clips, the demo replay at 1000x) that has raised an alert, with the page enabled;
    ``token=False`` leaves the page without a token (read-only)."""

    def start(token: bool = True, broker=None) -> ReviewSite:
        token_file = None
        if token:
            token_file = tmp_path / "web-token"
            token_file.write_text(TOKEN + "\n")
        config = demo_config(tmp_path / "state", 1000.0, Config(backbones=[BackboneConfig("logmel")]))
        mqtt = replace(config.mqtt, enabled=broker is not None, port=broker.port if broker else 1883,
                       client_id=f"web-{tmp_path.name}")
        config = replace(config, mqtt=mqtt, web=WebConfig(enabled=True, port=0, token_file=token_file))
        enroll_files(Detector.from_config(config), BankStore(bank_dir(config.daemon.state_dir)), enroll_clips(),
                     "default")
        daemon = running(config)

        def raised() -> list[dict]:
            return [e["alert"] for e in events_of(daemon) if e["kind"] == "alert" and e["alert"]["type"] == "raise"]

        wait_for(lambda: bool(raised()) and daemon.replay_finished(), 60)
        alert = raised()[0]
        assert alert["clip"], alert
        return ReviewSite(daemon, f"http://127.0.0.1:{daemon.web.port}", TOKEN if token else None, alert["event_id"],
                          Path(alert["clip"]))

    return start


def review_events(site: ReviewSite) -> list[dict]:
    return [e for e in events_of(site.daemon) if e["kind"] == "review"]


def reviews_file(site: ReviewSite) -> list[dict]:
    path = site.state_dir / "reviews.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
