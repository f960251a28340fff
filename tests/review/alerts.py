"""Alerts as the daemon leaves them behind, for the review tests: the clip saved by the real
``ClipStore`` and the raise written by the real ``EventLog``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from monitor.config import Config
from monitor.outputs.clips import ClipStore
from monitor.outputs.events import EventLog
from monitor.outputs.messages import AlertEvent, BackboneScore, iso_time

START = 1_795_923_908.0


def raise_alert(config: Config, machine: str, samples: np.ndarray, rate: int, event_id: str,
                start: float = START, clip: str | None = None, fused: float = 1.0) -> AlertEvent:
    """Save ``samples`` as the alert's clip (or name ``clip`` instead) and log the raise."""
    state = config.daemon.resolved_state_dir()
    if clip is None:
        saved = ClipStore(state / "clips", config.clips).save(machine, start, samples, rate)
        clip = str(saved.path)
    end = start + len(samples) / rate
    alert = AlertEvent(event_id, "raise", "test", machine, iso_time(start), iso_time(end), fused,
                       config.alerts.threshold, {b.model: BackboneScore(50.0, fused) for b in config.backbones},
                       "default", clip, None)
    with EventLog(config.daemon.event_log or state / "events.jsonl") as events:
        events.write("alert", alert=alert)
    return alert


def clip_path(alert: AlertEvent) -> Path:
    assert alert.clip is not None
    return Path(alert.clip)
